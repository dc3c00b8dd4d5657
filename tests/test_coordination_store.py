"""The coordination store (supervisor/coordination.py) on a real redis-server: dependencies and their
release, the backlog and its claim race, notes, cancel. No runner here: a test plays the runner's
part with the same calls the runner makes (claim, begin, finish in one MULTI/EXEC)."""
from __future__ import annotations

import select
import subprocess
import threading
import time

import pytest
from conftest import wait_for

from tinytown.supervisor.config import init_town
from tinytown.supervisor.coordination import Coordination, caller, split_refs
from tinytown.supervisor.coordination_lua import SCRIPTS
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.keys import Keys
from tinytown.supervisor.models import AgentState, Message, TaskState
from tinytown.supervisor.prompt_blocks import compose
from tinytown.supervisor.redis_server import find_binary
from tinytown.supervisor.resp import connect as resp_connect
from tinytown.supervisor.town import Claimed, Town


@pytest.fixture(scope="module")
def town_config(tmp_path_factory):
    """A town folder with its own redis-server on the town's socket (no persistence)."""
    config = init_town(tmp_path_factory.mktemp("coord"), "coord")
    proc = subprocess.Popen([find_binary(config), "--port", "0", "--unixsocket", str(config.redis_socket),
                             "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--daemonize", "no",
                             "--loglevel", "warning"], stdout=subprocess.DEVNULL)
    client = resp_connect(config, timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.01)
    client.close()
    yield config
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def town(town_config):
    """The town on resp.RespClient (what runners and quick commands use), Redis emptied first."""
    client = resp_connect(town_config, long_lived=True)
    client.execute_command("FLUSHALL")
    yield Town(town_config, client)
    client.close()


@pytest.fixture
def coord(town):
    return Coordination(town)


def spawn(town, name: str, idle: bool = True, roles=()) -> str:
    """Register an agent, idle unless told; its id."""
    agent = town.spawn(name, "claude")
    if idle:
        town.set_agent_state(agent.id, AgentState.IDLE)
    if roles:
        Coordination(town).set_roles(name, roles)
    return agent.id


def inbox_tasks(town, agent_id: str) -> list[str]:
    return [Message.decode(raw).task_id for raw in town.r.lrange(town.keys.inbox(agent_id), 0, -1)]


def take(town, coord, agent_id: str):
    """The runner's claim and begin: (claimed message, Begun)."""
    claimed = town.claim(agent_id, 0.01)
    assert claimed is not None, "nothing in the inbox"
    return claimed, coord.begin(agent_id, claimed.message.task_id)


def finish(town, coord, agent_id: str, claimed: Claimed, state: TaskState, output: str = "") -> None:
    """Town.finish_task: outcome, in-flight gone, agent idle, the release and the agent's backlog
    claim, in one MULTI/EXEC (started first if it was not)."""
    if state_of(town, claimed.message.task_id) == TaskState.ASSIGNED.value:
        town.start_task(agent_id, claimed.message.task_id)
    town.finish_task(agent_id, claimed, state, exit_code=0 if state is TaskState.COMPLETED else 1,
                     output=output.encode())


def outcome_without_release(town, agent_id: str, claimed: Claimed, state: TaskState) -> None:
    """An outcome written without its release (a crash in between, or a hand edit)."""
    pipe = town.r.pipeline()
    pipe.hset(town.keys.task(claimed.message.task_id), mapping={"state": state.value,
                                                                 "finished_at": f"{time.time():.6f}"})
    pipe.lrem(town.keys.inflight(agent_id), 1, claimed.raw)
    pipe.hset(town.keys.agent(agent_id), mapping={"state": "idle", "current_task": ""})
    pipe.execute()


def run_one(town, coord, agent_id: str, state=TaskState.COMPLETED, output: str = "") -> str:
    """Take the next task from the agent's inbox, start it and finish it; its id."""
    claimed, begun = take(town, coord, agent_id)
    assert begun.status == "ok"
    town.start_task(agent_id, claimed.message.task_id, task=begun.task, agent_state=begun.agent_state)
    finish(town, coord, agent_id, claimed, state, output)
    return claimed.message.task_id


def state_of(town, task_id: str) -> str:
    return town.r.hget(town.keys.task(task_id), "state")


def state(town, task_id: str) -> str:
    return town.r.hget(town.keys.task(task_id), "state")


def events(town, kind: str) -> list[dict]:
    return [f for _id, f in town.r.xrange(town.keys.events) if f["type"] == kind]


# --- keys ---------------------------------------------------------------------------------------

def test_key_templates_end_with_the_id():
    """The scripts build keys as template + id: every templated key must end with its id."""
    keys = Keys("t")
    for method in (keys.task, keys.agent, keys.inbox, keys.inflight, keys.dependents, keys.backlog,
                   keys.roles, keys.note, keys.notes, keys.delivered_notes):
        assert method("") + "abc-1" == method("abc-1"), method.__name__


# --- dependencies ---------------------------------------------------------------------------------

