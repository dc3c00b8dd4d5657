"""`tt attach`: a user's terminal connected to an agent's live pseudo-terminal.

Each runner serves a unix socket (owner-only folder, peers checked by uid). A viewer says hello
(read-write or read-only, its window size), gets the recent output replayed and the agent's state,
then live output; a read-write viewer's keystrokes and window size go to the CLI's pty.

The server runs in a thread of the runner. An idle runner's main thread is blocked in BLMOVE
(woken by Redis, not by file descriptors), and viewers must be able to connect then too; a thread
keeps the runner's loop and its Redis handling as they are. It is safe here: the runner only forks
through pexpect, which execs at once, and the thread blocks every signal so stop signals still
interrupt the main thread's wait. The runner never waits for a viewer: output is queued per viewer
and a viewer too slow to take it loses output (and is told how much), never the CLI's time.

Frames both ways: 1 byte kind + 4 bytes big-endian length + payload.
  viewer -> runner: H hello (JSON: mode, rows, cols), I keystrokes, W window size (JSON)
  runner -> viewer: O output bytes, S state (JSON: state, task, reason, dropped)
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
from collections import deque
from pathlib import Path

from .config import Config, validate_name
from .errors import TinytownError
from .logs import keep_tail
from .procutil import drain

FRAME = struct.Struct("!cI")
MAX_FRAME = 1024 * 1024
REPLAY_BYTES = 32 * 1024       # recent output a new viewer sees first
VIEWER_BUFFER = 1024 * 1024    # queued for one viewer before its output is dropped
MAX_VIEWERS = 32


def frame(kind: bytes, payload: bytes) -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


class FrameReader:
    """Splits a byte stream into (kind, payload) frames; ValueError on a frame too large."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buf += data
        frames = []
        while len(self.buf) >= FRAME.size:
            kind, size = FRAME.unpack_from(self.buf)
            if size > MAX_FRAME:
                raise ValueError("frame too large")
            if len(self.buf) < FRAME.size + size:
                break
            frames.append((kind, bytes(self.buf[FRAME.size:FRAME.size + size])))
            del self.buf[:FRAME.size + size]
        return frames


