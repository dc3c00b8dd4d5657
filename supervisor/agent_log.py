"""An agent's log file as its runner writes it: `.tt/logs/<agent>.log`, appended unbuffered and
rotated by size (agent.log -> .1 -> .2 ...); and the small tail helpers that read its end back
(a failed agent's reason, what `tt attach` replays first). The readers `tt logs` uses are in
log_readers.py.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

from .config import Config
from .terminal_text import clean_text


class AgentLog:
    """`.tt/logs/<agent>.log`, written unbuffered so a follower sees a line within milliseconds.

    A write that fails (a full disk, a file-size limit, a folder gone read-only) or a rotation
    that fails does not raise: the log is a copy of what the task's tail and the Redis stream also
    keep, and losing it must not lose the task. `problem` says what went wrong on the last write
    ("" once a write succeeds again); every write tries again, so the log recovers by itself.

    Two threads write it: the CLI's output comes from the pty's reader thread (pty_reader), the
    runner's notes from its main thread; a lock keeps each write, and a rotation, whole.
    """

    def __init__(self, config: Config, agent_name: str):
        self.path = config.log_file(agent_name)
        self.max_bytes = config.logs.max_bytes
        self.backups = config.logs.backups
        self.fd = -1
        self.size = 0
        self.problem = ""
        self.lock = threading.Lock()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.fd, self.size = self._open()
        except OSError as exc:
            self.problem = self._describe("cannot open", exc)
        # Kept across rotations: the files read as one stream, so a note must not join a line.
        self.at_line_start = tail_bytes(self.path, 1, align=False) in (b"", b"\n")

    def _open(self) -> tuple[int, int]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return fd, os.fstat(fd).st_size

    def write(self, data: bytes) -> None:
        with self.lock:
            self._write(data)

    def _write(self, data: bytes) -> None:
        size = len(data)
        problem = ""
        try:
            if self.fd < 0:
                self.fd, self.size = self._open()
            if self.size + size > self.max_bytes and self.size > 0:
                problem = self.rotate()
            done = os.write(self.fd, data)  # (all of it, but for a file-size limit or a full disk)
            if done < size:
                view = memoryview(data)[done:]
                while view:
                    view = view[os.write(self.fd, view):]
        except OSError as exc:  # what did not fit is lost from the log only
            problem = self._describe("cannot write", exc)
        self.size += size  # (counted even if lost: a full log still rotates on time)
        if size:
            self.at_line_start = data[-1] == 10  # (a newline)
        self.problem = problem

    def note(self, text: str) -> None:
        """A line of Tinytown's own (task started/finished), marked so it stands out from CLI output."""
        stamp = time.strftime("%H:%M:%S")
        with self.lock:  # (the reader thread may be writing: where the line starts is read here)
            start = "" if self.at_line_start else "\n"
            self._write(f"{start}[tt {stamp}] {text}\n".encode("utf-8", "replace"))

    def rotate(self) -> str:
        """agent.log -> agent.log.1 -> ... ; a follower notices the new inode and reopens. "" or
        what failed: then the current file is kept (and grows past max_bytes) until a rotation
        succeeds."""
        try:
            # The file that goes (the oldest backup, or with none the log itself: a new file rather
            # than truncating in place, so a follower still holding it reads it to the end) is
            # discarded first, so that no rename below replaces a file.
            self._discard(self.path.with_name(f"{self.path.name}.{self.backups}") if self.backups else self.path)
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            if self.backups:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            fd, size = self._open()
        except OSError as exc:
            return self._describe("cannot rotate", exc)
        old_fd, self.fd, self.size = self.fd, fd, size
        old = os.fstat(old_fd)
        os.close(old_fd)
        self._move_std(old)
        return ""

    @staticmethod
    def _discard(path: Path) -> None:
        """Remove a full log file without the writer waiting for its blocks to be freed: it is
        unlinked while an fd of ours holds it, and that fd is closed (the kernel frees the file
        there) on a thread of its own. Unlinking 10 MiB took the writer 4-8 ms here, and renaming
        over it as much again (ext4 then writes the renamed file out): at 100 MB/s of output,
        ~10 % of the time. A reader still sees the file deleted at once (st_nlink 0). Anything
        but a regular file we can open (a FIFO put there, no permission) is simply unlinked."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # (a FIFO must not block us)
        except FileNotFoundError:
            return
        except OSError:
            os.unlink(path)
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                fd = -1
            os.unlink(path)
        except OSError:
            if fd >= 0:
                os.close(fd)
            raise
        if fd < 0:
            return
        try:
            threading.Thread(target=os.close, args=(fd,), name="log-discard", daemon=True).start()
        except RuntimeError:  # no thread to be had: freed now, then
            os.close(fd)

    def _describe(self, what: str, exc: OSError) -> str:
        return f"log {what} {self.path.name}: {exc.strerror or exc}; output kept in the task and Redis only"

    def _move_std(self, old: os.stat_result) -> None:
        """The runner's stdout and stderr are this log too (the supervisor set them up so): keep
        them on the current file, where a crash's traceback is looked for."""
        for std in (1, 2):
            try:
                st = os.fstat(std)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (old.st_dev, old.st_ino):
                os.dup2(self.fd, std)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def tail_text(path, max_lines: int = 5, max_chars: int = 400) -> str:
    """The last lines of a log file, for a failed agent's reason: cleaned (terminal_text), since
    the reason is printed by the supervisor, `tt status` and `tt events` alike."""
    data = tail_bytes(path, 8192, align=False)
    lines = [line for line in clean_text(data.decode("utf-8", "replace")).splitlines() if line.strip()]
    return " | ".join(lines[-max_lines:])[-max_chars:]


