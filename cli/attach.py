"""`tt attach`: the user's terminal connected to an agent's live pseudo-terminal (the runner's
attach server, supervisor/attach_server.py): keystrokes and window size out, output in."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys

from tinytown.supervisor.attach_protocol import FrameReader, frame, parse_json
from tinytown.supervisor.config import Config, validate_name
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.procutil import drain

from tinytown.cli.entry import cannot_reach


class KeyMatcher:
    """Finds the detach sequence in typed bytes; bytes that turn out not to be part of it pass on."""

    def __init__(self, keys: bytes):
        self.keys = keys
        self.held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(bytes to send on, whether the sequence was completed)."""
        out = bytearray()
        for byte in data:
            self.held += bytes([byte])
            while self.held and not self.keys.startswith(self.held):
                out.append(self.held[0])
                self.held = self.held[1:]
            if self.held == self.keys:
                self.held = b""
                return bytes(out), True
        return bytes(out), False


def describe_keys(spec: str) -> str:
    """"ctrl-p,ctrl-q" -> "Ctrl-P Ctrl-Q", for the line printed on attach."""
    words = []
    for item in spec.split(","):
        item = item.strip()
        words.append("Ctrl-" + item[5:].upper() if item.lower().startswith("ctrl-") else item)
    return " ".join(words)


def attach(config: Config, name: str, keys: bytes, keys_spec: str, read_only: bool = False,
           via_redis: bool = False, stdin: int = 0, stdout: int = 1) -> int:
    """Run one attach session in this terminal; the exit code (0 detached or agent stopped, 1 lost).

    The agent's runner is reached through its unix socket when that is on this machine, else
    (or with via_redis) through the town's Redis (supervisor/remote_attach.py); the terminal loop
    is the same either way."""
    validate_name("agent", name)
    from tinytown.supervisor.remote_attach import attach_route
    if via_redis or attach_route(config, name) == "redis":
        return _attach_via_redis(config, name, keys, keys_spec, read_only, stdin, stdout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(config.attach_socket(name)))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise TinytownError(_not_running(config, name)) from None
    except PermissionError:
        sock.close()
        raise TinytownError(f"permission denied on {config.attach_socket(name)} (only its owner can attach)") from None
    _refuse_another_users_runner(sock, config.attach_socket(name))
    try:
        interactive = _need_terminal(read_only, stdin)
    except TinytownError:
        sock.close()
        raise
    view = _Terminal(sock, name, keys, read_only, interactive, stdin, stdout)
    return view.run(describe_keys(keys_spec))


def _need_terminal(read_only: bool, stdin: int) -> bool:
    """Whether input comes from a terminal; TinytownError if it must and does not."""
    interactive = os.isatty(stdin)
    if not read_only and not interactive:
        raise TinytownError("tt attach needs a terminal for input (use --read-only to watch from a script)")
    return interactive


def _attach_via_redis(config: Config, name: str, keys: bytes, keys_spec: str, read_only: bool,
                      stdin: int, stdout: int) -> int:
    """The same session, its runner reached through the town's Redis (its socket is not here)."""
    from tinytown.supervisor.remote_attach import NOT_RUNNING, RedisBridge
    from tinytown.supervisor.resp import RespConnectionError, RespError
    from tinytown.supervisor.town import Town
    try:
        town = Town(config)
        agent = town.agent(name)
    except RespError as exc:
        if not config.redis_url:
            raise TinytownError(_not_running(config, name)) from None
        if isinstance(exc, RespConnectionError):  # (a shared Redis: no supervisor here says whether the town runs)
            raise cannot_reach(config) from None
        raise  # (a refused password, said as every command says it)
    if agent.state in NOT_RUNNING:
        raise TinytownError(f"agent {name} is not running (state {agent.state}); attach works once its runner is up")
    if town.hosts.lost(agent.host):  # (its record still says what it was doing when the host went)
        raise TinytownError(f"{name}'s host {agent.host} is lost: attach works once it is back")
    interactive = _need_terminal(read_only, stdin)
    bridge = RedisBridge(config, agent)
    view = _Terminal(bridge.open(), name, keys, read_only, interactive, stdin, stdout)
    try:
        return view.run(describe_keys(keys_spec))
    finally:
        bridge.close()


def _refuse_another_users_runner(sock: socket.socket, path) -> None:
    """A socket served by another user is not a runner of this town (one in a /tmp/tt-<uid> a
    neighbour made first, for a long town path): it would get your keystrokes and write what it
    likes to your terminal. The runner checks the viewer the same way."""
    import struct
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    if uid != os.getuid():
        sock.close()
        raise TinytownError(f"{path} is served by another user (uid {uid}), not by this town's runner: "
                            "nothing was sent to it")


def _not_running(config: Config, name: str) -> str:
    from tinytown.supervisor.lifecycle import running_pid
    from tinytown.supervisor.town import Town
    if not running_pid(config):  # the socket is local, so the town would be too
        return f"town {config.name!r} is not running (start it with `tt start`)"
    try:
        agent = Town(config).agent(name)
    except TinytownError:
        raise
    except Exception:  # noqa: BLE001 - Redis unreachable
        return f"town {config.name!r} is not running (start it with `tt start`)"
    return f"agent {name} is not running (state {agent.state}); attach works once its runner is up"


