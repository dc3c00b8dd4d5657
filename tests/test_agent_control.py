"""Agent control on real towns: `tt interrupt`/`resume`, `close`, `kill`, `prune`, and `tt events`.

The fake agent's `@gate NAME` holds a task until the test opens the gate; every wait is a
condition with a deadline (conftest.wait_for).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import town_processes, wait_for


def open_gate(town, name: str = "go") -> None:
    (town.record / name).touch()


def working_on(town, name: str, task_id: str) -> dict:
    return wait_for(lambda: (lambda a: a if a["current_task"] == task_id and a["cli_pid"] else None)(town.agent(name)),
                    30, f"{name} to run {task_id}")


def runner_pids(town, name: str) -> list[int]:
    """Live runners of agent `name` (their process title is `tt-runner NAME`)."""
    found = []
    for proc in town_processes(town.root):
        try:
            if " ".join(proc.cmdline()).startswith(f"tt-runner {name}"):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_interrupt_lets_the_task_finish_and_holds_the_next_until_resume(town):
    town.tt("spawn", "dev")
    first = town.assign("dev", "@gate go\n@echo first done")
    working_on(town, "dev", first)
    second = town.assign("dev", "@echo second done")
    out = town.tt("interrupt", "dev").out
    assert "pauses after its current task" in out
    assert town.agent("dev")["hold"] == "pause"
    assert "pausing after its current task" in " ".join(town.tt("status").out.split())
    assert "pausing after its current task" in town.tt("list").out
    open_gate(town)
    assert town.wait_task(first)["state"] == "completed"
    town.wait_agent("dev", ("paused",))
    # paused: no runner, and the next task waits in the inbox
    assert runner_pids(town, "dev") == []
    assert town.task(second)["state"] == "assigned" and town.agent("dev")["pending"] == 1
    assert "Paused" in town.tt("list").out and "tt resume dev" in " ".join(town.tt("status").out.split())
    # a pause survives the town's stop and start
    town.tt("stop")
    third = town.assign("dev", "@echo third")  # (starts the town again)
    town.tt("spawn", "other")
    town.wait_agent("other")  # the supervisor has reconciled since it started
    assert town.agent("dev")["state"] == "paused" and runner_pids(town, "dev") == []
    assert town.task(second)["state"] == "assigned" and town.task(third)["state"] == "assigned"
    out = town.tt("resume", "dev").out
    assert "resumes" in out
    assert town.wait_task(second)["state"] == "completed"
    assert "second done" in town.task(second)["output"]
    assert town.wait_task(third)["state"] == "completed"
    town.wait_agent("dev", ("idle",))
    assert town.agent("dev")["hold"] == ""


def test_resume_while_still_pausing_goes_on_without_a_pause(town):
    town.tt("spawn", "dev")
    first = town.assign("dev", "@gate go\n@echo first")
    working_on(town, "dev", first)
    second = town.assign("dev", "@echo second")
    town.tt("interrupt", "dev")
    assert "goes on taking tasks" in town.tt("resume", "dev").out
    open_gate(town)
    assert town.wait_task(second)["state"] == "completed"
    assert town.agent("dev")["state"] in ("idle", "working")


def test_interrupt_and_resume_refuse_what_makes_no_sense(town):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    done = town.tt("resume", "dev", check=False)
    assert done.returncode == 1 and "not paused" in done.err and "Traceback" not in done.err
    done = town.tt("interrupt", "nobody", check=False)
    assert done.returncode == 1 and "no agent named 'nobody'" in done.err
    town.tt("interrupt", "dev")
    town.wait_agent("dev", ("paused",))
    assert "paused already" in town.tt("interrupt", "dev").out


def test_close_lets_the_task_finish_then_stops_the_runner_for_good(town):
    town.tt("spawn", "dev")
    first = town.assign("dev", "@gate go\n@echo first")
    working_on(town, "dev", first)
    runner = town.agent("dev")["pid"]
    queued = [town.assign("dev", f"@echo queued {i}") for i in range(2)]
    assert "closes after its current task" in town.tt("close", "dev").out
    open_gate(town)
    assert town.wait_task(first)["state"] == "completed"
    town.wait_agent("dev", ("stopped",))
    wait_for(lambda: not alive(runner), 10, "dev's runner to exit")
    assert runner_pids(town, "dev") == []
    # not restarted: a nudge (another spawn) reconciles, and dev stays stopped with its queue
    town.tt("spawn", "other")
    town.wait_agent("other")
    assert town.agent("dev")["state"] == "stopped" and runner_pids(town, "dev") == []
    assert [town.task(t)["state"] for t in queued] == ["assigned", "assigned"]
    # ...and they say why they wait (a task in hand that a stop put back here waits the same way)
    assert "waiting: agent dev is closed (tt restart dev runs what waits for it)" in town.tt("tasks").out
    assert "waiting: agent dev is closed" in town.tt("wait", queued[0], "--timeout", "0.1", check=False).out
    for said in (town.tt("assign", "dev", "@echo for a closed agent"), town.tt("send", "dev", "a note")):
        assert "tt: note: dev is closed: this waits for `tt restart dev`" in said.err
    # `tt restart` opens it again, and its queue runs
    town.tt("restart", "dev")
    for task_id in queued:
        assert town.wait_task(task_id)["state"] == "completed"


def test_close_to_backlog_gives_the_queue_to_another_idle_agent(town):
    town.tt("spawn", "dev")
    town.tt("spawn", "helper")
    town.wait_agent("helper")
    first = town.assign("dev", "@gate go\n@echo first")
    working_on(town, "dev", first)
    second = town.assign("dev", "@echo second by whoever")
    third = town.assign("dev", "@echo third")
    assert "go to the backlog" in town.tt("close", "dev", "--to-backlog").out
    open_gate(town)
    assert town.wait_task(first)["state"] == "completed"
    # dev's queue leaves for the backlog: the idle helper takes the oldest at once
    done = town.wait_task(second)
    assert done["state"] == "completed" and done["agent"] == "helper"
    # and, idle again, the next (an agent going idle takes backlog work in the same transaction)
    left = town.wait_task(third)
    assert left["state"] == "completed" and left["agent"] == "helper" and left["backlog"] is True
    assert town.agent("dev")["state"] == "stopped" and town.agent("dev")["pending"] == 0


def test_kill_puts_the_running_task_back_first_and_leaves_nothing_running(town):
    town.tt("spawn", "dev")
    running = town.assign("dev", "@child\n@gate never")
    agent = working_on(town, "dev", running)
    cli_pid, runner = agent["cli_pid"], agent["pid"]
    queued = town.assign("dev", "@echo later")
    out = town.tt("kill", "dev").out
    assert "goes back to the front of the queue" in out and "dev stopped" in out
    assert not alive(cli_pid) and not alive(runner)
    helpers = [int(x) for x in (town.record / f"{running}.children").read_text().split()]
    assert helpers and not any(alive(pid) for pid in helpers)
    task = town.task(running)
    assert task["state"] == "assigned" and task["attempts"] == 0  # a kill is not a crash
    # back at the front: it comes before the task queued after it
    t = town.town()
    try:
        inbox = t.r.lrange(t.keys.inbox(agent["id"]), 0, -1)
    finally:
        t.r.close()
    assert running in inbox[0] and queued in inbox[1]
    assert town.agent("dev")["state"] == "stopped"
    assert runner_pids(town, "dev") == []
    town.tt("stop")
    assert town_processes(town.root) == []


def test_kill_of_a_runner_that_does_not_answer_sigkills_it(town):
    town.tt("spawn", "dev")
    running = town.assign("dev", "@gate never")
    agent = working_on(town, "dev", running)
    os.kill(agent["pid"], signal.SIGSTOP)  # deaf to the supervisor's SIGUSR1
    out = town.tt("kill", "dev").out
    assert "dev stopped" in out
    assert not alive(agent["pid"]) and not alive(agent["cli_pid"])
    task = town.task(running)
    assert (task["state"], task["attempts"]) == ("assigned", 1)  # back in the inbox; its runner died under it: an attempt
    assert town.agent("dev")["state"] == "stopped" and runner_pids(town, "dev") == []


def test_prune_removes_a_closed_agent_and_keeps_its_tasks(town):
    town.tt("spawn", "dev")
    done = town.assign("dev", "@echo kept")
    town.wait_task(done)
    refused = town.tt("prune", "dev", check=False)
    assert refused.returncode == 1 and "only a stopped agent is pruned" in refused.err
    from tinytown.supervisor.coordination import Coordination
    t = town.town()
    try:
        Coordination(t).send("dev", "a note never read")
    finally:
        t.r.close()
    town.tt("close", "dev")
    town.wait_agent("dev", ("stopped",))
    out = town.tt("prune").out
    assert "Pruned dev: 1 undelivered note(s) dropped" in out
    assert [a["name"] for a in town.json("list")] == []
    task = town.task(done)
    assert task["state"] == "completed" and "kept" in task["output"]
    # the name is free again: a new agent, a new id
    town.tt("spawn", "dev")
    assert town.wait_agent("dev")["id"] != task["agent_id"]


def test_prune_refuses_queued_work_unless_it_goes_to_the_backlog(town):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    town.tt("close", "dev")
    town.wait_agent("dev", ("stopped",))
    queued = town.assign("dev", "@echo waiting")
    refused = town.tt("prune", check=False)
    assert refused.returncode == 1 and "1 queued task(s)" in refused.err and "--to-backlog" in refused.err
    assert [a["name"] for a in town.json("list")] == ["dev"]
    out = town.tt("prune", "--to-backlog").out
    assert "1 queued task(s) to the backlog" in out
    task = town.task(queued)
    assert task["state"] == "pending" and task["agent"] == "" and task["backlog"] is True


def _git(cwd, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@x")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def test_prune_removes_a_worktree_once_committed_and_keeps_an_unmerged_branch(town):
    from tinytown.supervisor.workspace import Workspace
    _git(town.root, "init", "-q", "-b", "main")
    _git(town.root, "add", "-A")
    _git(town.root, "commit", "-q", "-m", "first")
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    space = Workspace(town.root, "dev")
    space.ensure()  # (what spawn does once workspaces are wired in)
    (space.path / "work.txt").write_text("not committed yet\n")
    town.tt("close", "dev")
    town.wait_agent("dev", ("stopped",))
    out = town.tt("prune", "--delete-branches").out
    assert "Pruned dev" in out and "committed as" in out and "kept branch tt/dev" in out
    assert not space.path.exists()
    # the work is on the branch, which is kept: not merged anywhere
    assert "not committed yet" in _git(town.root, "show", "tt/dev:work.txt")


def _events_follow(town, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "events", "-f", *args], cwd=town.root,
                            env={**town.env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _interrupt(follower: subprocess.Popen) -> None:
    """Ctrl+C ends it. Once in CI (not reproduced here in 200 tries under load) it did not within
    10 s: if that happens again, SIGABRT makes its fault handler print where it was."""
    follower.send_signal(signal.SIGINT)
    try:
        follower.wait(10)
    except subprocess.TimeoutExpired:
        follower.send_signal(signal.SIGABRT)
        follower.wait(10)
        pytest.fail(f"`tt events -f` did not end on Ctrl+C; where it was: {follower.stderr.read()[-6000:]!r}")


def _read_until(proc, needle: bytes, timeout: float = 20.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {needle!r} in `tt events -f` within {timeout}s: {seen[-2000:]!r}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                pytest.fail(f"`tt events -f` ended: {proc.stderr.read()!r}")
            seen += chunk
    return seen


def blocked_in_xread(town) -> bool:
    t = town.town()
    try:
        return any(c.get("cmd") == "xread" for c in t.r.client_list())
    finally:
        t.r.close()


def test_events_shows_the_last_n_and_follows_new_ones(town):
    town.tt("spawn", "dev")
    task_id = town.assign("dev", "@echo hi")
    town.wait_task(task_id)
    t = town.town()
    try:  # an event carrying what an agent wrote (a restart's reason has its last output)
        t.event("hostile", agent="dev", reason="\x1b]0;pwned\x07[bold]x[/]\nsecond line\x9b2J")
        task_event_id = t.event("task_completed", task=task_id, exit_code=0)  # (its agent: from the task)
    finally:
        t.r.close()
    hostile = town.tt("events", "-n", "2", "--agent", "dev").out.splitlines()
    assert len(hostile) == 2 and hostile[0].endswith("hostile  reason=[bold]x[/] second line2J")
    assert task_event_id
    lines = town.tt("events", "-n", "3").out.splitlines()
    assert len(lines) == 3 and "task_completed" in lines[-1] and f"task={task_id}" in lines[-1]
    assert " dev " in lines[-1]  # an outcome's event names its task; its agent is read from it
    everything = town.tt("events", "-n", "1000", "--agent", "dev").out
    assert "agent_spawned" in everything and "task_started" in everything and "\x1b" not in everything
    assert "\x9b" not in everything
    as_json = [__import__("json").loads(line) for line in town.tt("events", "-n", "2", "--json").out.splitlines()]
    assert as_json[-1]["type"] == "task_completed" and as_json[-1]["agent"] == "dev"
    assert as_json[-1]["exit_code"] == 0  # (a number, not "0")
    # backlog work dev took later: what happened to it before dev had it is not dev's
    gate = town.assign("dev", "@gate backlog-after")
    taken = town.json("backlog", "add", "@echo from the backlog", "--after", gate)["id"]
    (town.record / "backlog-after").touch()
    town.wait_task(taken)
    mine = town.tt("events", "-n", "1000", "--agent", "dev").out
    assert f"task_claimed  task={taken}" in mine or f"task_assigned  task={taken}" in mine, mine
    assert not [line for line in mine.splitlines() if taken in line and (
        "task_backlogged" in line or "task_pending" in line or "task_released" in line)], mine
    follower = _events_follow(town, "-n", "0", "--agent", "dev")
    try:
        wait_for(lambda: blocked_in_xread(town), 20, "the follower to wait on the stream")
        later = town.assign("dev", "@echo later")
        seen = _read_until(follower, f"task_completed  task={later}".encode())
        assert b"agent_spawned" not in seen  # -n 0: only what came after
    finally:
        _interrupt(follower)


def test_events_follow_ends_on_ctrl_c_even_inside_a_finalizer(town, tmp_path):
    """Ctrl+C while a finalizer (or a gc callback) runs: its KeyboardInterrupt is swallowed there,
    and the follower used to go on following for ever. It now ends at once, exit 0."""
    from conftest import interrupt_inside_gc
    town.tt("spawn", "dev")
    extra, marker = interrupt_inside_gc(tmp_path)
    follower = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "events", "-f", "-n", "0"], cwd=town.root,
                                env={**town.env, **extra, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    try:
        wait_for(lambda: blocked_in_xread(town), 20, "the follower to wait on the stream")
        marker.touch()
        town.assign("dev", "@echo wakes the follower")  # (its events: allocations, so collections)
        assert follower.wait(20) == 0 and not marker.exists()
        assert b"Traceback" not in follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.send_signal(signal.SIGABRT)
            follower.wait(10)
            pytest.fail(f"`tt events -f` went on after Ctrl+C: {follower.stderr.read()[-3000:]!r}")


def test_events_refuses_an_unknown_agent(town):
    town.tt("spawn", "dev")
    done = town.tt("events", "--agent", "nobody", check=False)
    assert done.returncode == 1 and "no agent named 'nobody'" in done.err


def test_a_closed_agents_queue_goes_to_the_backlog_when_asked_later(town):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    town.tt("close", "dev")
    town.wait_agent("dev", ("stopped",))
    assert "closed already" in town.tt("close", "dev").out
    queued = town.assign("dev", "@echo waits for dev")  # a closed agent's inbox still takes work
    assert town.task(queued)["state"] == "assigned"
    town.tt("close", "dev", "--to-backlog")
    task = town.wait_task(queued, ("pending",))
    assert task["agent"] == "" and task["backlog"] == 1
    wait_for(lambda: town.agent("dev")["to_backlog"] == 0, 10, "the give-back to be recorded")