def keep_tail(buf: bytearray, data: bytes, limit: int) -> bool:
    """Append `data` to `buf`, keeping at least its last `limit` bytes (trimmed back to that once
    past twice as much, so not at every append); True if anything was dropped. A batch of output
    may be MiBs: only what is kept is copied."""
    if len(data) >= limit:
        buf[:] = data[-limit:]
        return True
    buf += data
    if len(buf) > 2 * limit:
        del buf[:-limit]
        return True
    return False


def last_holding(chunks: list[bytes], size: int) -> tuple[int, int]:
    """Where the fewest last chunks that hold `size` bytes begin (0: all of them), and how many
    bytes they hold: what of a batch a tail of `size` bytes needs to look at."""
    total, first = 0, len(chunks)
    while first > 0 and total < size:
        first -= 1
        total += len(chunks[first])
    return first, total


def keep_tail_of(buf: bytearray, chunks: list[bytes], limit: int) -> bool:
    """keep_tail for a batch of chunks, looking only at the last ones that hold `limit` bytes (a
    flood's batch is MiBs of 4 KiB reads): when earlier ones are skipped, `buf` restarts from the
    first chunk kept, so what it holds is always one unbroken run. True if anything was dropped."""
    first, _ = last_holding(chunks, limit)
    dropped = first > 0
    if dropped:
        buf.clear()
    for chunk in chunks[first:]:
        dropped = keep_tail(buf, chunk, limit) or dropped
    return dropped


def in_pieces(chunks: list[bytes], limit: int) -> list[bytes]:
    """Consecutive chunks joined into pieces of at most `limit` bytes (a Redis stream's entries, a
    viewer's frames), made with one copy, and none for a chunk that is a piece already. A chunk
    larger than `limit` (a flood's held window, stream_budget.py) is cut first."""
    pieces: list[bytes] = []
    group: list[bytes] = []
    size = 0
    chunks = [chunk[i:i + limit] for chunk in chunks for i in range(0, len(chunk), limit)] \
        if any(len(chunk) > limit for chunk in chunks) else chunks
    for chunk in chunks:
        if group and size + len(chunk) > limit:
            pieces.append(group[0] if len(group) == 1 else b"".join(group))
            group, size = [], 0
        group.append(chunk)
        size += len(chunk)
    if group:
        pieces.append(group[0] if len(group) == 1 else b"".join(group))
    return pieces


def tail_bytes(path: Path, max_bytes: int, align: bool = True) -> bytes:
    """The end of a log file, from a line boundary unless align=False: what `tt attach` replays first."""
    try:
        with open(path, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # (a log made a link to /dev/full...)
                return b""
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            data = fh.read(max_bytes)
    except OSError:
        return b""
    if size > max_bytes and align:
        data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
    return data
