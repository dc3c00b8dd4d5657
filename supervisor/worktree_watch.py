"""What changed in an agent's worktree since its last checkpoint, told by the kernel (inotify), so
that a task's end stages just those paths (`git add -A -- PATHS`) instead of having git lstat every
file of the worktree and read every folder: the end's cost follows what the task changed, not the
size of the repository (on 5 000 files `add -A` was ~20 ms here, ~8 with the paths).

It answers only when it can vouch for the answer; otherwise `changes()` returns None and the
caller scans everything, as before. It cannot vouch:
- before the first full scan after the watch was made, every FULL_SCAN_EVERY answers (a
  backstop for what inotify never sees: a file changed through a hard link made from outside
  while the agent runs, or written through a shared mapping kept open), and after an add that
  did not finish (what it was handed is read again by a full scan);
- after the kernel's event queue overflowed, or a watched folder moved (its watch no longer
  knows its path): the watch is made again, then the full scan;
- when the index was written by someone else since our last git command (a CLI's own `git add`,
  `git rm --cached`, commit...: the index no longer matches what the events describe), or an
  ignore rule may have changed: a `.gitignore` or `.gitattributes` among the paths, or the
  repository's info/exclude or config, or the user's git config or ignore file, rewritten;
- when a path that is gone may be in the index: `add -A` with a path that matches nothing is an
  error, and only a path whose first event created it after our last index write (an editor's
  temporary file) is surely not there. So a task that deletes a tracked file scans in full;
- when too many paths changed (the full scan costs no more than the list).
It is not made at all (every end scans in full, as before) for a worktree with more than
MAX_WATCHES folders (each is a watch, and the user's limit is shared with every other tool), with
a repository nested in it, or with a file of several hard links (a write through one name is an
event for that name only).

Why ctypes: Python has no inotify binding, and the three calls are stable Linux ABI. Elsewhere
(or if libc lacks them) the watch is simply not available. (ctypes comes in with the first
watch, through procutil.libc: a `tt` command that imports workspace.py has no use for it.)
"""
from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

from .procutil import file_stamp, libc

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

WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")            # struct inotify_event: wd, mask, cookie, len (then the name)
MAX_PATHS = 1000
MAX_WATCHES = 4000
FULL_SCAN_EVERY = 50
_RULE_FILES = (b".gitignore", b".gitattributes")

_with_inotify = None


def _inotify():
    """libc with inotify, or None (not Linux, or no such calls)."""
    global _with_inotify
    if _with_inotify is None:
        _with_inotify = False
        lib = libc()
        if lib is not None and hasattr(lib, "inotify_init1") and hasattr(lib, "inotify_add_watch"):
            import ctypes
            lib.inotify_init1.argtypes = [ctypes.c_int]
            lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            _with_inotify = lib
    return _with_inotify or None


def parse_events(buf: bytes) -> list[tuple[int, int, bytes]]:
    """(wd, mask, name) for each struct inotify_event in `buf` (the name without its NUL padding)."""
    events, offset = [], 0
    while offset + _EVENT.size <= len(buf):
        wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
        offset += _EVENT.size
        events.append((wd, mask, buf[offset:offset + length].rstrip(b"\0")))
        offset += length
    return events


def rule_files(common_dir: Path) -> list[Path]:
    """Files whose change may change what `git add -A` ignores or how it reads a file, beside the
    worktree's own .gitignore/.gitattributes (those are paths in the answer)."""
    home = Path(os.path.expanduser("~"))
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    files = [common_dir / "info" / "exclude", common_dir / "info" / "attributes", common_dir / "config",
             home / ".gitconfig", xdg / "git" / "config", xdg / "git" / "ignore", xdg / "git" / "attributes"]
    if os.environ.get("GIT_CONFIG_GLOBAL"):
        files.append(Path(os.environ["GIT_CONFIG_GLOBAL"]))
    return files


