"""Supervision you can trust: restarts, crash-safe delivery, the supervisor's own death, graceful stop,
heartbeats, task timeouts and max_agents, against real processes and a real redis-server.

Every wait is a condition with a deadline (conftest.wait_for); the fake agent's `@gate NAME` blocks a
task until the test opens the gate, so nothing depends on how fast this machine is.
"""
from __future__ import annotations

import json
import select
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import FAST_POLICY, town_processes, wait_for


# --- helpers -----------------------------------------------------------------------------------
def policy(**overrides) -> str:
    """FAST_POLICY with some values replaced or added."""
    lines, seen = [], set()
    for line in FAST_POLICY.strip().splitlines():
        key = line.split("=")[0].strip()
        if key in overrides:
            line, _ = f"{key} = {overrides[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{k} = {v}" for k, v in overrides.items() if k not in seen]
    return "\n" + "\n".join(lines) + "\n"


def flat(text: str) -> str:
    """Output with runs of whitespace made one space: a table's last column may fold."""
    return " ".join(text.split())


def open_gate(town, name: str = "go") -> None:
    (town.record / name).touch()


def dead(pid) -> bool:
    """Gone, or a zombie nobody has reaped yet (it runs nothing)."""
    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def events(town, kind: str | None = None) -> list[dict]:
    t = town.town()
    try:
        found = [fields for _id, fields in t.r.xrange(t.keys.events)]
    finally:
        t.r.close()
    return [f for f in found if kind is None or f.get("type") == kind]


def working_on(town, name: str, task_id: str) -> dict:
    """Wait until agent `name` runs `task_id` with its CLI started; the agent's record."""
    return wait_for(lambda: (lambda a: a if a["current_task"] == task_id and a["cli_pid"] else None)(town.agent(name)),
                    30, f"{name} to run {task_id}")


def helpers_of(town, task_id: str) -> list[int]:
    path = town.record / f"{task_id}.children"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def start_foreground(town) -> subprocess.Popen:
    """`tt start` as a user runs it in a terminal; returns once it holds the town's lock."""
    proc = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "start"], cwd=town.root, env=town.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: town.supervisor_pid() == proc.pid or proc.poll() is not None, 30, "tt start to take the lock")
    assert proc.poll() is None, proc.communicate()

    # It holds the lock a moment before its redis-server is up: a command that reads waits for it.
    assert town.json("status")["supervisor"]["state"] == "running"
    return proc


def supervisors(town) -> list[psutil.Process]:
    """The town's supervisor processes. Its forked runners share its command line, and its name
    until they rename themselves a moment after the fork (a runner caught in that moment once
    counted as a second supervisor): a child of one of them is not one."""
    found = [p for p in town_processes(town.root) if not _name(p).startswith("tt-runner")
             and any(s in " ".join(_cmdline(p)) for s in ("supervisor.daemon", "cli.main start"))]
    pids = {p.pid for p in found}
    return [p for p in found if _ppid(p) not in pids]


def runners(town) -> list[psutil.Process]:
    return [p for p in town_processes(town.root) if _name(p).startswith("tt-runner")]


def redis_servers(town) -> list[psutil.Process]:
    return [p for p in town_processes(town.root) if "redis-server" in _name(p)]


def _name(process: psutil.Process) -> str:
    """Its name, or "" if it ended since it was listed (a killed one can, while these tests look)."""
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def _ppid(process: psutil.Process) -> int:
    try:
        return process.ppid()
    except psutil.NoSuchProcess:
        return 0


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:
        return []


def set_max_agents(town, n: int) -> None:
    path = town.root / "tinytown.toml"
    path.write_text(path.read_text().replace("max_agents = 10", f"max_agents = {n}"))


# --- 1. restart policy -------------------------------------------------------------------------
def test_runner_killed_mid_task_is_restarted_and_the_task_redelivered(town):
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@child\n@gate go\n@echo finished")["id"]
    agent = working_on(town, "dev", task_id)
    wait_for(lambda: helpers_of(town, task_id), 20, "the CLI's helper")
    first_cli, first_helper = agent["cli_pid"], helpers_of(town, task_id)[0]

    os.kill(agent["pid"], signal.SIGKILL)

    # the runner's death takes its CLI's whole process group with it ...
    wait_for(lambda: dead(first_cli) and dead(first_helper), 20, "the old CLI and its helper to die")
    # ... and a new runner picks the task up again from the in-flight list
    wait_for(lambda: town.task(task_id)["attempts"] == 2 and town.agent("dev")["cli_pid"] not in ("", None, first_cli),
             30, "the task to be re-delivered")
    after = town.agent("dev")
    assert after["pid"] != agent["pid"] and after["restarts"] == 1 and after["state"] == "working"
    open_gate(town)
    task = town.wait_task(task_id)
    assert task["state"] == "completed" and task["attempts"] == 2 and "finished" in task["output"]
    restarting = events(town, "agent_restarting")
    assert len(restarting) == 1 and float(restarting[0]["delay"]) == 0  # the first restart is immediate
    assert "SIGKILL" in restarting[0]["reason"]
    wait_for(lambda: all(dead(p) for p in helpers_of(town, task_id)), 20, "every helper to be gone")


def test_cli_killed_mid_task_fails_the_task_and_the_runner_stays(town):
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@gate never")["id"]
    agent = working_on(town, "dev", task_id)
    os.kill(agent["cli_pid"], signal.SIGKILL)
    task = town.wait_task(task_id)
    assert task["state"] == "failed" and task["exit_code"] == -signal.SIGKILL
    assert "SIGKILL" in task["reason"] and task["attempts"] == 1
    after = town.wait_agent("dev", ("idle",))
    assert after["pid"] == agent["pid"] and after["restarts"] == 0
    assert town.wait_task(town.json("assign", "dev", "@echo next")["id"])["state"] == "completed"


