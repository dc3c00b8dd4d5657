"""Each agent's own git worktree: made at spawn, a commit per task, dependencies merged in, work
brought home, and nothing an agent wrote ever thrown away.

Why it is shaped this way (the design note, workspaces-design.md, has the costs and the wiring):
- A task's git work is on its path, so it is counted in processes. `begin` reads a few files under
  the worktree's git folder and starts no git at all unless something is wrong (or it merges
  upstream work: merge-base and merge-tree side by side, then `reset --keep`); `end` stages what
  the task changed (`git add -A`, handed just the changed paths when the worktree's inotify watch
  can vouch for them: worktree_watch.py), then writes the tree beside the diff stat; the commit object and
  the branch move are written by Python (git_store.py), falling back to commit-tree/update-ref
  where that is not plain. No hook runs, nothing is signed, the index is never refreshed twice.
- A task in flight leaves a marker in the worktree's git folder (not in the worktree, so it is
  never committed). A marker found by `begin` means the last run was interrupted (crash, `tt stop
  --now`): what it left is committed as `tt: interrupted <task>` before anything else happens.
- No code path discards work: there is no `reset --hard` (the one reset is `--keep`, which refuses
  to touch a changed file), no `clean`, no forced branch deletion, every branch update names the
  commit it replaces, and a merge is made in the object store first, so a conflict never touches
  the worktree (tests/test_workspace.py greps this file for the forbidden commands).
- Git's output is read with -z and paths are kept as bytes decoded with surrogateescape, so a
  name with spaces, newlines or bytes that are not UTF-8 round-trips.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path
from typing import NamedTuple

from .errors import TinytownError
from .git_store import descends_from, identity_line, move_ref, read_ref, write_commit
from .procutil import capture
from .town_dir import AGENTS_DIR
from .worktree_watch import WorktreeWatch, rule_files

SHARED = "shared"
WORKTREE = "worktree"
EMAIL_DOMAIN = "tinytown.invalid"          # RFC 2606: can never be a real mailbox
MARKER = "tt-task"                         # in the worktree's git folder: "<task-id> <base>"
SUBJECT_MAX = 100                          # characters of the prompt's first line in a commit subject
GIT_TIMEOUT = 600.0
ZERO_OID = "0" * 40
OID_RE = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
MIN_GIT = (2, 38)                          # `git merge-tree --write-tree`: merges without a worktree

# Every git Tinytown runs for itself: no user hook can fail or slow a checkpoint (hooksPath), no
# background gc or maintenance on a task's path, no signing prompt, no remembered resolution that
# would make a conflict look resolved, and untracked files always seen whatever the user's config.
GIT_OPTIONS = (
    "-c", "core.hooksPath=/dev/null", "-c", "maintenance.auto=false", "-c", "gc.auto=0",
    "-c", "commit.gpgSign=false", "-c", "merge.verifySignatures=false", "-c", "rerere.enabled=false",
    "-c", "status.showUntrackedFiles=normal", "-c", "advice.detachedHead=false", "-c", "merge.autoStash=false",
)
# Variables that would point git at another repository, index or object store (`git rev-parse
# --local-env-vars`): a `tt` started from a git hook has some of them set.
_GIT_LOCAL_ENV = ("GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
                  "GIT_OBJECT_DIRECTORY", "GIT_DIR", "GIT_WORK_TREE", "GIT_IMPLICIT_WORK_TREE", "GIT_GRAFT_FILE",
                  "GIT_INDEX_FILE", "GIT_NO_REPLACE_OBJECTS", "GIT_REPLACE_REF_BASE", "GIT_PREFIX",
                  "GIT_INTERNAL_SUPER_PREFIX", "GIT_SHALLOW_FILE", "GIT_COMMON_DIR")

# What a CLI can leave a worktree in the middle of: (file in the git folder, state, how to finish).
IN_PROGRESS = (
    ("rebase-merge", "mid-rebase", "git rebase --continue, or --abort"),
    ("rebase-apply/applying", "mid-am", "git am --continue, or --abort"),
    ("rebase-apply", "mid-rebase", "git rebase --continue, or --abort"),
    ("MERGE_HEAD", "mid-merge", "git merge --continue, or --abort"),
    ("CHERRY_PICK_HEAD", "mid-cherry-pick", "git cherry-pick --continue, or --abort"),
    ("REVERT_HEAD", "mid-revert", "git revert --continue, or --abort"),
    ("BISECT_LOG", "mid-bisect", "git bisect reset"),
    # A git command of the CLI killed mid-write leaves its lock: every git after it would fail.
    ("index.lock", "index-locked", "if no git command runs there, delete {gitdir}/index.lock"),
)


class WorkspaceError(TinytownError):
    """A git step failed or was refused; the message is one line a user can act on."""


class Unavailable(WorkspaceError):
    """No worktree can be made here; `kind` says why: "not-git" (the town is not in a git work
    tree, or git is missing), "old-git" (older than MIN_GIT) or "no-commit" (the repository has
    no commit to branch from)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Busy(WorkspaceError):
    """The worktree is in the middle of a rebase, merge, ... left by a CLI: nothing is committed
    until a human finishes or aborts it. `state` is "mid-rebase", "mid-merge", ..."""

    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state


class WorkNotHere(WorkspaceError):
    """The agent's latest work, made on another host, cannot be brought into its branch here: every
    task would run without it, so the agent fails (its tasks wait) rather than each task."""


class MergeConflict(WorkspaceError):
    """A merge would conflict; it was aborted (or never started) and nothing changed."""

    def __init__(self, files: list[str], message: str):
        super().__init__(message)
        self.files = files


@dataclass(frozen=True)
class FileChange:
    """One changed file of a task's diff. added/deleted are None for a binary file; old_path is
    set for a rename. Paths are str with undecodable bytes kept as surrogates (os.fsencode round-trips)."""

    path: str
    added: int | None
    deleted: int | None
    old_path: str | None = None

    def to_json(self) -> dict:
        data = {"path": self.path, "added": self.added, "deleted": self.deleted}
        if self.old_path is not None:
            data["old_path"] = self.old_path
        return data

    @classmethod
    def from_json(cls, data: dict) -> "FileChange":
        return cls(data["path"], data.get("added"), data.get("deleted"), data.get("old_path"))


@dataclass
class Begun:
    """What `begin` did: the commit the task starts from, and what it had to do first."""

    base: str
    interrupted_task: str = ""         # the task whose interrupted run left changes behind...
    interrupted_commit: str = ""       # ...committed here as `tt: interrupted <task>`
    merged: tuple[str, ...] = ()       # upstream heads merged in (already contained ones too)
    notes: list[str] = field(default_factory=list)


class Carried(NamedTuple):
    """An agent's own latest work, made on another host: merged into its branch here before its next
    task, as a dependency's work is (the branch itself does not travel between hosts)."""

    task: str
    head: str
    host: str


@dataclass
class Ended:
    """What a task changed: base..head and its files. `commit` is the checkpoint made for it ("" if
    nothing was left uncommitted); `branch` is where HEAD was (None: detached); `problem` is set
    (and nothing committed) when the CLI left the worktree mid-rebase, mid-merge, ..."""

    base: str
    head: str
    files: list[FileChange] = field(default_factory=list)
    commit: str = ""
    branch: str | None = None
    problem: str = ""
    failure: str = ""                  # why the task fails though its work is committed (a nested repository)
    notes: list[str] = field(default_factory=list)


