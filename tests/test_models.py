"""States, transitions, and the round trip of models through Redis hashes and JSON."""
from __future__ import annotations

import pytest

from tinytown.supervisor.keys import Keys
from tinytown.supervisor.models import (AGENT_TRANSITIONS, Agent, AgentState, InvalidTransition, Message, Task,
                               TaskState, check_agent_transition, check_task_transition)


def test_states_are_the_documented_ones():
    assert [s.value for s in AgentState] == ["starting", "idle", "working", "waiting", "stopping", "stopped", "backoff",
                                              "failed", "paused"]
    assert [s.value for s in TaskState] == ["pending", "assigned", "running", "completed", "failed", "cancelled"]
    assert {s for s in TaskState if s.terminal} == {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED}
    assert set(AGENT_TRANSITIONS) == set(AgentState)


@pytest.mark.parametrize("old,new", [
    (None, AgentState.STARTING), ("starting", AgentState.IDLE), ("idle", AgentState.WORKING),
    ("working", AgentState.IDLE), ("working", AgentState.BACKOFF), ("backoff", AgentState.FAILED),
    ("failed", AgentState.STARTING), ("idle", AgentState.IDLE),
    ("stopping", AgentState.PAUSED), ("paused", AgentState.STARTING), ("paused", AgentState.STOPPED),
    ("working", AgentState.WAITING), ("waiting", AgentState.WORKING), ("waiting", AgentState.IDLE),
    ("waiting", AgentState.STOPPING),
])
def test_allowed_agent_transitions(old, new):
    assert check_agent_transition(old, new) is new


@pytest.mark.parametrize("old,new", [
    (None, AgentState.IDLE), ("stopped", AgentState.WORKING), ("failed", AgentState.IDLE),
    ("backoff", AgentState.WORKING), ("paused", AgentState.IDLE), ("paused", AgentState.WORKING),
    ("failed", AgentState.PAUSED), ("idle", AgentState.WAITING), ("stopping", AgentState.WAITING),
    ("stopping", AgentState.WORKING),
])
def test_refused_agent_transitions(old, new):
    with pytest.raises(InvalidTransition):
        check_agent_transition(old, new)


def test_task_transitions():
    assert check_task_transition(None, TaskState.ASSIGNED) is TaskState.ASSIGNED
    assert check_task_transition("running", TaskState.ASSIGNED) is TaskState.ASSIGNED  # re-queued
    assert check_task_transition("assigned", TaskState.PENDING) is TaskState.PENDING  # given to the backlog
    for terminal in ("completed", "failed", "cancelled"):
        with pytest.raises(InvalidTransition):
            check_task_transition(terminal, TaskState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_task_transition(None, TaskState.RUNNING)


def test_hash_round_trip_keeps_types_and_bytes():
    task = Task(id="t1", agent="dev", agent_id="a1", description="multi\nline $(x) \udcff", attempts=2,
                created_at=12.5, exit_code=None)
    raw = {k.encode(): v.encode("utf-8", "surrogateescape") for k, v in task.to_hash().items()}
    back = Task.from_hash({k: v.decode("utf-8", "surrogateescape") for k, v in raw.items()})
    assert back == task
    agent = Agent(id="a", name="dev", cli="claude", pid=42, restarts=3, heartbeat_at=None)
    assert Agent.from_hash(agent.to_hash()) == agent
    assert agent.to_json()["pid"] == 42


def test_flags_are_1_or_0_in_the_hash_and_booleans_in_json():
    """The Lua scripts compare flags with '1'; `--json` readers get true/false, not 0/1."""
    agent = Agent(id="a", name="dev", cli="claude", keep_context=True, pinned=False)
    assert (agent.to_hash()["keep_context"], agent.to_hash()["pinned"]) == ("1", "0")
    assert (agent.to_json()["keep_context"], agent.to_json()["pinned"]) == (True, False)
    back = Agent.from_hash({**agent.to_hash(), "to_backlog": "", "restart_asked": "1"})
    assert (back.keep_context, back.pinned, back.to_backlog, back.restart_asked) == (True, False, False, True)
    task = Task(id="t", agent="", agent_id="", description="x", backlog=True)
    assert Task.from_hash(task.to_hash()).to_json()["backlog"] is True


def test_message_encoding():
    msg = Message.task_assign("t-1")
    back = Message.decode(msg.encode())
    assert back == msg and back.type == "TaskAssign" and back.task_id == "t-1"
    assert Message.decode('{"type":"Ping","id":"x","created_at":1,"future_field":3}').type == "Ping"


def test_keys_are_town_scoped():
    k = Keys("ft")
    assert k.agent("a1") == "tt:{ft}:agent:a1"
    assert k.task("t1") == "tt:{ft}:task:t1"
    assert k.inbox("a1") == "tt:{ft}:inbox:a1"
    assert len({k.agent_index, k.task_index, k.inflight("a1"), k.output("a1"), k.events, k.supervisor,
                k.control}) == 7
    assert all(key.startswith("tt:{ft}:") for key in (k.agent_index, k.events, k.control))
