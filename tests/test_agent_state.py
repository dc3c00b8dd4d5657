"""An agent's state changes only along models.AGENT_TRANSITIONS, even with two writers at once."""
from __future__ import annotations

import pytest

from tinytown.supervisor.config import init_town
from tinytown.supervisor.models import AgentState, InvalidTransition
from tinytown.supervisor.resp import connect
from tinytown.supervisor.town import Town


class OtherWriterAfterRead:
    """A client on which another writer (a supervisor marking the agent stopped) gets in right
    after every read of an agent's state: the interleaving a check-then-set loses to."""

    def __init__(self, client, other):
        self.client, self.other = client, other

    def hget(self, key, field):
        value = self.client.hget(key, field)
        if field == "state":
            self.other.hset(key, "state", AgentState.STOPPED.value)
        return value

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture
def server(bare_redis):
    return bare_redis()


@pytest.fixture
def store(tmp_path, server):
    return Town(init_town(tmp_path / "town", "unit"), server.client())


def test_the_check_and_the_write_are_one_step(store, server):
    dev = store.spawn("dev", "claude")
    store.set_agent_state(dev.id, AgentState.IDLE)
    racing = Town(store.config, OtherWriterAfterRead(store.r, server.client()))
    racing.r.hget(store.keys.agent(dev.id), "state")  # the other writer marks it stopped now
    with pytest.raises(InvalidTransition, match="from 'stopped' to 'working'"):
        racing.set_agent_state(dev.id, AgentState.WORKING)
    assert store.agent("dev").state == "stopped"  # stopped -> working is not in the table


def test_a_transition_ruled_out_by_what_the_caller_read_sends_nothing(store):
    dev = store.spawn("dev", "claude")
    pipe = store.r.pipeline()
    with pytest.raises(InvalidTransition):
        store.set_agent_state(dev.id, AgentState.WORKING, pipe=pipe, old="stopped")
    assert pipe.queued == []  # nothing was queued


def test_on_a_real_redis_through_the_small_client(town):
    town.tt("spawn", "dev")  # (brings the town's Redis up; the agent below is not in its registry)
    t = Town(town.config(), connect(town.config()))
    key = t.keys.agent("loose")
    t.r.hset(key, mapping={"id": "loose", "name": "loose", "cli": "claude", "state": "idle"})
    t.set_agent_state("loose", AgentState.STARTING)
    t.set_agent_state("loose", AgentState.STARTING)  # the same state again is no change
    with pytest.raises(InvalidTransition, match="from 'starting' to 'working'"):
        t.set_agent_state("loose", AgentState.WORKING)
    with pytest.raises(InvalidTransition, match="from no record to 'idle'"):
        t.set_agent_state("no-such-agent", AgentState.IDLE)
    # not even `starting`: a supervisor starting an agent `tt prune` removed a moment ago must not
    # bring back a record holding a state and nothing else
    with pytest.raises(InvalidTransition, match="from no record to 'starting'"):
        t.set_agent_state("no-such-agent", AgentState.STARTING)
    assert not t.agent_exists("no-such-agent")  # refused: nothing written
    # in a pipeline, the refused command fails alone, when the pipeline runs
    pipe = t.r.pipeline(transaction=False)
    pipe.hset(key, "reason", "written")
    t.set_agent_state("loose", AgentState.WORKING, pipe=pipe)
    with pytest.raises(Exception, match="TRANSITION agent cannot go from 'starting' to 'working'"):
        pipe.execute()
    assert t.r.hget(key, "reason") == "written" and t.r.hget(key, "state") == "starting"
    # a record edited by hand does not stop `tt stop` from recording the others
    t.r.hset(key, "state", "bogus")
    t.mark_stopped("loose", t.agent_id("dev"))
    assert t.r.hget(key, "state") == "bogus"
    t.r.close()
