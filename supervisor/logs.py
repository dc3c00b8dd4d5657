"""Agent log files: append the CLI's bytes as they come, rotate by size, keep a few backups."""
from __future__ import annotations

import os
import time

from .config import Config


class AgentLog:
    """`.tt/logs/<agent>.log`, written unbuffered so a follower sees a line within milliseconds."""

    def __init__(self, config: Config, agent_name: str):
        self.path = config.log_file(agent_name)
        self.max_bytes = config.logs.max_bytes
        self.backups = config.logs.backups
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = -1
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.max_bytes and self.size > 0:
            self.rotate()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)

    def note(self, text: str) -> None:
        """A line of Tinytown's own (task started/finished), marked so it stands out from CLI output."""
        stamp = time.strftime("%H:%M:%S")
        self.write(f"\n[tt {stamp}] {text}\n".encode("utf-8", "replace"))

    def rotate(self) -> None:
        """agent.log -> agent.log.1 -> ... ; a follower notices the new inode and reopens."""
        os.close(self.fd)
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            os.truncate(self.path, 0)
        self._open()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def tail_text(path, max_lines: int = 5, max_chars: int = 400) -> str:
    """The last lines of a log file, for a failed agent's reason."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            data = fh.read()
    except OSError:
        return ""
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return " | ".join(lines[-max_lines:])[-max_chars:]