def test_dependent_waits_for_every_dependency_then_goes_to_its_inbox(town, coord):
    dev, rev = spawn(town, "dev"), spawn(town, "rev")
    a = coord.create_task("implement", agent="dev").task
    b = coord.create_task("test", agent="dev").task
    c = coord.create_task("review", agent="rev", after=["dev"], created_by="user").task
    assert (c.state, c.deps_left, c.after) == ("pending", 2, f"{a.id},{b.id}")
    assert inbox_tasks(town, rev) == []
    assert coord.dependency_json([c])[c.id] == {"after": [a.id, b.id], "blocked_by": [a.id, b.id]}

    assert run_one(town, coord, dev) == a.id
    assert state(town, c.id) == "pending" and town.r.hget(town.keys.task(c.id), "deps_left") == "1"
    assert coord.dependency_json([c])[c.id]["blocked_by"] == [b.id]
    assert run_one(town, coord, dev) == b.id
    assert state(town, c.id) == "assigned" and inbox_tasks(town, rev) == [c.id]
    assert [e["task"] for e in events(town, "task_released")] == [c.id]
    assert [e["task"] for e in events(town, "task_pending")] == [c.id]
    assert town.r.execute_command("SMEMBERS", town.keys.awaited) == []
    assert not town.r.exists(town.keys.dependents(a.id))


def test_finishes_release_and_claim_after_the_scripts_are_flushed_between_them(town, coord):
    """finish_task names its scripts by SHA1 once its connection loaded them: a SCRIPT FLUSH
    between two finishes (NOSCRIPT inside the MULTI) still releases the dependents and claims."""
    dev, rev = spawn(town, "dev"), spawn(town, "rev", idle=False)
    a = coord.create_task("one", agent="dev").task
    b = coord.create_task("two", agent="dev").task
    after_a = coord.create_task("after one", agent="rev", after=[a.id]).task
    after_b = coord.create_task("after two", agent="rev", after=[b.id]).task
    backlog = coord.backlog_add("for whoever is free").task
    assert run_one(town, coord, dev) == a.id
    assert inbox_tasks(town, rev) == [after_a.id] and inbox_tasks(town, dev) == [b.id]
    resp_connect(town.config).execute_command("SCRIPT", "FLUSH")
    assert run_one(town, coord, dev) == b.id
    assert inbox_tasks(town, rev) == [after_a.id, after_b.id]
    assert inbox_tasks(town, dev) == [backlog.id]  # idle again: it took the backlog task
    assert [state(town, t) for t in (a.id, b.id, after_b.id, backlog.id)] == ["completed", "completed",
                                                                               "assigned", "assigned"]
    assert town.r.hget(town.keys.agent(dev), "state") == "idle"


def test_dependents_are_released_in_the_order_they_were_created(town, coord):
    dev, rev = spawn(town, "dev"), spawn(town, "rev", idle=False)
    first = coord.create_task("first", agent="dev").task
    waiting = [coord.create_task(f"after {i}", agent="rev", after=[first.id[:8]]).task.id for i in range(6)]
    run_one(town, coord, dev)
    assert inbox_tasks(town, rev) == waiting


def test_a_chain_runs_link_by_link(town, coord):
    dev = spawn(town, "dev")
    chain = [coord.create_task("link 0", agent="dev").task.id]
    for i in range(1, 4):
        chain.append(coord.create_task(f"link {i}", agent="dev", after=[chain[-1]]).task.id)
    for i, task_id in enumerate(chain):
        assert [state(town, t) for t in chain[i + 1:]] == ["pending"] * (len(chain) - i - 1)
        assert run_one(town, coord, dev) == task_id
    assert [state(town, t) for t in chain] == ["completed"] * 4


def test_a_failed_dependency_cancels_the_dependents_down_the_chain(town, coord):
    dev = spawn(town, "dev")
    a = coord.create_task("a", agent="dev").task.id
    x = coord.create_task("x", agent="dev").task.id
    b = coord.create_task("b", agent="dev", after=[a]).task.id
    c = coord.create_task("c", agent="dev", after=[b]).task.id
    d = coord.create_task("d", agent="dev", after=[a, x]).task.id
    run_one(town, coord, dev, TaskState.FAILED)
    reasons = {t: town.r.hget(town.keys.task(t), "reason") for t in (b, c, d)}
    assert {t: state(town, t) for t in (b, c, d)} == {b: "cancelled", c: "cancelled", d: "cancelled"}
    assert reasons[b] == f"dependency {a} (dev) failed" and reasons[d] == reasons[b]
    assert reasons[c] == f"dependency {b} (dev) cancelled"
    assert {e["task"] for e in events(town, "task_cancelled")} == {b, c, d}
    assert inbox_tasks(town, dev) == [x]  # the unrelated task is untouched
    assert run_one(town, coord, dev) == x
    assert inbox_tasks(town, dev) == []


