"""The two ways `tt logs` reads an agent's output back: LogFile follows one log file across
rotations like `tail -F`, without losing or repeating a byte; OutputStream reads the same output
from the town's Redis, for machines without the files and for questions about time (`--since`,
one task), since stream entries carry time and task. The writer is agent_log.py.
"""
from __future__ import annotations

import os
import re
from pathlib import Path


READ_BLOCK = 64 * 1024
DRAIN_LIMIT = 1024 * 1024   # per read(): several agents' files take turns


class LogFile:
    """Read one agent's log as a continuous byte stream, across rotations and runner restarts.

    At the end of the open file it checks whether the name now means a newer file; if so the old
    one is read to its end (the fd stays valid even once the file is renamed or deleted) and the
    next file in the rotation chain is opened. Identity is by inode, so a follower that fell
    several rotations behind still finds its place.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = -1
        self.ino: tuple[int, int] | None = None

    def start(self, lines: int | None) -> bytes:
        """Open the current file; its last `lines` lines (reaching into backups; None = all).

        read() then continues exactly after them.
        """
        if not self._open(self.path):
            return b""
        size = os.fstat(self.fd).st_size
        os.lseek(self.fd, size, os.SEEK_SET)
        if lines == 0:
            return b""
        sources = [(self.fd, size)]
        opened = []
        try:
            chain = self._chain()
            mine = [i for i, (_, ino) in enumerate(chain) if ino == self.ino]
            for path, ino in reversed(chain[: mine[0]] if mine else []):
                fd = _open_if(path, ino)
                if fd < 0:
                    break  # rotated while we looked: history stops here, following is unaffected
                opened.append(fd)
                sources.append((fd, os.fstat(fd).st_size))
            return _last_lines(sources, lines)
        finally:
            for fd in opened:
                os.close(fd)

    def read(self) -> bytes:
        """Everything appended since the last call, following any rotations in between."""
        out = bytearray()
        for _ in range(64):  # bounded: a writer rotating in a tight loop cannot trap us here
            if self.fd < 0 and not self._open(self.path):
                break
            data, at_end = self._drain()
            out += data
            if not at_end:
                break
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self.ino:
                if st.st_size < os.lseek(self.fd, 0, os.SEEK_CUR):  # truncated in place: start over
                    os.lseek(self.fd, 0, os.SEEK_SET)
                    continue
                break
            # The name now means another file, so ours is complete: finish it, then move on.
            out += self._drain_all()
            if not self._next():
                break
        return bytes(out)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- internals -------------------------------------------------------------------------
    def _open(self, path: Path, ino=None) -> bool:
        fd = _open_if(path, ino)
        if fd < 0:
            return False
        self.close()
        st = os.fstat(fd)
        self.fd, self.ino = fd, (st.st_dev, st.st_ino)
        return True

    def _drain(self) -> tuple[bytes, bool]:
        out = bytearray()
        while len(out) < DRAIN_LIMIT:
            block = os.read(self.fd, READ_BLOCK)
            if not block:
                return bytes(out), True
            out += block
        return bytes(out), False

    def _drain_all(self) -> bytes:
        out = bytearray()
        while True:
            data, at_end = self._drain()
            out += data
            if at_end:
                return bytes(out)

    def _chain(self) -> list[tuple[Path, tuple[int, int]]]:
        """(path, identity) of every file of this log, oldest backup first, current last.

        Listed until two listings agree: one taken during a rotation could show a file twice or
        skip one, and skipping one would lose its lines.
        """
        last = self._list()
        for _ in range(20):
            again = self._list()
            if again == last:
                break
            last = again
        return last

    def _list(self) -> list[tuple[Path, tuple[int, int]]]:
        pattern = re.compile(re.escape(self.path.name) + r"\.(\d+)$")
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return []
        numbered = sorted(((int(m[1]), n) for n in names if (m := pattern.match(n))), reverse=True)
        found = []
        for path in [self.path.parent / n for _, n in numbered] + [self.path]:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            found.append((path, (st.st_dev, st.st_ino)))
        return found

    def _next(self) -> bool:
        """Open the file written after ours; False if it does not exist yet."""
        for _ in range(10):  # a rotation while we list: list again
            chain = self._chain()
            ids = [ino for _, ino in chain]
            if self.ino in ids:
                i = ids.index(self.ino)
                if i + 1 >= len(chain):
                    return False
                path, ino = chain[i + 1]
            elif os.fstat(self.fd).st_nlink == 0:
                if not chain:
                    return False
                path, ino = chain[0]  # ours was deleted (rotated off the end): the oldest left follows it
            else:
                continue  # ours still exists but moved while we listed
            if self._open(path, ino):
                return True
        return False


def _open_if(path: Path, ino=None) -> int:
    """An fd for `path` (only if it is still the file `ino`), or -1."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return -1
    if ino is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ino:
            os.close(fd)
            return -1
    return fd


