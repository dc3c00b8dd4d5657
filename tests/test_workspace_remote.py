"""Workspaces on several hosts ([workspace] remote): a task's head pushed to the town's git remote, a
dependent task on another host fetching and merging it, and a clear failure without a remote.

Two clones of the town folder stand for two hosts, a bare repository for the remote. Until a town
spans hosts, each clone runs a town of its own; the dependency's record, which a shared Redis would
hold, is copied from host A's Redis to host B's.
"""
from __future__ import annotations

import subprocess

import pytest

from conftest import TownHarness
from test_workspaces_town import dependent, git, git_town  # noqa: F401 - git_town: a fixture


@pytest.fixture
def two_hosts(git_town, tmp_path):
    """Factory: (host A, host B, the bare remote): host A's town folder a git repository pushed to
    the remote, host B a clone of it, each with a town of the same name."""
    made: list[TownHarness] = []

    def make(extra: str = ""):
        remote = tmp_path / "remote.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
        a = git_town("hosttown", extra)
        git(a.root, "remote", "add", "origin", str(remote))
        git(a.root, "push", "-q", "origin", "main")
        git(tmp_path, "clone", "-q", str(remote), "host-b")
        b = TownHarness(tmp_path / "host-b")
        made.append(b)
        return a, b, remote

    yield make
    for harness in made:
        harness.cleanup()