def test_release_is_idempotent_and_waits_for_the_outcome(town, coord):
    dev = spawn(town, "dev")
    a = coord.create_task("a", agent="dev").task.id
    b = coord.create_task("b", agent="dev", after=[a]).task.id
    assert coord.release(a) == (0, 0)  # not finished: nothing released
    assert state(town, b) == "pending"
    claimed, _ = take(town, coord, dev)
    town.start_task(dev, a)
    outcome_without_release(town, dev, claimed, TaskState.COMPLETED)
    assert state(town, b) == "pending"
    assert coord.release(a) == (1, 0)
    assert coord.release(a) == (0, 0)
    assert inbox_tasks(town, dev) == [b] and town.r.hget(town.keys.task(b), "deps_left") == "0"


def test_releasing_one_dependency_twice_does_not_count_it_twice(town, coord):
    """The counter is decremented once per dependency: a second run after a crash or at supervisor
    start must not release a task that still waits on another."""
    dev = spawn(town, "dev")
    a = coord.create_task("a", agent="dev").task.id
    b = coord.create_task("b", agent="dev").task.id
    c = coord.create_task("c", agent="dev", after=[a, b]).task.id
    run_one(town, coord, dev)
    assert coord.release(a) == (0, 0) and coord.recover() == (0, 0, 0)
    assert (state(town, c), town.r.hget(town.keys.task(c), "deps_left")) == ("pending", "1")
    run_one(town, coord, dev)
    assert state(town, c) == "assigned" and inbox_tasks(town, dev) == [c]


def test_recover_releases_what_a_crash_left_and_only_reads_awaited_tasks(town, coord):
    dev = spawn(town, "dev")
    a = coord.create_task("a", agent="dev").task.id
    fails = coord.create_task("fails", agent="dev").task.id
    b = coord.create_task("b", agent="dev", after=[a]).task.id
    c = coord.create_task("c", agent="dev", after=[fails]).task.id
    running = coord.create_task("still running", agent="dev").task.id
    d = coord.create_task("d", agent="dev", after=[running]).task.id
    for outcome in (TaskState.COMPLETED, TaskState.FAILED):
        claimed, _ = take(town, coord, dev)
        town.start_task(dev, claimed.message.task_id)
        outcome_without_release(town, dev, claimed, outcome)
    assert sorted(town.r.execute_command("SMEMBERS", town.keys.awaited)) == sorted([a, fails, running])
    assert coord.recover() == (1, 1, 0)
    assert (state(town, b), state(town, c), state(town, d)) == ("assigned", "cancelled", "pending")
    assert town.r.execute_command("SMEMBERS", town.keys.awaited) == [running]
    assert coord.recover() == (0, 0, 0)


def test_dependencies_already_finished_at_creation(town, coord):
    dev = spawn(town, "dev")
    done = coord.create_task("done", agent="dev").task.id
    failed = coord.create_task("failed", agent="dev").task.id
    run_one(town, coord, dev)
    run_one(town, coord, dev, TaskState.FAILED)
    after_done = coord.create_task("after done", agent="dev", after=[done]).task
    assert after_done.state == "assigned" and inbox_tasks(town, dev) == [after_done.id]
    assert coord.dependency_json([after_done])[after_done.id] == {"after": [done], "blocked_by": []}
    after_failed = coord.create_task("after failed", agent="dev", after=[done, failed]).task
    assert after_failed.state == "cancelled" and after_failed.reason == f"dependency {failed} (dev) failed"
    assert state(town, after_failed.id) == "cancelled" and inbox_tasks(town, dev) == [after_done.id]
    # ...and so does anything created after the cancelled one.
    assert coord.create_task("next", agent="dev", after=[after_failed.id]).task.state == "cancelled"


def test_an_agent_ref_means_its_unfinished_tasks_else_its_last(town, coord):
    dev = spawn(town, "dev")
    spawn(town, "rev")
    finished = coord.create_task("finished", agent="dev").task.id
    run_one(town, coord, dev)
    spawn(town, "qa")
    after_idle = coord.create_task("check what dev did", agent="qa", after=["dev"]).task
    assert after_idle.after == finished      # dev finished already: its work is still carried
    open_ = [coord.create_task(f"open {i}", agent="dev").task.id for i in range(2)]
    task = coord.create_task("review", agent="rev", after=["dev", open_[0]]).task
    assert task.after.split(",") == open_ and finished not in task.after  # each once, finished ones not
    after_rev = coord.create_task("after rev's work", agent="dev", after=["rev"]).task
    assert after_rev.state == "pending" and after_rev.after == task.id
    spawn(town, "spare")
    nothing_to_wait_for = coord.create_task("after an agent with no work", agent="dev", after=["spare"]).task
    assert (nothing_to_wait_for.state, nothing_to_wait_for.after) == ("assigned", "")


