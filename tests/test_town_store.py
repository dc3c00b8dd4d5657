"""The Redis operations on a bare redis-server: registry, assignment, the in-flight path. Store logic."""
from __future__ import annotations

import pytest
from conftest import race

from tinytown.supervisor.config import init_town
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.models import AgentState, TaskState
from tinytown.supervisor.town import Town


@pytest.fixture
def town(tmp_path, bare_redis):
    config = init_town(tmp_path / "town", "unit", max_agents=2)
    return Town(config, bare_redis().client())


def test_spawn_registers_once_and_respects_max_agents(town):
    dev = town.spawn("dev", "claude")
    assert town.agent("dev").id == dev.id and dev.state == "starting"
    with pytest.raises(TinytownError, match="already exists"):
        town.spawn("dev", "codex")
    town.spawn("rev", "codex")
    with pytest.raises(TinytownError, match=r"max_agents reached \(2\)"):
        town.spawn("third", "claude")
    assert [a.name for a in town.agents()] == ["dev", "rev"]


@pytest.mark.parametrize("name", ["", "-x", "a b", "x/y", "a" * 64, "ü"])
def test_bad_agent_names(town, name):
    with pytest.raises(TinytownError, match="invalid agent name"):
        town.spawn(name, "claude")
    assert town.agents() == []


def test_unknown_preset_registers_nothing(town):
    with pytest.raises(TinytownError, match="unknown CLI"):
        town.spawn("dev", "gpt-9")
    assert town.agents() == []


def test_assign_claim_finish(town):
    dev = town.spawn("dev", "claude")
    with pytest.raises(TinytownError, match="no agent named 'nobody'"):
        town.assign("nobody", "x")
    task = town.assign("dev", "line one\nline two")
    assert town.queued_counts([dev]) == {dev.id: 1}
    claimed = town.claim(dev.id, 0.01)
    assert claimed.message.task_id == task.id
    assert town.inflight(dev.id)[0].raw == claimed.raw
    town.set_agent_state(dev.id, AgentState.IDLE)
    running = town.start_task(dev.id, task.id)
    assert running.attempts == 1 and town.agent("dev").state == "working"
    town.finish_task(dev.id, claimed, TaskState.COMPLETED, exit_code=0, output=b"x" * 70000)
    done = town.task(task.id[:8])  # a unique prefix finds it
    assert (done.state, done.exit_code, len(done.output)) == ("completed", 0, 64 * 1024)
    assert town.inflight(dev.id) == [] and town.agent("dev").state == "idle"
    assert town.task_counts()["completed"] == 1


def test_requeue_puts_the_task_first_and_can_give_back_the_attempt(town):
    dev = town.spawn("dev", "claude")
    town.set_agent_state(dev.id, AgentState.IDLE)
    first = town.assign("dev", "first")
    town.assign("dev", "second")
    claimed = town.claim(dev.id, 0.01)
    town.start_task(dev.id, first.id)
    town.requeue(dev.id, claimed, give_back_attempt=True)
    task = town.task(first.id)
    assert (task.state, task.attempts) == ("assigned", 0)
    assert town.claim(dev.id, 0.01).message.task_id == first.id


def test_empty_task_is_refused(town):
    town.spawn("dev", "claude")
    with pytest.raises(TinytownError, match="empty"):
        town.assign("dev", "  \n ")


def test_assign_many_writes_all_in_order_or_nothing(town):
    dev = town.spawn("dev", "claude")
    with pytest.raises(TinytownError, match="empty"):
        town.assign_many("dev", ["fine", " "])
    assert town.tasks() == [] and town.queued_counts([dev]) == {dev.id: 0}
    tasks = town.assign_many("dev", [f"task {i}" for i in range(50)])
    assert [t.description for t in town.tasks()] == [f"task {i}" for i in range(50)]
    assert [town.claim(dev.id, 0.01).message.task_id for _ in range(50)] == [t.id for t in tasks]


def test_racing_spawns_never_pass_max_agents(town):
    """Each spawn checks the registry and writes under WATCH: of 8 that all read "no agents yet"
    before any of them writes, 2 win (max_agents) and the others, run again, find no room."""
    import threading

    from tinytown.supervisor.resp import RespClient
    all_checked = threading.Barrier(8)

    class CheckThenWait(RespClient):
        """Waits after its first read until every racer has read too: the race, every time."""
        waited = False

        def pipeline(self, transaction=True):
            pipe = super().pipeline(transaction)
            if not transaction and not self.waited:
                execute = pipe.execute

                def execute_then_wait():
                    result = execute()
                    self.waited = True
                    all_checked.wait(30)
                    return result
                pipe.execute = execute_then_wait
            return pipe

    won, lost = [], []

    def spawn(i):
        try:
            won.append(Town(town.config, CheckThenWait(path=town.r.path)).spawn(f"a{i}", "claude").name)
        except TinytownError as exc:
            lost.append(str(exc))

    race(spawn, 8)
    assert len(won) == 2 and len(lost) == 6 and all("max_agents reached" in m for m in lost)
    assert sorted(a.name for a in town.agents()) == sorted(won)
