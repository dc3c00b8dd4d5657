"""The runner's side of `tt attach`: its agent's live pseudo-terminal served on a unix socket.

Each runner serves a unix socket (owner-only folder, peers checked by uid). A viewer says hello
(read-write or read-only, its window size), gets the recent output replayed and the agent's state,
then live output; a read-write viewer's keystrokes and window size go to the CLI's pty.

The server runs in a thread of the runner. An idle runner's main thread is blocked in BLMOVE
(woken by Redis, not by file descriptors), and viewers must be able to connect then too; a thread
keeps the runner's loop and its Redis handling as they are. It is safe here: the runner only forks
through pexpect, which execs at once, and the thread blocks every signal so stop signals still
interrupt the main thread's wait. The runner never waits for a viewer: output is queued per viewer
and a viewer too slow to take it loses output (and is told how much), never the CLI's time.

The frames are in attach_protocol.py. Viewers on other hosts come through Redis
(remote_attach.py) and are handed over with far_message(): the same rules apply to their keys and
window sizes.
"""
from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from pathlib import Path

from .agent_log import in_pieces, keep_tail_of
from .attach_protocol import FrameReader, frame, parse_json
from .config import ensure_private_folder
from .procutil import drain

REPLAY_BYTES = 32 * 1024       # recent output a new viewer sees first
BARE_NEWLINE = re.compile(rb"(?<!\r)\n")
FRAME_OUTPUT = 64 * 1024       # output bytes a frame to a viewer carries at most
VIEWER_BUFFER = 1024 * 1024    # queued for one viewer before its output is dropped
MAX_VIEWERS = 32


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


class _FarViewer:
    """A viewer on another host (`tt attach` through Redis, remote_attach.py). It reads the output
    stream itself: only its mode, window size and when it was last heard of are kept here."""

    def __init__(self, serial: int):
        self.mode = ""
        self.size: tuple[int, int] | None = None
        self.size_serial = serial
        self.expires = 0.0           # time.monotonic(): forgotten then unless heard of again

    @property
    def closed(self) -> bool:
        return time.monotonic() >= self.expires


class AttachServer:
    """One runner's attach socket. The runner calls output(), task_started(), task_ended(), close()."""

    def __init__(self, path: Path, agent: str, replay: bytes = b""):
        self.path = Path(path)
        self.agent = agent
        self.lock = threading.Lock()     # guards everything below against the server thread
        # (the log's end after a restart: its own lines, `[tt ...] task started`, end in a bare
        # newline, and a viewer's terminal is raw, where that would start the next line mid-row)
        self.ring = bytearray(BARE_NEWLINE.sub(b"\r\n", replay[-REPLAY_BYTES:]))
        self.ring_aligned = True         # ring starts at a line boundary
        self.viewers: dict[int, _Viewer] = {}
        self.far: dict[str, _FarViewer] = {}  # viewers on other hosts, by viewer id
        # time.monotonic() until which a viewer on another host is attached: the runner's pump
        # sends output to the Redis stream at once meanwhile (one float: read without the lock)
        self.far_until = 0.0
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
        ensure_private_folder(self.path.parent, "attach sockets")
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

    def output(self, chunks: list[bytes]) -> None:
        """The CLI printed `chunks` (a batch, in order): keep their end for replay and queue them
        for every viewer, in frames of up to FRAME_OUTPUT bytes."""
        with self.lock:
            if keep_tail_of(self.ring, chunks, REPLAY_BYTES):
                self.ring_aligned = False
            watching = [viewer for viewer in self.viewers.values() if viewer.mode]
            if watching:
                for piece in in_pieces(chunks, FRAME_OUTPUT):
                    for viewer in watching:
                        viewer.queue(b"O", piece, droppable=True)
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

    def far_message(self, viewer_id: str, kind: bytes, payload: bytes) -> None:
        """A message from a viewer on another host (remote_attach.RemoteInput's thread), handled as
        a local viewer's frame would be: H/K hello and still here, I keys, W window size, B bye."""
        from .remote_attach import FAR_TTL_SECONDS
        now = time.monotonic()
        with self.lock:
            viewer = self.far.get(viewer_id)
            if kind == b"B":
                self.far.pop(viewer_id, None)
            elif kind in (b"H", b"K"):
                if viewer is None or viewer.closed:  # (K: a runner restarted since its hello)
                    hello = parse_json(payload)
                    self.serial += 1
                    viewer = self.far[viewer_id] = _FarViewer(self.serial)
                    viewer.mode = "ro" if hello.get("mode") == "ro" else "rw"
                    viewer.expires = now + FAR_TTL_SECONDS
                    self._resize(viewer, hello)
                viewer.expires = now + FAR_TTL_SECONDS
            elif viewer is not None and not viewer.closed and viewer.mode == "rw":
                if kind == b"I" and self.session is not None:
                    self.session.write(payload)
                elif kind == b"W":
                    self._resize(viewer, parse_json(payload))
            for gone in [v for v, far in self.far.items() if far.expires <= now]:
                del self.far[gone]
            while len(self.far) > MAX_VIEWERS:  # the oldest heard of go first
                del self.far[min(self.far, key=lambda v: self.far[v].expires)]
            self.far_until = max((far.expires for far in self.far.values()), default=0.0)

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
        sized = [v for v in (*self.viewers.values(), *self.far.values())
                 if v.mode == "rw" and v.size and not v.closed]
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
            hello = parse_json(payload)
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
            self._resize(viewer, parse_json(payload))
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