def test_wait_refs_of_an_idle_agent_mean_the_task_it_finished_last(town, coord):
    """An agent with nothing unfinished (`tt wait AGENT`, `--after AGENT`): the task it finished
    last (not the last one created, which may have finished first), and only this agent's, not an
    earlier one of its name."""
    spawn(town, "dev")
    first = coord.create_task("created first", agent="dev").task.id
    second = coord.create_task("created second", agent="dev").task.id
    town.r.hset(town.keys.task(first), mapping={"state": "failed", "finished_at": "2000.0"})
    town.r.hset(town.keys.task(second), mapping={"state": "completed", "finished_at": "1000.0"})
    assert coord.resolve_refs(["dev"]) == [first]
    town.r.execute_command("HDEL", town.keys.agent_index, "dev")      # pruned: the name is free again
    spawn(town, "dev")
    assert coord.resolve_refs(["dev"]) == []                          # the new dev has no task yet


def test_unknown_or_ambiguous_refs_create_nothing(town, coord):
    spawn(town, "dev")
    coord.create_task("a", agent="dev")
    shared = _common_prefix(town, coord)
    before = town.r.execute_command("DBSIZE"), town.r.xrange(town.keys.events)
    with pytest.raises(TinytownError, match=r"--after 'nope': no task or agent of that name in town 'coord'"):
        coord.create_task("b", agent="dev", after=["nope"])
    with pytest.raises(TinytownError, match="ambiguous"):
        coord.create_task("b", agent="dev", after=[shared])
    with pytest.raises(TinytownError, match="empty reference"):
        coord.create_task("b", agent="dev", after=["a,,b"])
    with pytest.raises(TinytownError, match="no agent named 'ghost'"):
        coord.create_task("b", agent="ghost")
    with pytest.raises(TinytownError, match="empty"):
        coord.create_task("  ", agent="dev")
    assert (town.r.execute_command("DBSIZE"), town.r.xrange(town.keys.events)) == before


def _common_prefix(town, coord) -> str:
    """A prefix two task ids share (made by creating tasks until two share a first character)."""
    ids = town.r.zrange(town.keys.task_index, 0, -1)
    while True:
        firsts = {}
        for task_id in ids:
            if task_id[0] in firsts:
                return task_id[0]
            firsts[task_id[0]] = task_id
        ids.append(coord.create_task("filler", agent="dev").task.id)


def test_the_script_refuses_a_dependency_that_vanished(town, coord):
    """A race guard: the script checks the ids again, and writes nothing when one is gone."""
    spawn(town, "dev")
    a = coord.create_task("a", agent="dev").task.id
    coord.resolve_refs = lambda refs: [a, "gone-id"]
    before = town.r.execute_command("DBSIZE")
    with pytest.raises(TinytownError, match="no task gone-id"):
        coord.create_task("b", agent="dev", after=["whatever"])
    assert town.r.execute_command("DBSIZE") == before


def test_split_refs():
    assert split_refs(["a", "b, c", "d"]) == ["a", "b", "c", "d"]


def test_ten_thousand_dependents(town, coord, capsys):
    """Release stays one fast step with 10 000 dependents of one task, and a cascade of cancels
    down a chain of 10 000 needs no recursion. Timings printed, not asserted."""
    dev = spawn(town, "dev")
    spawn(town, "rev", idle=False)
    n = 10_000
    root = coord.create_task("root", agent="dev").task.id
    create = town.r.execute_command("SCRIPT", "LOAD", SCRIPTS["create"].source)

    def queue_create(pipe, *args):  # EVALSHA: 10 000 copies of the script text would be 100 MB
        pipe._call(("EVALSHA", create, 1, town.keys.task_index, coord.ctx, *args))

    pipe = town.r.pipeline(transaction=False)
    for i in range(n):
        queue_create(pipe, f"dep-{i:05d}", 1, root, "id", f"dep-{i:05d}", "agent", "rev",
                     "agent_id", town.agent_id("rev"), "description", f"d{i}", "created_at", f"{time.time():.6f}",
                     "after", root)
    t0 = time.perf_counter()
    pipe.execute()
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_one(town, coord, dev)
    released = time.perf_counter() - t0
    assert town.r.llen(town.keys.inbox(town.agent_id("rev"))) == n
    assert inbox_tasks(town, town.agent_id("rev"))[:3] == ["dep-00000", "dep-00001", "dep-00002"]

    town.r.execute_command("FLUSHDB")
    dev = spawn(town, "dev")
    chain = [coord.create_task("head", agent="dev").task.id]
    pipe = town.r.pipeline(transaction=False)
    for i in range(n):
        queue_create(pipe, f"link-{i:05d}", 1, chain[-1], "id", f"link-{i:05d}", "agent", "dev",
                     "agent_id", dev, "description", f"l{i}", "created_at", f"{time.time():.6f}", "after", chain[-1])
        chain.append(f"link-{i:05d}")
    pipe.execute()
    t0 = time.perf_counter()
    run_one(town, coord, dev, TaskState.FAILED)
    cascade = time.perf_counter() - t0
    assert state(town, chain[-1]) == "cancelled" and town.r.llen(town.keys.inbox(dev)) == 0
    with capsys.disabled():
        print(f"\n  10 000 dependents: created in {created * 1000:.0f} ms (pipelined), released by one finish "
              f"in {released * 1000:.1f} ms; a chain of 10 000 cancelled by one failure in {cascade * 1000:.1f} ms")