# --- the runner's side ------------------------------------------------------------------------
class _Viewer:
    def __init__(self, sock: socket.socket, serial: int):
        self.sock = sock
        self.reader = FrameReader()
        self.out: deque[bytes] = deque()
        self.offset = 0          # bytes of out[0] already sent
        self.queued = 0
        self.dropped = 0
        self.mode = ""           # "" until hello, then "rw" or "ro"
        self.size: tuple[int, int] | None = None
        self.size_serial = serial
        self.closed = False

    def queue(self, kind: bytes, payload: bytes, droppable: bool = False) -> None:
        if droppable and self.queued > VIEWER_BUFFER:
            self.dropped += len(payload)
            return
        if self.dropped:  # say what was skipped where it was skipped
            self._append(frame(b"S", json.dumps({"dropped": self.dropped}).encode()))
            self.dropped = 0
        self._append(frame(kind, payload))

    def _append(self, data: bytes) -> None:
        self.out.append(data)
        self.queued += len(data)

    def flush(self) -> None:
        """Send what the socket takes now; never blocks. MSG_NOSIGNAL: a gone viewer is an error, not SIGPIPE."""
        while self.out and not self.closed:
            try:
                sent = self.sock.send(memoryview(self.out[0])[self.offset:], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                return
            self.offset += sent
            self.queued -= sent
            if self.offset == len(self.out[0]):
                self.out.popleft()
                self.offset = 0
            if not self.out and self.dropped:  # caught up: say what it missed
                self._append(frame(b"S", json.dumps({"dropped": self.dropped}).encode()))
                self.dropped = 0


class AttachServer:
    """One runner's attach socket. The runner calls output(), task_started(), task_ended(), close()."""

    def __init__(self, path: Path, agent: str, replay: bytes = b""):
        self.path = Path(path)
        self.agent = agent
        self.lock = threading.Lock()     # guards everything below against the server thread
        self.ring = bytearray(replay[-REPLAY_BYTES:])
        self.ring_aligned = True         # ring starts at a line boundary
        self.viewers: dict[int, _Viewer] = {}
        self.session = None              # the running CliSession, or None while idle
        self.task = ""
        self.stopping = ""               # the reason, once close() is called
        self.serial = 0
        self.identity = None             # the socket file's inode, once we made it
        self.listener: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.wake_r = self.wake_w = -1

    # --- the runner's main thread ------------------------------------------------------------
    def start(self) -> None:
        """Bind the socket (replacing a dead runner's) and start serving; TinytownError if unsafe."""
        _private_folder(self.path.parent)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(MAX_VIEWERS)
        listener.setblocking(False)
        self.listener = listener
        self.identity = os.stat(self.path).st_ino
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._serve, name="tt-attach", daemon=True)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self.thread.start()  # inherits the full mask: every signal goes to the main thread
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def output(self, data: bytes) -> None:
        """The CLI printed `data`: keep it for replay and queue it for every viewer."""
        with self.lock:
            if keep_tail(self.ring, data, REPLAY_BYTES):
                self.ring_aligned = False
            for viewer in self.viewers.values():
                if viewer.mode:
                    viewer.queue(b"O", data, droppable=True)
        self._wake()

    def task_started(self, task_id: str, session) -> None:
        with self.lock:
            self.session, self.task = session, task_id
            size = self._size()
            if size:
                session.resize(*size)
            self._broadcast_state()
        self._wake()

    def task_ended(self) -> None:
        """Before the pty closes: from here on keystrokes are dropped, not written to a closed fd."""
        with self.lock:
            self.session, self.task = None, ""
            self._broadcast_state()
        self._wake()

    def close(self, reason: str = "the runner stopped") -> None:
        if self.thread is None:
            return
        with self.lock:
            self.stopping = reason
            self._broadcast_state()
            watched = bool(self.viewers)
        self._wake(always=True)
        if watched:  # give viewers a moment to hear why; with none, the process just exits
            self.thread.join(2.0)
        self.thread = None
        self.remove_socket()

    def remove_socket(self) -> None:
        """Unlink our socket file (not a successor's), so none is left behind in .tt/ or /tmp."""
        try:
            if self.identity is not None and os.stat(self.path).st_ino == self.identity:
                self.path.unlink()
        except OSError:
            pass

    def _wake(self, always: bool = False) -> None:
        if not (always or self.viewers):  # nobody watching: no syscall per chunk of output
            return
        try:
            os.write(self.wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake

    # --- under the lock ----------------------------------------------------------------------
    def _state(self) -> dict:
        if self.stopping:
            return {"state": "stopped", "reason": self.stopping}
        return {"state": "working", "task": self.task} if self.session else {"state": "idle"}

    def _broadcast_state(self) -> None:
        payload = json.dumps(self._state()).encode()
        for viewer in self.viewers.values():
            if viewer.mode:
                viewer.queue(b"S", payload)

    def _size(self) -> tuple[int, int] | None:
        """The window size of the read-write viewer that attached or resized last."""
        sized = [v for v in self.viewers.values() if v.mode == "rw" and v.size and not v.closed]
        return max(sized, key=lambda v: v.size_serial).size if sized else None

    def _replay(self) -> bytes:
        data = bytes(self.ring[-REPLAY_BYTES:])
        if len(self.ring) > REPLAY_BYTES or not self.ring_aligned:
            data = data[data.find(b"\n") + 1:]  # start at a line, not inside an escape sequence
        return data

    # --- the server thread -------------------------------------------------------------------
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "listen")
        sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, events in sel.select():
                    if key.data == "listen":
                        self._accept(sel)
                    elif key.data == "wake":
                        drain(self.wake_r)
                    elif events & selectors.EVENT_READ:
                        self._receive(key.data)
                with self.lock:
                    for fd, viewer in list(self.viewers.items()):
                        viewer.flush()
                        if viewer.closed or (self.stopping and not viewer.out):
                            self._drop(sel, fd, viewer)
                        else:
                            sel.modify(viewer.sock, selectors.EVENT_READ
                                       | (selectors.EVENT_WRITE if viewer.out else 0), viewer)
                    if self.stopping:
                        break
        except Exception as exc:  # noqa: BLE001 - attach must never take the runner down
            print(f"tt runner: attach server stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            with self.lock:
                for fd, viewer in list(self.viewers.items()):
                    self._drop(sel, fd, viewer)
            sel.close()
            self.listener.close()

    def _drop(self, sel, fd: int, viewer: _Viewer) -> None:
        self.viewers.pop(fd, None)
        try:
            sel.unregister(viewer.sock)
        except (KeyError, ValueError):
            pass
        viewer.sock.close()

    def _accept(self, sel) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, OSError):
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid() or len(self.viewers) >= MAX_VIEWERS or self.stopping:
            conn.close()
            return
        conn.setblocking(False)
        with self.lock:
            self.serial += 1
            viewer = _Viewer(conn, self.serial)
            self.viewers[conn.fileno()] = viewer
        sel.register(conn, selectors.EVENT_READ, viewer)

    def _receive(self, viewer: _Viewer) -> None:
        try:
            data = viewer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            frames = viewer.reader.feed(data) if data else None
        except ValueError:
            frames = None
        with self.lock:
            if frames is None:
                viewer.closed = True
                return
            for kind, payload in frames:
                self._handle(viewer, kind, payload)

    def _handle(self, viewer: _Viewer, kind: bytes, payload: bytes) -> None:
        if kind == b"H" and not viewer.mode:
            hello = _json(payload)
            viewer.mode = "ro" if hello.get("mode") == "ro" else "rw"
            replay = self._replay()
            if replay:
                viewer.queue(b"O", replay)
            viewer.queue(b"S", json.dumps({**self._state(), "agent": self.agent}).encode())
            self._resize(viewer, hello)
        elif kind == b"I" and viewer.mode == "rw":
            if self.session is not None:
                self.session.write(payload)
        elif kind == b"W" and viewer.mode == "rw":
            self._resize(viewer, _json(payload))
        elif not viewer.mode:
            viewer.closed = True  # anything before hello is not a viewer

    def _resize(self, viewer: _Viewer, msg: dict) -> None:
        rows, cols = msg.get("rows"), msg.get("cols")
        if viewer.mode != "rw" or not (isinstance(rows, int) and isinstance(cols, int)
                                       and 0 < rows < 10000 and 0 < cols < 10000):
            return
        self.serial += 1
        viewer.size, viewer.size_serial = (rows, cols), self.serial
        if self.session is not None:
            self.session.resize(rows, cols)


