"""Per-agent workspaces (supervisor/workspace.py) on real git repositories and real worktrees."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinytown.supervisor import workspace as ws
from tinytown.supervisor.config import WorkspacePolicy, load
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.workspace import (Busy, Carried, FileChange, MergeConflict, Unavailable, Workspace,
                                           WorkspaceError, diff_argv, merge_home, parse_numstat)


pytestmark = pytest.mark.usefixtures("git_identity")   # (tests/conftest.py)


def git(cwd, *args, ok=(0,)) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, errors="surrogateescape")
    assert done.returncode in ok, done.stderr
    return done.stdout


def make_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    for name, text in (files or {"a.txt": "one\ntwo\nthree\n"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-qm", "first")
    return path


@pytest.fixture
def town(tmp_path) -> Path:
    return make_repo(tmp_path / "town")


def head(cwd) -> str:
    return git(cwd, "rev-parse", "HEAD").strip()


def tip(cwd, ref) -> str:
    return git(cwd, "rev-parse", "--verify", "-q", ref, ok=(0, 1)).strip()


def status(cwd) -> str:
    return git(cwd, "status", "--porcelain", "--untracked-files=all")


def spawned(town: Path, name: str = "dev", **kw) -> Workspace:
    space = Workspace(town, name, **kw)
    space.ensure()
    return space


def task(space: Workspace, task_id: str, change, prompt: str = "do it", after=(), failed=False):
    begun = space.begin(task_id, after)
    change(space.path)
    return begun, space.end(task_id, prompt, failed)


def write(name: str, text: str):
    return lambda root: (root / name).write_text(text)


# --- a worktree per agent -------------------------------------------------------------------------

def test_spawn_makes_a_worktree_on_the_agents_branch_out_of_git_status(town):
    space = Workspace(town, "dev")
    notes = space.ensure()
    assert git(space.path, "symbolic-ref", "HEAD").strip() == "refs/heads/tt/dev"
    assert tip(town, "tt/dev") == head(town)
    assert (space.path / "a.txt").read_text() == "one\ntwo\nthree\n"
    assert status(town) == ""                       # agents/ stays out of the user's git status
    assert any("agents/.gitignore" in note for note in notes)
    assert space.ensure() == []                     # already there: nothing done, no process
    assert Workspace(town, "qa", branch_prefix="team/").ensure() == []
    assert tip(town, "team/qa") == head(town)


def test_a_users_own_agents_gitignore_is_left_alone_and_exclude_used(town):
    (town / "agents").mkdir()
    (town / "agents" / ".gitignore").write_text("notes.md\n")
    git(town, "add", "agents/.gitignore")
    git(town, "commit", "-qm", "their own ignore file")
    notes = spawned(town).ensure() or Workspace(town, "qa").ensure()
    assert (town / "agents" / ".gitignore").read_text() == "notes.md\n"
    assert "/agents/qa/" in (town / ".git" / "info" / "exclude").read_text()
    assert any("info/exclude" in note for note in notes)
    assert status(town) == ""


def test_from_ref_and_an_existing_branch_is_reused_never_reset(town):
    first = head(town)
    (town / "b.txt").write_text("b\n")
    git(town, "add", "b.txt")
    git(town, "commit", "-qm", "second")
    space = Workspace(town, "dev")
    space.ensure(from_ref=first)
    assert head(space.path) == first
    _, ended = task(space, "t1", write("c.txt", "c\n"))
    space.prune()
    notes = space.ensure(from_ref="main")           # the branch exists: reused with its commit
    assert head(space.path) == ended.head and (space.path / "c.txt").exists()
    assert any("reused as it is" in note for note in notes)
    space.prune()
    notes = space.ensure()  # (an agent spawned again under a pruned one's name: it is told, not only --from)
    assert head(space.path) == ended.head
    assert any(f"branch tt/dev exists here: agents/dev is made from it, at {ended.head[:12]}" in note
               for note in notes), notes
    with pytest.raises(WorkspaceError, match="no such commit"):
        Workspace(town, "qa").ensure(from_ref="no-such-ref")
    with pytest.raises(WorkspaceError, match="no such commit"):
        Workspace(town, "qa2").ensure(from_ref="--output=/tmp/x")


def test_a_branch_checked_out_elsewhere_is_a_clear_error(town, tmp_path):
    git(town, "branch", "tt/dev")
    git(town, "worktree", "add", "-q", str(tmp_path / "elsewhere"), "tt/dev")
    with pytest.raises(WorkspaceError, match=r"branch tt/dev is already checked out at .*elsewhere"):
        Workspace(town, "dev").ensure()
    assert not (town / "agents" / "dev").exists()


def test_a_worktree_deleted_by_hand_is_made_again_from_its_branch(town):
    space = spawned(town)
    _, ended = task(space, "t1", write("new.txt", "kept\n"))
    subprocess.run(["rm", "-rf", str(space.path)], check=True)
    begun = space.begin("t2")                       # the runner's next task finds it gone
    assert any("had been deleted" in note for note in begun.notes)
    assert begun.base == ended.head and (space.path / "new.txt").read_text() == "kept\n"


def test_a_folder_in_the_way_is_never_touched(town):
    (town / "agents" / "dev").mkdir(parents=True)
    (town / "agents" / "dev" / "mine.txt").write_text("mine\n")
    with pytest.raises(WorkspaceError, match="exists and is not a git worktree"):
        Workspace(town, "dev").ensure()
    assert (town / "agents" / "dev" / "mine.txt").read_text() == "mine\n"


def test_towns_without_a_usable_repository(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(Unavailable, match="not in a git work tree: agents share the town folder") as info:
        Workspace(plain, "dev").ensure()
    assert info.value.kind == "not-git"
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(Unavailable, match=r"no commit yet.*git commit -m 'first commit'\): agents spawned after "
                                          "that get a worktree each") as info:
        Workspace(empty, "dev").ensure()
    assert info.value.kind == "no-commit"
    assert not (empty / "agents" / "dev").exists()


def test_a_git_too_old_for_worktrees_is_said_once(town, monkeypatch):
    monkeypatch.setattr(ws, "MIN_GIT", (99, 0))
    with pytest.raises(Unavailable, match=r"git [\d.]+ is older than 99.0, which agents' worktrees need") as info:
        Workspace(town, "dev").ensure()
    assert info.value.kind == "old-git" and not (town / "agents" / "dev").exists()


def test_a_detached_town_head_still_gives_a_worktree_and_says_what_merge_needs(town):
    git(town, "checkout", "-q", "--detach")
    notes = Workspace(town, "dev").ensure()
    assert any("detached" in note and "--into BRANCH" in note for note in notes)
    with pytest.raises(WorkspaceError, match="HEAD is detached.*--into BRANCH"):
        merge_home(town, "refs/heads/tt/dev", label="dev")


def test_a_town_in_a_subfolder_of_the_repository(tmp_path):
    repo = make_repo(tmp_path / "repo", {"app/main.py": "print(1)\n", "town/README": "town\n"})
    space = spawned(repo / "town")
    _, ended = task(space, "t1", write("app/main.py", "print(2)\n"))
    assert [f.path for f in ended.files] == ["app/main.py"]
    assert status(repo) == ""


def test_submodules_do_not_break_anything_and_are_named(tmp_path):
    sub = make_repo(tmp_path / "lib", {"lib.c": "int x;\n"})
    town = make_repo(tmp_path / "town")
    git(town, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "lib")
    git(town, "commit", "-qm", "add lib")
    space = Workspace(town, "dev")
    notes = space.ensure()
    assert any("submodules" in note and "submodule update --init" in note for note in notes)
    _, ended = task(space, "t1", write("a.txt", "changed\n"))
    assert [f.path for f in ended.files] == ["a.txt"]
    _, ended = task(space, "t2", lambda root: None)
    assert ended.commit == "" and ended.files == []


# --- a commit per task ----------------------------------------------------------------------------

def test_a_task_is_one_commit_with_its_files_counted(town):
    space = spawned(town)

    def change(root: Path):
        (root / "a.txt").write_text("one\n2\nthree\nfour\n")
        (root / "with space.txt").write_text("x\n")
        (root / "line\nbreak.txt").write_text("y\ny\n")
        (root / os.fsdecode(b"caf\xe9.txt")).write_text("z\n")
        (root / "blob.bin").write_bytes(bytes(range(256)))

    begun, ended = task(space, "t-1", change, prompt="Add the users endpoint\nwith details")
    assert begun.base == head(town) and ended.base == begun.base
    assert ended.head == head(space.path) == ended.commit != ended.base
    files = {f.path: (f.added, f.deleted) for f in ended.files}
    assert files == {"a.txt": (2, 1), "with space.txt": (1, 0), "line\nbreak.txt": (2, 0),
                     os.fsdecode(b"caf\xe9.txt"): (1, 0), "blob.bin": (None, None)}
    assert all(os.path.exists(space.path / f.path) for f in ended.files)   # names round-trip
    log = git(space.path, "log", "-1", "--format=%an|%ae|%cn|%ce|%s%n%b")
    assert log.startswith("dev (tt)|dev@tinytown.invalid|dev (tt)|dev@tinytown.invalid|"
                          "tt: t-1 Add the users endpoint\n")
    assert "Tinytown-Task: t-1" in log and "Tinytown-State: completed" in log
    assert status(space.path) == "" and git(space.path, "rev-list", "--count", "HEAD").strip() == "2"


def test_nothing_changed_is_no_commit(town):
    space = spawned(town)
    begun, ended = task(space, "t1", lambda root: None)
    assert ended.commit == "" and ended.head == ended.base == begun.base and ended.files == []
    assert git(space.path, "rev-list", "--count", "HEAD").strip() == "1"


def test_renames_deletions_and_a_failed_task_are_committed(town):
    space = spawned(town)
    _, ended = task(space, "t1", lambda root: (root / "a.txt").rename(root / "b.txt"), failed=True)
    assert ended.files == [FileChange("b.txt", 0, 0, old_path="a.txt")]
    assert "Tinytown-State: failed" in git(space.path, "log", "-1", "--format=%b")
    _, ended = task(space, "t2", lambda root: (root / "b.txt").unlink())
    assert ended.files == [FileChange("b.txt", 0, 3)]


def test_a_hostile_prompt_makes_a_plain_subject(town):
    space = spawned(town)
    prompt = "--amend \x1b]0;pwned\x07\x1b[31mred " + "x" * 300 + "\nsecond line"
    _, ended = task(space, "t1", write("f", "1\n"), prompt=prompt)
    subject = git(space.path, "log", "-1", "--format=%s").rstrip("\n")
    assert subject.startswith("tt: t1 --amend ?]0;pwned??[31mred xxx")
    assert subject.isprintable() and len(subject) <= len("tt: t1 ") + ws.SUBJECT_MAX
    assert "second line" not in subject


def test_user_hooks_signing_and_config_never_get_in_the_way(town):
    hooks = town / ".git" / "hooks"
    ran = town / "hook-ran"
    for name in ("pre-commit", "commit-msg", "prepare-commit-msg", "post-commit", "post-checkout",
                 "pre-merge-commit", "post-merge", "reference-transaction"):
        (hooks / name).write_text(f"#!/bin/sh\necho {name} >> {ran}\nexit 1\n")
        (hooks / name).chmod(0o755)
    git(town, "config", "commit.gpgSign", "true")
    git(town, "config", "user.signingKey", "NO-SUCH-KEY")
    git(town, "config", "status.showUntrackedFiles", "no")
    git(town, "config", "merge.ff", "false")
    space = spawned(town)
    _, ended = task(space, "t1", write("brand-new.txt", "n\n"))
    assert [f.path for f in ended.files] == ["brand-new.txt"] and ended.commit
    other = spawned(town, "qa")
    begun = other.begin("t2", after=[ended.head])
    assert begun.base == ended.head                 # a fast-forward despite merge.ff = false
    assert not ran.exists()


def test_an_interrupted_run_is_committed_before_the_next_task(town):
    space = spawned(town)
    first = space.begin("t1")
    (space.path / "half.txt").write_text("half done\n")   # then the runner is killed: no end()
    runner_again = Workspace(town, "dev")
    begun = runner_again.begin("t1")                      # its next attempt
    assert begun.interrupted_task == "t1" and begun.interrupted_commit
    assert git(space.path, "log", "-1", "--format=%s").strip() == "tt: interrupted t1"
    assert any("interrupted run of t1" in note for note in begun.notes)
    # The task's record covers both runs: its base is the first run's, so its files include what
    # the interrupted run did (and `tt diff TASK` shows it).
    assert begun.base == first.base != begun.interrupted_commit
    (space.path / "rest.txt").write_text("the rest\n")
    ended = runner_again.end("t1", "do it")
    assert ended.base == first.base and ended.commit
    assert sorted(f.path for f in ended.files) == ["half.txt", "rest.txt"]
    assert runner_again.begin("t2").interrupted_task == ""


def test_a_first_runs_base_no_longer_behind_the_branch_is_not_kept(town):
    space = spawned(town)
    git(town, "checkout", "-q", "-b", "elsewhere")
    git(town, "commit", "-q", "--allow-empty", "-m", "not on tt/dev")
    unrelated = git(town, "rev-parse", "HEAD").strip()
    git(town, "checkout", "-q", "main")
    space.begin("t1")
    (space.gitdir / "tt-task").write_text(f"t1 {unrelated}\n")  # (as if the branch was moved since)
    begun = Workspace(town, "dev").begin("t1")
    assert begun.base == git(space.path, "rev-parse", "HEAD").strip() != unrelated


def test_an_interrupted_run_of_another_task_is_not_the_next_tasks_work(town):
    space = spawned(town)
    space.begin("t1")
    (space.path / "half.txt").write_text("half done\n")
    begun = Workspace(town, "dev").begin("t2")            # the agent's next task is another one
    assert begun.interrupted_task == "t1" and begun.base == begun.interrupted_commit
    ended = Workspace(town, "dev").end("t2", "other")
    assert ended.files == [] and ended.commit == ""


def test_a_worktree_left_mid_rebase_is_left_for_a_human(town):
    space = spawned(town)
    git(space.path, "checkout", "-q", "-b", "side")
    (space.path / "a.txt").write_text("side\n")
    git(space.path, "commit", "-qam", "side")
    git(space.path, "checkout", "-q", "tt/dev")
    begun = space.begin("t1")
    (space.path / "a.txt").write_text("dev\n")
    git(space.path, "commit", "-qam", "dev")
    git(space.path, "rebase", "side", ok=(1,))            # the CLI's rebase stops on a conflict
    before = (space.path / "a.txt").read_bytes()
    ended = space.end("t1", "do it")
    assert ended.problem == "mid-rebase" and ended.commit == ""
    # what the CLI committed before its rebase stopped is recorded (the branch as the rebase found it)
    assert [f.path for f in ended.files] == ["a.txt"] and ended.head == git(space.path, "rev-parse", "tt/dev").strip()
    assert "git rebase --continue, or --abort" in ended.notes[0]
    assert (space.path / "a.txt").read_bytes() == before and space.problem() == "mid-rebase"
    with pytest.raises(Busy, match="agents/dev is mid rebase .*commits nothing") as info:
        space.begin("t2")
    assert info.value.state == "mid-rebase"
    git(space.path, "rebase", "--abort")
    assert space.begin("t2").base != begun.base           # the human finished: work goes on


def test_a_worktree_left_mid_merge(town):
    space = spawned(town)
    git(town, "checkout", "-q", "-b", "other")
    (town / "a.txt").write_text("other\n")
    git(town, "commit", "-qam", "other")
    git(town, "checkout", "-q", "main")
    space.begin("t1")
    (space.path / "a.txt").write_text("dev\n")
    git(space.path, "commit", "-qam", "dev")
    git(space.path, "merge", "other", ok=(1,))
    ended = space.end("t1", "x")
    assert ended.problem == "mid-merge" and ended.commit == ""
    assert [f.path for f in ended.files] == ["a.txt"]          # the CLI's own commit, before its merge
    marker = space.gitdir / "tt-task"  # (it stays while the worktree waits for a human)
    marker.write_text("t1 " + "1" * 40 + "\n")  # a base git cannot find: still the problem, no error
    assert space.end("t1", "x").problem == "mid-merge"
    with pytest.raises(Busy, match="mid merge"):
        space.begin("t2")


def test_a_worktree_left_mid_bisect_records_the_branch_not_the_midpoint(town):
    space = spawned(town)
    begun = space.begin("t1")
    for n in range(3):
        (space.path / f"f{n}.txt").write_text(f"{n}\n")
        git(space.path, "add", f"f{n}.txt")
        git(space.path, "commit", "-qm", f"f{n}")
    tip = git(space.path, "rev-parse", "HEAD").strip()
    git(space.path, "bisect", "start", "HEAD", begun.base)  # HEAD now detached at a midpoint
    ended = space.end("t1", "x")
    assert ended.problem == "mid-bisect" and ended.head == tip
    assert sorted(f.path for f in ended.files) == ["f0.txt", "f1.txt", "f2.txt"]


def test_a_lock_left_by_a_killed_git_is_reported_not_removed(town):
    space = spawned(town)
    space.begin("t1")
    (space.path / "f.txt").write_text("f\n")
    lock = space.gitdir / "index.lock"
    lock.write_bytes(b"")
    ended = space.end("t1", "x")
    assert ended.problem == "index-locked" and ended.commit == ""
    assert f"has a stale index.lock (left by its CLI): finish it there (if no git command runs there, delete {lock})" \
        in ended.notes[0]
    with pytest.raises(Busy, match="stale index.lock"):
        space.begin("t2")
    assert lock.exists()
    lock.unlink()
    begun = space.begin("t2")
    assert begun.interrupted_task == "t1" and "f.txt" in git(space.path, "show", "--name-only", "--format=")


def test_a_cli_that_switched_branch_loses_nothing(town):
    space = spawned(town)
    space.begin("t1")
    git(space.path, "checkout", "-q", "-b", "feature")
    (space.path / "f.txt").write_text("f\n")
    ended = space.end("t1", "x")
    assert ended.branch == "feature" and ended.commit and tip(town, "feature") == ended.commit
    assert tip(town, "tt/dev") == ended.base and "switched agents/dev to feature" in ended.notes[0]
    begun = space.begin("t2")                             # a fast-forward: tt/dev follows
    assert begun.base == ended.commit == tip(town, "tt/dev")
    assert git(space.path, "symbolic-ref", "HEAD").strip() == "refs/heads/tt/dev"
    space.end("t2", "x")
    # Not a fast-forward: back on tt/dev, the other branch keeps its commits.
    git(town, "branch", "elsewhere", "main")
    space.begin("t3")
    git(space.path, "checkout", "-q", "elsewhere")
    (space.path / "g.txt").write_text("g\n")
    ended = space.end("t3", "x")
    begun = space.begin("t4")
    assert tip(town, "elsewhere") == ended.commit and begun.base == tip(town, "tt/dev") != ended.commit
    assert any("back on tt/dev" in note for note in begun.notes)


def test_a_detached_head_commit_gets_a_branch(town):
    space = spawned(town)
    space.begin("t1")
    git(space.path, "checkout", "-q", "--detach")
    (space.path / "d.txt").write_text("d\n")
    ended = space.end("t1", "x")
    assert ended.branch is None
    assert tip(town, f"tt/dev-detached-{ended.commit[:12]}") == ended.commit
    assert space.begin("t2").base == ended.commit == tip(town, "tt/dev")


def test_a_cli_that_moves_its_branch_back_leaves_no_commit_on_no_branch(town):
    """`git reset --hard HEAD~1` in a task: the previous task's commit was left to the reflog,
    on no branch, without a word."""
    space = spawned(town)
    _, first = task(space, "t1", write("one.txt", "1\n"))
    space.begin("t2")
    git(space.path, "reset", "-q", "--hard", "HEAD~1")
    (space.path / "two.txt").write_text("2\n")
    ended = space.end("t2", "x")
    kept = f"tt/dev-rewound-{first.commit[:12]}"
    assert tip(town, kept) == first.commit
    assert any(note == f"the CLI moved tt/dev back past {first.commit[:12]}, where the task began: that commit "
               f"is kept on branch {kept}" for note in ended.notes), ended.notes
    _, third = task(space, "t3", write("three.txt", "3\n"))  # (a task that only adds: no branch, no note)
    assert not any("rewound" in n for n in third.notes) and git(town, "branch", "--list", "tt/dev-*").count("\n") == 1


def test_prune_deletes_the_branches_kept_aside_for_the_agent_once_merged(town):
    """prune --delete-branches deleted tt/dev but left tt/dev-rewound-* and -detached-* behind
    for ever. They follow the same rule now: deleted once their commits are on your branches."""
    space = spawned(town)
    _, first = task(space, "t1", write("one.txt", "1\n"))
    space.begin("t2")
    git(space.path, "reset", "-q", "--hard", "HEAD~1")
    (space.path / "two.txt").write_text("2\n")
    space.end("t2", "x")
    kept = f"tt/dev-rewound-{first.commit[:12]}"
    git(town, "branch", "tt/devx-rewound-0123456789ab", first.commit)  # (another agent's: untouched)
    notes = space.prune(delete_branch=True)
    assert notes[-2:] == ["kept branch tt/dev: 1 commit on it is on none of your branches (tt merge dev first)",
                          f"kept branch {kept}: 1 commit on it is on none of your branches (git merge {kept} first)"]
    git(town, "merge", "-q", "--no-edit", kept)
    merge_home(town, "refs/heads/tt/dev", label="dev")
    notes = Workspace(town, "dev").prune(delete_branch=True)
    assert notes == ["deleted branch tt/dev (all its commits are on your branches)",
                     f"deleted branch {kept} (all its commits are on your branches)"]
    assert tip(town, kept) == "" and tip(town, "tt/devx-rewound-0123456789ab") == first.commit

def work_elsewhere(town: Path, after: str) -> str:
    """A head made by the agent on another host (here: another worktree's commit on top of `after`)."""
    other = spawned(town, "other")
    return task(other, "t-else", write("two.txt", "2\n"), after=[after])[1].head


def test_an_agent_back_from_another_host_continues_from_its_latest_work(town):
    """Its branch here moves to the head it made elsewhere (a fast-forward); what the branch held
    here beyond it (a run interrupted when this host was lost, redone elsewhere) is not merged
    back, which would conflict with the redone work: it is kept on a branch of its own."""
    space = spawned(town)
    _, first = task(space, "t1", write("one.txt", "1\n"))
    latest = work_elsewhere(town, first.head)
    space.begin("t-else")
    (space.path / "two.txt").write_text("half of 2, then the host was lost\n")  # (never ended here)
    begun = space.begin("t3", carried=[Carried("t-else", latest, "b")])
    left = git(town, "for-each-ref", "--format=%(objectname)", "refs/heads/tt/dev-left-*").strip()
    assert tip(town, f"tt/dev-left-{left[:12]}") == left and tip(town, "tt/dev") == latest == begun.base
    assert begun.interrupted_task == ""  # (its prompt does not say that run's changes are in the tree)
    assert (space.path / "two.txt").read_text() == "2\n" and status(space.path) == ""
    assert begun.notes[-2:] == [
        f"tt/dev here had commits that are not in its latest work (a run interrupted here, or made here "
        f"meanwhile): kept on branch tt/dev-left-{left[:12]}",
        f"brought in its latest work from host b (task t-else, {latest[:12]})"]
    (space.path / "three.txt").write_text("3, then this runner was killed\n")  # (t3 runs again here)
    again = space.begin("t3", carried=[Carried("t-else", latest, "b")])
    assert again.interrupted_task == "t3" and (space.path / "three.txt").exists()  # (its changes are in the tree)
    space.end("t3", "x")
    assert space.begin("t4", carried=[Carried("t-else", latest, "b")]).notes == []  # (it has it now)
    assert f"kept branch tt/dev-left-{left[:12]}: 1 commit of a run interrupted here and redone on another host " \
        f"(git branch -D tt/dev-left-{left[:12]} drops it)" in space.prune(delete_branch=True)  # (not: git merge it)


def test_a_name_git_cannot_take_as_a_branch_is_refused_wherever_the_worktree_is_made(town):
    """`tt spawn y.lock --host b` from another folder (possible(): nothing made here) accepted a
    name git refuses as a branch, and every task then failed on b; a spawn here refused it."""
    for make in (Workspace.ensure, Workspace.possible):
        with pytest.raises(WorkspaceError, match="'tt/y.lock' cannot be a git branch name: rename the agent"):
            make(Workspace(town, "y.lock"))
    assert not (town / "agents" / "y.lock").exists()

def test_ran_here_names_the_task_whose_run_began_in_this_worktree_and_did_not_end(town):
    """A task failed for crashing too often commits what its runs left as its work only in the
    worktree they ran in: on a host it moved to, that worktree's tip is neither its work nor the
    agent's latest (review: the failed task recorded a stale tip, and the next task lost the
    agent's work from the other host)."""
    space = Workspace(town, "dev")
    assert not space.ran_here("t1")               # (no worktree here at all)
    space.begin("t1")
    assert space.ran_here("t1") and not space.ran_here("t2")
    space.end("t1", "x")
    assert not space.ran_here("t1")

def test_a_branch_made_on_arrival_starts_at_the_agents_latest_work(town):
    """A host that never had the agent: its branch, made from this checkout's HEAD, goes straight
    to the agent's latest work, with no branch kept aside (that HEAD is the user's commit)."""
    start = head(town)
    space = spawned(town)
    _, first = task(space, "t1", write("one.txt", "1\n"))
    latest = work_elsewhere(town, first.head)
    (town / "main.txt").write_text("main moved on\n")
    git(town, "add", "main.txt")
    git(town, "commit", "-qm", "main moves on")  # (this checkout's HEAD is not behind the agent's work)
    newbie = Workspace(town, "newbie")
    begun = newbie.begin("t5", carried=[Carried("t-else", latest, "b")])
    assert tip(town, "tt/newbie") == latest == begun.base and head(town) != start
    assert not git(town, "branch", "--list", "tt/newbie-*")
    assert begun.notes[-1] == f"brought in its latest work from host b (task t-else, {latest[:12]})"

def test_a_cli_that_commits_itself_is_still_measured(town):
    space = spawned(town)
    begun = space.begin("t1")
    (space.path / "a.txt").write_text("mine\n")
    git(space.path, "commit", "-qam", "the CLI's own commit")
    (space.path / "extra.txt").write_text("e\n")
    ended = space.end("t1", "x")
    assert ended.commit and ended.base == begun.base
    assert {f.path for f in ended.files} == {"a.txt", "extra.txt"}
    begun = space.begin("t2")
    (space.path / "b.txt").write_text("b\n")
    git(space.path, "add", "b.txt")
    git(space.path, "commit", "-qm", "all committed by the CLI")
    ended = space.end("t2", "x")
    assert ended.commit == "" and ended.head == head(space.path) and [f.path for f in ended.files] == ["b.txt"]


# --- dependencies carry work ----------------------------------------------------------------------

def test_dependencies_merge_upstream_heads_before_the_cli_starts(town):
    dev, tester, reviewer = spawned(town, "dev"), spawned(town, "tester"), spawned(town, "reviewer")
    _, built = task(dev, "t1", write("api.py", "def users(): ...\n"))
    _, tested = task(tester, "t2", write("test_api.py", "def test(): ...\n"))
    begun = reviewer.begin("t3", after=[built.head, tested.head])
    assert (reviewer.path / "api.py").exists() and (reviewer.path / "test_api.py").exists()
    assert set(begun.merged) == {built.head, tested.head}
    assert git(reviewer.path, "merge-base", "--is-ancestor", built.head, "HEAD", ok=(0,)) == ""
    ended = reviewer.end("t3", "review")
    assert ended.commit == "" and ended.base == begun.base    # the merge is not the task's change
    # One upstream head ahead of this branch: a fast-forward, no merge commit.
    _, more = task(dev, "t4", write("api.py", "def users(): return []\n"))
    qa = spawned(town, "qa")
    assert qa.begin("t5", after=[more.head]).base == more.head


def test_a_conflicting_dependency_fails_before_the_cli_and_changes_nothing(town):
    dev, tester, reviewer = spawned(town, "dev"), spawned(town, "tester"), spawned(town, "reviewer")
    _, a = task(dev, "t1", write("a.txt", "dev's\n"))
    _, b = task(tester, "t2", write("a.txt", "tester's\n"))
    (reviewer.path / "ignored-by-nobody.txt").write_text("left by an interrupted run\n")
    reviewer.begin("t0")                                  # marker: the next begin commits this first
    before_files = sorted(p.name for p in reviewer.path.iterdir())
    with pytest.raises(MergeConflict, match=r"conflicts in a.txt: nothing merged, agents/reviewer unchanged") as info:
        reviewer.begin("t3", after=[a.head, b.head])
    assert info.value.files == ["a.txt"]
    assert status(reviewer.path) == "" and reviewer.problem() == ""
    assert sorted(p.name for p in reviewer.path.iterdir()) == before_files
    assert (reviewer.path / "a.txt").read_text() == "one\ntwo\nthree\n"
    assert git(reviewer.path, "log", "-1", "--format=%s").strip() == "tt: interrupted t0"
    with pytest.raises(WorkspaceError, match="not a commit id"):
        reviewer.begin("t4", after=["main"])


def test_a_dependency_never_overwrites_a_change_made_between_tasks(town):
    dev, reviewer = spawned(town, "dev"), spawned(town, "reviewer")
    _, built = task(dev, "t1", lambda root: ((root / "a.txt").write_text("dev's\n"), (root / "n.txt").write_text("n\n")))
    (reviewer.path / "a.txt").write_text("edited by hand between tasks\n")
    before = head(reviewer.path)
    with pytest.raises(WorkspaceError, match=r"could not bring agents/reviewer to the merged work: .*a.txt.*nothing changed"):
        reviewer.begin("t2", after=[built.head])
    assert head(reviewer.path) == before and (reviewer.path / "a.txt").read_text() == "edited by hand between tasks\n"
    git(reviewer.path, "checkout", "a.txt")
    (reviewer.path / "n.txt").write_text("untracked, in the way\n")
    with pytest.raises(WorkspaceError, match=r"n.txt.*nothing changed"):
        reviewer.begin("t2", after=[built.head])
    assert head(reviewer.path) == before and (reviewer.path / "n.txt").read_text() == "untracked, in the way\n"


# --- bringing work home, pruning ------------------------------------------------------------------

def test_merge_home_into_the_users_branch(town):
    dev = spawned(town)
    _, ended = task(dev, "t1", write("api.py", "x\n"))
    merged = merge_home(town, dev.ref, label="dev")
    assert merged.how == "fast-forward" and head(town) == ended.head and (town / "api.py").exists()
    assert merge_home(town, dev.ref, label="dev").how == "up to date"
    (town / "mine.txt").write_text("user's work\n")
    git(town, "add", "mine.txt")
    git(town, "commit", "-qm", "user's work")
    _, ended = task(dev, "t2", write("api.py", "y\n"))
    merged = merge_home(town, ended.head, label="task t2")  # a task's head
    assert merged.how == "merge" and git(town, "log", "-1", "--format=%s%n%an").startswith(
        "tt: merge task t2 into main\nUna User")
    assert (town / "api.py").read_text() == "y\n" and status(town) == ""


def test_merge_home_refuses_a_dirty_target_and_a_conflict_changing_nothing(town):
    dev = spawned(town)
    task(dev, "t1", write("a.txt", "dev's\n"))
    (town / "a.txt").write_text("uncommitted\n")
    before = head(town)
    with pytest.raises(WorkspaceError, match=r"has uncommitted changes: commit or stash them"):
        merge_home(town, dev.ref, label="dev")
    assert (town / "a.txt").read_text() == "uncommitted\n" and head(town) == before
    git(town, "commit", "-qam", "user's a.txt")
    before = head(town)
    with pytest.raises(MergeConflict, match=r"merging dev into main would conflict in a.txt: nothing changed") as info:
        merge_home(town, dev.ref, label="dev")
    assert info.value.files == ["a.txt"]
    assert head(town) == before and status(town) == "" and not (town / ".git" / "MERGE_HEAD").exists()



def test_merge_home_names_the_untracked_files_in_the_way(town):
    dev = spawned(town)
    task(dev, "t1", lambda root: [(root / name).write_text("dev's\n") for name in ("new one.txt", "b.txt")])
    for name in ("new one.txt", "b.txt"):
        (town / name).write_text("the user's own, untracked\n")
    before = head(town)
    # (git names them on the lines after its error: the one line has them too)
    with pytest.raises(WorkspaceError, match=r"would be overwritten by merge: (new one.txt, b.txt|b.txt, new one.txt)"):
        merge_home(town, dev.ref, label="dev")
    assert (town / "new one.txt").read_text() == "the user's own, untracked\n" and head(town) == before


def test_merge_home_into_a_branch_not_checked_out(town):
    dev = spawned(town)
    git(town, "branch", "release")
    _, ended = task(dev, "t1", write("api.py", "x\n"))
    merged = merge_home(town, dev.ref, into="release", label="dev")
    assert merged.where is None and tip(town, "release") == ended.head and head(town) != ended.head
    git(town, "commit", "-q", "--allow-empty", "-m", "release note", ok=(0,))
    git(town, "branch", "-f", "release", "main")
    _, ended = task(dev, "t2", write("api2.py", "y\n"))
    merged = merge_home(town, dev.ref, into="release", label="dev")
    assert merged.how == "merge" and git(town, "rev-parse", "release^2").strip() == ended.head
    with pytest.raises(WorkspaceError, match="no branch 'nope'"):
        merge_home(town, dev.ref, into="nope")
    with pytest.raises(WorkspaceError, match="not a branch name"):
        merge_home(town, dev.ref, into="-x")


def test_prune_keeps_unmerged_branches_and_deletes_merged_ones_when_asked(town):
    dev = spawned(town)
    task(dev, "t1", write("api.py", "x\n"))
    (dev.path / "stray.txt").write_text("left over\n")
    (dev.path / ".gitignore").write_text("*.secret\nbuild/\n")
    (dev.path / "creds.secret").write_text("not committed: git ignores it\n")
    (dev.path / "build").mkdir()
    (dev.path / "build" / "out.o").write_text("o\n")
    notes = dev.prune(delete_branch=True)
    assert not dev.path.exists() and any("held uncommitted changes" in n for n in notes)
    assert any(n.startswith("removed agents/dev, and with it what git ignores there: ") and "creds.secret" in n
               and "build/" in n for n in notes), notes  # (said: it is gone with the folder)
    assert any("kept branch tt/dev: 2 commits on it are on none of your branches" in n for n in notes)
    assert "stray.txt" in git(town, "show", "--name-only", "--format=", "tt/dev")
    merge_home(town, "refs/heads/tt/dev", label="dev")
    assert Workspace(town, "dev").prune(delete_branch=True)[-1].startswith("deleted branch tt/dev")
    assert tip(town, "tt/dev") == ""
    # Merged only into another agent's branch is not home yet.
    a, b = spawned(town, "a"), spawned(town, "b")
    _, ended = task(a, "t2", write("z.txt", "z\n"))
    b.begin("t3", after=[ended.head])
    b.end("t3", "x")
    assert "on none of your branches" in a.prune(delete_branch=True)[-1]


def test_prune_names_the_branch_it_committed_leftovers_on(town):
    """Someone switched agents/dev to a branch of their own: prune commits what is left there, on
    that branch, and said "committed as X ... kept branch tt/dev", sending them to the wrong one."""
    dev = spawned(town)
    git(dev.path, "checkout", "-q", "-b", "side")
    (dev.path / "wip.txt").write_text("work in progress\n")
    notes = dev.prune()
    committed = [n for n in notes if "held uncommitted changes" in n]
    assert len(committed) == 1 and committed[0].endswith(" on branch side"), notes
    assert "wip.txt" in git(town, "show", "--name-only", "--format=", "side")


def test_prune_refuses_a_worktree_holding_a_repository_of_its_own(town):
    """Its files are on no branch: removing the worktree would delete them."""
    space = spawned(town)
    git(space.path, "init", "-q", "proj")
    (space.path / "proj" / "main.rs").write_text("fn main() {}\n")
    git(space.path / "proj", "add", "-A")
    git(space.path / "proj", "commit", "-qm", "its own")
    with pytest.raises(WorkspaceError, match="agents/dev/proj is a git repository of its own"):
        space.prune()
    assert (space.path / "proj" / "main.rs").exists()
    assert "proj" not in git(town, "ls-tree", "-r", "tt/dev")


def test_prune_refuses_a_repository_with_commits_in_what_git_ignores(town):
    """What git ignores goes with the folder, but a repository in it has a history of its own:
    prune used to delete it, commits and all."""
    space = spawned(town)
    (space.path / ".gitignore").write_text("build/\n")
    git(space.path, "init", "-q", "build/deep/nested")
    nested = space.path / "build" / "deep" / "nested"
    (nested / "f.txt").write_text("i\n")
    git(nested, "add", "-A")
    git(nested, "commit", "-qm", "inner")
    (space.path / "build" / "empty").mkdir()
    git(space.path / "build" / "empty", "init", "-q")  # no commits: nothing of its own to lose
    (space.path / "build" / "broken" / ".git").mkdir(parents=True)  # not a repository git can read
    with pytest.raises(WorkspaceError, match=r"agents/dev/build/deep/nested is a git repository with commits of its "
                                             r"own in what git ignores there"):
        space.prune()
    assert (nested / "f.txt").exists()
    shutil.rmtree(nested)
    assert any("what git ignores there: build/" in n for n in space.prune())


def test_prune_refuses_a_worktree_mid_rebase(town):
    space = spawned(town)
    (space.path / ".git").read_text()
    gitdir = space.gitdir
    (gitdir / "rebase-merge").mkdir()
    with pytest.raises(Busy):
        space.prune()
    assert space.path.exists()


# --- tt diff --------------------------------------------------------------------------------------

def test_diff_commands_for_a_task_and_an_agent(town):
    dev = spawned(town)
    _, ended = task(dev, "t1", write("api.py", "x\n"))
    stat = subprocess.run(diff_argv(town, base=ended.base, head=ended.head, stat=True), capture_output=True, text=True)
    assert "api.py | 1 +" in stat.stdout
    full = subprocess.run(diff_argv(town, branch=dev.branch), capture_output=True, text=True)
    assert "+x" in full.stdout
    with pytest.raises(WorkspaceError, match="no recorded commits"):
        diff_argv(town, base="", head="")
    with pytest.raises(WorkspaceError):
        diff_argv(town, base="--output=/tmp/x", head=ended.head)


def test_git_versions_are_read():
    assert ws.git_version("git version 2.39.5\n") == (2, 39, 5)
    assert ws.git_version("git version 2.45.GIT") == (2, 45)
    assert ws.git_version("git version 2.37.1 (Apple Git-137.1)") < ws.MIN_GIT <= ws.git_version("git version 2.38.0")
    assert ws.git_version("nonsense") == (0,)


def test_numstat_parsing():
    out = b"1\t2\tplain\0-\t-\tbin\0" + b"3\t0\t\0old name\0new\nname\0"
    assert parse_numstat(out) == [FileChange("plain", 1, 2), FileChange("bin", None, None),
                                  FileChange("new\nname", 3, 0, "old name")]
    assert parse_numstat(b"") == []
    assert FileChange.from_json(FileChange("x", None, 1, "y").to_json()) == FileChange("x", None, 1, "y")


# --- no path that throws work away ----------------------------------------------------------------

def test_the_module_never_runs_a_command_that_discards_work():
    source = Path(ws.__file__).read_text()
    code = re.sub(r'""".*?"""', "", source, flags=re.S)       # docstrings may name what is never done
    code = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    assert re.findall(r'"reset", [^\n]*', code) == ['"reset", "-q", "--keep", to, ok=range(0, 256), identity=self.agent)']
    for forbidden in ('"--hard"', '"--merge"', '"clean"', '"-D"', '"--force"', '"-f"', '"--delete"', '"branch", "-d"', '"--orphan"', '"checkout", "-f"', '"-B"'):
        assert forbidden not in code, forbidden
    # The one ref deletion names the commit it expects, so a branch that moved is never deleted.
    assert re.findall(r'"update-ref", [^\n]*"-d"[^\n]*', code) == [
        '"update-ref", "-m", why, "-d", f"refs/heads/{branch}", oid)']


# --- config ---------------------------------------------------------------------------------------

def test_workspace_config(tmp_path):
    (tmp_path / "tinytown.toml").write_text('name = "t"\n[workspace]\nmode = "shared"\nbranch_prefix = "ai/"\n')
    assert load(tmp_path).workspace == WorkspacePolicy(mode="shared", branch_prefix="ai/")
    (tmp_path / "tinytown.toml").write_text('name = "t"\n')
    assert load(tmp_path).workspace == WorkspacePolicy(mode="worktree", branch_prefix="tt/")
    for text, pattern in [('mode = "private"', r':3: mode: must be "worktree" or "shared"'),
                          ('branch_prefix = "a..b/"', r":3: branch_prefix: cannot start a git branch name"),
                          ('branch_prefix = "-x/"', r":3: branch_prefix: cannot start"),
                          ('branch_prefix = ".x/"', r":3: branch_prefix: cannot start"),
                          ('branch_prefix = "a b/"', r":3: branch_prefix: cannot start"),
                          ('prefix = "x"', r":3: prefix: unknown key in \[workspace\] \(did you mean 'branch_prefix'\?\)")]:
        (tmp_path / "tinytown.toml").write_text(f'name = "t"\n[workspace]\n{text}\n')
        with pytest.raises(TinytownError, match=pattern):
            load(tmp_path)


def test_git_commands_run_side_by_side_answer_each_and_a_failure_is_one_line(town):
    """git_together (two git commands a task needs, neither needing the other's answer): each
    result as git() gives it; a status outside a command's `ok` is a WorkspaceError naming it."""
    first = head(town)
    base, tree = ws.git_together(town, (("merge-base", first, first), (0, 1)), (("write-tree",), (0,)))
    assert base.stdout.decode().strip() == first
    assert tree.stdout.decode().strip() == git(town, "rev-parse", "HEAD^{tree}").strip()
    with pytest.raises(WorkspaceError, match=r"^git cat-file failed in .*: fatal: "):
        ws.git_together(town, (("rev-parse", "HEAD"), (0,)), (("cat-file", "-t", "0" * 40), (0,)))
    assert status(town) == ""


def test_a_dependency_that_is_a_fast_forward_or_already_in_makes_no_merge_commit(town):
    dev, rev = Workspace(town, "dev"), Workspace(town, "rev")
    dev.ensure(), rev.ensure()
    dev.begin("t1")
    (dev.path / "a.txt").write_text("dev\n")
    upstream = dev.end("t1", "change").head
    rev.begin("t2", after=[upstream])                 # rev has not moved: a fast-forward
    assert head(rev.path) == upstream and (rev.path / "a.txt").read_text() == "dev\n"
    rev.end("t2", "nothing")
    rev.begin("t3", after=[upstream])                 # already in
    assert head(rev.path) == upstream
    assert git(rev.path, "log", "--merges", "--oneline") == ""


def test_a_dependency_task_costs_these_git_processes_and_no_more(town, monkeypatch):
    """The bench row's budget (scripts/benchsuite/workspace.py) counted in processes: merging an
    upstream head, then committing the task, runs two pairs side by side and two alone; the
    commits and the branch move are written without a process (git_store)."""
    dev, rev = Workspace(town, "dev"), Workspace(town, "rev")
    dev.ensure(), rev.ensure()
    task(rev, "r1", write("rev.txt", "r\n"))
    _, upstream = task(dev, "d1", write("dev.txt", "d\n"))
    ran = []
    real_run = ws._run
    monkeypatch.setattr(ws, "_run", lambda cwd, commands, **kw: ran.append([ws._subcommand(args) for args, _ in commands])
                        or real_run(cwd, commands, **kw))
    begun, ended = task(rev, "r2", write("more.txt", "m\n"), after=[upstream.head])
    assert ran == [["merge-base", "merge-tree"], ["reset"], ["add"], ["diff", "write-tree"]]
    assert rev.watch.answers == 1   # (that add was handed the changed paths: tests/test_worktree_watch.py)
    assert len(begun.merged) == 1 and ended.commit and (rev.path / "dev.txt").exists()
    assert git(rev.path, "rev-parse", "HEAD~1^2").strip() == upstream.head
    assert status(rev.path) == "" and git(town, "fsck", "--strict", "--no-dangling") == ""


def test_processes_are_read_to_the_end_on_both_streams_and_given_up_on_at_the_deadline():
    from tinytown.supervisor.procutil import capture
    big = "import sys; sys.stdout.write('o' * 300000); sys.stderr.write('e' * 300000); sys.exit(3)"
    procs = [subprocess.Popen([sys.executable, "-c", big], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    assert capture(procs, 60) == [(b"o" * 300000, b"e" * 300000)] * 2
    assert [p.returncode for p in procs] == [3, 3]
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            capture([stuck], 0.2)
    finally:
        stuck.kill()
        stuck.wait()