# --- backlog and roles ----------------------------------------------------------------------------

def test_backlog_waits_for_a_matching_free_agent(town, coord):
    tester = spawn(town, "tester", idle=False, roles=["test"])
    any_ = coord.backlog_add("anyone").task
    for_test = coord.backlog_add("tests", role="test", created_by="dev").task
    for_docs = coord.backlog_add("docs", role="docs").task
    assert (any_.state, any_.agent, for_test.created_by) == ("pending", "", "dev")
    assert [t.id for t in coord.backlog()] == [any_.id, for_test.id, for_docs.id]
    assert coord.unserved_roles(town.agents()) == ["docs"]
    assert coord.roles([tester]) == {tester: ["test"]}
    # tester becomes idle: the step that makes it idle also gives it the oldest it may take
    pipe = town.r.pipeline()
    town.set_agent_state(tester, AgentState.IDLE, pipe=pipe)
    coord.queue_claim(pipe, tester)
    pipe.execute()
    assert inbox_tasks(town, tester) == [any_.id]
    got = town.task(any_.id)
    assert (got.state, got.agent, got.agent_id) == ("assigned", "tester", tester)
    run_one(town, coord, tester)  # ...and on finishing it, the next one
    assert inbox_tasks(town, tester) == [for_test.id]
    run_one(town, coord, tester)
    assert inbox_tasks(town, tester) == [] and [t.id for t in coord.backlog()] == [for_docs.id]
    assert [e["task"] for e in events(town, "task_claimed")] == [any_.id, for_test.id]
    assert [(e["task"], e["role"]) for e in events(town, "task_backlogged")] == [
        (any_.id, "*"), (for_test.id, "test"), (for_docs.id, "docs")]


def test_unserved_roles_count_the_backlog_without_reading_its_tasks(town, coord):
    tester = spawn(town, "tester", idle=False, roles=["test"])
    for i in range(30):
        coord.backlog_add(f"docs {i}", role="docs")
    coord.backlog_add("tests", role="test")
    coord.backlog_add("anyone")
    taken = coord.backlog_add("ops", role="ops").task
    coord.backlog_remove(taken.id)  # its role's backlog is empty again

    def task_reads() -> int:
        stats = town.r.execute_command("INFO", "commandstats")
        return sum(int(line.split("calls=")[1].split(",")[0]) for line in stats.splitlines()
                   if line.startswith(("cmdstat_hgetall:", "cmdstat_hget:", "cmdstat_hmget:")))

    agents = town.agents()
    before = task_reads()
    assert coord.unserved_roles(agents) == ["docs"]
    assert task_reads() == before
    # an agent closed, paused or failed takes nothing until resumed or restarted: it serves no role
    town.r.hset(town.keys.agent(tester), "hold", "close")
    assert coord.unserved_roles(town.agents()) == ["docs", "test"]


def test_backlog_add_goes_at_once_to_a_free_agent_idle_longest(town, coord):
    first = spawn(town, "first", roles=["dev"])
    spawn(town, "second", roles=["dev"])
    spawn(town, "other", roles=["docs"])
    made = coord.backlog_add("build it", role="dev")
    assert made.taken_by == "first" and made.task.state == "assigned" and inbox_tasks(town, first) == [made.task.id]
    assert coord.backlog_add("and this", role="dev").taken_by == "second"
    assert coord.backlog_add("and that", role="dev").taken_by == ""  # both have work queued now
    assert coord.backlog_add("anyone", role=None).taken_by == "other"


def test_backlog_claim_and_remove(town, coord):
    spawn(town, "dev", idle=False)
    spawn(town, "rev", idle=False, roles=["review"])
    a = coord.backlog_add("a", role="review").task.id
    b = coord.backlog_add("b").task.id
    assert coord.claim("dev") == b  # dev has no role: role-less work only
    assert coord.claim("dev") is None
    with pytest.raises(TinytownError, match=f"task {b} was taken by dev"):
        coord.claim("rev", b)
    with pytest.raises(TinytownError, match=f"not in the backlog: dev has it"):
        coord.backlog_remove(b)
    c = coord.backlog_add("c", role="review", after=[b]).task.id  # waits for b first: listed, so removable
    assert coord.backlog_remove(c) == 0 and state(town, c) == "cancelled"
    assert coord.backlog_remove(a[:10]) == 0
    assert state(town, a) == "cancelled" and coord.backlog() == []
    assert coord.claim("rev") is None


