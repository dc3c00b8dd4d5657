"""supervisor/git_store.py: the commits and branch moves Python writes on a task's path are the ones
git would write, and anything less plain is left to git with nothing changed. Real git throughout."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tinytown.supervisor.git_store import descends_from, identity_line, move_ref, read_ref, reflog_message, write_commit

MESSAGE = "tt: t-1 caf\xe9 \u2603\n\nTinytown-Task: t-1\n".encode()


def git(cwd, *args, env=None, input=None, ok=(0,)) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, input=input,
                          env={**os.environ, **(env or {})})
    assert done.returncode in ok, done.stderr
    return done.stdout.decode("utf-8", "surrogateescape")


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for kind in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{kind}_NAME", "Una User")
        monkeypatch.setenv(f"GIT_{kind}_EMAIL", "una@example.com")
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "a.txt").write_text("one\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    return root


def rev(cwd, what) -> str:
    return git(cwd, "rev-parse", what).strip()


def as_git_would(cwd, tree, parents, name, email, when, message) -> str:
    """`git commit-tree`'s id for the same commit, author and committer pinned to `when` (the
    offset from UTC git's own, from TZ)."""
    date = f"@{when}"
    env = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_AUTHOR_DATE": date,
           "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email, "GIT_COMMITTER_DATE": date}
    parent_args = [arg for parent in parents for arg in ("-p", parent)]
    return git(cwd, "commit-tree", tree, *parent_args, env=env, input=message).strip()


@pytest.fixture(params=["UTC", "America/St_Johns", "Asia/Kolkata"])
def local_zone(request, monkeypatch):
    """A machine's time zone, half-hour offsets and one west of UTC among them."""
    import time
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def test_a_commit_written_by_python_is_byte_for_byte_the_one_git_writes(repo, local_zone):
    tree, parent = rev(repo, "HEAD^{tree}"), rev(repo, "HEAD")
    git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    other = rev(repo, "HEAD")
    objects = repo / ".git" / "objects"
    for parents in ([parent], [], [other, parent], [parent, parent]):
        ours = write_commit(objects, tree, parents, "dev (tt)", "dev@tinytown.invalid", MESSAGE, when=1_790_000_000)
        assert ours == as_git_would(repo, tree, parents, "dev (tt)", "dev@tinytown.invalid", 1_790_000_000, MESSAGE)
    assert git(repo, "cat-file", "-p", ours).encode("utf-8", "surrogateescape").endswith(MESSAGE)
    git(repo, "fsck", "--strict", "--no-dangling")
    loose = objects / ours[:2] / ours[2:]
    assert stat.S_IMODE(loose.stat().st_mode) == 0o444 and not list(loose.parent.glob("tmp_obj_*"))
    # Written again (same second, same everything): the object there is kept, no error.
    again = write_commit(objects, tree, [parent, parent], "dev (tt)", "dev@tinytown.invalid", MESSAGE,
                         when=1_790_000_000)
    assert again == ours


def test_what_is_not_sha1_or_not_a_plain_identity_is_not_written(repo):
    objects = repo / ".git" / "objects"
    before = sorted(objects.rglob("*"))
    assert write_commit(objects, "a" * 64, [], "dev (tt)", "dev@x.invalid", b"m\n") is None
    assert write_commit(objects, rev(repo, "HEAD^{tree}"), ["b" * 64], "dev (tt)", "dev@x.invalid", b"m\n") is None
    # Not UTF-8: git would re-encode it, so git writes it.
    assert write_commit(objects, rev(repo, "HEAD^{tree}"), [], "dev (tt)", "dev@x.invalid", b"caf\xe9\n") is None
    with pytest.raises(ValueError):
        write_commit(objects, rev(repo, "HEAD^{tree}"), [], "dev <evil>", "dev@x.invalid", b"m\n")
    assert sorted(objects.rglob("*")) == before


def branch_log(cwd, ref) -> list[str]:
    return git(cwd, "reflog", "show", "--format=%H %gs|%gn|%ge", ref).splitlines()