@dataclass
class MergedHome:
    """What `merge_home` did to the target branch."""

    branch: str
    before: str
    after: str
    how: str                           # "up to date", "fast-forward" or "merge"
    where: Path | None                 # the worktree that had the branch checked out, if any


# --- running git ---------------------------------------------------------------------------------

def _env(identity: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCAL_ENV}
    env.update(LC_ALL="C", GIT_TERMINAL_PROMPT="0", GIT_EDITOR="true", GIT_MERGE_AUTOEDIT="no")
    if identity is not None:
        name, email = _identity(identity)
        env.update(GIT_AUTHOR_NAME=name, GIT_AUTHOR_EMAIL=email, GIT_COMMITTER_NAME=name, GIT_COMMITTER_EMAIL=email)
    return env


def _identity(agent: str) -> tuple[str, str]:
    """The author and committer of an agent's commits."""
    return f"{agent} (tt)", f"{agent}@{EMAIL_DOMAIN}"


def git(cwd: Path, *args: str, input: bytes | None = None, ok=(0,), identity: str | None = None
        ) -> subprocess.CompletedProcess:
    """Run `git ARGS` in `cwd` (never through a shell); WorkspaceError unless its status is in `ok`."""
    return _run(cwd, [(args, ok)], input=input, identity=identity)[0]


def git_together(cwd: Path, *commands: tuple[tuple[str, ...], tuple[int, ...] | range]
                 ) -> list[subprocess.CompletedProcess]:
    """Run git commands that neither read what the other writes, each (ARGS, ok), at the same time:
    a task's path waits for the slowest of them, not their sum (each is a few ms, mostly process
    start and reading the index). Read-only ones beside one that writes the index are fine: git
    replaces the index in one rename."""
    return _run(cwd, list(commands))


def _run(cwd: Path, commands: list, input: bytes | None = None, identity: str | None = None
         ) -> list[subprocess.CompletedProcess]:
    procs: list[subprocess.Popen] = []
    env = _env(identity)
    try:
        for args, _ in commands:
            procs.append(subprocess.Popen(["git", *GIT_OPTIONS, *args], cwd=cwd, env=env,
                                          stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        if input is not None:
            outputs = [procs[0].communicate(input, timeout=GIT_TIMEOUT)]
        else:
            outputs = capture(procs, GIT_TIMEOUT)
    except FileNotFoundError:
        raise Unavailable("not-git", "git is not installed (or not on PATH)") from None
    except subprocess.TimeoutExpired:
        names = " and ".join(f"git {_subcommand(args)}" for args, _ in commands)
        raise WorkspaceError(f"{names} in {cwd} took over {GIT_TIMEOUT:g}s; gave up") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [_checked(cwd, args, subprocess.CompletedProcess(proc.args, proc.returncode, out, err), ok)
            for proc, (out, err), (args, ok) in zip(procs, outputs, commands)]


def _checked(cwd: Path, args, done: subprocess.CompletedProcess, ok) -> subprocess.CompletedProcess:
    if done.returncode not in ok:
        raise WorkspaceError(f"git {_subcommand(args)} failed in {cwd}: {_last_line(done)}")
    return done


def _subcommand(args) -> str:
    return next((arg for arg in args if not arg.startswith("-")), args[0])


def _last_line(done: subprocess.CompletedProcess) -> str:
    """git's own reason, one printable line (hints dropped)."""
    lines = [line for line in _text(done.stderr or done.stdout).splitlines()
             if line.strip() and not line.startswith("hint:")]
    fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
    line = (fatal or lines or [f"exit status {done.returncode}"])[0]
    if line.endswith(":") and line in lines:  # "...would be overwritten by merge:", then the files, indented
        indented = takewhile(lambda name: name[:1].isspace(), lines[lines.index(line) + 1:])
        files = [name[1:] if name.startswith("\t") else name.strip() for name in indented]  # (its own spaces kept)
        if files:
            line += " " + _names(files)
    return "".join(c if c.isprintable() else "?" for c in line)[:300]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _oid(raw: bytes | str) -> str:
    text = raw.decode() if isinstance(raw, bytes) else raw
    text = text.strip()
    if not OID_RE.fullmatch(text):
        raise WorkspaceError(f"git gave {text[:80]!r} where a commit id was expected")
    return text


def git_version(text: str) -> tuple[int, ...]:
    """(2, 39, 5) from "git version 2.39.5" (or "2.39.5.windows.1", "2.45.GIT"); (0,) if unreadable."""
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part) for part in found.groups() if part is not None) if found else (0,)


def is_oid(text: str) -> bool:
    return bool(OID_RE.fullmatch(text or ""))


def _safe_subject(text: str) -> str:
    """The prompt's first line as a commit subject: printable, one line, bounded (git log prints it
    raw to the user's terminal)."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    line = "".join(c if c.isprintable() else "?" for c in line)    # (surrogates are not printable)
    return line if len(line) <= SUBJECT_MAX else line[:SUBJECT_MAX - 1] + "…"


def parse_numstat(out: bytes) -> list[FileChange]:
    """`git diff --numstat -z` output: "A\\tD\\tPATH\\0", or for a rename "A\\tD\\t\\0OLD\\0NEW\\0";
    "-" counts for a binary file."""
    parts, files, i = out.split(b"\0"), [], 0
    while i < len(parts) and parts[i]:
        added, deleted, path = parts[i].split(b"\t", 2)
        i += 1
        old = None
        if not path:
            old, path = parts[i], parts[i + 1]
            i += 2
        files.append(FileChange(_text(path), None if added == b"-" else int(added),
                                None if deleted == b"-" else int(deleted), None if old is None else _text(old)))
    return files


# --- the town's repository -----------------------------------------------------------------------

@dataclass(frozen=True)
class Repo:
    """The git work tree the town folder sits in."""

    root: Path                         # the town folder
    toplevel: Path                     # the top of its work tree
    common_dir: Path                   # the repository's git folder (shared by every worktree)

    @classmethod
    def find(cls, root: Path) -> "Repo":
        """The town's repository, or Unavailable("not-git") with the line spawn prints once."""
        root = Path(root)
        try:
            done = git(root, "rev-parse", "--path-format=absolute", "--show-toplevel", "--git-common-dir",
                       ok=(0, 128))
        except Unavailable as exc:
            raise Unavailable("not-git", f"{exc}: agents share the town folder") from None
        lines = _text(done.stdout).splitlines()
        if done.returncode != 0 or len(lines) != 2:
            raise Unavailable("not-git", f"{root} is not in a git work tree: agents share the town folder "
                                         "(git init and a first commit give each agent a worktree of its own)")
        return cls(root, Path(lines[0]), Path(lines[1]))

    def head_branch(self) -> str | None:
        """The town folder's branch ("main"), None when its HEAD is detached."""
        done = git(self.root, "symbolic-ref", "-q", "--short", "HEAD", ok=(0, 1))
        return _text(done.stdout).strip() or None

    def resolve(self, rev: str) -> str | None:
        """The commit `rev` names, None if none (rev is never read as an option)."""
        if rev.startswith("-"):
            return None
        done = git(self.root, "rev-parse", "--verify", "-q", "--end-of-options", f"{rev}^{{commit}}", ok=(0, 1, 128))
        return _oid(done.stdout) if done.returncode == 0 else None

    def is_ancestor(self, older: str, newer: str) -> bool:
        return is_ancestor(self.root, self.common_dir / "objects", older, newer)

    def worktrees(self) -> list[dict]:
        """`git worktree list --porcelain -z`: one dict per worktree (worktree, HEAD, branch, prunable...)."""
        out = git(self.root, "worktree", "list", "--porcelain", "-z").stdout
        found, current = [], {}
        for item in out.split(b"\0"):
            if not item:
                if current:
                    found.append(current)
                current = {}
                continue
            key, _, value = _text(item).partition(" ")
            current[key] = value
        if current:
            found.append(current)
        return found

    def checked_out_at(self, ref: str) -> Path | None:
        for tree in self.worktrees():
            if tree.get("branch") == ref:
                return Path(tree["worktree"])
        return None