def has_commit(root, oid: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{oid}^{{commit}}"], cwd=root, capture_output=True).returncode == 0


def completed_on_host_a(a: TownHarness, b: TownHarness, text: str) -> tuple[str, str]:
    """A task run by an agent on host A; its record copied into host B's Redis (as a shared Redis
    would hold it). (task id, its head)."""
    a.tt("spawn", "dev")
    task_id = a.assign("dev", text)
    done = a.wait_task(task_id)
    assert done["state"] == "completed", done
    b.tt("spawn", "rev")
    b.wait_agent("rev")
    town_a, town_b = a.town(), b.town()
    fields = town_a.r.hgetall(town_a.keys.task(task_id))
    town_b.r.hset(town_b.keys.task(task_id), mapping=fields)
    town_b.r.zadd(town_b.keys.task_index, {task_id: float(fields["created_at"])})
    return task_id, done["head"]


def test_a_dependent_task_on_another_host_fetches_and_merges_the_work(two_hosts):
    a, b, remote = two_hosts('\n[workspace]\nremote = "origin"\n')
    upstream, head = completed_on_host_a(a, b, "Add the feature\n@write feature.py FEATURE = 1")
    # pushed at the task's end, before its outcome was written
    assert git(remote, "rev-parse", f"refs/tinytown/hosttown/{upstream}").strip() == head
    assert not has_commit(b.root, head)             # host B's repository does not have it yet

    task = dependent(b, "rev", "Review the feature\n@ls", [upstream])
    review = b.wait_task(task)
    assert review["state"] == "completed", review
    assert "feature.py" in (b.record / f"{task}.ls").read_text().split()   # its CLI saw A's work
    assert has_commit(b.root, head) and subprocess.run(
        ["git", "merge-base", "--is-ancestor", head, "tt/rev"], cwd=b.root).returncode == 0  # merged on its branch
    assert f"fetched the work of {upstream} from origin" in (b.root / ".tt" / "logs" / "rev.log").read_text()
    # and its own head went to the remote in turn, for whoever depends on it
    assert git(remote, "rev-parse", f"refs/tinytown/hosttown/{task}").strip() == review["head"]


def test_diff_and_merge_of_a_task_done_on_another_host_fetch_its_work(two_hosts):
    """tt diff TASK on a host without the task's commits printed git's 'fatal: bad object', exit
    128; tt merge said 'no such branch or commit'. They now fetch it as a dependent task does."""
    a, b, _ = two_hosts('\n[workspace]\nremote = "origin"\n')
    upstream, head = completed_on_host_a(a, b, "Add the feature\n@write feature.py FEATURE = 1")
    assert not has_commit(b.root, head)
    shown = b.tt("diff", upstream, "--stat")
    assert "feature.py" in shown.out and f"fetched the work of {upstream} from origin" in shown.err
    assert b.tt("merge", upstream).out.startswith(f"merged task {upstream[:8]} into main")
    assert (b.root / "feature.py").read_text() == "FEATURE = 1\n"


def test_a_fetch_the_remote_fails_once_is_tried_again(two_hosts, tmp_path):
    """A fetch that failed for a moment (the network, a server restarting) failed the dependent
    task, or failed an agent whose own work it was until `tt restart`. It is tried again."""
    a, b, _ = two_hosts('\n[workspace]\nremote = "origin"\n')
    upstream, head = completed_on_host_a(a, b, "Add the feature\n@write feature.py FEATURE = 1")
    failed_once = tmp_path / "failed-once"
    flaky = tmp_path / "flaky-upload-pack"
    flaky.write_text(f"#!/bin/sh\nif [ ! -e {failed_once} ]; then : > {failed_once}; "
                     "echo 'fatal: the remote end hung up unexpectedly' >&2; exit 128; fi\nexec git-upload-pack \"$@\"\n")
    flaky.chmod(0o755)
    git(b.root, "config", "remote.origin.uploadpack", str(flaky))
    shown = b.tt("diff", upstream, "--stat")
    assert failed_once.exists() and "feature.py" in shown.out, shown.err
    assert f"fetched the work of {upstream} from origin" in shown.err
    # what will not pass is said at once, after one try (a review saw refused credentials tried 3 times)
    refusing = tmp_path / "refusing-upload-pack"
    tries = tmp_path / "tries"
    refusing.write_text(f"#!/bin/sh\necho x >> {tries}\necho 'fatal: Authentication failed' >&2\nexit 128\n")
    refusing.chmod(0o755)
    git(b.root, "config", "remote.origin.uploadpack", str(refusing))
    later = a.assign("dev", "Add more\n@write more.py MORE = 1")
    assert a.wait_task(later)["state"] == "completed"
    town_a, town_b = a.town(), b.town()
    fields = town_a.r.hgetall(town_a.keys.task(later))
    town_b.r.hset(town_b.keys.task(later), mapping=fields)
    town_b.r.zadd(town_b.keys.task_index, {later: float(fields["created_at"])})
    refused = b.tt("diff", later, check=False)
    assert refused.returncode == 1 and "Authentication failed" in refused.err
    assert tries.read_text().count("x") == 1


def test_diff_of_work_on_another_host_without_a_remote_says_why_in_one_line(two_hosts):
    a, b, _ = two_hosts()
    upstream, head = completed_on_host_a(a, b, "Add the feature\n@write feature.py FEATURE = 1")
    for args in (("diff", upstream), ("merge", upstream)):
        refused = b.tt(*args, check=False)
        assert refused.returncode == 1 and refused.err.startswith(
            f"tt: error: task {upstream}'s work ({head[:12]}) is on another host and [workspace] remote is not set"), refused.err


def test_without_a_remote_a_dependency_made_on_another_host_fails_the_task_before_its_cli(two_hosts):
    a, b, _ = two_hosts()
    upstream, head = completed_on_host_a(a, b, "Add the feature\n@write feature.py FEATURE = 1")
    task = dependent(b, "rev", "Review the feature\n@ls", [upstream])
    failed = b.wait_task(task)
    assert failed["state"] == "failed"
    assert (f"dependency {upstream}'s work ({head[:12]}) is on another host and [workspace] remote is not set"
            in failed["reason"]), failed["reason"]
    assert not (b.record / f"{task}.json").exists()    # its CLI never started: no run on stale code


@pytest.mark.parametrize("remote", ["nosuchremote", "unreachable"])
def test_a_remote_that_refuses_the_push_is_said_and_the_task_keeps_its_outcome(git_town, remote):
    t = git_town("solo", f'\n[workspace]\nremote = "{remote}"\n')
    # a remote whose URL holds a token (git keeps it; it must not reach the task's record)
    git(t.root, "remote", "add", "unreachable", "https://s3cr3t-token@127.0.0.1:1/project.git")
    t.tt("spawn", "dev")
    task = t.wait_task(t.assign("dev", "Add it\n@write x.py X = 1"))
    assert task["state"] == "completed"
    assert f"could not push its work to {remote}" in task["workspace_note"], task
    # (nothing pushes it again: the note says how, to the ref a dependent task fetches)
    assert task["workspace_note"].endswith(f"it is pushed by hand: git push {remote} +{task['head']}:"
                                           f"refs/tinytown/solo/{task['id']})"), task["workspace_note"]
    assert "s3cr3t" not in task["workspace_note"] and "s3cr3t" not in t.tt("status").out


@pytest.mark.parametrize("value", ['"--upload-pack=touch /tmp/x"', '"https://me:secret@example.invalid/x.git"',
                                   '"https://secret@example.invalid/x.git"', '""'])
def test_a_remote_that_could_be_an_option_or_holds_a_password_is_refused(make_town, value):
    t = make_town()
    t.append_config(f"\n[workspace]\nremote = {value}\n")
    proc = t.tt("status", check=False)
    assert proc.returncode == 1 and "tinytown.toml:" in proc.err and "remote" in proc.err, proc.err
    assert "secret" not in proc.err and len(proc.err.strip().splitlines()) == 1


def test_remotes_that_are_fine():
    from tinytown.supervisor.config import _git_remote_ok
    for remote in ("origin", "git@example.invalid:team/project.git", "ssh://git@example.invalid/p.git",
                   "https://example.invalid/p.git", "/srv/git/project.git"):
        assert _git_remote_ok(remote), remote