def test_a_branch_moved_by_python_is_moved_and_logged_as_git_update_ref_does(repo):
    first = rev(repo, "HEAD")
    (repo / "a.txt").write_text("two\n")
    git(repo, "commit", "-qam", "second")
    second = rev(repo, "HEAD")
    git(repo, "worktree", "add", "-q", "-b", "tt/by-git", str(repo.parent / "by-git"), first)
    git(repo, "worktree", "add", "-q", "-b", "tt/by-python", str(repo.parent / "by-python"), first)
    identity = {"GIT_COMMITTER_NAME": "dev (tt)", "GIT_COMMITTER_EMAIL": "dev@tinytown.invalid"}
    git(repo.parent / "by-git", "update-ref", "-m", "tt: t-1  two\tspaces", "HEAD", second, first, env=identity)
    common = repo / ".git"
    assert move_ref(common, "refs/heads/tt/by-python", second, first,
                    identity_line("dev (tt)", "dev@tinytown.invalid"), "tt: t-1  two\tspaces",
                    worktree_gitdir=common / "worktrees" / "by-python")
    assert rev(repo, "tt/by-python") == second == read_ref(common, "refs/heads/tt/by-python")
    assert branch_log(repo, "tt/by-python") == branch_log(repo, "tt/by-git")
    assert branch_log(repo.parent / "by-python", "HEAD")[0] == branch_log(repo.parent / "by-git", "HEAD")[0]
    assert not (common / "refs/heads/tt/by-python.lock").exists()
    git(repo, "fsck", "--strict", "--no-dangling")


def test_a_packed_branch_is_moved_too(repo):
    first = rev(repo, "HEAD")
    (repo / "a.txt").write_text("two\n")
    git(repo, "commit", "-qam", "second")
    git(repo, "branch", "packed", first)
    git(repo, "pack-refs", "--all")
    common = repo / ".git"
    assert not (common / "refs/heads/packed").exists() and read_ref(common, "refs/heads/packed") == first
    assert move_ref(common, "refs/heads/packed", rev(repo, "HEAD"), first, identity_line("a", "a@b.invalid"), "m")
    assert rev(repo, "packed") == rev(repo, "HEAD")


def test_whatever_git_should_decide_is_left_to_git_with_nothing_changed(repo):
    common = repo / ".git"
    first = rev(repo, "HEAD")
    (repo / "a.txt").write_text("two\n")
    git(repo, "commit", "-qam", "second")
    second = rev(repo, "HEAD")
    git(repo, "branch", "moved-on", second)
    who = identity_line("a", "a@b.invalid")
    log_before = branch_log(repo, "moved-on")

    # Not at the value expected (someone moved it): refused, unchanged, no lock left behind.
    assert not move_ref(common, "refs/heads/moved-on", first, first, who, "m")
    # Held by another git: refused, and that git's lock is not touched.
    lock = common / "refs/heads/moved-on.lock"
    lock.write_text("held\n")
    assert not move_ref(common, "refs/heads/moved-on", first, second, who, "m")
    assert lock.read_text() == "held\n"
    lock.unlink()
    # A symbolic ref, a 64-digit id, a ref that is not a branch, another ref store.
    (common / "refs/heads/sym").write_text("ref: refs/heads/main\n")
    assert not move_ref(common, "refs/heads/sym", first, second, who, "m")
    assert not move_ref(common, "refs/heads/moved-on", "c" * 64, second, who, "m")
    assert not move_ref(common, "refs/tags/v1", first, second, who, "m")
    (common / "reftable").mkdir()
    assert not move_ref(common, "refs/heads/moved-on", first, second, who, "m")
    (common / "reftable").rmdir()

    assert rev(repo, "moved-on") == second and branch_log(repo, "moved-on") == log_before
    assert not (common / "refs/heads/moved-on.lock").exists()


def test_a_task_in_a_sha256_repository_is_committed_by_git_itself(tmp_path, monkeypatch):
    """The fallback end to end: a repository whose ids are 64 digits gets its task commits and its
    branch moves from `git commit-tree` and `git update-ref`."""
    from tinytown.supervisor.workspace import Workspace
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    town = tmp_path / "town"
    town.mkdir()
    git(town, "init", "-q", "-b", "main", "--object-format=sha256")
    (town / "a.txt").write_text("one\n")
    env = {"GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@x.invalid", "GIT_COMMITTER_NAME": "u",
           "GIT_COMMITTER_EMAIL": "u@x.invalid"}
    git(town, "add", "-A")
    git(town, "commit", "-qm", "first", env=env)
    space = Workspace(town, "dev")
    space.ensure()
    begun = space.begin("t1")
    (space.path / "b.txt").write_text("new\n")
    ended = space.end("t1", "add b")
    assert len(ended.head) == 64 and ended.head != begun.base
    assert rev(space.path, "tt/dev") == ended.head
    assert git(space.path, "log", "-1", "--format=%an|%s").strip() == "dev (tt)|tt: t1 add b"
    assert [f.path for f in ended.files] == ["b.txt"]