# --- one agent's worktree ------------------------------------------------------------------------

class Workspace:
    """agents/NAME, a git worktree on branch <prefix>NAME. Opening one starts no process."""

    def __init__(self, town_root: Path, agent: str, branch_prefix: str = "tt/"):
        self.town_root = Path(town_root).resolve()    # git reports resolved paths
        self.agent = agent
        self.path = self.town_root / AGENTS_DIR / agent
        self.branch = f"{branch_prefix}{agent}"
        self.ref = f"refs/heads/{self.branch}"
        self.prefix = branch_prefix
        self.label = f"{AGENTS_DIR}/{agent}"
        self.watch: WorktreeWatch | None = None       # what changed since the last checkpoint (made at the first)
        self.made_branch_at = ""                      # the commit ensure() made the branch at ("": it existed)

    # -- where git keeps this worktree (read from files: no process) --

    @property
    def gitdir(self) -> Path | None:
        """The worktree's own git folder (.git/worktrees/NAME), None if the worktree is not there."""
        try:
            text = (self.path / ".git").read_text(encoding="utf-8", errors="surrogateescape")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        if not text.startswith("gitdir: "):
            return None
        gitdir = Path(text[len("gitdir: "):].strip())
        gitdir = gitdir if gitdir.is_absolute() else (self.path / gitdir)
        return gitdir if (gitdir / "HEAD").is_file() else None

    @property
    def workdir(self) -> Path:
        """Where the agent's CLI works: the town folder's place in the worktree. Its root when the
        town folder is the repository's top; a town in the repository's sub/ works in
        agents/NAME/sub, as an agent sharing the town folder would (found without git: the
        nearest folder up holding .git)."""
        for top in (self.town_root, *self.town_root.parents):
            if (top / ".git").exists():
                return self.path / self.town_root.relative_to(top)
        return self.path

    def _dirs(self) -> tuple[Path, Path]:
        gitdir = self.gitdir
        if gitdir is None:
            if not self.path.exists():  # deleted (by the task itself, or by hand)
                raise WorkspaceError(f"{self.label} was deleted (its next task makes it again from branch "
                                     f"{self.branch}; what was not committed went with it)")
            raise WorkspaceError(self.problem_line("not-a-worktree"))
        try:
            common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        except OSError:
            common = gitdir
        return gitdir, common

    def exists(self) -> bool:
        return self.gitdir is not None

    def problem(self, gitdir: Path | None = None) -> str:
        """"" or what the worktree is in the middle of ("mid-rebase", "mid-merge", ...,
        "index-locked"), or "not-a-worktree" (agents/NAME is there but git does not know it): for
        `tt status`. File checks only: one listing of the worktree's git folder."""
        gitdir = gitdir or self.gitdir
        if gitdir is None:
            return "" if not self.path.exists() else "not-a-worktree"
        try:
            present = set(os.listdir(gitdir))
        except OSError:
            return "not-a-worktree"
        for name, state, _ in IN_PROGRESS:
            top, _, rest = name.partition("/")
            if top in present and (not rest or (gitdir / name).exists()):
                return state
        return ""

    def problem_line(self, state: str) -> str:
        """`tt status`'s line for what problem() found."""
        if state == "not-a-worktree":
            return (f"{self.label} is not a git worktree any more: move it away (its next task makes it again "
                    f"from branch {self.branch})")
        return str(self._busy(state))

    def _busy(self, state: str) -> Busy:
        finish = next((how for _, s, how in IN_PROGRESS if s == state), "fix it by hand")
        finish = finish.format(gitdir=self.gitdir)
        what = "has a stale index.lock" if state == "index-locked" else f"is {state.replace('-', ' ')}"
        return Busy(state, f"{self.label} {what} (left by its CLI): finish it there ({finish}); Tinytown "
                           "commits nothing in it until then")

    def head(self, dirs: tuple[Path, Path] | None = None) -> tuple[str | None, str | None]:
        """(HEAD's commit or None if unborn, the ref HEAD is on or None if detached), read from files
        (`dirs`: _dirs(), when the caller has it already)."""
        gitdir, common = dirs or self._dirs()
        try:
            text = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if text.startswith("ref: "):
            ref = text[5:]
            return self._read_ref(ref, common), ref
        if OID_RE.fullmatch(text):
            return text, None
        return self._git_head()

    def _read_ref(self, ref: str, common: Path) -> str | None:
        """A branch's commit: read from files (git_store.read_ref), else from git (another ref backend)."""
        value = read_ref(common, ref)
        if value is not None and OID_RE.fullmatch(value):
            return value
        cwd = self.path if self.path.is_dir() else self.town_root
        done = git(cwd, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", ok=(0, 1, 128))
        return _oid(done.stdout) if done.returncode == 0 else None

    def _git_head(self) -> tuple[str | None, str | None]:
        done = git(self.path, "rev-parse", "--verify", "-q", "HEAD", ok=(0, 1, 128))
        ref = _text(git(self.path, "symbolic-ref", "-q", "HEAD", ok=(0, 1)).stdout).strip() or None
        return (_oid(done.stdout) if done.returncode == 0 else None), ref

    def branch_tip(self) -> str | None:
        common = self._dirs()[1] if self.exists() else Repo.find(self.town_root).common_dir
        return self._read_ref(self.ref, common)

    # -- spawn --

    def ensure(self, from_ref: str | None = None) -> list[str]:
        """Make agents/NAME a worktree on the agent's branch if it is not one already; return what
        was done, as lines to print once. The branch, if it exists, is reused as it is (--from is
        then ignored); it is created from `from_ref` or the town's HEAD otherwise.

        Unavailable("not-git" | "no-commit") when no worktree can be made (spawn says so and the
        agent shares the town folder); WorkspaceError for a fault the user must fix.
        """
        if self.exists():
            return []
        repo = self._repository()
        notes: list[str] = []
        for tree in repo.worktrees():
            if tree.get("branch") != self.ref and Path(tree.get("worktree", "")) != self.path:
                continue
            where = Path(tree["worktree"])
            if where.exists() and "prunable" not in tree:
                raise WorkspaceError(f"branch {self.branch} is already checked out at {where}: a branch can be "
                                     f"checked out in one worktree only (switch that one to another branch)")
            # Registered but its folder is gone (deleted by hand): drop git's record of it, keep the branch.
            git(repo.root, "worktree", "remove", str(where))
            if where == self.path:
                notes.append(f"{self.label} had been deleted: made again from branch {self.branch} (its commits are "
                              "kept; what was not committed went with the folder)")
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise WorkspaceError(f"{self.label} exists and is not a git worktree: move it away (Tinytown touches "
                                 "nothing in it), or spawn the agent with --shared")
        tip = repo.resolve(self.ref)
        if tip is not None:
            if from_ref:
                notes.append(f"branch {self.branch} exists: reused as it is, at {tip[:12]} (--from {from_ref} ignored)")
            elif not notes and tip != repo.resolve("HEAD"):  # (a pruned agent's of that name, or an old one here)
                notes.append(f"branch {self.branch} exists here: {self.label} is made from it, at {tip[:12]} "
                             "(not the town's HEAD)")
            args = ["worktree", "add", "-q", str(self.path), self.branch]
        else:
            start = repo.resolve(from_ref or "HEAD")
            if start is None and from_ref:
                raise WorkspaceError(f"--from {from_ref}: no such commit in {repo.toplevel}")
            if start is None:
                raise self._no_commit(repo)
            if not from_ref and repo.head_branch() is None:
                notes.append(f"the town folder's HEAD is detached: {self.branch} starts at {start[:12]}; "
                             "`tt merge` will need --into BRANCH")
            args = ["worktree", "add", "-q", "--no-track", "-b", self.branch, str(self.path), start]
        quiet = self._keep_out_of_status(repo)
        git(repo.root, *args)
        self.made_branch_at = "" if tip is not None else start
        if quiet:
            notes.append(quiet)
        if (self.path / ".gitmodules").exists():
            notes.append(f"{self.label}: the repository has submodules, which are not checked out there "
                         f"(git -C {self.label} submodule update --init, if the agent needs them)")
        return notes

    def ran_here(self, task_id: str) -> bool:
        """Whether task `task_id` began in this worktree and did not end here (its marker), read
        from the file: a crashed task's leftovers are committed as its work only where it ran."""
        if not self.exists():
            return False
        previous = _read_marker(self._dirs()[0] / MARKER)
        return previous is not None and previous[0] == task_id

    def possible(self) -> None:
        """Unavailable where ensure() would raise it, making nothing: for an agent spawned to run on
        another host, whose runner there makes its worktree at its first task."""
        repo = self._repository()
        if repo.resolve("HEAD") is None and self.branch_tip() is None:
            raise self._no_commit(repo)

    def _repository(self) -> Repo:
        """The town's repository, if worktrees can be made in it (else Unavailable: not-git, old-git)
        and the agent's branch can be named so (else WorkspaceError)."""
        repo = Repo.find(self.town_root)
        version = git_version(_text(git(repo.root, "version").stdout))
        if version < MIN_GIT:
            raise Unavailable("old-git", f"git {'.'.join(map(str, version))} is older than "
                                         f"{'.'.join(map(str, MIN_GIT))}, which agents' worktrees need: "
                                         "agents share the town folder")
        if git(repo.root, "check-ref-format", self.ref, ok=(0, 1)).returncode != 0:
            raise WorkspaceError(f"{self.branch!r} cannot be a git branch name: rename the agent or change "
                                 "[workspace] branch_prefix")
        return repo

    def _no_commit(self, repo: Repo) -> Unavailable:
        return Unavailable("no-commit", f"the repository at {repo.toplevel} has no commit yet, so {self.agent} "
                                        "has no worktree and shares the town folder: commit something "
                                        "(git add -A && git commit -m 'first commit'): agents spawned "
                                        "after that get a worktree each")

    def _keep_out_of_status(self, repo: Repo) -> str:
        """Keep agents/ out of the user's `git status` without editing a file of theirs: a
        self-ignoring agents/.gitignore (as a venv does), or, if they have their own there, a line in
        the repository's untracked .git/info/exclude. Returns what was done ("" if nothing was needed)."""
        relative = os.path.relpath(self.path, repo.root) + "/"
        if git(repo.root, "check-ignore", "-q", "--no-index", relative, ok=(0, 1)).returncode == 0:
            return ""
        ignore = self.path.parent / ".gitignore"
        if not ignore.exists():
            ignore.parent.mkdir(parents=True, exist_ok=True)
            ignore.write_text("# Written by Tinytown: the agents' worktrees stay out of `git status`.\n*\n")
            return (f"wrote {AGENTS_DIR}/.gitignore (`*`, ignoring itself too): the agents' worktrees stay out "
                    "of `git status`")
        exclude = repo.common_dir / "info" / "exclude"
        line = "/" + os.path.relpath(self.path, repo.toplevel).replace(os.sep, "/") + "/"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        existing = exclude.read_text(errors="surrogateescape") if exclude.exists() else ""
        with exclude.open("a", errors="surrogateescape") as fh:
            fh.write(("" if not existing or existing.endswith("\n") else "\n") + line + "\n")
        return f"added {line} to {exclude} (untracked, this clone only): {self.label} stays out of `git status`"

    # -- a task's path --

    def begin(self, task_id: str, after: tuple[str, ...] | list[str] = (), carried: list[Carried] = ()) -> Begun:
        """Before a task's CLI starts: commit what an interrupted run left, put HEAD back on the
        agent's branch if a CLI moved it, bring the branch to the agent's latest work made on
        another host (`carried`: _carry), merge the upstream tasks' heads (`after`), and return the
        commit the task starts from. Busy if the worktree is mid-rebase/merge (the task must fail
        before its CLI starts); MergeConflict if `after` conflicts (nothing merged, nothing changed);
        WorkNotHere if the branch cannot be brought to `carried`.

        Costs no git process when the last task ended normally and `after` is empty.
        """
        notes: list[str] = []
        fresh = False  # the branch is made now, from this checkout's HEAD: nothing of the agent's on it
        if not self.exists():
            notes += self.ensure()
            fresh = bool(self.made_branch_at)
            if self.watch is not None:          # (a new folder, maybe a new git folder: a new watch)
                self.watch.close()
                self.watch = None
        dirs = self._dirs()
        gitdir = dirs[0]
        state = self.problem(gitdir)
        if state:
            raise self._busy(state)
        if self.watch is not None:
            self.watch.verify()                 # (before any git of ours below writes the index)
        begun = Begun(base="", notes=notes)
        marker = gitdir / MARKER
        previous = _read_marker(marker)
        base_before = None  # a task run again keeps the base of its first run: its record is all it did
        if previous is not None:
            old_task = previous[0]
            if old_task == task_id:
                base_before = previous[1]
            head, ref = self.head(dirs)
            commit, _, _ = self._checkpoint(f"tt: interrupted {old_task}", head, ref, trailers={
                "Tinytown-Task": old_task, "Tinytown-State": "interrupted"}, dirs=dirs)
            if commit:
                begun.interrupted_task, begun.interrupted_commit = old_task, commit
                notes.append(f"the interrupted run of {old_task} left changes: committed as {commit[:12]}")
            marker.unlink()
        head, ref = self.head(dirs)
        if ref != self.ref:
            notes += self._back_on_branch(head, ref)
        for work in carried:
            notes += self._carry(work, dirs, fresh)
            if begun.interrupted_commit and not self._is_ancestor(begun.interrupted_commit, self.head(dirs)[0], dirs):
                # (kept aside, not in the tree this run starts from: the prompt must not say it is)
                begun.interrupted_task = begun.interrupted_commit = ""
        if after:
            begun.merged = self.merge(after, task_id, dirs)
        head, _ = self.head(dirs)
        if head is None:
            raise WorkspaceError(f"{self.label} has no commit on {self.branch}")
        if base_before and base_before != head and not self._is_ancestor(base_before, head, dirs):
            base_before = None  # (the branch was moved meanwhile: the first run's base is not behind it)
        begun.base = base_before or head
        _write_marker(marker, task_id, begun.base)
        if self.watch is not None:
            self.watch.index_written()
        return begun

    def end(self, task_id: str, prompt: str, failed: bool = False) -> Ended:
        """After a task's CLI exits: commit whatever it changed and did not commit (failed tasks too:
        work is never thrown away) and return base, head and the files changed with +/- counts.

        Left mid-rebase/merge: nothing is committed and `problem` says what (the task fails with it;
        the marker stays, so the next `begin` refuses until a human finished it).
        """
        dirs = self._dirs()
        marker = dirs[0] / MARKER
        recorded = _read_marker(marker)
        head, ref = self.head(dirs)
        base = recorded[1] if recorded and recorded[0] == task_id else (head or "")
        ended = Ended(base=base, head=head or "", branch=_short(ref))
        state = self.problem(dirs[0])
        if state:
            # Nothing is committed, but what the CLI committed itself before it stopped is the
            # task's: the tip of the branch it was on (a rebase or bisect detaches HEAD and leaves
            # the branch where it was; an am moves it). Best effort: the problem is the outcome.
            ended.problem = state
            ended.notes.append(str(self._busy(state)))
            try:
                committed = head if ref is not None else self._read_ref(self.ref, dirs[1])
                if base and committed and committed != base:
                    ended.files = self._numstat(base, committed)
                    ended.head = committed
            except WorkspaceError:
                pass
            return ended
        if ref is not None and ref != self.ref:
            ended.notes.append(f"the CLI switched {self.label} to {_short(ref)}: the task's work is committed there "
                               f"({self.branch} is unchanged; the next task puts it back)")
        subject = f"tt: {task_id} {_safe_subject(prompt)}".rstrip()
        commit, files, nested = self._checkpoint(subject, head, ref, base=base, trailers={
            "Tinytown-Task": task_id, "Tinytown-State": "failed" if failed else "completed"}, dirs=dirs, watched=True)
        if nested:
            ended.failure = (f"{_names([f'{self.label}/{path}' for path in nested])} is a git repository of its own (made "
                             f"by the CLI?): its files are not committed on {self.branch}; move it out of the "
                             "worktree, or delete its .git so the next task commits them")
        ended.commit, ended.head = commit, commit or head or ""
        if files is None and base and ended.head != base:
            files = self._numstat(base, ended.head)     # the CLI made commits of its own
        ended.files = files or []
        if ref is None and ended.head:
            ended.notes.append(self._rescue(ended.head))
        elif ref == self.ref and base and head and head != base and not self._is_ancestor(base, head, dirs):
            ended.notes.append(self._keep_rewound(base))  # (a reset, a rebase: only when the CLI moved it)
        marker.unlink(missing_ok=True)
        if self.watch is not None:
            self.watch.index_written()
        return ended

    def _checkpoint(self, subject: str, head: str | None, ref: str | None, base: str | None = None,
                    trailers: dict | None = None, dirs: tuple[Path, Path] | None = None, watched: bool = False
                    ) -> tuple[str, list[FileChange] | None, list[str]]:
        """Commit everything in the worktree on top of HEAD: stage it (_stage; `watched`: a task's
        end, which may hand git just what changed), then plumbing, so no hook runs, nothing is
        signed and the index is not refreshed twice. Returns the new commit ("" if nothing
        changed), when `base` is HEAD base..index's files (else None), and the repositories nested
        in the worktree that git staged as a bare commit id (_stage)."""
        gitdir, common = dirs or self._dirs()
        nested = self._stage(gitdir, common, watched)
        if nested:
            # Out of the index again: a commit holding a bare commit id would look like the files
            # were kept, and git would never take them once the nested .git is deleted.
            git(self.path, "update-index", "--force-remove", "--", *nested)
        files = None
        if head is not None and base == head:
            # The diff stat (which also says whether there is anything to commit) and the tree, at
            # once; a tree written for nothing is HEAD's own, and harmless.
            numstat, tree = git_together(self.path, (self._numstat_args(base, None), (0,)), (("write-tree",), (0,)))
            files = parse_numstat(numstat.stdout)
            if not files:
                return "", files, nested
            tree = _oid(tree.stdout)
        else:
            tree = _oid(git(self.path, "write-tree").stdout)
            if head is not None and tree == _oid(git(self.path, "rev-parse", f"{head}^{{tree}}").stdout):
                return "", files, nested
        message = subject + "\n"
        if trailers:
            message += "\n" + "".join(f"{k}: {v}\n" for k, v in trailers.items())
        new = self._commit(tree, [head] if head else [], message.encode("utf-8", "surrogateescape"), common)
        if not (ref and head and move_ref(common, ref, new, head, identity_line(*_identity(self.agent)), subject[:200],
                                          worktree_gitdir=gitdir)):
            git(self.path, "update-ref", "-m", subject[:200], "HEAD", new, head or ZERO_OID, identity=self.agent)
        return new, files, nested

    def _stage(self, gitdir: Path, common: Path, watched: bool) -> list[str]:
        """Stage whatever the worktree holds that the index does not (`git add -A`). At a task's
        end, when the watch can vouch for what changed since the last checkpoint
        (worktree_watch.py), only those paths are handed to git, so it does not lstat every file
        and read every folder; nothing changed, no git at all. Anything unexpected from that narrow
        add (a path that matched nothing) falls back to the full scan, which is always right.
        Returns the repositories nested in the worktree (a CLI's `git init` or `git clone`) that
        git staged as a commit id only (a gitlink), their files left out (_checkpoint takes them
        out of the index again); one with no commit yet stops git adding anything: a
        WorkspaceError that names it."""
        if watched and self.watch is None:
            self.watch = WorktreeWatch(self.path, gitdir / "index", rule_files(common))
        paths = self.watch.changes() if watched else None
        if paths:
            # (literal: a name like `*.py` or `:x` is a file here, not a pattern)
            done = git(self.path, "--literal-pathspecs", "add", "-A", "--pathspec-from-file=-", "--pathspec-file-nul",
                       input=b"".join(path + b"\0" for path in paths), ok=range(0, 256))
            if done.returncode == 0 or (done.returncode == 1 and _only_ignored(done.stderr)):
                self.watch.staged()
                return _nested_repositories(done.stderr)
        elif paths is not None:
            self.watch.staged()
            return []
        done = git(self.path, "add", "-A", ok=range(0, 256))
        empty = re.search(rb"error: '(.+)/' does not have a commit checked out", done.stderr or b"")
        if done.returncode != 0 and empty:
            raise WorkspaceError(f"{self.label}/{_text(empty[1])} is a git repository of its own with no commit (made by "
                                 "the CLI?): git adds nothing while it is there; move it out of the worktree, or "
                                 "delete its .git (nothing was committed)")
        _checked(self.path, ("add", "-A"), done, (0,))
        if self.watch is not None:
            self.watch.scanned()
        return _nested_repositories(done.stderr)

    def _commit(self, tree: str, parents: list[str], message: bytes, common: Path) -> str:
        """A commit of `tree` by the agent: written by Python when the repository is SHA-1 (no
        process on a task's path), else by `git commit-tree`."""
        oid = write_commit(common / "objects", tree, parents, *_identity(self.agent), message)
        if oid is None:
            parent_args = [arg for parent in parents for arg in ("-p", parent)]
            oid = _oid(git(self.path, "commit-tree", "--no-gpg-sign", tree, *parent_args, input=message,
                           identity=self.agent).stdout)
        return oid

    def _numstat(self, base: str, head: str | None) -> list[FileChange]:
        return parse_numstat(git(self.path, *self._numstat_args(base, head)).stdout)

    @staticmethod
    def _numstat_args(base: str, head: str | None) -> tuple[str, ...]:
        revs = ("--cached", base) if head is None else (base, head)
        return ("diff", "--numstat", "-z", "-M", "--no-ext-diff", "--no-color", *revs, "--")

    def _rescue(self, oid: str) -> str:
        """A detached commit gets a branch, so no later checkout can leave it to the reflog alone."""
        name = self._keep_aside(oid, "detached")
        return f"{self.label} was on a detached HEAD: its commit {oid[:12]} is kept on branch {name}"

    def _keep_rewound(self, oid: str) -> str:
        """The CLI moved the agent's branch off the commit its task began on (a reset, a rebase):
        that commit, earlier tasks' work, gets a branch of its own rather than the reflog alone."""
        name = self._keep_aside(oid, "rewound")
        return (f"the CLI moved {self.branch} back past {oid[:12]}, where the task began: that commit is kept on "
                f"branch {name}")

    def _keep_aside(self, oid: str, kind: str) -> str:
        """Commit `oid`, about to be on no branch, on branch tt/NAME-<kind>-<oid> (its name): never
        left to the reflog alone. (Made once: a branch of that name already holds it.)"""
        name = f"{self.branch}-{kind}-{oid[:12]}"
        git(self.path, "update-ref", "-m", f"tt: keep a commit ({kind})", f"refs/heads/{name}", oid, ZERO_OID,
            ok=(0, 128))
        return name

    def _is_ancestor(self, older: str, newer: str, dirs: tuple[Path, Path] | None = None) -> bool:
        return is_ancestor(self.path, (dirs or self._dirs())[1] / "objects", older, newer)

    def _back_on_branch(self, head: str | None, ref: str | None) -> list[str]:
        """A CLI left HEAD on another branch (or detached): bring the agent's branch forward to it when
        that is a fast-forward, else switch back (the other branch keeps its commits)."""
        tip = self.branch_tip()
        where = _short(ref) or f"a detached HEAD ({(head or '')[:12]})"
        if head is None:
            raise WorkspaceError(f"{self.label} is on an unborn branch {where}: check out {self.branch} there")
        if tip is None or self._is_ancestor(tip, head):
            git(self.path, "update-ref", "-m", "tt: follow the CLI's branch", self.ref, head, tip or ZERO_OID,
                identity=self.agent)
            git(self.path, "symbolic-ref", "-m", "tt: back on the agent's branch", "HEAD", self.ref)
            return [f"{self.label} was left on {where}: {self.branch} moved forward to it ({head[:12]}) and "
                    "checked out again"]
        notes = [] if ref is not None else [self._rescue(head)]
        git(self.path, "switch", "-q", "--no-guess", self.branch)
        return notes + [f"{self.label} was left on {where}: back on {self.branch} (the commits made there stay there)"]

    def _carry(self, work: Carried, dirs: tuple[Path, Path], fresh: bool) -> list[str]:
        """Bring the agent's branch here to its latest work, made on another host (the notes to
        print; [] if the branch has it already). Not a merge: what the branch holds here beyond
        that work was never recorded as the agent's (a run interrupted when this host was lost,
        since run again elsewhere; a commit made here meanwhile), so merging it would bring back
        work redone since, and conflict with it. It is kept on a branch of its own instead."""
        before, _ = self.head(dirs)
        if before == work.head or (before and self._is_ancestor(work.head, before, dirs)):
            return []
        notes = []
        if before and not fresh and not self._is_ancestor(before, work.head, dirs):
            notes.append(f"{self.branch} here had commits that are not in its latest work (a run interrupted "
                         f"here, or made here meanwhile): kept on branch {self._keep_aside(before, 'left')}")
        try:
            self._move_branch(work.head, f"its latest work ({work.head[:12]})")
        except WorkspaceError as exc:
            raise WorkNotHere(str(exc)) from None
        return notes + [f"brought in its latest work from host {work.host} (task {work.task}, {work.head[:12]})"]

    def merge(self, heads, task_id: str = "", dirs: tuple[Path, Path] | None = None) -> tuple[str, ...]:
        """Merge upstream tasks' head commits into the agent's branch, a fast-forward when possible.

        Each merge is made in the object store first (`git merge-tree`), so a conflict is found
        before anything is touched: MergeConflict names the files and the worktree is exactly as it
        was. Only the result reaches the worktree, in one step that refuses, changing nothing, if it
        would overwrite a local change. Cheaper than `git merge`, which scans the whole worktree and
        stashes it away before a real merge.
        """
        wanted = tuple(dict.fromkeys(heads))
        bad = [h for h in wanted if not is_oid(h)]
        if bad:
            raise WorkspaceError(f"not a commit id: {bad[0][:80]!r}")
        dirs = dirs or self._dirs()
        head, _ = self.head(dirs)
        if not wanted or head is None:
            return ()
        current = head
        for upstream in wanted:
            if upstream == current:
                continue
            # Whether it is a merge at all, and the merge if it is, asked at once (the merge is
            # thrown away when upstream is already in or a fast-forward).
            found, done = git_together(self.path, (("merge-base", current, upstream), (0, 1)), (
                ("merge-tree", "--write-tree", "--name-only", "-z", "--no-messages", current, upstream), range(0, 256)))
            base = _text(found.stdout).strip()
            if base == upstream:
                continue                             # already in
            if base == current:
                current = upstream                   # a fast-forward
                continue
            if done.returncode == 1:
                files = _conflicted(done.stdout)
                raise MergeConflict(files, f"merging {upstream[:12]} into {self.branch} conflicts in {_names(files)}: "
                                           f"nothing merged, {self.label} unchanged")
            if done.returncode != 0:
                raise WorkspaceError(f"cannot merge {upstream[:12]} into {self.branch}: {_last_line(done)}")
            message = f"tt: {task_id} merges {upstream[:12]}, work it depends on\n" if task_id else \
                f"tt: merge {upstream[:12]}\n"
            current = self._commit(_oid(done.stdout.split(b"\0")[0]), [current, upstream], message.encode(), dirs[1])
        if current != head:
            self._move_branch(current, "the merged work")
        return wanted

    def _move_branch(self, to: str, what: str) -> None:
        """The agent's branch and worktree to commit `to`. `reset --keep` (never --hard) updates only
        the files that differ; it refuses, changing nothing, when one of them has a local change or
        an untracked file is in the way. Unlike `merge --ff-only` it does not lstat every file of
        the worktree first. Callers keep any commit it leaves behind on a branch first."""
        done = git(self.path, "reset", "-q", "--keep", to, ok=range(0, 256), identity=self.agent)
        if done.returncode != 0:
            raise WorkspaceError(f"could not bring {self.label} to {what}: {_last_line(done)} (nothing changed)")

    # -- tt prune --

    def prune(self, delete_branch: bool = False) -> list[str]:
        """Remove agents/NAME (after committing anything left in it) and keep the branch; with
        delete_branch, delete it only if every commit on it is on one of the user's branches."""
        notes: list[str] = []
        repo = Repo.find(self.town_root)
        if self.exists():
            state = self.problem()
            if state:
                raise self._busy(state)
            head, ref = self.head()
            commit, _, nested = self._checkpoint("tt: left uncommitted when the agent was pruned", head, ref,
                                                 base=head, trailers={"Tinytown-State": "pruned"})
            if commit:  # (on the branch checked out there: not tt/NAME if someone switched it)
                on = f" on branch {ref.removeprefix('refs/heads/')}" if ref else ""
                notes.append(f"{self.label} held uncommitted changes: committed as {commit[:12]}{on}")
            if nested:
                raise WorkspaceError(f"{_names([f'{self.label}/{path}' for path in nested])} is a git repository of "
                                     "its own, whose files no branch holds: move it out of the worktree first")
            if ref is None and (commit or head):
                notes.append(self._rescue(commit or head))
            # What git ignores is not committed and goes with the folder: say what it was.
            ignored = _paths(git(self.path, "ls-files", "-z", "--others", "--ignored", "--exclude-standard",
                                 "--directory", ok=range(0, 256)).stdout)
            kept_apart = _repositories_with_commits(self.path, ignored)
            if kept_apart:
                raise WorkspaceError(f"{_names([f'{self.label}/{path}' for path in kept_apart])} is a git repository "
                                     "with commits of its own in what git ignores there, which prune removes: move "
                                     "it out of the worktree first")
            done = git(repo.root, "worktree", "remove", str(self.path), ok=range(0, 256))
            if done.returncode != 0:
                raise WorkspaceError(f"could not remove {self.label}: {_last_line(done)}")
            notes.append(f"removed {self.label}" + (f", and with it what git ignores there: {_names(ignored)}"
                                                     if ignored else ""))
        else:
            for tree in repo.worktrees():
                if Path(tree.get("worktree", "")) == self.path:
                    git(repo.root, "worktree", "remove", str(self.path))
        tip = repo.resolve(self.ref)
        if not delete_branch:
            return notes + ([f"kept branch {self.branch} (tt spawn {self.agent} reuses it)"] if tip else [])
        branches = ([(self.branch, tip, f"tt merge {self.agent} first")] if tip else []) + [
            (name, oid, f"git merge {name} first") for name, oid in self._kept_aside(repo)]
        for branch, oid, how in branches:
            unmerged = self.unmerged(repo, oid, branch)
            if not unmerged:
                self._delete_branch(repo, branch, oid, "tt prune: merged")
                notes.append(f"deleted branch {branch} (all its commits are on your branches)")
            elif "-left-" in branch[len(self.branch):]:  # (a run redone elsewhere: merging it back is not the advice)
                own = int(git(repo.root, "rev-list", "--count", oid, "--not", f"--exclude={branch}", "--branches")
                          .stdout.strip() or 0)
                notes.append(f"kept branch {branch}: {own} commit{'s' if own != 1 else ''} of a run interrupted here "
                             f"and redone on another host (git branch -D {branch} drops {'them' if own != 1 else 'it'})")
            else:
                notes.append(f"kept branch {branch}: {unmerged} commit{'s' if unmerged != 1 else ''} on it "
                             f"{'are' if unmerged != 1 else 'is'} on none of your branches ({how})")
        return notes

    def unmake(self, branch_made_at: str) -> list[str]:
        """Undo what ensure() has just made, for an agent placed on another host, whose runner makes
        its own there: the worktree, and the branch if ensure() made it at `branch_made_at`. Nothing
        is lost: git refuses to remove a worktree with changes (then it stays, and the note says
        why), and the branch is deleted only if it is still at that commit."""
        repo = Repo.find(self.town_root)
        done = git(repo.root, "worktree", "remove", str(self.path), ok=range(0, 256))
        if done.returncode != 0:
            return [f"left {self.label} here: {_last_line(done)}"]
        if branch_made_at:
            self._delete_branch(repo, self.branch, branch_made_at, "tt spawn: placed on another host")
        return []

    @staticmethod
    def _delete_branch(repo: Repo, branch: str, oid: str, why: str) -> None:
        """The one way a branch is deleted: only if it is still at `oid` (one that moved is kept)."""
        git(repo.root, "update-ref", "-m", why, "-d", f"refs/heads/{branch}", oid)

    def _kept_aside(self, repo: Repo) -> list[tuple[str, str]]:
        """The branches a worktree's commits were kept on (_keep_aside): (name, commit) of each."""
        out = git(repo.root, "for-each-ref", "--format=%(refname:short) %(objectname)",
                  *(f"refs/heads/{self.branch}-{kind}-*" for kind in ("detached", "rewound", "left"))).stdout
        found = []
        for line in _text(out).splitlines():
            name, _, oid = line.rpartition(" ")
            if re.fullmatch(re.escape(self.branch) + r"-(detached|rewound|left)-[0-9a-f]{12}", name):
                found.append((name, oid))
        return found

    def unmerged(self, repo: Repo, tip: str, branch: str | None = None) -> int:
        """How many commits on the agent's branch (or `branch`, one of its own) no branch of the
        user's holds (the town's agent branches do not count: work is home only once it is on a
        branch of the user's)."""
        excludes = [f"--exclude={self.prefix}*"] if self.prefix else []
        out = git(repo.root, "rev-list", "--count", tip, "--not", *excludes, f"--exclude={branch or self.branch}",
                  "--branches").stdout
        return int(out.strip() or 0)


def is_ancestor(cwd: Path, objects: Path, older: str, newer: str) -> bool:
    """`older` is `newer` or behind it: read from the loose objects when it can (a CLI's own
    commits: no git process at a task's end), else asked of git (in `cwd`)."""
    known = descends_from(objects, newer, older)
    if known is not None:
        return known
    return git(cwd, "merge-base", "--is-ancestor", older, newer, ok=range(0, 256)).returncode == 0


def _read_marker(marker: Path) -> tuple[str, str] | None:
    try:
        task, _, base = marker.read_text(encoding="utf-8").strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return None
    return (task, base if is_oid(base) else "") if task else None


def _write_marker(marker: Path, task_id: str, base: str) -> None:
    partial = marker.with_name(marker.name + ".new")
    partial.write_text(f"{task_id} {base}\n", encoding="utf-8")
    os.replace(partial, marker)


def _short(ref: str | None) -> str | None:
    return ref[len("refs/heads/"):] if ref and ref.startswith("refs/heads/") else ref


def _paths(out: bytes) -> list[str]:
    return [_text(p) for p in out.split(b"\0") if p]


def _nested_repositories(err: bytes) -> list[str]:
    """The repositories `git add` staged as a commit id, from its warnings."""
    return [_text(found) for found in re.findall(rb"warning: adding embedded git repository: (.+)", err or b"")]


def _repositories_with_commits(root: Path, ignored: list[str]) -> list[str]:
    """The git repositories with at least one commit under `ignored` (paths in `root`, folders
    ending in /): their history is in no branch of the town's, and goes if the folder does."""
    found = []
    for entry in ignored:
        top = root / entry
        if not entry.endswith("/") or top.is_symlink():
            continue
        for folder, subfolders, files in os.walk(top):
            if ".git" in subfolders or ".git" in files:
                subfolders[:] = []  # (its own files are its own business)
                # Its own top with a HEAD commit: a .git git cannot read sends it up to the worktree's.
                done = git(Path(folder), "rev-parse", "--show-toplevel", "HEAD", ok=range(0, 256))
                lines = _text(done.stdout).splitlines()
                if done.returncode == 0 and lines and Path(lines[0]) == Path(folder).resolve():
                    found.append(os.path.relpath(folder, root))
    return sorted(found)


def _only_ignored(err: bytes) -> bool:
    """`git add` was given paths that .gitignore excludes: it staged the others, said which it
    left, and exits 1; nothing else went wrong."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(b"hint:")]
    return bool(lines) and lines[0].startswith(b"The following paths are ignored by one of your .gitignore files")


def _conflicted(out: bytes) -> list[str]:
    """The files `git merge-tree --write-tree --name-only -z` lists after the tree on a conflict."""
    return list(dict.fromkeys(_paths(out.split(b"\0", 1)[1] if b"\0" in out else b"")))


def _names(files: list[str], most: int = 10) -> str:
    shown = ", ".join(repr(f) if not f.isprintable() else f for f in files[:most])
    return (shown + (f" and {len(files) - most} more" if len(files) > most else "")) or "(no file named)"


# --- bringing work home --------------------------------------------------------------------------

def merge_home(town_root: Path, source: str, into: str | None = None, label: str = "") -> MergedHome:
    """`tt merge`: merge `source` (an agent's branch ref or a task's head commit) into the user's
    branch: the town folder's, or `into`. Refused with one line and no change when the target's
    worktree has uncommitted changes to tracked files or the merge would conflict (checked with
    `git merge-tree` before anything is touched)."""
    repo = Repo.find(town_root)
    label = label or source
    source_oid = repo.resolve(source)
    if source_oid is None:
        raise WorkspaceError(f"{label}: no such branch or commit")
    if into is not None:
        branch = into
        if into.startswith("-") or git(repo.root, "check-ref-format", "--branch", into, ok=(0, 1, 128)).returncode:
            raise WorkspaceError(f"--into {into}: not a branch name")
    else:
        branch = repo.head_branch()
        if branch is None:
            raise WorkspaceError("the town folder's HEAD is detached: check out a branch there, or name one with --into BRANCH")
    ref = f"refs/heads/{branch}"
    before = repo.resolve(ref)
    if before is None:
        raise WorkspaceError(f"no branch {branch!r} (--into names an existing branch)")
    where = repo.checked_out_at(ref)
    if repo.is_ancestor(source_oid, before):
        return MergedHome(branch, before, before, "up to date", where)
    fast_forward = repo.is_ancestor(before, source_oid)
    tree = None
    if not fast_forward:
        done = git(repo.root, "merge-tree", "--write-tree", "--name-only", "-z", "--no-messages", before, source_oid,
                   ok=range(0, 256))
        if done.returncode == 1:
            files = _conflicted(done.stdout)
            raise MergeConflict(files, f"merging {label} into {branch} would conflict in {_names(files)}: nothing "
                                       "changed (merge the other way in the agent's worktree, or by hand)")
        if done.returncode != 0:
            raise WorkspaceError(f"cannot check {label} against {branch}: {_last_line(done)}")
        tree = _oid(done.stdout.split(b"\0")[0])
    message = f"tt: merge {label} into {branch}"
    if where is not None:
        _refuse_unless_clean(where)
        done = git(where, "merge", "-q", "--no-edit", "--ff", "--no-stat", "--no-verify-signatures", "-m", message,
                   source_oid, ok=range(0, 256))
        if done.returncode != 0:
            if (Path(_text(git(where, "rev-parse", "--absolute-git-dir").stdout).strip()) / "MERGE_HEAD").exists():
                git(where, "merge", "--abort")
            raise WorkspaceError(f"could not merge {label} into {branch} at {where}: {_last_line(done)} (nothing changed)")
        after = repo.resolve(ref) or before
    else:
        after = source_oid
        if not fast_forward:
            after = _oid(git(repo.root, "commit-tree", "--no-gpg-sign", tree, "-p", before, "-p", source_oid,
                             input=(message + "\n").encode()).stdout)
        git(repo.root, "update-ref", "-m", message, ref, after, before)
    return MergedHome(branch, before, after, "fast-forward" if fast_forward else "merge", where)


def _refuse_unless_clean(where: Path) -> None:
    gitdir = Path(_text(git(where, "rev-parse", "--absolute-git-dir").stdout).strip())
    for name, state, how in IN_PROGRESS:
        if (gitdir / name).exists():
            raise WorkspaceError(f"{where} is {state.replace('-', ' ')}: finish it first ({how})")
    out = git(where, "--no-optional-locks", "status", "--porcelain=v2", "-z", "--untracked-files=no",
              "--ignore-submodules=dirty").stdout  # (not rewriting that index: an agent's watch would take it for a CLI's)
    if out.strip(b"\0"):
        raise WorkspaceError(f"{where} has uncommitted changes: commit or stash them, then run tt merge again "
                             "(nothing changed)")


# --- tt diff -------------------------------------------------------------------------------------

def diff_argv(town_root: Path, *, base: str = "", head: str = "", branch: str = "", stat: bool = False) -> list[str]:
    """The git command `tt diff` runs in the user's terminal (git's own colour and pager): a task's
    base..head, or what an agent's branch adds to the town folder's HEAD (HEAD...branch)."""
    if branch:
        if branch.startswith("-"):
            raise WorkspaceError(f"not a branch name: {branch!r}")
        revs = [f"HEAD...refs/heads/{branch}"]
    else:
        if not (is_oid(base) and is_oid(head)):
            raise WorkspaceError("this task has no recorded commits (it ran in the shared town folder, or has not ended)")
        revs = [base, head]
    return ["git", "-C", str(town_root), "diff", *(["--stat"] if stat else []), *revs, "--"]