def test_a_backlog_task_after_others_enters_the_backlog_when_released(town, coord):
    dev = spawn(town, "dev")
    rev = spawn(town, "rev", idle=False, roles=["review"])
    a = coord.create_task("a", agent="dev").task.id
    r = coord.backlog_add("review a", role="review", after=[a]).task
    dropped = coord.backlog_add("also after a", after=[a]).task
    # listed while it waits, saying on what (`tt backlog` said "empty"), and removable from it
    listed = town.explained(coord.backlog())
    assert [(t.id, t.reason) for t in listed] == [(r.id, f"waits on {a[:8]}"), (dropped.id, f"waits on {a[:8]}")]
    assert r.state == "pending" and inbox_tasks(town, rev) == []
    coord.backlog_remove(dropped.id)
    assert state(town, dropped.id) == "cancelled"
    run_one(town, coord, dev)
    assert [(t.id, t.deps_left) for t in coord.backlog()] == [(r.id, 0)]
    town.set_agent_state(rev, AgentState.IDLE)
    assert coord.recover() == (0, 0, 1)  # the supervisor's sweep at start hands it over
    assert inbox_tasks(town, rev) == [r.id]


def test_ten_claimers_race_and_each_task_is_claimed_once(town, coord):
    agents = [f"a{i}" for i in range(10)]
    for name in agents:
        spawn(town, name, idle=False, roles=["work"])
    contested = coord.backlog_add("one task, ten claimers", role="work").task.id
    tasks = [contested] + [coord.backlog_add(f"t{i}", role="work").task.id for i in range(59)]
    won: dict[str, list[str]] = {name: [] for name in agents}
    barrier = threading.Barrier(len(agents))
    errors = []

    def claimer(name: str) -> None:
        client = resp_connect(town.config)  # one connection per claimer, like separate runners
        mine = Coordination(Town(town.config, client))
        try:
            barrier.wait()
            while (task_id := mine.claim(name)) is not None:
                won[name].append(task_id)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=claimer, args=(name,)) for name in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    claimed = [task_id for ids in won.values() for task_id in ids]
    assert sorted(claimed) == sorted(tasks)  # every task once, none twice
    holders = [name for name, ids in won.items() if contested in ids]
    assert len(holders) == 1 and town.task(contested).agent == holders[0]
    assert sum(town.r.llen(town.keys.inbox(town.agent_id(n))) for n in agents) == len(tasks)


def test_set_roles_replaces_them_and_a_free_agent_takes_matching_work(town, coord):
    dev = spawn(town, "dev", roles=["a", "b"])
    waiting = coord.backlog_add("for c", role="c").task.id
    assert coord.set_roles("dev", ["c"]) == ["c"]
    assert coord.roles([dev]) == {dev: ["c"]} and inbox_tasks(town, dev) == [waiting]
    with pytest.raises(TinytownError, match="invalid role name"):
        coord.set_roles("dev", ["no spaces"])


# --- notes ----------------------------------------------------------------------------------------

def test_notes_go_with_the_next_task_urgent_first_and_survive_a_runner_death(town, coord):
    dev = spawn(town, "dev")
    coord.send("dev", "first, not urgent", sender="user")
    coord.send("dev", "second, urgent", urgent=True, sender="reviewer")
    coord.send("dev", "third", sender="tester")
    assert [n.text for n in coord.inbox("dev")] == ["first, not urgent", "second, urgent", "third"]
    assert coord.inbox("dev")[1].to_json()["from"] == "reviewer"
    task = coord.create_task("the task text", agent="dev").task
    claimed, begun = take(town, coord, dev)
    assert begun.status == "ok" and [n.text for n in begun.notes] == ["first, not urgent", "second, urgent", "third"]
    assert coord.inbox("dev") == [] and len(coord.inbox("dev", delivered=True)) == 3
    assert {n.task for n in coord.inbox("dev", delivered=True)} == {task.id}
    assert len(events(town, "note_sent")) == 3 and events(town, "notes_delivered")[0]["task"] == task.id

    prompt = compose(begun.task.description, begun.notes, begun.upstream, marker="m")
    head, body = prompt.split(b"<<< end of notes m >>>\n\n")
    assert body == b"the task text"
    assert head.index(b"second, urgent") < head.index(b"first, not urgent") < head.index(b"third")
    assert b"from reviewer, URGENT" in head

    # The runner dies before the CLI ran: the task goes back; its next delivery has the same notes,
    # and a note sent meanwhile joins them.
    town.put_back_inflight(dev)
    coord.send("dev", "fourth")
    _, again = take(town, coord, dev)
    assert [n.text for n in again.notes] == ["first, not urgent", "second, urgent", "third", "fourth"]
    assert coord.inbox("dev") == []


def test_a_one_megabyte_note(town, coord):
    dev = spawn(town, "dev")
    text = ("0123456789abcdef" * 65536)[:-1] + "\n"
    coord.send("dev", text)
    coord.create_task("go", agent="dev")
    _, begun = take(town, coord, dev)
    assert begun.notes[0].text == text
    assert text.encode() in compose("go", begun.notes, marker="m")


def test_send_refuses_empty_notes_and_unknown_agents(town, coord):
    spawn(town, "dev")
    with pytest.raises(TinytownError, match="empty"):
        coord.send("dev", " \n")
    with pytest.raises(TinytownError, match="no agent named 'ghost'"):
        coord.send("ghost", "hi")
    assert coord.inbox("dev", delivered=True) == []