def test_a_runner_that_keeps_crashing_ends_failed_with_growing_backoff(make_town):
    town = make_town(policy=policy(start_seconds=60, max_fast_failures=4, max_attempts=4,
                                   backoff_first=0.05, backoff_factor=2.0, backoff_max=10.0))
    town.tt("spawn", "crashy")
    town.tt("spawn", "steady")
    crash_id = town.json("assign", "crashy", "@echo about to crash\n@kill-runner")["id"]

    failed = town.wait_agent("crashy", ("failed",), timeout=30)
    assert "SIGKILL" in failed["reason"] and "last output" in failed["reason"]
    assert failed["restarts"] == 3 and not failed["pid"]
    delays = [float(e["delay"]) for e in events(town, "agent_restarting") if e["agent"] == "crashy"]
    assert delays == [0.0, 0.05, 0.1]  # at once, then backoff_first, then times backoff_factor
    assert len(events(town, "agent_failed")) == 1

    # the supervisor stays up and serves the other agent
    assert town.wait_task(town.json("assign", "steady", "@echo fine")["id"])["state"] == "completed"
    assert len(events(town, "agent_restarting")) == 3  # no restart storm: nothing after giving up
    assert town.agent("crashy")["state"] == "failed"
    status = town.json("status")
    crashy = next(a for a in status["agents"] if a["name"] == "crashy")
    assert crashy["health"] == "failed"
    # its task is not lost, nor shown as running: it waits in the inbox for `tt restart`
    assert crashy["pending"] == 1 and crashy["current_task"] == ""
    waiting = town.task(crash_id)
    assert waiting["state"] == "assigned" and waiting["attempts"] == 4
    text = flat(town.tt("status").out)
    assert "failed 1" in text and "SIGKILL" in text and "`tt restart crashy` to try again" in text

    # `tt restart` clears it; the task that kept killing it has used up its attempts
    assert town.tt("restart", "crashy").out == "Restarting agent crashy (it was failed)\n"
    task = town.wait_task(crash_id)
    assert task["state"] == "failed" and task["reason"] == "agent crashed 4 times"
    town.wait_agent("crashy", ("idle",))
    assert town.wait_task(town.json("assign", "crashy", "@echo recovered")["id"])["state"] == "completed"


def test_restart_of_a_live_agent_gives_it_a_new_runner_after_its_task(town):
    """`tt restart` of an idle or working agent: a new runner (which reads the config as it is
    now, as `tt reload` says), once the task in hand is done; the task is not cut short."""
    town.tt("spawn", "dev")
    first = town.wait_agent("dev")["pid"]
    assert town.tt("restart", "dev").out == "Restarting agent dev's runner\n"
    wait_for(lambda: town.agent("dev")["pid"] not in (None, first) and town.agent("dev")["state"] == "idle",
             30, "a new runner")
    second = town.agent("dev")["pid"]
    task = town.assign("dev", "@gate go\n@echo done")
    town.wait_task(task, states=("running",))
    assert town.tt("restart", "dev").out == "Restarting agent dev's runner once its current task is done\n"
    assert town.agent("dev")["pid"] == second and town.task(task)["state"] == "running"
    (town.record / "go").write_text("")
    done = town.wait_task(task)
    assert done["state"] == "completed" and done["attempts"] == 1
    wait_for(lambda: town.agent("dev")["pid"] not in (None, second), 30, "a new runner after the task")
    assert town.tt("events").out.count("agent_restart_requested") == 2


def test_a_task_failed_for_crashing_its_agent_keeps_what_its_runs_printed(make_town):
    """"agent crashed N times": the task's output was empty (no run lived to record it); it is
    now what the runs sent to the agent's Redis stream."""
    town = make_town(policy=policy(max_attempts=2))
    town.tt("spawn", "crashy")
    task_id = town.json("assign", "crashy", "@echo printed before the crash\n@gate streamed\n@kill-runner")["id"]
    wait_for(lambda: "printed before the crash" in town.tt("logs", "--task", task_id, "--redis").out, 30,
             "the output in the agent's stream")
    (town.record / "streamed").touch()  # (the gate stays open: the second run crashes at once too)
    task = town.wait_task(task_id, timeout=60)
    assert task["state"] == "failed" and task["reason"] == "agent crashed 2 times", task
    assert "printed before the crash" in task["output"]


def test_status_shows_an_agent_in_backoff_and_restart_skips_the_wait(make_town):
    town = make_town(policy=policy(start_seconds=60, backoff_first=600, backoff_max=600, max_attempts=2))
    town.tt("spawn", "crashy")
    task_id = town.json("assign", "crashy", "@kill-runner")["id"]
    agent = town.wait_agent("crashy", ("backoff",), timeout=30)
    assert agent["restarts"] == 2 and agent["restart_at"] > time.time() + 60
    data = next(a for a in town.json("status")["agents"] if a["name"] == "crashy")
    assert data["health"] == "restarting"
    text = flat(town.tt("status").out)
    assert "restarting in" in text and "SIGKILL" in text
    town.tt("restart", "crashy")  # no 10-minute wait
    task = town.wait_task(task_id)
    assert task["state"] == "failed" and task["reason"] == "agent crashed 2 times"
    town.wait_agent("crashy", ("idle",))