def _last_lines(sources: list[tuple[int, int]], lines: int | None) -> bytes:
    """The last `lines` lines of the sources laid end to end (given newest first, as (fd, size)).

    Reads backwards only as far as needed. A final line without a newline counts as a line.
    """
    blocks: list[bytes] = []
    count = 0
    for fd, size in sources:
        pos = size
        # lines + 1 newlines are enough whether or not the data ends with one
        while pos > 0 and (lines is None or count <= lines):
            start = max(0, pos - READ_BLOCK)
            block = os.pread(fd, pos - start, start)
            blocks.append(block)
            count += block.count(b"\n")
            pos = start
    return cut_lines(b"".join(reversed(blocks)), lines)


def cut_lines(data: bytes, lines: int | None) -> bytes:
    """The last `lines` lines of data (None = all); a final line without a newline counts."""
    if lines is None:
        return data
    if lines <= 0:
        return b""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    cut = end
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1:]


class OutputStream:
    """Agents' output from the town's Redis streams (see Keys.output): chunks with time and task.

    `agents` maps name -> agent id; `task` keeps only that task's chunks. The client is a
    resp.RespClient made with decode=False: chunks are the CLI's bytes, ids and fields bytes too.
    """

    def __init__(self, client, keys, agents: dict[str, str], task: str | None = None):
        self.r = client
        self.keys = keys
        self.task = task.encode() if task else None
        self.last: dict[str, bytes] = {}   # stream key -> id of the newest entry seen
        self.names: dict[str, str] = {}    # stream key -> agent name
        for name, agent_id in agents.items():
            self.add(name, agent_id)

    def add(self, name: str, agent_id: str, last: bytes = b"0-0") -> None:
        key = self.keys.output(agent_id)
        self.names[key] = name
        self.last.setdefault(key, last)

    def history(self, lines: int | None, since: float | None = None) -> list[tuple[str, bytes]]:
        """Each agent's last `lines` lines (None = all) since `since` (epoch s), in arrival order.

        read() continues right after the newest entry that existed when this was called.
        """
        bottom = f"{int(since * 1000)}-0" if since else "-"
        merged = []
        for key in self.names:
            newest = self.r.xrevrange(key, "+", "-", count=1)
            if not newest:
                continue
            self.last[key] = top = newest[0][0]
            entries = []   # (id, data), newest first
            count = 0
            while lines is None or count <= lines:  # lines + 1 newlines: enough in every case
                batch = self.r.xrevrange(key, top, bottom, count=500)
                for entry_id, fields in batch:
                    if self._wanted(fields):
                        entries.append((entry_id, fields[b"data"]))
                        count += fields[b"data"].count(b"\n")
                if len(batch) < 500:
                    break
                top = b"(" + batch[-1][0]
            entries.reverse()
            skip = sum(len(d) for _, d in entries) - len(cut_lines(b"".join(d for _, d in entries), lines))
            for entry_id, data in entries:  # the oldest chunks may lie partly before the first line
                if skip < len(data):
                    merged.append((_order(entry_id), self.names[key], data[skip:]))
                skip = max(0, skip - len(data))
        merged.sort(key=lambda item: item[0])
        return [(name, data) for _, name, data in merged]

    def read(self, block_ms: int) -> list[tuple[str, bytes]]:
        """New chunks since the last call (waiting up to block_ms for the first), in arrival order."""
        found = self.r.xread(dict(self.last), block=block_ms) or []
        merged = []
        for key, entries in found:
            key = key.decode()
            for entry_id, fields in entries:
                self.last[key] = entry_id
                if self._wanted(fields):
                    merged.append((_order(entry_id), self.names[key], fields[b"data"]))
        merged.sort(key=lambda item: item[0])
        return [(name, data) for _, name, data in merged]

    def _wanted(self, fields) -> bool:
        return b"data" in fields and (self.task is None or fields.get(b"task") == self.task)


def _order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