# --- context --------------------------------------------------------------------------------------

def test_begin_gives_the_upstream_outputs_for_the_context_block(town, coord):
    dev, tester, rev = spawn(town, "dev"), spawn(town, "tester"), spawn(town, "rev")
    a = coord.create_task("code", agent="dev").task.id
    b = coord.create_task("tests", agent="tester").task.id
    r = coord.create_task("review \udcff bytes", agent="rev", after=["dev", "tester"]).task.id
    quiet = coord.create_task("no context", agent="rev", after=[a], context=False).task.id
    run_one(town, coord, dev, output="\x1b[1mbuilt\x1b[0m\r\nall " + "x" * 5000 + " done\r\n")
    run_one(town, coord, tester, output="12 passed\n")
    claimed, begun = take(town, coord, rev)  # released first (it waited on dev's task alone)
    assert begun.task.id == quiet and begun.upstream == []
    assert compose(begun.task.description, begun.notes, begun.upstream) == b"no context"
    finish(town, coord, rev, claimed, TaskState.COMPLETED)
    _, begun = take(town, coord, rev)
    assert [(u.id, u.agent, u.state, u.exit_code) for u in begun.upstream] == [
        (a, "dev", "completed", 0), (b, "tester", "completed", 0)]
    prompt = compose(begun.task.description, begun.notes, begun.upstream, context_bytes=100, marker="m")
    assert begun.task.id == r
    assert prompt.startswith("review \udcff bytes".encode("utf-8", "surrogateescape") + b"\n\n<<< tinytown context m")
    assert f"[task 1: {a} by dev, completed, exit code 0; the last 100 bytes of its output]".encode() in prompt
    assert b"\x1b" not in prompt and b"\r" not in prompt and b"x done\n" in prompt
    assert f"[task 2: {b} by tester, completed, exit code 0; its output (10 bytes)]\n12 passed\n".encode() in prompt
    assert prompt.endswith(b"<<< end of context m >>>\n")


def test_the_prompt_is_the_text_alone_without_notes_or_upstream():
    text = "line\r\n\x1b[31m\udcff raw\n"
    assert compose(text) == text.encode("utf-8", "surrogateescape")


# --- cancel ---------------------------------------------------------------------------------------

def test_cancel_a_waiting_task_cascades_and_leaves_queues_clean(town, coord):
    dev = spawn(town, "dev", idle=False)
    queued = coord.create_task("queued", agent="dev").task.id
    pending = coord.create_task("pending", agent="dev", after=[queued]).task.id
    below = coord.create_task("below", agent="dev", after=[pending]).task.id
    in_backlog = coord.backlog_add("in the backlog").task.id
    assert coord.cancel(pending[:12], by="rev") == ("cancelled", 1)
    assert town.task(pending).reason == "cancelled by rev"
    assert town.task(below).reason == f"dependency {pending} (dev) cancelled"
    assert coord.cancel(queued) == ("cancelled", 0)
    assert inbox_tasks(town, dev) == [] and state(town, queued) == "cancelled"
    assert coord.cancel(in_backlog) == ("cancelled", 0) and coord.backlog() == []


def test_cancel_in_flight_is_a_request_the_runner_acts_on(town, coord):
    dev = spawn(town, "dev")
    task = coord.create_task("long job", agent="dev").task.id
    after = coord.create_task("after it", agent="dev", after=[task]).task.id
    claimed = town.claim(dev, 0.01)  # in flight, not started yet
    subscription = resp_connect(town.config).subscribe(town.keys.control)
    # (subscribe() does not wait for Redis to confirm: under load the PUBLISH came first, once)
    wait_for(lambda: town.r.execute_command("PUBSUB", "NUMSUB", town.keys.control)[1] == 1, 10, "the subscription")
    heard = []

    def nudged():
        select.select([subscription], [], [], 0.1)
        heard.extend(data for _channel, data in subscription.messages())
        return f"cancel {task}" in heard

    assert coord.cancel(task) == ("requested", 0)
    wait_for(nudged, 10, "the cancel's nudge on the control channel")
    assert coord.cancel_requests() == [(task, dev)] and coord.cancel_request(task) == "cancelled by user"
    begun = coord.begin(dev, task)  # what the runner does next: no CLI, record it cancelled
    assert begun.status == "cancel"
    finish(town, coord, dev, claimed, TaskState.CANCELLED)
    assert state(town, after) == "cancelled" and coord.cancel_requests() == []
    subscription.close()


def test_cancel_running_then_finished(town, coord):
    dev = spawn(town, "dev")
    task = coord.create_task("job", agent="dev").task.id
    claimed, _ = take(town, coord, dev)
    town.start_task(dev, task)
    assert coord.cancel(task) == ("requested", 0)
    assert coord.cancel(task) == ("requested", 0)  # asked twice: still one request
    assert coord.cancel_requests() == [(task, dev)]
    assert [e["task"] for e in events(town, "task_cancel_requested")] == [task, task]
    finish(town, coord, dev, claimed, TaskState.CANCELLED, output="partial output")
    record = town.r.hgetall(town.keys.task(task))
    with pytest.raises(TinytownError, match=f"task {task} is already cancelled; nothing to cancel"):
        coord.cancel(task)
    with pytest.raises(TinytownError, match="no task 'nope'"):
        coord.cancel("nope")
    assert town.r.hgetall(town.keys.task(task)) == record and record["output"] == "partial output"