# --- 3. the supervisor's own death ---------------------------------------------------------------
def test_supervisor_sigkill_leaves_no_orphans_and_the_town_comes_back(town):
    for name in ("a", "b"):
        town.tt("spawn", name)
    running = {"a": town.json("assign", "a", "@child\n@gate go\n@echo a1")["id"],
               "b": town.json("assign", "b", "@gate go\n@echo b1")["id"]}
    queued = [town.json("assign", name, f"@echo {name}{i}")["id"] for name in ("a", "b") for i in (2, 3)]
    for name, task_id in running.items():
        working_on(town, name, task_id)
    wait_for(lambda: helpers_of(town, running["a"]), 20, "a's helper")
    assert len(redis_servers(town)) == 1

    os.kill(town.supervisor_pid(), signal.SIGKILL)

    # runners, their CLIs (and helpers) and redis-server all go: nothing of the town lives on
    wait_for(lambda: town_processes(town.root) == [], 30, "every process of the town to exit")
    assert town.supervisor_pid() is None

    open_gate(town)
    town.tt("restart", "a")  # any writing command brings the town back
    for task_id in [*running.values(), *queued]:
        task = town.wait_task(task_id)
        assert task["state"] == "completed", task
        assert task["attempts"] in (1, 2)
    assert {a["name"]: a["state"] for a in town.json("list")} == {"a": "idle", "b": "idle"}


def test_whole_town_killed_at_once_leaves_stale_files_that_the_next_start_replaces(town):
    town.tt("spawn", "dev")
    running = town.json("assign", "dev", "@gate go\n@echo first")["id"]
    queued = town.json("assign", "dev", "@echo second")["id"]
    working_on(town, "dev", running)
    aof = town.root / ".tt" / "redis"

    def persisted() -> bool:  # appendfsync everysec: wait until the tasks are on disk
        data = b"".join(p.read_bytes() for p in aof.rglob("*") if p.is_file())
        return running.encode() in data and queued.encode() in data

    wait_for(persisted, 20, "the append-only file to hold the tasks")
    victims = town_processes(town.root)
    # A power cut, or the OOM killer taking everything: freeze all first, so no process sees another
    # die (redis-server would get its parent-death SIGTERM and tidy up its pid file and socket).
    for action in ("suspend", "kill"):
        for proc in victims:
            try:
                getattr(proc, action)()
            except psutil.NoSuchProcess:
                pass
    wait_for(lambda: town_processes(town.root) == [], 20, "every process to die")
    assert (town.root / ".tt" / "redis.pid").exists() and (town.root / ".tt" / "redis.sock").exists()

    open_gate(town)
    proc = start_foreground(town)
    try:
        assert town.wait_task(running)["state"] == "completed"
        assert town.wait_task(queued)["state"] == "completed"
        assert len(redis_servers(town)) == 1
    finally:
        town.tt("stop")
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert town_processes(town.root) == []


def test_a_cli_deaf_to_hangup_is_killed_when_its_runner_dies(town):
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@ignore-hup\n@ignore-term\n@gate never")["id"]
    agent = working_on(town, "dev", task_id)
    wait_for(lambda: "received" in town.tt("logs", "dev").stdout.decode(), 20, "the CLI to be past its setup")
    os.kill(agent["pid"], signal.SIGKILL)
    # its terminal hangs up, which it ignores: the supervisor, its adoptive parent, kills it
    wait_for(lambda: dead(agent["cli_pid"]), 20, "the orphaned CLI to be killed")
    wait_for(lambda: town.agent("dev")["cli_pid"] not in ("", None, agent["cli_pid"]), 30, "the task to run again")


def test_a_cli_that_outlives_its_runner_and_supervisor_is_killed_by_the_next_start(town):
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@ignore-hup\n@ignore-term\n@runs\n@gate go\n@echo done")["id"]
    agent = working_on(town, "dev", task_id)
    wait_for(lambda: "runs 1" in town.tt("logs", "dev").stdout.decode(), 20, "the CLI to be past its setup")
    cli = psutil.Process(agent["cli_pid"])
    # supervisor and runner killed together (frozen first, so neither sees the other die)
    victims = [psutil.Process(town.supervisor_pid()), psutil.Process(agent["pid"])]
    for action in ("suspend", "kill"):
        for proc in victims:
            getattr(proc, action)()
    wait_for(lambda: all(dead(p.pid) for p in victims), 20, "the supervisor and the runner to die")
    assert cli.is_running() and cli.status() != psutil.STATUS_ZOMBIE  # deaf to its hang-up: still there

    town.tt("restart", "dev")  # a new supervisor starts, and first kills what the old one left
    wait_for(lambda: dead(cli.pid), 20, "the leftover CLI to be killed")
    open_gate(town)  # (had it lived, the old CLI would have gone on with the task, unsupervised)
    task = town.wait_task(task_id)
    assert task["state"] == "completed" and "runs 2" in task["output"]


def test_stop_kills_a_helper_that_left_its_clis_process_group(town):
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@daemon\n@seq 2000\n@echo started a daemon")["id"]
    task = town.wait_task(task_id)  # the helper holds the CLI's terminal: the task ends all the same
    assert task["state"] == "completed" and task["output"].endswith("seq 002000\r\nstarted a daemon\r\ndone\r\n")
    [helper] = helpers_of(town, task_id)
    assert not dead(helper)  # out of the CLI's group, it outlived the task (as a server would)
    town.tt("stop")
    assert dead(helper) and town_processes(town.root) == []


def test_redis_server_killed_is_restarted_and_the_town_goes_on(town):
    town.tt("spawn", "dev")
    assert town.wait_task(town.json("assign", "dev", "@echo one")["id"])["state"] == "completed"
    supervisor, runner = town.supervisor_pid(), town.agent("dev")["pid"]
    [server] = redis_servers(town)
    server.kill()
    wait_for(lambda: [p.pid for p in redis_servers(town)] not in ([], [server.pid]), 30, "a new redis-server")
    # the same supervisor restarted it; the runner rode it out on its own connection
    task = town.wait_task(town.json("assign", "dev", "@echo two")["id"])
    assert task["state"] == "completed" and "two" in task["output"]
    assert town.supervisor_pid() == supervisor and town.agent("dev")["pid"] == runner


