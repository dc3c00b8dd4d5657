"""A commit written, a branch moved and a short ancestry read by Python, without a git process,
where that is plain.

Why: a task's git work is counted in processes (2-3 ms each here), and `git commit-tree` and
`git update-ref` are two whose whole job is a few hundred bytes: a zlib-compressed loose object
under `objects/`, and a ref file replaced under its `.lock` with a line appended to its reflog.
Both formats are git's oldest stable interfaces (every git reads them; `git fsck` checks them),
and the `.lock` is the same one git takes, so a git of the CLI's running at the same time is safe.

Anything less plain is left to git: each function returns None/False, and the caller runs the git
command instead, which also gives the user git's own error. That is a repository that is not SHA-1
(a 64-digit id), a message that is not UTF-8, a ref store that is not files (reftable), a ref that
is locked, symbolic, or not at the value expected, a HEAD no longer on the branch, and any OSError.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import zlib
from pathlib import Path

_SHA1_HEX = 40
_GIT_SPACE = re.compile(r"[ \t\n\r]+")


def identity_line(name: str, email: str, when: float | None = None) -> bytes:
    """`Name <email> 1700000000 +0100`, as git writes an author or committer."""
    moment = time.time() if when is None else when
    offset = time.localtime(moment).tm_gmtoff // 60
    sign = "-" if offset < 0 else "+"
    offset = abs(offset)
    return f"{name} <{email}> {int(moment)} {sign}{offset // 60:02d}{offset % 60:02d}".encode()


def commit_body(tree: str, parents: list[str] | tuple[str, ...], identity: bytes, message: bytes) -> bytes:
    lines = [b"tree " + tree.encode()] + [b"parent " + p.encode() for p in parents]
    lines += [b"author " + identity, b"committer " + identity]
    return b"\n".join(lines) + b"\n\n" + message


def move_ref(common: Path, ref: str, new: str, old: str, identity: bytes, message: str,
             worktree_gitdir: Path | None = None) -> bool:
    """`git update-ref -m MESSAGE REF NEW OLD` for a branch (refs/heads/...) in the files ref store:
    False, with nothing changed, wherever git should do it instead (see the module's docstring).

    With `worktree_gitdir`, it is `git update-ref HEAD ...` in that worktree: as git does, HEAD is
    locked too and must still be on `ref` under the lock (a CLI's `git switch` a moment before
    means git decides), and the move is logged as HEAD's as well as the branch's. Any OSError (a
    full disk, a folder git made as another user) also leaves it to git, whose error says why."""
    if len(new) != _SHA1_HEX or len(old) != _SHA1_HEX or not ref.startswith("refs/heads/"):
        return False
    if (common / "reftable").exists():
        return False
    path = common / ref
    locks = [path.with_name(path.name + ".lock")]
    if worktree_gitdir is not None:
        locks.insert(0, worktree_gitdir / "HEAD.lock")
    held: list[Path] = []
    try:
        for lock in locks:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            held.append(lock)                  # (another git holding one: FileExistsError, git decides)
        if worktree_gitdir is not None and (worktree_gitdir / "HEAD").read_bytes().strip() != b"ref: " + ref.encode():
            return False
        if read_ref(common, ref) != old:
            return False
        line = f"{old} {new} {identity.decode()}\t{reflog_message(message)}\n".encode("utf-8", "surrogateescape")
        logs = [common / "logs" / ref] + ([worktree_gitdir / "logs" / "HEAD"] if worktree_gitdir else [])
        with open(locks[-1], "w", encoding="ascii") as fh:
            fh.write(new + "\n")
        for log in logs:
            if log.exists():                   # git makes a branch's log when it makes the branch
                with open(log, "ab") as fh:
                    fh.write(line)
        os.replace(locks[-1], path)
        held.pop()                             # (moved: that name may be another git's lock by now)
        return True
    except OSError:
        return False
    finally:
        for lock in held:
            lock.unlink(missing_ok=True)


def reflog_message(message: str) -> str:
    """A reflog line's message as git writes it: runs of space, tab, CR and LF made one space, and
    none at either end (git's own idea of whitespace, not Python's)."""
    return " ".join(part for part in _GIT_SPACE.split(message) if part)


def read_ref(common: Path, ref: str) -> str | None:
    """A branch's value as the files ref store has it: its loose file, else its line in
    packed-refs; None if neither has it (or another ref store does)."""
    try:
        return (common / ref).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError):
        return None
    try:
        with open(common / "packed-refs", "rb") as fh:
            suffix = b" " + os.fsencode(ref)
            for line in fh:
                line = line.rstrip(b"\n")
                if line.endswith(suffix):
                    return line[:-len(suffix)].decode("ascii", "replace")
    except OSError:
        pass
    return None


def descends_from(objects: Path, head: str, ancestor: str, most: int = 64) -> bool | None:
    """Whether `ancestor` is `head` or one of its ancestors, by reading loose commit objects
    (a CLI's own fresh commits are loose); None when that cannot say (a packed or unreadable
    commit, a history longer than `most` commits): the caller asks git."""
    seen, todo = set(), [head]
    while todo:
        oid = todo.pop()
        if oid == ancestor:
            return True
        if oid in seen:
            continue
        seen.add(oid)
        if len(seen) > most or len(oid) != _SHA1_HEX:
            return None
        try:
            raw = zlib.decompress((objects / oid[:2] / oid[2:]).read_bytes())
        except (OSError, zlib.error):
            return None
        header, _, body = raw.partition(b"\0")
        if not header.startswith(b"commit "):
            return None
        for line in body.split(b"\n"):
            if not line.startswith(b"tree ") and not line.startswith(b"parent "):
                break  # (the parents come right after the tree)
            if line.startswith(b"parent "):
                todo.append(line[7:].decode("ascii", "replace"))
    return False


def write_commit(objects: Path, tree: str, parents, name: str, email: str, message: bytes,
                 when: float | None = None) -> str | None:
    """Store a commit of `tree` on `parents` by `name <email>` (author and committer, at `when`,
    default now) in the `objects` folder; return its id, or None when the repository is not SHA-1
    (the caller falls back to git). An object already there is left alone (same id, same bytes)."""
    if len(tree) != _SHA1_HEX or any(len(p) != _SHA1_HEX for p in parents):
        return None
    try:
        message.decode("utf-8")
    except UnicodeDecodeError:                 # git re-encodes such bytes (as Latin-1): its call
        return None
    if any(c in name + email for c in "<>\n\0"):
        raise ValueError(f"not usable in a commit's identity: {name!r} <{email!r}>")
    parents = list(dict.fromkeys(parents))    # git drops a parent named twice
    body = commit_body(tree, parents, identity_line(name, email, when), message)
    raw = b"commit %d\0" % len(body) + body
    oid = hashlib.sha1(raw).hexdigest()
    folder = objects / oid[:2]
    final = folder / oid[2:]
    if final.exists():
        return oid
    temporary = folder / f"tmp_obj_tt{os.getpid()}_{time.monotonic_ns()}"
    try:
        folder.mkdir(exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        with os.fdopen(fd, "wb") as fh:
            fh.write(zlib.compress(raw))
        try:
            os.link(temporary, final)          # as git does: never replace an object that is there
        except FileExistsError:
            pass
        except OSError:                        # a file system without hard links
            os.replace(temporary, final)
    except OSError:                            # a full disk, a folder another user made: git says why
        return None
    finally:
        temporary.unlink(missing_ok=True)
    return oid