class _Terminal:
    """The client loop: keystrokes and window size out, output and state in; raw mode meanwhile."""

    def __init__(self, sock, name, keys, read_only, interactive, stdin, stdout):
        self.sock, self.name, self.read_only = sock, name, read_only
        self.interactive, self.stdin, self.stdout = interactive, stdin, stdout
        self.matcher = KeyMatcher(keys)
        self.styled = os.isatty(stdout)
        self.at_line_start = True
        self.stopped = False
        self.screen_reset = False
        self.alternate = False     # the CLI switched the terminal to its alternate screen

    def run(self, keys_label: str) -> int:
        import termios
        import tty
        saved = termios.tcgetattr(self.stdin) if self.interactive else None
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: None)
        old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            if saved is not None:
                tty.setraw(self.stdin, termios.TCSANOW)
            self._send(b"H", json.dumps({"mode": "ro" if self.read_only else "rw", **self._size()}).encode())
            mode = " (read-only)" if self.read_only else ""
            self._say(f"attached to {self.name}{mode}; {keys_label} detaches (the agent keeps running)")
            return self._loop(wake_r)
        finally:
            self._reset_screen()  # (left by an exception or SIGTERM too)
            if saved is not None:
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, saved)
            signal.signal(signal.SIGWINCH, old_winch)
            signal.signal(signal.SIGTERM, old_term)
            signal.set_wakeup_fd(old_fd)
            for fd in (wake_r, wake_w):
                os.close(fd)
            self.sock.close()

    def _loop(self, wake_r: int) -> int:
        import select
        reader = FrameReader()
        watch = [self.sock, wake_r] + ([self.stdin] if self.interactive else [])
        while True:
            ready, _, _ = select.select(watch, [], [])
            if wake_r in ready:
                drain(wake_r)
                if not self.read_only:
                    self._send(b"W", json.dumps(self._size()).encode())
            if self.stdin in ready:
                typed = os.read(self.stdin, 4096)
                send, detach = self.matcher.feed(typed) if typed else (b"", True)
                if self.read_only and b"\x03" in typed:
                    detach = True  # nothing is sent in read-only mode, so Ctrl-C may as well leave
                if send and not self.read_only:
                    self._send(b"I", send)
                if detach:
                    self._reset_screen()
                    self._say(f"detached from {self.name} (it keeps running)")
                    return 0
            if self.sock in ready:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._reset_screen()
                    if self.stopped:
                        return 0
                    self._say(f"lost the connection to {self.name}'s runner")
                    return 1
                for kind, payload in reader.feed(data):
                    if kind == b"O":
                        self._write(payload)
                    elif kind == b"S":
                        self._show_state(parse_json(payload))

    # What a full-screen CLI may have switched on, switched off again: the main screen, the cursor,
    # mouse reporting (all its modes), bracketed paste, application cursor keys and keypad, colours.
    SCREEN_RESET = b"\x1b[?25h\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?2004l\x1b[?1l\x1b>\x1b[0m"
    ALTERNATE_ON = re.compile(rb"\x1b\[\?(?:1049|1047|47)([hl])")
    LEAVE_ALTERNATE = b"\x1b[?1049l"  # (sent only if the CLI is on it: from the main screen, xterm
    #                                    would restore a cursor position nobody saved)

    def _reset_screen(self) -> None:
        """Leave the user's terminal as it was before the attach, whatever mode the CLI left it in
        (once; only a terminal gets it). A terminal gone meanwhile is no error."""
        if self.styled and not self.screen_reset:
            self.screen_reset = True
            try:
                self._write((self.LEAVE_ALTERNATE if self.alternate else b"") + self.SCREEN_RESET)
            except OSError:
                return
            self.at_line_start = False  # (the CLI's last line may be on screen again)

    def _show_state(self, msg: dict) -> None:
        if msg.get("dropped"):
            self._say(f"{msg['dropped']} bytes of output skipped: this terminal could not keep up")
        elif msg.get("state") == "working":
            self._say(f"{self.name} is working on task {msg.get('task', '')}")
        elif msg.get("state") == "idle":
            self._say(f"{self.name} is idle: waiting for the next task")
        elif msg.get("state") == "stopped":
            self.stopped = True
            self._say(f"{self.name}'s runner stopped ({msg.get('reason', '')})")

    def _size(self) -> dict:
        try:
            cols, rows = os.get_terminal_size(self.stdout)
        except OSError:
            return {}
        return {"rows": rows, "cols": cols}

    def _send(self, kind: bytes, payload: bytes) -> None:
        try:
            self.sock.sendall(frame(kind, payload))
        except OSError:
            pass  # noticed as end of input on the next read

    def _write(self, data: bytes) -> None:
        switched = self.ALTERNATE_ON.findall(data)
        if switched:
            self.alternate = switched[-1] == b"h"
        view = memoryview(data)
        while view:
            view = view[os.write(self.stdout, view):]
        if data:
            self.at_line_start = data.endswith(b"\n")

    def _say(self, text: str) -> None:
        line = f"[tt] {text}"
        if self.styled:
            line = f"\x1b[7m{line}\x1b[0m"
        self._write(("" if self.at_line_start else "\r\n").encode() + line.encode() + b"\r\n")
