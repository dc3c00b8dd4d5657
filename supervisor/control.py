"""The supervisor's ear: a raw pub/sub connection whose only job is to make select() wake up.

A message on the control channel means "desired state changed, reconcile"; what changed is read
from Redis itself, so a missed or merged nudge loses nothing.
"""
from __future__ import annotations

import socket

from .config import Config


class ControlChannel:
    def __init__(self, config: Config, channel: str):
        self.config = config
        self.channel = channel.encode()
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        if self.config.use_socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.config.redis_socket))
        else:
            sock = socket.create_connection((self.config.redis_host, self.config.redis_port))
        command = b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(self.channel), self.channel)
        password = self.config.redis_password
        if password is not None:  # (its reply is read and dropped with the rest by drain())
            secret = password.encode()
            command = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + command
        sock.sendall(command)
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Read whatever arrived; False if the connection closed (Redis went away)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