def test_a_redis_server_stalled_longer_than_a_client_timeout_loses_nothing(town):
    town.tt("spawn", "dev")
    assert town.wait_task(town.json("assign", "dev", "@echo one")["id"])["state"] == "completed"
    supervisor, runner = town.supervisor_pid(), town.agent("dev")["pid"]
    [server] = redis_servers(town)
    server.suspend()  # an fsync on a busy disk, swapping: Redis answers nobody for a while
    try:
        time.sleep(6)  # the stall itself (longer than the 5 s a `tt` command waits), not a wait for state
    finally:
        server.resume()
    task = town.wait_task(town.json("assign", "dev", "@echo two")["id"])
    assert task["state"] == "completed"
    assert town.supervisor_pid() == supervisor and town.agent("dev")["pid"] == runner
    assert [p.pid for p in redis_servers(town)] == [server.pid]


def test_a_cli_does_not_inherit_what_tt_start_inherited(town):
    inherited = os.open(town.root / "tinytown.toml", os.O_RDONLY)
    os.dup2(inherited, 57)  # an fd a user's shell left open (`exec 57<file`, a lock, a pipe)
    os.close(inherited)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "start"], cwd=town.root, env=town.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(57,))
    finally:
        os.close(57)
    try:
        wait_for(lambda: town.supervisor_pid() == proc.pid, 30, "tt start to take the lock")
        town.tt("spawn", "dev")
        task_id = town.json("assign", "dev", "@echo hi")["id"]
        assert town.wait_task(task_id)["state"] == "completed"
        fds = json.loads((town.record / f"{task_id}.json").read_text())["fds"]
        assert 57 not in fds and fds[:3] == [0, 1, 2]
    finally:
        town.tt("stop")
        proc.wait(30)


def test_a_leftover_cli_that_brings_the_town_back_is_killed_by_the_supervisor_it_started(town):
    # A CLI left over from a dead town runs `tt ...` (as agents do), which starts a supervisor in
    # the foreground, in its own process group: the new supervisor kills it (its task will be
    # delivered again) and goes on.
    markers = dict(town.env, TT_TOWN_DIR=str(town.root), TT_TASK_ID="left-over", TT_AGENT_ID="x")
    start = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-m', 'tinytown.cli.main', 'start']); time.sleep(300)"
    leftover = subprocess.Popen([sys.executable, "-c", start], cwd=town.root, env=markers, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: leftover.poll() is not None, 30, "the leftover CLI to be killed")
        supervisor = wait_for(town.supervisor_pid, 30, "the supervisor it started to run")
        assert town.json("status")["supervisor"]["state"] == "running"
        assert town.supervisor_pid() == supervisor  # it spared itself, and its process group
    finally:
        if leftover.poll() is None:
            leftover.kill()
        town.tt("stop")


def test_a_supervisor_started_by_an_agent_does_not_carry_its_markers(town):
    agent_env = {"TT_TOWN": "outer", "TT_TOWN_DIR": "/outer/town", "TT_AGENT": "dev", "TT_AGENT_ID": "x", "TT_TASK_ID": "y"}
    town.env.update(agent_env)
    town.tt("spawn", "dev", "--town", str(town.root))  # starts this town's supervisor in the background
    environ = open(f"/proc/{town.supervisor_pid()}/environ", "rb").read().split(b"\0")
    assert not [v for v in environ if v.split(b"=")[0].decode() in agent_env]


def test_a_runner_death_spares_what_earlier_tasks_left_running(town):
    town.tt("spawn", "dev")
    first = town.json("assign", "dev", "@daemon\n@echo started a daemon")["id"]
    assert town.wait_task(first)["state"] == "completed"
    [daemon] = helpers_of(town, first)
    crash = town.json("assign", "dev", "@kill-runner")["id"]
    wait_for(lambda: town.task(crash)["attempts"] >= 2, 30, "the crashed task to be run again")
    assert not dead(daemon)  # not the crashed task's: a gpg-agent, a server the agent meant to keep
    town.tt("stop")
    assert dead(daemon)  # `tt stop` leaves nothing running (SIGTERM first)


def test_helpers_holding_the_terminal_leave_nothing_behind_in_the_runner(town):
    town.tt("spawn", "dev")
    assert town.wait_task(town.json("assign", "dev", "@echo warm")["id"])["state"] == "completed"
    runner = psutil.Process(town.agent("dev")["pid"])
    fds, threads = runner.num_fds(), runner.num_threads()
    for i in range(5):  # each leaves a helper in a session of its own, holding the task's terminal
        task = town.wait_task(town.json("assign", "dev", f"@daemon\n@echo task {i}")["id"])
        assert task["state"] == "completed" and f"task {i}" in task["output"]
    # each task's reader thread, its fds and its pty are let go, as they were for a plain task
    wait_for(lambda: (runner.num_fds(), runner.num_threads()) == (fds, threads), 20, "the runner's fds and threads")


def test_redis_server_killed_during_a_graceful_stop_loses_nothing(town):
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@gate go\n@echo finished")["id"]
    working_on(town, "dev", task_id)
    supervisor = psutil.Process(town.supervisor_pid())
    stop = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "stop"], cwd=town.root, env=town.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    town.wait_agent("dev", ("stopping",))  # the stop waits for the task, within stop_grace
    [server] = redis_servers(town)
    server.kill()
    wait_for(lambda: dead(server.pid), 20, "redis-server to die")
    open_gate(town)
    out, err = stop.communicate(timeout=60)
    assert stop.returncode == 0, err.decode()
    supervisor.wait(30)
    assert town_processes(town.root) == []
    report = json.loads((town.root / ".tt" / "last-stop.json").read_text())
    assert report["stopped"] == ["dev"] and report["killed"] == []
    town.tt("restart", "dev")  # any writing command brings the town back, to read it
    task = town.wait_task(task_id)
    assert task["state"] == "completed" and "finished" in task["output"]


