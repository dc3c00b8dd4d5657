"""Chaos: hundreds of short tasks over several agents while runners and CLIs are SIGKILLed at random.

At the end every task is completed, or failed with a reason; none is missing, none reached a
terminal state twice, and nothing of the town is left running.

The suite runs a short round. A longer one, by hand:
    ./scripts/chaos [SECONDS [TASKS]]     (default 300 s, 30000 tasks; also CHAOS_AGENTS, CHAOS_SEED)
"""
from __future__ import annotations

import collections
import os
import random
import signal
import time

import psutil
from conftest import FAST_POLICY, town_processes, wait_for

CHAOS_SECONDS = float(os.environ.get("CHAOS_SECONDS", "15"))  # how long the killing goes on, at most
CHAOS_TASKS = int(os.environ.get("CHAOS_TASKS", "600"))
CHAOS_AGENTS = int(os.environ.get("CHAOS_AGENTS", "4"))
CHAOS_SEED = int(os.environ.get("CHAOS_SEED", str(random.randrange(1 << 30))))

# Restart at once and often, never give up on an agent: the chaos is in the kills, and a task
# whose runner dies max_attempts times fails with a reason, which is a fine outcome here.
CHAOS_POLICY = FAST_POLICY.replace("backoff_first = 0.05", "backoff_first = 0.01") \
    .replace("backoff_max = 1.0", "backoff_max = 0.1") \
    .replace("start_seconds = 1.0", "start_seconds = 0.05") \
    .replace("max_fast_failures = 4", "max_fast_failures = 1000000")


class EventLog:
    """Follows the town's event stream with XREAD, so its cap never hides an event from us."""

    def __init__(self, town):
        self.town = town
        self.last = "0-0"
        self.terminal: dict[str, list[str]] = collections.defaultdict(list)
        self.count: collections.Counter = collections.Counter()

    def read(self) -> None:
        while True:
            got = self.town.r.xread({self.town.keys.events: self.last}, count=1000)
            if not got:
                return
            for entry_id, fields in got[0][1]:
                self.last = entry_id
                kind = fields.get("type", "")
                self.count[kind] += 1
                if kind in ("task_completed", "task_failed", "task_cancelled"):
                    self.terminal[fields["task"]].append(kind)


def town_pid(pid, root: str, runner: bool) -> psutil.Process | None:
    """The process `pid` if it is still this town's runner (or CLI), not a recycled pid."""
    try:
        proc = psutil.Process(int(pid))
        if proc.cwd() != root or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc if proc.name().startswith("tt-runner") == runner else None
    except (psutil.Error, ValueError, TypeError):
        return None


def test_chaos(make_town):
    rng = random.Random(CHAOS_SEED)
    print(f"chaos: seed {CHAOS_SEED}, {CHAOS_TASKS} tasks, {CHAOS_AGENTS} agents, up to {CHAOS_SECONDS}s of kills")
    town = make_town(policy=CHAOS_POLICY)
    root = str(town.root)
    names = [f"agent{i}" for i in range(CHAOS_AGENTS)]
    for name in names:
        town.tt("spawn", name)
    t = town.town()
    events = EventLog(t)

    ids = []
    kills = collections.Counter()
    started = time.monotonic()
    batch = max(1, CHAOS_TASKS // 20)

    def all_done() -> bool:
        return len(ids) == CHAOS_TASKS and len(events.terminal) >= CHAOS_TASKS

    while not all_done() and time.monotonic() - started < CHAOS_SECONDS:
        # keep the inboxes fed (in batches, so the killing starts while work is under way)
        for _ in range(min(batch, CHAOS_TASKS - len(ids))):
            i = len(ids)
            text = f"@echo chaos {i}" if rng.random() < 0.8 else "@sleep 0.05\n@echo napped"
            ids.append(t.assign(names[i % len(names)], text).id)
        agent = rng.choice(t.agents())
        runner = rng.random() < 0.4
        victim = town_pid(agent.pid if runner else agent.cli_pid, root, runner)
        if victim is not None:
            try:
                victim.send_signal(signal.SIGKILL)
                kills["runner" if runner else "cli"] += 1
            except psutil.Error:
                pass
        events.read()
        time.sleep(rng.uniform(0.01, 0.12))  # the pace of the chaos, not a synchronisation
    chaos_seconds = time.monotonic() - started
    while len(ids) < CHAOS_TASKS:  # CHAOS_SECONDS ran out before every task was assigned
        ids.append(t.assign(names[len(ids) % len(names)], "@echo late").id)

    def settled() -> bool:
        events.read()
        return len(events.terminal) >= CHAOS_TASKS

    wait_for(settled, 60 + CHAOS_TASKS * 0.05, "every task to reach a terminal state")
    wait_for(lambda: all(a.state == "idle" for a in t.agents()), 30, "every agent to be idle")

    # every task is accounted for, exactly once
    tasks = {task.id: task for task in t.tasks()}
    assert set(ids) <= set(tasks) and len(ids) == len(set(ids)) == CHAOS_TASKS
    states = collections.Counter(tasks[i].state for i in ids)
    assert set(states) <= {"completed", "failed"}, states
    duplicated = {i: kinds for i, kinds in events.terminal.items() if len(kinds) != 1}
    assert not duplicated, duplicated
    assert set(events.terminal) == set(ids)
    for i in ids:
        task = tasks[i]
        if task.state == "completed":
            assert task.exit_code == 0 and "done" in task.output
        else:
            assert task.reason, task  # "killed by SIGKILL", "agent crashed 3 times", ...
    for agent in t.agents():
        assert t.r.llen(t.keys.inbox(agent.id)) == 0 and t.r.llen(t.keys.inflight(agent.id)) == 0
    restarts = sum(a.restarts for a in t.agents())
    reasons = collections.Counter(tasks[i].reason for i in ids if tasks[i].state == "failed")
    print(f"chaos: {chaos_seconds:.1f}s, kills {dict(kills)}, restarts {restarts}, {dict(states)}, "
          f"failed because {dict(reasons)}")
    assert kills["runner"] > 0 and restarts > 0
    t.r.close()

    town.tt("stop")
    wait_for(lambda: town_processes(town.root) == [], 30, "no process of the town left")
