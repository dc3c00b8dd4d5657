"""Agents' git worktrees in a running town (issue 10): real git, real supervisor, fake CLIs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import TownHarness, wait_for

USER = ("-c", "user.name=User", "-c", "user.email=user@example.invalid")


def git(root, *args) -> str:
    done = subprocess.run(["git", *USER, *args], cwd=root, capture_output=True, check=True)
    return done.stdout.decode()


@pytest.fixture
def git_town(make_town):
    """Factory: a town whose folder is a git repository with one commit on main (app.py and the
    town's own tinytown.toml and .gitignore, as a user who commits everything has)."""

    def make(name: str = "gittown", extra: str = "") -> TownHarness:
        harness = make_town(name, extra, folder=name)
        (harness.root / "app.py").write_text("print('hello')\n")
        git(harness.root, "init", "-q", "-b", "main")
        git(harness.root, "add", "-A")
        git(harness.root, "commit", "-q", "-m", "first commit")
        return harness

    return make


def dependent(t: TownHarness, agent: str, text: str, after: list[str]) -> str:
    """A task that runs after others, made through the coordination store (as `tt assign --after` does)."""
    from tinytown.supervisor.coordination import Coordination
    return Coordination(t.town()).create_task(text, agent=agent, after=after).task.id


def subjects(root, rev_range: str) -> list[str]:
    return git(root, "log", "--format=%s", rev_range).splitlines()


def test_tutorial_in_a_git_town_gives_a_branch_and_a_commit_per_task(git_town):
    t = git_town()
    root = t.root
    spawned = t.tt("spawn", "dev", "--model", "claude")
    assert "agents/dev" in spawned.out and "tt/dev" in spawned.out
    assert "agents/.gitignore" in spawned.err  # said what it did to keep the worktrees out of git status
    t.tt("spawn", "tester", "--model", "auggie")
    t.tt("spawn", "reviewer", "--model", "codex")
    listed = {a["name"]: a for a in t.json("list")}
    assert listed["dev"]["workspace"] == "worktree" and listed["dev"]["branch"] == "tt/dev"
    assert listed["dev"]["workdir"] == str(root / "agents" / "dev")

    dev = t.assign("dev", "Create the endpoint\n@write api.py def create_user(): pass")
    tester = t.assign("tester", "Write the tests\n@write tests/test_api.py def test_create(): pass")
    for task_id in (dev, tester):
        assert t.wait_task(task_id)["state"] == "completed"
    reviewer = dependent(t, "reviewer", "Review the implementation and tests\n@ls", [dev, tester])
    review = t.wait_task(reviewer)
    assert review["state"] == "completed", review

    # each agent's CLI ran in its worktree; the reviewer's held the other two agents' work
    assert t.recorded(dev)[0]["cwd"] == str(root / "agents" / "dev")
    assert t.recorded(reviewer)[0]["cwd"] == str(root / "agents" / "reviewer")
    seen = (t.record / f"{reviewer}.ls").read_text().split()
    assert {"api.py", "tests/test_api.py", "app.py"} <= set(seen)

    # one commit per task on three branches, the town folder's branch untouched so far
    dev_task, tester_task = t.task(dev), t.task(tester)
    assert subjects(root, "main..tt/dev") == [f"tt: {dev} Create the endpoint"]
    assert subjects(root, "main..tt/tester") == [f"tt: {tester} Write the tests"]
    assert subjects(root, "tt/dev..tt/reviewer")[-1] == f"tt: {tester} Write the tests"
    assert dev_task["files"] == [{"path": "api.py", "added": 1, "deleted": 0}]
    assert dev_task["base"] == git(root, "rev-parse", "main").strip()
    assert dev_task["head"] == git(root, "rev-parse", "tt/dev").strip()
    assert review["files"] == [] and review["head"] == review["base"]  # merged work, nothing of its own
    for upstream in (dev_task, tester_task):
        git(root, "merge-base", "--is-ancestor", upstream["head"], review["base"])
    assert "agents" not in git(root, "status", "--porcelain")  # worktrees out of the user's status

    shown = t.tt("task", dev).out
    assert f"{dev_task['base'][:12]}..{dev_task['head'][:12]}" in shown and "+1 -0" in shown and "api.py" in shown
    stat = t.tt("diff", dev, "--stat").out
    assert "api.py" in stat and "1 insertion" in stat
    assert "tests/test_api.py" in t.tt("diff", "tester").out

    # bringing work home
    merged = t.tt("merge", "dev").out
    assert merged.startswith("merged dev into main (fast-forward,")
    assert (root / "api.py").read_text() == "def create_user(): pass\n"
    assert t.tt("merge", "dev").out.strip() == "dev: already in main"
    (root / "app.py").write_text("changed by hand\n")
    refused = t.tt("merge", "tester", check=False)
    assert refused.returncode == 1 and refused.err.count("\n") == 1 and "uncommitted changes" in refused.err
    assert not (root / "tests").exists() and (root / "app.py").read_text() == "changed by hand\n"
    git(root, "branch", "side", "main")  # a branch checked out nowhere: merged in the object store
    into_side = t.tt("merge", tester[:8], "--into", "side").out
    assert into_side.startswith(f"merged task {tester[:8]} into side (merge,")
    assert git(root, "show", "side:tests/test_api.py") == "def test_create(): pass\n"
    assert (root / "app.py").read_text() == "changed by hand\n"


def test_a_conflicting_dependency_fails_the_task_before_its_cli_starts(git_town):
    t = git_town()
    for name in ("dev", "tester", "reviewer"):
        t.tt("spawn", name)
    dev = t.assign("dev", "@write app.py print('dev')")
    tester = t.assign("tester", "@write app.py print('tester')")
    for task_id in (dev, tester):
        assert t.wait_task(task_id)["state"] == "completed"
    worktree = t.root / "agents" / "reviewer"
    before = git(worktree, "rev-parse", "HEAD")
    reviewer = dependent(t, "reviewer", "review", [dev, tester])
    failed = t.wait_task(reviewer)
    assert failed["state"] == "failed" and "conflicts in app.py" in failed["reason"], failed
    assert not (t.record / f"{reviewer}.json").exists()  # its CLI never started
    assert git(worktree, "rev-parse", "HEAD") == before and git(worktree, "status", "--porcelain") == ""
    assert (worktree / "app.py").read_text() == "print('hello')\n"
    # `tt diff` says why it has no commits (it said "it ran in the shared town folder")
    refused = t.tt("diff", reviewer, check=False)
    assert refused.returncode == 1 and f"task {reviewer} has no commits (it ended failed without one: " in refused.err
    assert "conflicts in app.py" in refused.err and "shared" not in refused.err
    # and the agent goes on with its next task
    after = t.assign("reviewer", "@echo next")
    assert t.wait_task(after)["state"] == "completed"


def test_a_crash_mid_task_leaves_work_the_next_attempt_commits_and_is_told_about(git_town):
    t = git_town()
    t.tt("spawn", "dev")
    task_id = t.assign("dev", "Build it\n@write half.txt started\n@gate go")
    wait_for(lambda: (t.root / "agents" / "dev" / "half.txt").exists(), 30, "the first attempt's file")
    runner = t.agent("dev")["pid"]
    os.kill(runner, signal.SIGKILL)  # the runner dies mid-task: its task is delivered again
    wait_for(lambda: t.agent("dev")["pid"] not in (None, runner), 30, "a new runner")
    (t.record / "go").write_text("")
    done = t.wait_task(task_id)
    assert done["state"] == "completed" and done["attempts"] == 2, done
    prompt = t.recorded(task_id)[1]
    # (the second attempt wrote the same file again: nothing new to commit after the interrupted run's)
    interrupted = git(t.root, "log", "-1", "--format=%H %s", "tt/dev").split()
    assert interrupted[1:] == ["tt:", "interrupted", task_id]
    assert prompt.startswith(f"[Tinytown] An earlier run of task {task_id} was interrupted; the changes it had "
                             f"made are committed as {interrupted[0][:12]}".encode())
    assert prompt.endswith(b"Build it\n@write half.txt started\n@gate go")
    assert "half.txt" in git(t.root, "show", "--name-only", "--format=", interrupted[0])
    # The task's record covers both attempts: its base is the first attempt's, so its files
    # include what the interrupted one did.
    assert done["base"] == git(t.root, "rev-parse", f"{interrupted[0]}^").strip()
    assert [f["path"] for f in done["files"]] == ["half.txt"], done["files"]


def test_a_task_failed_for_crashing_its_agent_records_the_work_it_left(git_town):
    """"agent crashed 3 times": what the runs wrote is committed on the branch, and the task's
    record says so (base..head, its files), as for any failed task; tt diff shows it."""
    t = git_town()
    t.tt("spawn", "dev")
    task_id = t.assign("dev", "@write crash.txt c\n@kill-runner")
    failed = t.wait_task(task_id, timeout=90)
    assert failed["state"] == "failed" and failed["reason"].startswith("agent crashed 3 times"), failed
    assert [f["path"] for f in failed["files"]] == ["crash.txt"], failed
    assert failed["head"] == git(t.root, "rev-parse", "tt/dev").strip()
    assert "crash.txt" in t.tt("diff", task_id, "--stat").out


def test_a_worktree_left_mid_rebase_fails_its_task_and_shows_in_status(git_town):
    t = git_town()
    t.tt("spawn", "dev")
    task_id = t.assign("dev", "@write file.txt x\n@gate go")
    gitdir = t.root / ".git" / "worktrees" / "dev"
    wait_for(lambda: (t.record / f"{task_id}.json").exists(), 30, "the CLI to start")
    (gitdir / "rebase-merge").mkdir()  # what a CLI's `git rebase` that stopped on a conflict leaves
    (t.record / "go").write_text("")
    failed = t.wait_task(task_id)
    assert failed["state"] == "failed" and "agents/dev is mid rebase" in failed["reason"], failed
    agent = next(a for a in t.json("status")["agents"] if a["name"] == "dev")
    assert "mid rebase" in agent["workspace_problem"]
    assert "mid rebase" in t.tt("status").out
    blocked = t.assign("dev", "@echo next")
    assert "mid rebase" in t.wait_task(blocked)["reason"]
    assert not (t.record / f"{blocked}.json").exists()
    (gitdir / "rebase-merge").rmdir()  # the human finished it
    assert next(a for a in t.json("status")["agents"] if a["name"] == "dev")["workspace_problem"] == ""
    again = t.assign("dev", "@echo again")
    assert t.wait_task(again)["state"] == "completed"
    assert "file.txt" in git(t.root, "show", "--name-only", "--format=", "tt/dev")  # committed, not lost


def test_a_repository_the_cli_nests_in_its_worktree_fails_the_task_naming_it(git_town):
    """A CLI's `git init` or `git clone` inside its worktree: one with no commit stops git adding
    anything, one with commits is staged as its commit id only. Either way the task fails naming
    the folder (it used to say completed, with every later task failing unexplained), and no file
    is lost."""
    import shutil
    t = git_town()
    t.tt("spawn", "dev")
    worktree = t.root / "agents" / "dev"

    def run_with(prepare, text: str) -> dict:
        task_id = t.assign("dev", f"@write {text}.txt x\n@gate {text}")
        wait_for(lambda: (t.record / f"{task_id}.json").exists(), 30, "the CLI to start")
        prepare()
        (t.record / text).write_text("")
        return t.wait_task(task_id)

    def empty_repository():
        git(worktree, "init", "-q", "empty")
        (worktree / "empty" / "n.txt").write_text("n\n")

    failed = run_with(empty_repository, "first")
    assert failed["state"] == "failed", failed
    assert "agents/dev/empty is a git repository of its own with no commit" in failed["reason"]
    shutil.rmtree(worktree / "empty" / ".git")  # the human's fix: the next task commits all of it
    assert t.wait_task(t.assign("dev", "@echo again"))["state"] == "completed"
    on_branch = git(t.root, "ls-tree", "-r", "--name-only", "tt/dev").split()
    assert "first.txt" in on_branch and "empty/n.txt" in on_branch

    def cloned_project():
        git(worktree, "init", "-q", "proj")
        (worktree / "proj" / "main.rs").write_text("fn main() {}\n")
        git(worktree / "proj", "add", "-A")
        git(worktree / "proj", "commit", "-qm", "its own")

    failed = run_with(cloned_project, "second")
    assert failed["state"] == "failed", failed
    assert "agents/dev/proj is a git repository of its own" in failed["reason"]
    assert "its files are not committed on tt/dev" in failed["reason"]
    tree = git(t.root, "ls-tree", "-r", "tt/dev")
    assert "second.txt" in tree and "proj" not in tree   # the rest committed; no bare commit id for proj
    assert "is a git repository of its own" in t.wait_task(t.assign("dev", "@echo still there"))["reason"]
    shutil.rmtree(worktree / "proj" / ".git")  # the human's fix: the next task commits its files
    assert t.wait_task(t.assign("dev", "@echo and now"))["state"] == "completed"
    assert "proj/main.rs" in git(t.root, "ls-tree", "-r", "--name-only", "tt/dev").split()


def test_a_town_that_is_not_a_git_repository_shares_its_folder_and_says_so_once(town):
    first = town.tt("spawn", "dev")
    assert "not in a git work tree" in first.err and "agents share the town folder" in first.err
    second = town.tt("spawn", "tester")
    assert "git" not in second.err
    assert town.agent("dev")["workspace"] == "shared" and town.agent("dev")["workdir"] == str(town.root)
    task_id = town.assign("dev", "@write shared.txt here")
    done = town.wait_task(task_id)
    assert done["state"] == "completed" and done["head"] == "" and done["files"] == []
    assert town.recorded(task_id)[0]["cwd"] == str(town.root) and (town.root / "shared.txt").exists()
    refused = town.tt("diff", "dev", check=False)
    assert refused.returncode == 1 and "shared town folder" in refused.err


def test_spawn_options_shared_and_from(git_town):
    t = git_town()
    git(t.root, "branch", "base-here")
    (t.root / "later.py").write_text("x\n")
    git(t.root, "add", "later.py")
    git(t.root, "commit", "-q", "-m", "later")
    data = t.json("spawn", "dev", "--from", "base-here")
    assert data["workspace"] == "worktree" and data["workspace_why"] == ""
    assert git(t.root, "rev-parse", "tt/dev") == git(t.root, "rev-parse", "base-here")
    assert not (t.root / "agents" / "dev" / "later.py").exists()
    assert t.json("spawn", "helper", "--shared")["workspace"] == "shared"
    assert not (t.root / "agents" / "helper").exists()
    bad = t.tt("spawn", "other", "--shared", "--from", "main", check=False)
    assert bad.returncode == 1 and "--from needs a worktree" in bad.err
    missing = t.tt("spawn", "third", "--from", "no-such-ref", check=False)
    assert missing.returncode == 1 and "no-such-ref" in missing.err
    assert "third" not in [a["name"] for a in t.json("list")]  # a refused spawn registers nothing


def test_a_worktree_deleted_between_tasks_is_made_again_and_the_next_task_runs(git_town):
    """The runner stood in the deleted folder: the CLI's start asked for the working directory,
    got ENOENT, and blamed the CLI ("cannot start 'claude' ... fix [agent_clis] (or PATH)"),
    failing the agent until `tt restart`."""
    import shutil
    t = git_town()
    t.tt("spawn", "dev")
    first = t.assign("dev", "@write a.txt x\n@gate deleted")
    wait_for(lambda: (t.root / "agents" / "dev" / "a.txt").exists(), 30, "the first task's file")
    shutil.rmtree(t.root / "agents" / "dev")  # under the running task
    (t.record / "deleted").touch()
    failed = t.wait_task(first)
    assert failed["state"] == "failed" and failed["reason"].startswith(
        "could not commit its work: agents/dev was deleted (its next task makes it again from branch tt/dev"), failed
    second = t.assign("dev", "@write b.txt y")
    done = t.wait_task(second)
    assert done["state"] == "completed", done
    assert t.agent("dev")["state"] == "idle"
    assert (t.root / "agents" / "dev" / "b.txt").read_text() == "y\n"


def test_diff_and_merge_say_why_a_task_has_no_commits_and_merging_a_failed_one_says_so(git_town):
    t = git_town()
    t.tt("spawn", "dev")
    failing = t.assign("dev", "@write half.txt x\n@exit 3")
    assert t.wait_task(failing)["state"] == "failed"
    blocker = t.assign("dev", "@gate never")
    queued = t.assign("dev", "@echo never runs")
    t.tt("cancel", queued)
    for command in ("diff", "merge"):
        refused = t.tt(command, queued, check=False)
        assert refused.returncode == 1 and refused.err.strip().endswith(
            f"task {queued} has no commits (it was cancelled before it ran)"), refused.err
    merged = t.tt("merge", failing)
    assert merged.out.startswith(f"merged task {failing[:8]} into main")
    assert f"note: task {failing[:8]} failed (" in merged.err and "what it left is merged as it was" in merged.err
    assert (t.root / "half.txt").read_text() == "x\n"
    t.tt("cancel", blocker)


def test_a_town_in_a_subfolder_of_the_repository_works_there_in_each_worktree(make_town):
    """The CLI ran at the worktree's root: `@write new.txt` in a town at repo/sub landed in
    repo/new.txt, where an agent sharing the town folder writes repo/sub/new.txt."""
    t = make_town(folder="repo/sub")
    repo = t.root.parent
    (repo / "top.txt").write_text("top\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first commit")
    t.tt("spawn", "dev")
    done = t.wait_task(t.assign("dev", "@write new.txt x"))
    assert done["state"] == "completed" and [f["path"] for f in done["files"]] == ["sub/new.txt"], done
    assert next(a for a in t.json("list") if a["name"] == "dev")["workdir"] == str(t.root / "agents" / "dev" / "sub")
    t.tt("merge", "dev")
    assert (t.root / "new.txt").read_text() == "x\n"
    # the agent's branch made `sub` a file: its task fails, saying so (the runner used to crash on it)
    worktree = t.root / "agents" / "dev"
    git(worktree, "rm", "-rq", "sub")
    (worktree / "sub").write_text("a file now\n")
    git(worktree, "add", "sub")
    git(worktree, "commit", "-qm", "sub is a file")
    failed = t.wait_task(t.assign("dev", "@echo never runs"))
    assert failed["state"] == "failed" and failed["reason"].startswith(f"cannot make {worktree / 'sub'}: "), failed
    assert t.agent("dev")["restarts"] == 0


def test_tt_task_shows_file_names_cleaned_and_json_keeps_them(git_town):
    t = git_town()
    t.tt("spawn", "dev")
    name = "evil\x1b]0;pwned\x07name.txt"
    task_id = t.assign("dev", f"@write {name} x\n@write plain.txt y")
    done = t.wait_task(task_id)
    assert sorted(f["path"] for f in done["files"]) == sorted([name, "plain.txt"])
    shown = t.tt("task", task_id).stdout
    assert b"\x1b" not in shown and b"\x07" not in shown
    # quoted as git quotes it: what the name is, on one line, neither obeyed nor silently shortened
    assert b"+1 -0  plain.txt" in shown and b'+1 -0  "evil\\033]0;pwned\\007name.txt"\n' in shown


def test_a_stop_now_mid_task_commits_nothing_then_the_next_attempt_commits_what_it_left(git_town):
    t = git_town()
    t.tt("spawn", "dev")
    task_id = t.assign("dev", "@write half.txt started\n@gate go")
    wait_for(lambda: (t.root / "agents" / "dev" / "half.txt").exists(), 30, "the first attempt's file")
    t.tt("stop", "--now")
    assert git(t.root, "rev-parse", "tt/dev") == git(t.root, "rev-parse", "main")  # nothing committed by the stop
    (t.record / "go").write_text("")
    t.tt("restart", "dev")
    done = t.wait_task(task_id)
    assert done["state"] == "completed" and done["attempts"] == 1, done
    assert subjects(t.root, "main..tt/dev") == [f"tt: interrupted {task_id}"]
    assert t.recorded(task_id)[1].startswith(f"[Tinytown] An earlier run of task {task_id}".encode())


def test_a_spawn_placed_on_another_host_removes_only_the_worktree_it_made(git_town):
    """An unpinned spawn placed on another host removes the worktree it made here; one that was
    here before (the agent ran here once) stayed with what git ignores in it (a .env, a build)."""
    from tinytown.cli.workspace_commands import leave_to_host, prepare_workspace
    from tinytown.supervisor.workspace import Workspace
    t = git_town()
    config = t.config()
    made = prepare_workspace(config, None, "w", None, quiet=True)
    assert leave_to_host(config, "w", made, "b", quiet=True) == ["agents/w is made on host b at its first task"]
    assert not (t.root / "agents" / "w").exists() and not git(t.root, "branch", "--list", "tt/w")
    Workspace(t.root, "w").ensure()
    git(t.root, "config", "core.excludesFile", str(t.root / "ignored-here"))
    (t.root / "ignored-here").write_text(".env\n")
    (t.root / "agents" / "w" / ".env").write_text("KEY=1\n")
    again = prepare_workspace(config, None, "w", None, quiet=True)
    leave_to_host(config, "w", again, "b", quiet=True)
    assert (t.root / "agents" / "w" / ".env").read_text() == "KEY=1\n"  # (before: removed with the worktree)


def test_tt_in_an_agents_worktree_is_its_towns_not_a_town_of_its_own(git_town):
    """A committed tinytown.toml is in every worktree: `tt` run in agents/NAME (the tutorial says
    `cd agents/dev`) found that copy, said the town was not running, and `tt spawn` there started
    a second town inside the first."""
    t = git_town()
    t.tt("spawn", "dev")
    checkout = t.root / "agents" / "dev"
    assert (checkout / "tinytown.toml").is_file()
    (checkout / "sub").mkdir()
    listed = t.tt("list", "--json", cwd=checkout / "sub")
    assert [a["name"] for a in json.loads(listed.out)] == ["dev"]
    task = json.loads(t.tt("assign", "dev", "@echo from inside", "--json", cwd=checkout).out)["id"]
    assert t.wait_task(task)["state"] == "completed"
    assert json.loads(t.tt("list", "--json", "--town", str(checkout)).out)[0]["name"] == "dev"
    assert not (checkout / ".tt").exists()


def test_a_stop_now_while_a_task_is_readied_starts_no_cli(git_town, tmp_path):
    """`tt stop --now` (or `tt kill`) arriving after a task was claimed, while its worktree was being
    readied (git: a checkpoint, a merge, a fetch), still started the CLI, to SIGTERM it at once: a
    real CLI could already have begun work the user had asked to stop."""
    t = git_town()
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    real = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True, check=True).stdout.strip()
    gate = tmp_path / "gate"
    (wrapper / "git").write_text(  # real git, held while the gate file is there (a slow disk, a fetch)
        f'#!/bin/sh\nif [ -e {gate} ]; then touch {gate}.held; while [ -e {gate} ]; do sleep 0.02; done; fi\n'
        f'exec {real} "$@"\n')
    (wrapper / "git").chmod(0o755)
    t.env["PATH"] = f"{wrapper}{os.pathsep}{t.env['PATH']}"  # (the supervisor's, so its runners')
    t.tt("spawn", "dev")
    t.tt("spawn", "up")
    upstream = t.assign("up", "@write up.txt made upstream")
    assert t.wait_task(upstream)["state"] == "completed"
    gate.touch()  # dev's task merges up's work first: git, held
    task = t.json("assign", "dev", "@echo should never run", "--after", upstream)["id"]
    wait_for(lambda: (tmp_path / "gate.held").exists(), 30, "the runner to ready the task's worktree")
    stopping = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "stop", "--now"], cwd=t.root,
                                env=t.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = t.root / ".tt" / "supervisor.log"
    wait_for(lambda: "stopping (now)" in log.read_text(errors="replace"), 30, "the stop to be asked")
    gate.unlink()
    assert stopping.wait(60) == 0, stopping.stderr.read()
    log = (t.root / ".tt" / "logs" / "dev.log").read_text()
    assert f"task {task} started" not in log and f"task {task} not started: stopped before its CLI" in log
    after = t.task(task)
    assert after["state"] == "assigned" and after["attempts"] == 0


def test_a_shared_agent_after_a_worktree_agents_task_is_told_its_work_stays_on_the_branch(git_town):
    """Dependencies carry work between worktree agents; a shared agent works in the town's folder,
    where a worktree agent's commits arrive only when merged. It ran without them, saying nothing."""
    t = git_town()
    t.tt("spawn", "dev")
    t.tt("spawn", "helper", "--shared")
    made = t.assign("dev", "@write fromdev.txt hi")
    t.wait_task(made)
    after = t.tt("assign", "helper", "@echo after dev", "--after", made)
    assert after.err == ("tt: note: helper works in the town's folder: dev's work stays on branch tt/dev until "
                         "merged (`tt merge dev`), so it runs after it but without it\n")
    assert t.tt("assign", "dev", "@echo more", "--after", made).err == ""  # (a worktree agent gets it)
