"""Chaos for work that flows between agents: a DAG of tasks over 4 agents and a backlog while
runners, CLIs and the supervisor are SIGKILLed at random.

At the end every task is completed, or failed/cancelled with a reason; no CLI of a dependent ever
started before all its dependencies had completed (the fake CLI records every start); no task
reached a terminal state twice; nothing is left waiting (`awaited`, `cancel-requests`).

The suite runs a short round; a longer one by hand:
    COORD_CHAOS_TASKS=2000 COORD_CHAOS_SECONDS=300 ./scripts/test -s tests/test_coordination_chaos.py
"""
from __future__ import annotations

import collections
import os
import random
import signal
import time
from unittest import mock

from conftest import town_processes, wait_for
from test_chaos import CHAOS_POLICY, EventLog, town_pid

TASKS = int(os.environ.get("COORD_CHAOS_TASKS", "300"))
SECONDS = float(os.environ.get("COORD_CHAOS_SECONDS", "15"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.randrange(1 << 30))))


def test_coordination_chaos(make_town):
    from tinytown.supervisor import lifecycle
    rng = random.Random(SEED)
    print(f"coordination chaos: seed {SEED}, {TASKS} tasks, up to {SECONDS}s of kills")
    town = make_town(policy=CHAOS_POLICY)
    root = str(town.root)
    names = [f"agent{i}" for i in range(4)]
    for i, name in enumerate(names):
        town.tt("spawn", name, "--role", "odd" if i % 2 else "even")
    config = town.config()

    def connect():
        t = town.town()
        return t, t.coordination

    def start_again():
        """The supervisor started again as `tt` starts it, with the town's environment (the fake
        CLI on PATH): started with this test's own, its runners could not find the CLI, and each
        task failed "command not found", which this test counted as settled."""
        with mock.patch.dict(os.environ, town.env, clear=True):
            lifecycle.ensure_running(config)

    t, coord = connect()
    events = EventLog(t)
    ids: list[str] = []
    kills = collections.Counter()
    started = time.monotonic()

    def create(i: int) -> str:
        deps = rng.sample(ids[-30:], k=min(len(ids[-30:]), rng.choice((0, 0, 1, 1, 2, 3))))
        text = f"@echo dag {i}" if rng.random() < 0.95 else "@exit 1"
        if rng.random() < 0.25:
            role = rng.choice((None, "odd", "even"))
            return coord.backlog_add(text, role=role, after=deps).task.id
        return coord.create_task(text, agent=rng.choice(names), after=deps).task.id

    while len(ids) < TASKS or (time.monotonic() - started < SECONDS and len(events.terminal) < TASKS):
        try:
            for _ in range(min(20, TASKS - len(ids))):
                ids.append(create(len(ids)))
            events.read()
            roll = rng.random()
            if roll < 0.05:  # the supervisor: its runners follow it (parent-death signal)
                pid = town.supervisor_pid()
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    kills["supervisor"] += 1
                    wait_for(lambda: not lifecycle.running_pid(config), 30, "the supervisor gone")
                start_again()
                t, coord = connect()
                events.town = t
            else:
                agent = rng.choice(t.agents())
                runner = roll < 0.4
                victim = town_pid(agent.pid if runner else agent.cli_pid, root, runner)
                if victim is not None:
                    victim.send_signal(signal.SIGKILL)
                    kills["runner" if runner else "cli"] += 1
        except Exception as exc:  # noqa: BLE001 - Redis restarting with its supervisor
            if "Redis" not in str(exc) and "connect" not in str(exc):
                raise
            start_again()
            t, coord = connect()
            events.town = t
        time.sleep(rng.uniform(0.01, 0.1))  # the pace of the chaos, not a synchronisation

    def settled() -> bool:
        events.read()
        return len(events.terminal) >= TASKS

    try:
        wait_for(settled, 120 + TASKS * 0.1, "every task to reach a terminal state")
    except BaseException:  # what is not settled, and why: the agents and the tasks left
        left = [task for task in t.tasks() if task.id in set(ids) - set(events.terminal)]
        print("agents:", [(a.name, a.state, a.reason[:80], a.hold) for a in t.agents()])
        print(f"{len(left)} tasks not settled:", [(x.id[:8], x.state, x.agent, x.reason[:80], x.after[:30])
                                                  for x in left[:10]])
        raise
    tasks = {task.id: task for task in t.tasks()}
    assert set(ids) <= set(tasks)
    states = collections.Counter(tasks[i].state for i in ids)
    assert set(states) <= {"completed", "failed", "cancelled"}, states
    duplicated = {i: kinds for i, kinds in events.terminal.items() if len(kinds) != 1}
    assert not duplicated, duplicated
    for i in ids:
        task = tasks[i]
        if task.state != "completed":
            assert task.reason, task
        starts = town.record / f"{i}.starts"
        runs = [float(x) for x in starts.read_text().split()] if starts.exists() else []
        deps = [tasks[d] for d in task.after.split(",") if d]
        for start in runs:  # no CLI before every dependency completed, none after it completed itself
            assert all(d.state == "completed" and d.finished_at <= start for d in deps), (task, deps)
            assert task.finished_at is None or start <= task.finished_at, task
        if any(d.state != "completed" for d in deps):
            assert task.state == "cancelled" and not runs, task
    assert t.r.execute_command("SCARD", t.keys.awaited) == 0
    assert t.r.execute_command("SCARD", t.keys.cancel_requests) == 0
    assert coord.backlog() == []
    print(f"coordination chaos: kills {dict(kills)}, {dict(states)}")
    assert kills["runner"] + kills["cli"] > 0
    t.r.close()
    town.tt("stop")
    wait_for(lambda: town_processes(town.root) == [], 30, "no process of the town left")
