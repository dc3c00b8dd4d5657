"""What changed in an agent's worktree since its last checkpoint, told by the kernel (inotify), so
that a task's end stages just those paths (`git add -A -- PATHS`) instead of having git lstat every
file of the worktree and read every folder: the end's cost follows what the task changed, not the
size of the repository (on 5 000 files `add -A` was ~20 ms here, ~8 with the paths).

It answers only when it can vouch for the answer; otherwise `changes()` returns None and the
caller scans everything, as before. It cannot vouch:
- before the first full scan after the watch was made (nothing says the worktree matched the index
  before), and every FULL_SCAN_EVERY answers (a backstop for what inotify never sees: a file
  written through a hard link from outside the worktree, or through a shared mapping);
- after the kernel's event queue overflowed, a watch could not be added (the user's inotify
  limit), or a watched folder was moved or renamed (its watch no longer knows its path): the
  watch is made again from scratch, then the full scan;
- when the index was written by someone else since the last checkpoint (a CLI's own `git add`,
  `git rm --cached`, commit...: the index no longer matches what the events describe), when a
  `.gitignore` or `.gitattributes` changed (files nobody touched may now be in or out), when a
  path that may be tracked is gone (`add -A` with a path that matches nothing is an error, and
  telling "never tracked" from "deleted" needs the index), or too many paths changed;
- with a repository nested in the worktree (a submodule: what changes inside it is its own).

Why ctypes: Python has no inotify binding, and the three calls are stable Linux ABI. Elsewhere
(or if libc lacks them) the watch is simply not available and every end scans everything.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_EXCL_UNLINK = 0x4000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")            # struct inotify_event: wd, mask, cookie, len (then the name)
_APPEARED = IN_CREATE | IN_MOVED_TO       # a path that did not exist just before this event
MAX_PATHS = 1000                          # more than this: one full scan costs no more than the list
MAX_WATCHES = 20000                       # folders per worktree (the user's limit is shared by all)
FULL_SCAN_EVERY = 50                      # answers between backstop full scans
_RULE_FILES = (b".gitignore", b".gitattributes")

_libc = None


def _inotify():
    """libc with inotify, or None (not Linux, or no such calls)."""
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.inotify_init1.argtypes = [ctypes.c_int]
            libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def parse_events(buf: bytes) -> list[tuple[int, int, bytes]]:
    """(wd, mask, name) for each struct inotify_event in `buf` (the name without its NUL padding)."""
    events, offset = [], 0
    while offset + _EVENT.size <= len(buf):
        wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
        offset += _EVENT.size
        events.append((wd, mask, buf[offset:offset + length].rstrip(b"\0")))
        offset += length
    return events


class WorktreeWatch:
    """The paths changed under `root` since the last full scan or answer; see the module's note.

    Use: `paths = watch.changes()` before staging; None -> `git add -A`, then `watch.scanned()`;
    a list -> stage those paths (empty: nothing in the worktree changed). After every git command
    of ours that writes the index, `watch.index_written()`.
    """

    def __init__(self, root: Path, index: Path):
        self.root = os.fsencode(root)
        self.index = index
        self.fd = -1
        self.dirs: dict[int, bytes] = {}     # watch descriptor -> folder, relative to root (b"" = root)
        self.trusted = False                 # a full scan has happened since the watch was made
        self.answers = 0                     # since the last full scan
        self.index_stamp: tuple | None = None
        self.previous: set[bytes] = set()    # paths the last add may have staged (see _maybe_tracked)
        self.pending: dict[bytes, int] = {}  # events read at the last full scan, for the next answer
        self.unavailable = _inotify() is None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.dirs, self.trusted, self.pending = -1, {}, False, {}

    # -- what the caller asks --

    def changes(self) -> list[bytes] | None:
        """The paths (relative to root, bytes) that changed since the last full scan or answer, or
        None: scan everything (and call scanned() once that scan is done)."""
        if self.unavailable:
            return None
        if self.fd < 0 or not self.trusted:
            self._restart()
            return None
        found = self._drain()
        if found is None:
            self._restart()
            return None
        found.update(self.pending)           # (those came first)
        self.pending = {}
        if self.answers >= FULL_SCAN_EVERY or self._index_stamp() != self.index_stamp:
            return None
        if len(found) > MAX_PATHS or any(os.path.basename(path) in _RULE_FILES for path in found):
            return None
        paths = []
        for path, first in sorted(found.items()):
            if os.path.lexists(os.path.join(self.root, path)):
                paths.append(path)
            elif self._maybe_tracked(path, first):
                return None                  # (a deletion to stage, or an error for `add` to raise)
        self.answers += 1
        self.previous = set(paths)
        return paths

    def scanned(self) -> None:
        """A full scan (`git add -A`) has just staged everything: answers can be vouched for again.
        What happened while it ran is read now: the scan may have staged those paths, and they are
        still part of the next answer."""
        if self.fd < 0:
            return
        found = self._drain()
        if found is None:
            self._restart()                  # (not trusted: the next end scans in full again)
            return
        self.trusted, self.answers, self.pending, self.previous = True, 0, found, set(found)

    def index_written(self) -> None:
        """Our own git wrote the index: that is the index the next answer is measured against."""
        self.index_stamp = self._index_stamp()

    # -- the watch --

    def _restart(self) -> None:
        """A new watch over every folder of the worktree (the old one's events are dropped)."""
        self.close()
        libc = _inotify()
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            self.unavailable = True          # (EMFILE: the user's instance limit; it stays so)
            return
        self.fd = fd
        if not self._watch_tree(b""):
            self.close()
            self.unavailable = True          # (it would fail again: no walk of the tree per task)

    def _watch_tree(self, top: bytes) -> bool:
        """Watch `top` and every folder under it (not following links); False if that cannot be
        vouched for (a watch refused, too many folders, a nested repository)."""
        libc = _inotify()
        stack = [top]
        while stack:
            folder = stack.pop()
            full = os.path.join(self.root, folder) if folder else self.root
            wd = libc.inotify_add_watch(self.fd, full, WATCH_MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if folder and err in (errno.ENOENT, errno.ENOTDIR):   # gone already: its parent's event says so
                    continue
                return False                              # ENOSPC (the user's watch limit), EACCES...
            self.dirs[wd] = folder
            if len(self.dirs) > MAX_WATCHES:
                return False
            try:
                with os.scandir(full) as entries:
                    for entry in entries:
                        if entry.name == b".git":
                            if folder:                    # a repository inside the worktree
                                return False
                            continue                      # the worktree's own .git file
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(os.path.join(folder, entry.name) if folder else entry.name)
            except (FileNotFoundError, NotADirectoryError):
                continue
        return True

    def _drain(self) -> dict[bytes, int] | None:
        """Every event queued since the last drain, as {path: mask of its first event}; None if the
        events cannot be vouched for. Folders that appeared get watches of their own here."""
        found: dict[bytes, int] = {}
        appeared: list[bytes] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            for wd, mask, name in parse_events(buf):
                if mask & (IN_Q_OVERFLOW | IN_MOVE_SELF):
                    return None
                if mask & IN_IGNORED:             # the folder is gone (its parent saw it go)
                    if self.dirs.pop(wd, None) == b"":
                        return None               # the worktree itself
                    continue
                folder = self.dirs.get(wd)
                if folder is None or mask & IN_DELETE_SELF:
                    continue
                if not name:
                    continue
                path = os.path.join(folder, name) if folder else name
                if path == b".git":
                    return None                   # the worktree's link to its repository changed
                if mask & IN_ISDIR and mask & IN_MOVED_FROM:
                    return None                   # a watched folder moved: its watches' paths are stale
                if mask & IN_ISDIR and mask & _APPEARED:
                    appeared.append(path)
                found.setdefault(path, mask)
        for folder in appeared:
            if not self._watch_tree(folder):
                return None
        return found

    def _maybe_tracked(self, path: bytes, first_mask: int) -> bool:
        """Whether a path that is gone now may be in the index. Not if its first event since the
        last add created it, unless that add may have staged it (it was in that add's answer, or
        its events came while a full scan ran): before that event it did not exist."""
        return not (first_mask & _APPEARED) or path in self.previous

    def _index_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.index)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