def test_through_head_it_moves_only_while_head_is_on_the_branch_and_unlocked(repo):
    """As `git update-ref HEAD`: a CLI that switched branches a moment before, or a git of its
    holding HEAD's lock, leaves the move to git (which follows HEAD or says it is locked)."""
    first = rev(repo, "HEAD")
    git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    second = rev(repo, "HEAD")
    worktree = repo.parent / "wt"
    git(repo, "worktree", "add", "-q", "-b", "tt/dev", str(worktree), first)
    common = repo / ".git"
    gitdir = common / "worktrees" / "wt"
    who = identity_line("dev (tt)", "dev@tinytown.invalid")
    logs = (branch_log(repo, "tt/dev"), branch_log(worktree, "HEAD"))

    git(worktree, "switch", "-q", "-c", "side")
    assert not move_ref(common, "refs/heads/tt/dev", second, first, who, "m", worktree_gitdir=gitdir)
    git(worktree, "switch", "-q", "tt/dev")
    logs = (branch_log(repo, "tt/dev"), branch_log(worktree, "HEAD"))
    (gitdir / "HEAD.lock").write_text("held\n")
    assert not move_ref(common, "refs/heads/tt/dev", second, first, who, "m", worktree_gitdir=gitdir)
    assert (gitdir / "HEAD.lock").read_text() == "held\n"
    (gitdir / "HEAD.lock").unlink()
    assert rev(repo, "tt/dev") == first and rev(repo, "side") == first
    assert (branch_log(repo, "tt/dev"), branch_log(worktree, "HEAD")) == logs
    assert not list(common.rglob("*.lock"))
    assert move_ref(common, "refs/heads/tt/dev", second, first, who, "m", worktree_gitdir=gitdir)
    assert rev(worktree, "HEAD") == second and not list(common.rglob("*.lock"))


def test_the_reflog_message_is_made_one_line_by_gits_rule():
    assert reflog_message("  tt: t-1\tone\r\n two  ") == "tt: t-1 one two"
    assert reflog_message("keeps\x0bvertical\x0ctabs and\u00a0nbsp") == "keeps\x0bvertical\x0ctabs and\u00a0nbsp"


def test_a_disk_that_refuses_the_writes_leaves_them_to_git(repo, monkeypatch):
    """ENOSPC (or a folder another user's git made) while writing the commit or moving the branch:
    nothing half-written is left, and the task's commit is made by git itself."""
    import errno

    from tinytown.supervisor import git_store
    from tinytown.supervisor.workspace import Workspace
    objects = repo / ".git" / "objects"
    real_open = os.open

    def full(path, *args, **kw):
        if "tmp_obj_" in os.fspath(path) or os.fspath(path).endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kw)

    space = Workspace(repo, "dev")
    space.ensure()
    space.begin("t1")
    (space.path / "new.txt").write_text("work\n")
    monkeypatch.setattr(git_store.os, "open", full)
    assert write_commit(objects, rev(repo, "HEAD^{tree}"), [], "dev (tt)", "dev@x.invalid", b"m\n") is None
    ended = space.end("t1", "add new")                    # commit-tree and update-ref, by git
    monkeypatch.undo()
    assert ended.commit and rev(space.path, "tt/dev") == ended.head
    assert git(space.path, "log", "-1", "--format=%an|%s").strip() == "dev (tt)|tt: t1 add new"
    assert not list(objects.rglob("tmp_obj_*")) and not list((repo / ".git").rglob("*.lock"))
    git(repo, "fsck", "--strict", "--no-dangling")


def test_ancestry_read_from_loose_commits_agrees_with_git_and_defers_when_packed(repo):
    """A task's end asks whether the CLI moved its branch back: from the loose objects when it
    can (its own fresh commits), git's answer otherwise."""
    objects = repo / ".git" / "objects"
    first = rev(repo, "HEAD")
    for i in range(3):
        (repo / f"f{i}").write_text(f"{i}\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"c{i}")
    head = rev(repo, "HEAD")
    git(repo, "checkout", "-q", "-b", "side", first)
    (repo / "side.txt").write_text("s\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "side")
    side = rev(repo, "HEAD")
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-edit", "side")
    merged = rev(repo, "HEAD")
    for older, newer in ((first, head), (head, head), (head, first), (side, head), (side, merged), (head, merged)):
        said_by_git = subprocess.run(["git", "merge-base", "--is-ancestor", older, newer], cwd=repo).returncode == 0
        assert descends_from(objects, newer, older) is said_by_git, (older, newer)
    assert descends_from(objects, head, first, most=2) is None  # (too far back: git says)
    git(repo, "gc", "-q")  # everything packed: no loose commit to read
    assert descends_from(objects, head, first) is None