# --- wait -----------------------------------------------------------------------------------------

def test_wait_wakes_on_the_outcomes_and_times_out(town, coord):
    dev = spawn(town, "dev")
    a = coord.create_task("a", agent="dev").task.id
    b = coord.create_task("b", agent="dev", after=[a]).task.id
    c = coord.create_task("c", agent="dev").task.id
    assert coord.wait([a], timeout=0.05) == {}

    def work():
        client = resp_connect(town.config, long_lived=True)
        other = Town(town.config, client)
        run_one(other, Coordination(other), dev, TaskState.FAILED)  # a fails: b is cancelled
        client.close()

    worker = threading.Thread(target=work)
    worker.start()
    assert coord.wait([a, b], timeout=30) == {a: "failed", b: "cancelled"}
    worker.join(10)
    assert coord.wait([a, c], timeout=0.05) == {a: "failed"}
    with pytest.raises(TinytownError, match="no task 'nope'"):
        coord.wait(["nope"], timeout=0)


# --- who did it -----------------------------------------------------------------------------------

def test_caller_is_the_agent_of_this_town_else_the_user():
    assert caller("t", {"TT_AGENT": "dev", "TT_TOWN": "t"}) == "dev"
    assert caller("t", {"TT_AGENT": "dev", "TT_TOWN": "other"}) == "user"
    assert caller("t", {}) == "user"


# --- agents leaving: give_back and remove_agent (supervisor/agent_control.py) -------------------

def test_give_back_keeps_each_tasks_place_and_role(town, coord):
    dev = spawn(town, "dev", idle=False)
    spawn(town, "rev", idle=False, roles=["review"])
    older = coord.backlog_add("older, for anyone").task.id
    mine = town.assign("dev", "dev's own").id                   # assigned directly: any agent may take it
    review = coord.backlog_add("review", role="review").task.id
    assert coord.claim("dev", review) == review                 # from the backlog, with its role
    newer = coord.backlog_add("newer, for anyone").task.id
    later = coord.create_task("after dev's own", agent="dev", after=[mine]).task.id  # pending on `mine`
    town.set_agent_state(dev, AgentState.STOPPED)
    assert coord.give_back(dev) == 3
    assert inbox_tasks(town, dev) == []
    assert [t.id for t in coord.backlog()] == [older, mine, review, newer, later]  # by creation time
    got = town.task(mine)
    assert (got.state, got.agent, got.agent_id, got.backlog, got.role) == ("pending", "", "", 1, "")
    assert town.task(review).role == "review"
    waiting = town.task(later)
    assert (waiting.state, waiting.agent, waiting.backlog) == ("pending", "", 1)
    assert sorted(e["task"] for e in events(town, "task_returned")) == sorted([mine, review, later])
    assert coord.give_back(dev) == 0                             # nothing left: idempotent


def test_give_back_offers_at_once_and_only_backlog_work_on_request(town, coord):
    dev = spawn(town, "dev", idle=False)
    own = town.assign("dev", "dev's own").id
    taken = coord.backlog_add("from the backlog").task.id
    assert coord.claim("dev", taken) == taken
    idle = spawn(town, "idle")
    assert coord.give_back(dev, only_backlog=True) == 1
    assert inbox_tasks(town, dev) == [own] and inbox_tasks(town, idle) == [taken]
    assert town.task(taken).agent == "idle"


def test_remove_agent_refuses_live_or_busy_agents_then_removes_every_key(town, coord):
    dev = spawn(town, "dev")
    with pytest.raises(TinytownError, match="dev is idle: only a stopped agent is pruned"):
        coord.remove_agent(dev, "dev", False)
    queued = town.assign("dev", "queued").id
    town.set_agent_state(dev, AgentState.STOPPED)
    with pytest.raises(TinytownError, match=r"dev has 1 queued task\(s\)"):
        coord.remove_agent(dev, "dev", False)
    coord.send("dev", "never read")
    coord.set_roles("dev", ["x"])
    town.r.xadd(town.keys.output(dev), {"task": queued, "data": "out"})
    assert coord.remove_agent(dev, "dev", True, check_only=True) == (1, 1)
    assert town.agent_id("dev") == dev                           # a check changes nothing
    assert coord.remove_agent(dev, "dev", True) == (1, 1)
    with pytest.raises(TinytownError, match="no agent named 'dev'"):
        town.agent_id("dev")
    left = [k for k in town.r.execute_command("KEYS", "*") if dev in k]
    assert left == []
    assert town.task(queued).state == "pending" and town.task(queued).backlog == 1
    assert events(town, "agent_pruned")[0]["notes_dropped"] == "1"