def test_two_starts_at_the_same_instant_make_one_supervisor(town):
    procs = [subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "start"], cwd=town.root, env=town.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        loser = wait_for(lambda: next((p for p in procs if p.poll() is not None), None), 30, "one start to give up")
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate()
        assert loser.returncode == 1 and "already running" in err.decode()
        assert err.decode().count("\n") == 1  # one line, no traceback
        assert winner.poll() is None and town.supervisor_pid() == winner.pid
        assert [p.pid for p in supervisors(town)] == [winner.pid]
        town.tt("spawn", "dev")  # goes to the running supervisor, starts no other
        assert town.wait_task(town.json("assign", "dev", "@echo hi")["id"])["state"] == "completed"
        assert [p.pid for p in supervisors(town)] == [winner.pid] and len(redis_servers(town)) == 1
    finally:
        town.tt("stop")
        for p in procs:
            p.communicate(timeout=30)
    assert winner.returncode == 0


def test_concurrent_auto_starts_make_one_supervisor(town):
    names = ["a", "b", "c"]
    procs = [subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "spawn", name], cwd=town.root, env=town.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in names]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    assert len(supervisors(town)) == 1 and len(redis_servers(town)) == 1
    for name in names:
        town.wait_agent(name, ("idle",))


# --- 4. graceful stop ----------------------------------------------------------------------------
def test_stop_during_a_long_task_requeues_it_and_the_next_start_completes_it(make_town):
    town = make_town(policy=policy(stop_grace=0.2))
    town.tt("spawn", "dev")
    long_id = town.json("assign", "dev", "@child\n@gate go\n@echo long done")["id"]
    next_id = town.json("assign", "dev", "@echo next")["id"]
    working_on(town, "dev", long_id)
    wait_for(lambda: helpers_of(town, long_id), 20, "the CLI's helper")

    out = town.tt("stop").out

    assert "Stopped town testtown: 1 runner(s) (dev)" in out
    assert f"Re-queued 1 unfinished task(s): {long_id}" in out and "2 task(s) wait" in out
    assert town_processes(town.root) == []
    assert all(dead(p) for p in helpers_of(town, long_id))
    report = json.loads((town.root / ".tt" / "last-stop.json").read_text())
    assert report["requeued"] == [long_id]

    open_gate(town)
    proc = start_foreground(town)
    try:
        long_task, next_task = town.wait_task(long_id), town.wait_task(next_id)
        assert long_task["state"] == "completed" and long_task["attempts"] == 1  # a stop is not a crash
        assert next_task["state"] == "completed"
        assert long_task["started_at"] < next_task["started_at"]  # back at the front of the inbox
    finally:
        town.tt("stop")
        proc.communicate(timeout=30)


def test_stop_lets_a_working_runner_finish_within_the_grace_period(make_town):
    town = make_town(policy=policy(stop_grace=60))
    town.tt("spawn", "dev")
    town.tt("spawn", "idler")
    task_id = town.json("assign", "dev", "@gate go\n@echo finished in time")["id"]
    working_on(town, "dev", task_id)
    stopping = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "stop", "--json"], cwd=town.root, env=town.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        town.wait_agent("dev", ("stopping",))
        # the idle runner exited at once; the working one is still at its task
        wait_for(lambda: town.agent("idler")["state"] == "stopped", 20, "the idle runner to stop")
        assert town.task(task_id)["state"] == "running"
        open_gate(town)
        out, err = stopping.communicate(timeout=60)
    finally:
        if stopping.poll() is None:
            stopping.kill()
    assert stopping.returncode == 0, err
    report = json.loads(out)
    assert report["requeued"] == [] and sorted(report["stopped"]) == ["dev", "idler"]
    town.tt("restart", "dev")
    task = town.task(task_id)
    assert task["state"] == "completed" and task["attempts"] == 1 and "finished in time" in task["output"]


def test_a_stop_gives_a_runner_the_grace_of_the_config_it_was_started_with(make_town):
    """`tt reload` shortening stop_grace reaches the next runner only; the supervisor took the new
    grace for every runner and SIGKILLed one still within its own, its CLI with it (no SIGTERM)."""
    town = make_town(policy=policy(stop_grace=60))
    town.tt("spawn", "dev")
    town.wait_agent("dev", ("idle",))
    path = town.root / "tinytown.toml"
    path.write_text(path.read_text().replace("stop_grace = 60", "stop_grace = 0.5", 1))
    assert "applied [supervisor]" in town.tt("reload").out
    from tinytown.supervisor import lock
    from tinytown.supervisor.stopping import Card
    card = Card.decode(lock.holder_and_card(town.root / ".tt")[1])
    assert card.stop_grace == 60  # what `tt stop` waits for: dev's runner keeps its 60 s
    task_id = town.json("assign", "dev", "@sleep 7\n@echo finished within its grace")["id"]
    working_on(town, "dev", task_id)
    report = town.json("stop")  # past 0.5 s + the supervisor's slack (5.5 s), within the runner's 60
    assert report["killed"] == [] and report["requeued"] == [] and report["stopped"] == ["dev"], report
    task = town.task(task_id)
    assert task["state"] == "completed" and task["attempts"] == 1 and "finished within its grace" in task["output"]


