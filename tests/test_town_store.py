"""The Redis operations on fakeredis: registry, assignment, the in-flight path. Pure store logic."""
from __future__ import annotations

import fakeredis
import pytest

from tinytown.supervisor.config import init_town
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.models import AgentState, TaskState
from tinytown.supervisor.town import Town


@pytest.fixture
def town(tmp_path):
    config = init_town(tmp_path, "unit", max_agents=2)
    client = fakeredis.FakeRedis(decode_responses=True, encoding_errors="surrogateescape")
    return Town(config, client)


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
    assert town.pending_counts([dev]) == {dev.id: 1}
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
