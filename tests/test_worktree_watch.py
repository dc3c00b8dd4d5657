"""A task's end stages only what changed (supervisor/worktree_watch.py): real inotify, real git,
real worktrees. Every test checks the one thing that matters, that nothing the CLI left is missing
from the commit (the worktree is clean afterwards), and which way the end went: the narrow add
(`--pathspec-from-file`) or the full scan."""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from tinytown.supervisor import workspace as ws
from tinytown.supervisor import worktree_watch
from tinytown.supervisor.workspace import Workspace
from tinytown.supervisor.worktree_watch import IN_CREATE, IN_ISDIR, IN_Q_OVERFLOW, parse_events

pytestmark = [pytest.mark.skipif(worktree_watch._inotify() is None, reason="no inotify here"),
              pytest.mark.usefixtures("git_identity")]   # (tests/conftest.py)


def git(cwd, *args) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, errors="surrogateescape")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def space(tmp_path, monkeypatch) -> Workspace:
    town = tmp_path / "town"
    for name, text in {"a.txt": "a\n", "src/b.py": "b\n", "src/deep/c.py": "c\n", ".gitignore": "*.log\nbuild/\n*.tmp\n"}.items():
        (town / name).parent.mkdir(parents=True, exist_ok=True)
        (town / name).write_text(text)
    git(town, "init", "-q", "-b", "main")
    git(town, "add", "-A")
    git(town, "commit", "-qm", "first")
    space = Workspace(town, "dev")
    space.ensure()
    space.adds = []   # how each end staged: "narrow" or "full"
    real_run = ws._run

    def spy(cwd, commands, **kw):
        for args, _ in commands:
            if [arg for arg in args if not arg.startswith("-")][:1] == ["add"]:   # (not `worktree add`)
                space.adds.append("narrow" if "--pathspec-from-file=-" in args else "full")
        return real_run(cwd, commands, **kw)
    monkeypatch.setattr(ws, "_run", spy)
    task(space, "t0", lambda root: (root / "a.txt").write_text("first task\n"))   # the first end scans in full
    assert space.adds == ["full"]
    space.adds.clear()
    return space


def task(space: Workspace, task_id: str, change):
    return task_after(space, task_id, change)


def task_after(space: Workspace, task_id: str, change, after=()):
    space.begin(task_id, after)
    change(space.path)
    return space.end(task_id, "do it")


def left_over(space: Workspace) -> str:
    """What the worktree holds that the commit does not (ignored files aside). (Without the
    optional lock, status would rewrite the index: a foreign write, which the next end must
    answer with a full scan.)"""
    return git(space.path, "--no-optional-locks", "status", "--porcelain", "--untracked-files=all")


def tracked(space: Workspace) -> set[str]:
    return set(git(space.path, "ls-files", "-z").split("\0")) - {""}


def test_an_end_hands_git_only_the_changed_paths_and_commits_all_of_them(space):
    odd = ["with space.txt", "line\nbreak.txt", os.fsdecode(b"caf\xe9.txt"), "*.txt", ":(glob)x", "-n"]

    def change(root: Path):
        (root / "a.txt").write_text("edited\n")                        # a tracked file
        (root / "src" / "deep" / "c.py").write_text("c2\n")            # deep in the tree
        for name in odd:                                               # names git could misread
            (root / "src" / name).write_text("odd\n")
        (root / "pkg" / "sub").mkdir(parents=True)                     # a new folder, filled at once
        (root / "pkg" / "sub" / "mod.py").write_text("m\n")
        (root / "debug.log").write_text("ignored\n")                   # ignored: named, not added
        (root / "build").mkdir()
        (root / "build" / "out.o").write_text("ignored too\n")
        (root / "src" / "b.py.tmp").write_text("b2\n")                 # an atomic save over b.py
        os.replace(root / "src" / "b.py.tmp", root / "src" / "b.py")
        (root / "scratch").write_text("gone again\n")                  # made and removed in the task
        (root / "scratch").unlink()

    ended = task(space, "t1", change)
    assert space.adds == ["narrow"]
    assert left_over(space) == ""
    files = {f.path for f in ended.files}
    assert files == {"a.txt", "src/deep/c.py", "src/b.py", "pkg/sub/mod.py", *(f"src/{name}" for name in odd)}
    assert not {"debug.log", "build/out.o", "scratch"} & tracked(space)

    # The new folder is watched from then on: a file added in it later is seen.
    ended = task(space, "t2", lambda root: (root / "pkg" / "sub" / "later.py").write_text("l\n"))
    assert space.adds == ["narrow", "narrow"] and [f.path for f in ended.files] == ["pkg/sub/later.py"]
    assert left_over(space) == ""