def test_stop_now_skips_the_grace_period(make_town):
    town = make_town(policy=policy(stop_grace=600))
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@ignore-term\n@gate never")["id"]
    working_on(town, "dev", task_id)
    out = town.tt("stop", "--now").out  # the CLI ignores SIGTERM: SIGKILL follows
    assert task_id in out and town_processes(town.root) == []
    data = town.json("status")
    assert data["running"] is False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_to_the_supervisor_stop_it_gracefully(make_town, sig):
    town = make_town(policy=policy(stop_grace=0.2))
    proc = start_foreground(town)
    try:
        town.tt("spawn", "dev")
        task_id = town.json("assign", "dev", "@gate never")["id"]
        working_on(town, "dev", task_id)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "1 task(s) re-queued" in out.decode()
    wait_for(lambda: town_processes(town.root) == [], 20, "the town to be down")
    report = json.loads((town.root / ".tt" / "last-stop.json").read_text())
    assert report["requeued"] == [task_id]


# --- 5. heartbeats and task timeouts -----------------------------------------------------------
def test_a_stopped_runner_shows_as_unresponsive(make_town):
    town = make_town(policy=policy(heartbeat_interval=0.1, heartbeat_stale=1.0))
    town.tt("spawn", "dev")
    town.tt("spawn", "other")
    pid = town.wait_agent("dev", ("idle",))["pid"]
    # other works on a silent task throughout: its runner beats while it waits on the CLI, so when
    # dev (stopped after other started) looks unresponsive, other must not
    busy = town.json("assign", "other", "@gate go")["id"]
    working_on(town, "other", busy)

    def health() -> dict:
        return {a["name"]: a["health"] for a in town.json("status")["agents"]}

    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: health() == {"dev": "unresponsive", "other": "healthy"}, 20, "dev to look unresponsive")
        assert "unresponsive" in town.tt("status").out
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: health() == {"dev": "healthy", "other": "healthy"}, 20, "dev to be healthy again")
    open_gate(town)
    assert town.wait_task(busy)["state"] == "completed"


def test_restart_of_a_hung_runner_stops_it_and_starts_a_new_one(make_town):
    town = make_town(policy=policy(heartbeat_interval=0.1, heartbeat_stale=1.0))
    town.tt("spawn", "dev")
    pid = town.wait_agent("dev", ("idle",))["pid"]
    os.kill(pid, signal.SIGSTOP)  # hung: no heartbeat, deaf to the supervisor
    wait_for(lambda: town.json("status")["agents"][0]["health"] == "unresponsive", 20, "dev to look unresponsive")
    refused = town.tt("restart", "dev", "--without-latest", check=False)  # (it stopped dev, then refused)
    assert refused.returncode == 1 and "stopping it first" not in refused.out
    from tinytown.supervisor.procutil import alive
    assert alive(pid) and town.town().agent("dev").hold == ""
    out = town.tt("restart", "dev").out
    assert "stopping it first" in out and "Restarting agent dev" in out
    assert not alive(pid)
    fresh = town.wait_agent("dev", ("idle",))
    assert fresh["pid"] != pid and town.wait_task(town.assign("dev", "@echo back"))["state"] == "completed"


def test_a_busy_runner_keeps_its_heartbeat(make_town):
    """Back-to-back short tasks for longer than heartbeat_stale: never unresponsive."""
    town = make_town(policy=policy(heartbeat_interval=0.1, heartbeat_stale=0.5))
    town.tt("spawn", "dev")
    town.wait_agent("dev", ("idle",))
    t = town.town()
    ids = [t.assign("dev", "@echo quick").id for _ in range(40)]
    seen = set()
    while town.task(ids[-1])["state"] not in ("completed", "failed"):
        seen |= {a["health"] for a in t.status()["agents"]}
    assert seen <= {"healthy"}, seen
    assert all(t.task(i).state == "completed" for i in ids)
    t.r.close()


def test_task_timeout_fails_the_task_and_kills_the_cli_group(make_town):
    town = make_town(policy=policy(task_timeout=0.5))
    town.tt("spawn", "quick")                              # the town's task_timeout
    town.tt("spawn", "patient", "--task-timeout", "600")   # its own
    slow_id = town.json("assign", "quick", "@child\n@ignore-term\n@gate never")["id"]
    patient_id = town.json("assign", "patient", "@gate go\n@echo patience")["id"]
    agent = working_on(town, "quick", slow_id)
    wait_for(lambda: helpers_of(town, slow_id), 20, "the CLI's helper")

    task = town.wait_task(slow_id)
    assert task["state"] == "failed" and task["reason"].startswith("timed out")
    assert dead(agent["cli_pid"]) and all(dead(p) for p in helpers_of(town, slow_id))
    after = town.wait_agent("quick", ("idle",))
    assert after["pid"] == agent["pid"] and after["restarts"] == 0

    assert town.task(patient_id)["state"] == "running"  # its own, longer timeout
    open_gate(town)
    assert town.wait_task(patient_id)["state"] == "completed"


# --- 6. max_agents -----------------------------------------------------------------------------
def test_the_supervisor_runs_no_more_than_max_agents(town):
    set_max_agents(town, 2)
    town.tt("spawn", "a")
    town.tt("spawn", "b")
    assert "max_agents" in town.tt("spawn", "c", check=False).err
    # more agents than allowed, written straight into Redis (a hand edit, or two racing spawns)
    from tinytown.supervisor.models import Agent, new_id, now
    t = town.town()
    for name in ("c", "d"):
        agent = Agent(id=new_id(), name=name, cli="claude", created_at=now(), updated_at=now())
        t.r.hset(t.keys.agent_index, name, agent.id)
        t.r.hset(t.keys.agent(agent.id), mapping=agent.to_hash())
    t.nudge()
    for name in ("c", "d"):
        over = town.wait_agent(name, ("stopped",))
        assert "max_agents" in over["reason"] and not over["pid"]
    for name in ("a", "b"):
        town.wait_agent(name, ("idle",))

    assert sorted(p.pid for p in runners(town)) == sorted(town.agent(n)["pid"] for n in ("a", "b"))
    assert "max_agents" in town.tt("status").out

    # and after a restart of the town, still two
    town.tt("stop")
    town.tt("restart", "a")
    for name in ("a", "b"):
        town.wait_agent(name, ("idle",))
    wait_for(lambda: town.agent("d")["reason"], 20, "d to be held back again")
    assert len(runners(town)) == 2
    t.r.close()