class WorktreeWatch:
    """The paths changed under `root` since the last checkpoint; see the module's note.

    Use: `paths = watch.changes()` before staging; None -> `git add -A`, then `watch.scanned()`;
    a list -> `git add -A -- PATHS` (none: no add), then `watch.staged()`. Around git commands
    of ours that write the index or the worktree: `watch.verify()` before, `watch.index_written()`
    after.
    """

    def __init__(self, root: Path, index: Path, rules: list[Path]):
        self.root = os.fsencode(root)
        self.stamped = [index, *rules]
        self.fd = -1
        self.dirs: dict[int, bytes] = {}     # watch descriptor -> folder, relative to root (b"" = root)
        self.trusted = False                 # a full scan or a narrow add has finished since the watch was made
        self.answers = 0                     # since the last full scan
        self.stamp: list | None = None
        self.pending: dict[bytes, int] = {}  # read when our git wrote the index: part of the next answer
        self.unavailable = _inotify() is None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.dirs, self.trusted, self.pending = -1, {}, False, {}

    # -- what the caller asks and says --

    def changes(self) -> list[bytes] | None:
        """The paths (relative to root, bytes) changed since the last checkpoint, or None: scan
        everything (then call scanned())."""
        if self.unavailable:
            return None
        if self.fd < 0:
            self._restart()
            return None
        found = self._drain()
        if found is None:
            self._restart()
            return None
        trusted, self.trusted = self.trusted, False    # (until the add of this answer has finished)
        maybe_in_index = set(self.pending)
        found.update(self.pending)                     # (those came first)
        self.pending = {}
        if (not trusted or self.answers >= FULL_SCAN_EVERY or self._stamp() != self.stamp
                or len(found) > MAX_PATHS or any(os.path.basename(path) in _RULE_FILES for path in found)):
            return None
        paths = []
        for path, first in sorted(found.items()):
            try:
                st = os.lstat(os.path.join(self.root, path))
            except FileNotFoundError:
                if path in maybe_in_index or not first & IN_CREATE:
                    return None                        # a deletion to stage, or an error for `add`
                continue                               # made and gone since our last index write
            except OSError:
                return None
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                self._give_up()                        # a write through its other name is not seen
                return None
            paths.append(path)
        self.answers += 1
        return paths

    def staged(self) -> None:
        """The narrow add of the last answer has finished."""
        if self.fd >= 0:
            self.trusted = True

    def scanned(self) -> None:
        """A full scan (`git add -A`) has just finished: answers can be vouched for again."""
        if self.fd >= 0:
            self.trusted, self.answers = True, 0     # (the caller says index_written() once its git is done)

    def verify(self) -> None:
        """Before our git writes the index: if someone else wrote it (or an ignore rule) since our
        last git, the next end scans in full (the stamp taken after our git would hide it)."""
        if self.stamp is not None and self._stamp() != self.stamp:
            self.trusted = False

    def index_written(self) -> None:
        """Our git has written the index (and maybe the worktree: a merge's files, a branch switched
        back). What happened until now may be in that index: those paths are read now, kept for the
        next answer, and one of them that is gone then is taken for tracked."""
        if self.fd >= 0:
            found = self._drain()
            if found is None:
                self._restart()
            else:
                for path, mask in found.items():
                    self.pending.setdefault(path, mask)
        self.stamp = self._stamp()

    # -- the watch --

    def _give_up(self) -> None:
        """This worktree cannot be vouched for (see the module's note): full scans from now on."""
        self.close()
        self.unavailable = True

    def _restart(self) -> None:
        """A new watch over every folder of the worktree (the old one's events are dropped)."""
        self.close()
        fd = _inotify().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            self.unavailable = True          # (EMFILE: the user's instance limit)
            return
        self.fd = fd
        if not self._watch_tree(b""):
            self._give_up()

    def _watch_tree(self, top: bytes) -> bool:
        """Watch `top` and every folder under it (not following links); False if the worktree
        cannot be vouched for (a watch refused, too many folders, a nested repository, a file of
        several hard links)."""
        import ctypes
        lib = _inotify()
        stack = [top]
        while stack:
            folder = stack.pop()
            full = os.path.join(self.root, folder) if folder else self.root
            wd = lib.inotify_add_watch(self.fd, full, WATCH_MASK)
            if wd < 0:
                if folder and ctypes.get_errno() in (errno.ENOENT, errno.ENOTDIR):
                    continue                                  # gone already: its parent's event says so
                return False                                  # ENOSPC (the user's watch limit), EACCES...
            self.dirs[wd] = folder
            if len(self.dirs) > MAX_WATCHES:
                return False
            try:
                with os.scandir(full) as entries:
                    for entry in entries:
                        if entry.name == b".git":
                            if folder:                        # a repository inside the worktree
                                return False
                            continue                          # the worktree's own .git file
                        path = os.path.join(folder, entry.name) if folder else entry.name
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(path)
                        elif entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_nlink > 1:
                            return False
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
                if folder is None or mask & IN_DELETE_SELF or not name:
                    continue
                if name == b".git":
                    return None                   # a repository made inside, or the worktree's link changed
                path = os.path.join(folder, name) if folder else name
                if mask & IN_ISDIR and mask & IN_MOVED_FROM:
                    return None                   # a watched folder moved: its watches' paths are stale
                if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    appeared.append(path)
                found.setdefault(path, mask)
        for folder in appeared:
            if not self._watch_tree(folder):
                return None
        return found

    def _stamp(self) -> list:
        return [file_stamp(path) for path in self.stamped]