def test_a_task_that_changed_nothing_runs_no_add(space):
    ended = task(space, "t1", lambda root: None)
    assert space.adds == [] and ended.commit == "" and left_over(space) == ""


@pytest.mark.parametrize("what", ["tracked file deleted", "atomic save, then deleted", "atomic save, then renamed",
                                  "index changed by the CLI", "gitignore changed", "info/exclude changed",
                                  "folder renamed", "queue overflowed"])
def test_what_the_watch_cannot_vouch_for_is_scanned_in_full_and_then_narrow_again(space, what):
    if what == "gitignore changed":              # an ignored file nobody touches again
        task(space, "t0b", lambda root: (root / "keep.tmp").write_text("x\n"))
        assert space.adds == ["narrow"] and "keep.tmp" not in tracked(space)
        space.adds.clear()
    if what == "info/exclude changed":           # a file ignored by a rule outside the worktree
        exclude = Path(git(space.path, "rev-parse", "--git-common-dir").strip())
        exclude = (exclude if exclude.is_absolute() else space.path / exclude) / "info" / "exclude"
        exclude.parent.mkdir(exist_ok=True)
        exclude.write_text("notes.md\n")
        task(space, "t0b", lambda root: (root / "notes.md").write_text("x\n"))
        assert "notes.md" not in tracked(space)
        exclude.write_text("")
        space.adds.clear()

    def change(root: Path):
        if what == "tracked file deleted":
            (root / "src" / "b.py").unlink()
        elif what.startswith("atomic save"):         # a rename onto b.py replaces it: no delete event
            (root / "src" / "b.py.new").write_text("b2\n")
            os.replace(root / "src" / "b.py.new", root / "src" / "b.py")
            if what.endswith("deleted"):
                (root / "src" / "b.py").unlink()
            else:
                (root / "src" / "b.py").rename(root / "src" / "b2.py")
        elif what == "info/exclude changed":
            pass
        elif what == "index changed by the CLI":     # the index no longer holds a.txt; no file changed
            git(root, "rm", "-q", "--cached", "a.txt")
        elif what == "gitignore changed":            # keep.tmp is not touched, but now belongs in
            (root / ".gitignore").write_text("*.log\nbuild/\n")
        elif what == "folder renamed":
            (root / "src" / "deep").rename(root / "src" / "deeper")
            (root / "src" / "deeper" / "c.py").write_text("moved and changed\n")
        else:
            limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
            for n in range(limit // 2 + 10):        # create + close-write each, in a watched folder
                (root / "src" / f"f{n}").write_bytes(b"")

    task(space, "t1", change)
    assert space.adds == ["full"], what
    assert left_over(space) == ""
    if what == "index changed by the CLI":
        assert "a.txt" in tracked(space)            # the full scan put it back: the worktree has it
    elif what == "gitignore changed":
        assert "keep.tmp" in tracked(space)
    elif what == "info/exclude changed":
        assert "notes.md" in tracked(space)
    elif what.startswith("atomic save"):
        assert "src/b.py" not in tracked(space)
    elif what == "folder renamed":
        assert "src/deeper/c.py" in tracked(space) and "src/deep/c.py" not in tracked(space)
    ended = task(space, "t2", lambda root: (root / "src" / "new.py").write_text("n\n"))
    assert space.adds == ["full", "narrow"] and [f.path for f in ended.files] == ["src/new.py"]
    assert left_over(space) == ""


def test_files_our_own_merge_wrote_count_as_tracked(space):
    """A file `begin` brought in with an upstream head (its events: created) that the CLI deletes."""
    upstream = Workspace(space.town_root, "up")
    upstream.ensure()
    up = task_after(upstream, "u1", lambda root: (root / "from_up.txt").write_text("u\n"))
    space.adds.clear()
    task_after(space, "t1", lambda root: (root / "from_up.txt").unlink(), after=[up.head])
    assert space.adds == ["full"] and left_over(space) == "" and "from_up.txt" not in tracked(space)


def test_an_end_whose_add_failed_leaves_its_changes_to_the_next_full_scan(space, monkeypatch):
    real_run = ws._run
    lock = space.gitdir / "index.lock"

    def another_git_holds_the_lock(cwd, commands, **kw):
        if any(ws._subcommand(args) == "add" for args, _ in commands):
            lock.write_text("")
            try:
                return real_run(cwd, commands, **kw)
            finally:
                lock.unlink()
        return real_run(cwd, commands, **kw)
    space.begin("t1")
    (space.path / "a.txt").write_text("edited in t1\n")
    monkeypatch.setattr(ws, "_run", another_git_holds_the_lock)
    with pytest.raises(ws.WorkspaceError):
        space.end("t1", "do it")
    monkeypatch.setattr(ws, "_run", real_run)
    begun = space.begin("t2")                   # commits what t1 left, as after any interrupted run
    space.end("t2", "nothing")
    assert begun.interrupted_task == "t1" and left_over(space) == ""


def test_a_file_with_two_names_means_full_scans(space):
    task(space, "t1", lambda root: os.link(root / "a.txt", root / "a_copy.txt"))
    task(space, "t2", lambda root: (root / "a.txt").write_text("through one name\n"))
    assert space.adds == ["full", "full"] and space.watch.unavailable and left_over(space) == ""


def test_only_a_tasks_end_makes_a_watch(space):
    def inotify_fds() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify" for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))
    before = inotify_fds()
    for n in range(3):
        other = Workspace(space.town_root, f"agent{n}")
        other.ensure()
        other.prune()
    assert inotify_fds() == before


def test_a_repository_inside_the_worktree_means_full_scans(space):
    def change(root: Path):
        (root / "vendor").mkdir()
        git(root / "vendor", "init", "-q")
        (root / "vendor" / "x.txt").write_text("x\n")
        git(root / "vendor", "add", "x.txt")
        git(root / "vendor", "commit", "-qm", "vendored")
    task(space, "t1", change)
    task(space, "t2", lambda root: (root / "a.txt").write_text("again\n"))
    assert space.adds == ["full", "full"] and space.watch.unavailable


def test_a_worktree_made_again_gets_a_new_watch(space):
    import shutil
    shutil.rmtree(space.path)
    git(space.town_root, "worktree", "prune")
    task(space, "t1", lambda root: (root / "a.txt").write_text("after\n"))
    task(space, "t2", lambda root: (root / "a.txt").write_text("after again\n"))
    assert space.adds == ["full", "narrow"] and left_over(space) == ""


def test_events_are_parsed_with_their_padding_dropped():
    def event(wd, mask, name=b""):
        padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))
        return struct.pack("iIII", wd, mask, 0, len(padded)) + padded
    buf = event(1, IN_CREATE | IN_ISDIR, b"pkg") + event(-1, IN_Q_OVERFLOW) + event(2, IN_CREATE, b"x" * 16)
    assert parse_events(buf) == [(1, IN_CREATE | IN_ISDIR, b"pkg"), (-1, IN_Q_OVERFLOW, b""), (2, IN_CREATE, b"x" * 16)]


def test_importing_the_workspace_module_leaves_ctypes_for_the_first_watch():
    """`tt` commands import workspace.py (tt status, spawn, merge...); ctypes is ~4 ms of import."""
    import sys
    code = "import sys, tinytown.supervisor.workspace; print('ctypes' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