def test_a_hand_edited_agent_record_does_not_take_the_town_down(town):
    town.tt("spawn", "good")
    town.wait_agent("good", ("idle",))
    from tinytown.supervisor.models import Agent, new_id, now
    t = town.town()
    bad = Agent(id=new_id(), name="bad", cli="claude", state="bogus", created_at=now(), updated_at=now())
    t.r.hset(t.keys.agent_index, "bad", bad.id)
    t.r.hset(t.keys.agent(bad.id), mapping=bad.to_hash())
    t.nudge()
    wait_for(lambda: "agent bad not started" in (town.root / ".tt" / "supervisor.log").read_text(), 20,
             "the supervisor to refuse the bad record")
    assert town.wait_task(town.json("assign", "good", "@echo still here")["id"])["state"] == "completed"
    t.r.close()


def test_a_runner_that_died_after_failing_its_agent_leaves_it_failed_and_the_town_up(make_town):
    """A runner records its agent failed (its CLI cannot start), then dies before its exit says so
    (SIGKILL, a Redis error on the way out): the supervisor took it for a crash and set the failed
    agent `backoff`, a transition refused, and the whole town went down with it."""
    town = make_town(policy=policy(start_seconds=60))
    town.tt("spawn", "dev")
    town.tt("spawn", "other")
    first = town.wait_agent("dev", ("idle",))["pid"]
    os.kill(first, signal.SIGKILL)  # one quick failure: restarted at once; the next one waits
    second = wait_for(lambda: (lambda a: a["state"] == "idle" and a["pid"] not in ("", first) and a["pid"])(
        town.agent("dev")), 30, "dev's second runner")
    t = town.town()
    try:
        t.fail_agent(t.agent_id("dev"), "dev", "its CLI cannot start: test")  # as the runner writes it
    finally:
        t.r.close()
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: "failed until `tt restart dev`" in (town.root / ".tt" / "supervisor.log").read_text(), 20,
             "the supervisor to take dev as failed")
    assert town.agent("dev")["state"] == "failed" and "its CLI cannot start" in town.agent("dev")["reason"]
    assert town.wait_task(town.json("assign", "other", "@echo still here")["id"])["state"] == "completed"


def test_an_inbox_entry_nobody_can_read_is_set_aside_not_the_town_taken_down(town):
    """A hand-written inbox entry that is not a message (not JSON, or JSON of another shape): the
    runner that claimed it died decoding it, and the supervisor, reading what it had in flight,
    died too, at every start after. Now the runner drops it, saying what it was, and goes on."""
    town.tt("spawn", "dev")
    town.wait_agent("dev", ("idle",))
    t = town.town()
    try:
        inbox = t.keys.inbox(t.agent_id("dev"))
        for junk in ("not json", '["a", "list"]', '{"no": "type"}'):
            t.r.rpush(inbox, junk)
    finally:
        t.r.close()
    task = town.json("assign", "dev", "@echo after the junk")["id"]
    assert town.wait_task(task)["state"] == "completed"
    log = (town.root / ".tt" / "logs" / "dev.log").read_text()
    for junk in ("'not json'", """'["a", "list"]'""", """'{"no": "type"}'"""):
        assert f"dropped an inbox entry that is not a message: {junk}" in log
    assert town.agent("dev")["restarts"] == 0


def test_a_fork_refused_by_the_pid_limit_delays_that_runner_not_the_town(town):
    """A runaway agent that uses up the pid limit made the supervisor's next fork fail, and the
    supervisor took every agent's running task down with it. The runner waits and is tried again."""
    cgroups = "/sys/fs/cgroup/pids"
    if not os.access(cgroups, os.W_OK):
        pytest.skip("needs a writable cgroup v1 pids controller (root)")
    group = f"{cgroups}/tt-test-{os.getpid()}"
    town.tt("spawn", "dev")
    town.tt("spawn", "busy")
    task = town.json("assign", "busy", "@gate go\n@echo done")["id"]
    working_on(town, "busy", task)
    runner = town.wait_agent("dev", ("idle",))["pid"]
    supervisor = town.supervisor_pid()
    os.mkdir(group)
    try:
        with open(f"{group}/cgroup.procs", "w") as fh:
            fh.write(str(supervisor))
        with open(f"{group}/pids.max", "w") as fh:
            fh.write("1")  # the supervisor alone: its next fork is refused (EAGAIN)
        os.kill(runner, signal.SIGKILL)
        log = town.root / ".tt" / "supervisor.log"
        wait_for(lambda: "cannot start runner dev" in log.read_text(), 20, "the refused fork to be said")
        assert town.agent("dev")["state"] == "backoff" and town.supervisor_pid() == supervisor
        with open(f"{group}/pids.max", "w") as fh:
            fh.write("max")
        wait_for(lambda: town.agent("dev")["state"] == "idle", 30, "dev's runner once forks work again")
    finally:  # every process back where it was (the runner forked meanwhile is in the group too)
        with open(f"{group}/cgroup.procs") as fh:
            inside = fh.read().split()
        for pid in inside:
            try:
                with open(f"{cgroups}/cgroup.procs", "w") as fh:
                    fh.write(pid)
            except ProcessLookupError:
                pass
        os.rmdir(group)
    open_gate(town)
    assert town.wait_task(task)["state"] == "completed"  # busy's task ran through it all