def _json(payload: bytes) -> dict:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _private_folder(folder: Path) -> None:
    """Create the socket's folder owner-only, and refuse one that others could reach."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise TinytownError(f"{folder} must be a folder only you can open (mode 700) to hold attach sockets")


# --- the user's side --------------------------------------------------------------------------
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
           stdin: int = 0, stdout: int = 1) -> int:
    """Run one attach session in this terminal; the exit code (0 detached or agent stopped, 1 lost)."""
    validate_name("agent", name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(config.attach_socket(name)))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise TinytownError(_not_running(config, name)) from None
    except PermissionError:
        sock.close()
        raise TinytownError(f"permission denied on {config.attach_socket(name)} (only its owner can attach)") from None
    interactive = os.isatty(stdin)
    if not read_only and not interactive:
        sock.close()
        raise TinytownError("tt attach needs a terminal for input (use --read-only to watch from a script)")
    view = _Terminal(sock, name, keys, read_only, interactive, stdin, stdout)
    return view.run(describe_keys(keys_spec))


def _not_running(config: Config, name: str) -> str:
    from .lifecycle import running_pid
    from .town import Town
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
                    self._say(f"detached from {self.name} (it keeps running)")
                    return 0
            if self.sock in ready:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    if self.stopped:
                        return 0
                    self._say(f"lost the connection to {self.name}'s runner")
                    return 1
                for kind, payload in reader.feed(data):
                    if kind == b"O":
                        self._write(payload)
                    elif kind == b"S":
                        self._show_state(_json(payload))

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