def test_a_runner_that_stayed_up_long_enough_counts_as_started(make_town):
    """Crashes far apart are each restarted at once: only quick failures in a row lead to `failed`."""
    town = make_town(policy=policy(start_seconds=0.3, max_fast_failures=2))
    town.tt("spawn", "dev")
    pid = None
    for n in (1, 2, 3):
        pid = wait_for(lambda: (lambda a: a["state"] == "idle" and a["pid"] != pid and a["pid"])(town.agent("dev")),
                       20, "a new runner for dev")
        seen = time.monotonic()  # it has been up at least since now (psutil's create_time is too coarse)
        wait_for(lambda: time.monotonic() - seen > 0.6, 20, "dev to count as started")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: town.agent("dev")["restarts"] == n, 20, f"restart {n}")
    assert [float(e["delay"]) for e in events(town, "agent_restarting")] == [0.0, 0.0, 0.0]
    assert town.wait_task(town.json("assign", "dev", "@echo alive")["id"])["state"] == "completed"


def test_racing_spawns_never_pass_max_agents(town):
    set_max_agents(town, 2)
    town.tt("spawn", "first")  # the supervisor is up: the race is in the registry, not the start
    procs = [subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "spawn", f"racer{i}"], cwd=town.root,
                              env=town.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    results = [(p.wait(timeout=60), p.communicate()[1].decode()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1, 1, 1]
    assert all("max_agents reached" in err for code, err in results if code)
    assert len(town.json("list")) == 2


def test_a_start_right_after_a_supervisor_sigkill_is_not_raced_by_the_old_runners(make_town):
    """The old runner is still putting its CLI down (it ignores SIGTERM) when the new town is up."""
    town = make_town(policy=policy(stop_grace=0.2))
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@ignore-term\n@runs\n@gate go\n@echo done")["id"]
    old = working_on(town, "dev", task_id)

    os.kill(town.supervisor_pid(), signal.SIGKILL)
    proc = start_foreground(town)  # at once: the old runner is still alive
    try:
        wait_for(lambda: dead(old["pid"]) and dead(old["cli_pid"]), 20, "the old runner and CLI to be gone")
        # the new runner has it (until the new supervisor starts one, the record still shows the old)
        wait_for(lambda: (lambda a: a["pid"] not in (None, old["pid"]) and a["current_task"] == task_id
                          and a["cli_pid"])(town.agent("dev")), 30, "a new runner to run the task")
        open_gate(town)
        task = town.wait_task(task_id)
        assert task["state"] == "completed" and "runs 2" in task["output"]
        assert len([e for e in events(town, "task_completed") if e["task"] == task_id]) == 1
        assert town.agent("dev")["restarts"] == 0
    finally:
        town.tt("stop")
        proc.communicate(timeout=30)


def test_a_runner_that_will_not_stop_is_killed_and_its_task_put_back(town):
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "@gate go\n@echo done")["id"]
    agent = working_on(town, "dev", task_id)
    os.kill(agent["pid"], signal.SIGSTOP)  # hung: it will not hear the stop
    report = town.json("stop", "--now")
    assert report["killed"] == ["dev"] and report["requeued"] == [task_id]
    assert town_processes(town.root) == [] and dead(agent["cli_pid"])
    open_gate(town)
    town.tt("restart", "dev")
    task = town.wait_task(task_id)
    assert task["state"] == "completed" and task["attempts"] == 2  # the killed run counts


def test_foreground_supervisor_outlives_its_terminal(town):
    """`tt start` over SSH, then the connection drops: the town goes on, its messages go to the log."""
    master, slave = os.openpty()
    child = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "start"], cwd=town.root, env=town.env,
                             stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        seen = bytearray()

        def printed_its_pid() -> bool:
            if select.select([master], [], [], 0.1)[0]:
                seen.extend(os.read(master, 4096))
            return b"supervisor pid" in seen

        wait_for(printed_its_pid, 30, "the supervisor's first line on its terminal")
        pid = wait_for(town.supervisor_pid, 10, "the supervisor's lock")
        assert pid == child.pid
        # The terminal goes away: closing the pty's master side hangs it up (SIGHUP, which the
        # supervisor ignores), and from then on writes to it fail.
        os.close(master)
        master = -1
        town.tt("spawn", "late")  # makes the supervisor print "runner late started" to a dead terminal
        assert town.wait_task(town.json("assign", "late", "hi")["id"])["state"] == "completed"
        assert town.supervisor_pid() == pid
        wait_for(lambda: "runner late started" in (town.root / ".tt" / "supervisor.log").read_text(), 10,
                 "the message in .tt/supervisor.log")
        town.tt("stop")
        assert child.wait(30) == 0
    finally:
        if master >= 0:
            os.close(master)
        if town.supervisor_pid() == child.pid:
            os.kill(child.pid, signal.SIGKILL)

def test_supervisor_and_runners_never_load_redis_py(town):
    """They talk RESP themselves (supervisor/resp.py): each runner is a fork of the supervisor,
    and redis-py's ~10 MB would be in every one of them, making each fork and exit dearer."""
    code = ("import sys; sys.modules['redis'] = None  # any `import redis` now raises ImportError\n"
            "from tinytown.supervisor.daemon import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(town.root)], cwd=town.root, env=town.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: town.supervisor_pid() == proc.pid or proc.poll() is not None, 30, "the supervisor to start")
        assert proc.poll() is None, proc.communicate()
        town.tt("spawn", "dev")
        task = town.wait_task(town.json("assign", "dev", "@echo hello")["id"])
        assert task["state"] == "completed" and "hello" in task["output"]
        town.tt("stop")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"redis" not in err.replace(b"redis-server", b"")  # no ImportError reported anywhere
