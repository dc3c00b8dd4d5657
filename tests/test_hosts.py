"""Many hosts in one town (supervisor/hosts.py): leases, placement, the election, host loss and
the epochs that fence a host that comes back. Store logic on a bare redis-server first; the
supervisors themselves, sharing one Redis, further down."""
from __future__ import annotations


import pytest

from tinytown.supervisor.config import init_town
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.hosts import Fenced
from tinytown.supervisor.models import AgentState, TaskState
from tinytown.supervisor.town import Town

TTL = 0.3  # seconds: a lease that lapses within a test


@pytest.fixture
def redis(bare_redis):
    return bare_redis()


@pytest.fixture
def make(tmp_path, redis):
    """Town(s) on one bare Redis, as the `tt` commands, supervisors and runners of several hosts."""
    config = init_town(tmp_path / "town", "unit", max_agents=3)

    def make_town() -> Town:
        return Town(config, redis.client())

    return make_town


def lapse(town: Town, host: str) -> None:
    """`host`'s lease ends now, as if its supervisor stopped renewing it lease_ttl ago."""
    town.r.hset(town.keys.host(host), "lease_until", 0)


def test_spawn_places_on_the_live_host_with_most_room(make):
    town = make()
    town.hosts.tick("a", 2, 1, 5.0)
    town.hosts.tick("b", 3, 2, 5.0)
    placed = [town.spawn(name, "claude").host for name in ("p", "q", "r", "s", "t")]
    # b has the most room first; ties go to the first name
    assert placed == ["b", "a", "b", "a", "b"]
    with pytest.raises(TinytownError, match=r"max_agents reached \(5\)"):
        town.spawn("u", "claude")
    assert town.agent("p").epoch == 1 and town.agent("p").pinned == 0


def test_a_pinned_spawn_goes_there_or_says_why_not(make):
    town = make()
    town.hosts.tick("a", 1, 1, 5.0)
    town.hosts.tick("b", 1, 2, 5.0)
    assert town.spawn("p", "claude", host="b").host == "b" and town.agent("p").pinned == 1
    with pytest.raises(TinytownError, match="host 'b' is full"):
        town.spawn("q", "claude", host="b")
    with pytest.raises(TinytownError, match=r"no host named 'zz' \(hosts: a, b"):
        town.spawn("q", "claude", host="zz")
    lapse(town, "a")
    with pytest.raises(TinytownError, match="host 'a' is lost"):
        town.spawn("q", "claude", host="a")
    assert [a.name for a in town.agents()] == ["p"]  # nothing registered by a refusal


def test_racing_spawns_never_exceed_a_hosts_capacity(make):
    make().hosts.tick("a", 3, 1, 5.0)
    errors, done = [], []

    def spawn(i):
        try:
            done.append(make().spawn(f"agent{i}", "claude").host)
        except TinytownError as exc:
            errors.append(str(exc))

    race(spawn, 12)
    assert done == ["a"] * 3 and len(errors) == 9 and all("max_agents reached (3)" in e for e in errors)


def test_one_reaper_is_elected_and_a_survivor_takes_over(make):
    a, b = make(), make()
    assert a.hosts.tick("a", 3, 1, TTL).reaper == "a"
    assert b.hosts.tick("b", 3, 2, TTL).reaper == "a"  # held: b does not handle losses
    a.r.delete(a.keys.reaper)  # a's key lapsed with its lease (PX)
    assert b.hosts.tick("b", 3, 2, TTL).reaper == "b"
    assert a.hosts.tick("a", 3, 1, TTL).reaper == "b"


def running_task(town: Town, agent, text: str = "work"):
    """A task `agent`'s runner claimed and started (one attempt counted)."""
    task = town.assign(agent.name, text)
    claimed = town.claim(agent.id, 0.01)
    town.set_agent_state(agent.id, AgentState.IDLE)
    town.start_task(agent.id, task.id)
    return task, claimed


def test_a_lost_host_s_agents_move_and_their_task_goes_back_to_the_front(make):
    town = make()
    town.hosts.tick("a", 3, 1, 5.0)
    town.hosts.tick("b", 3, 2, 5.0)
    dev = town.spawn("dev", "claude", host="b")  # pinned: waits for b
    assert town.spawn("free", "claude").host == "a"  # the most room
    loose = town.spawn("loose", "claude")
    town.r.hset(town.keys.agent(loose.id), "host", "b")  # (as if placed on b: unpinned, it moves)
    first, _ = running_task(town, dev)
    queued = town.assign("dev", "next")
    moving, _ = running_task(town, town.agent_by_id(loose.id))
    town.hosts.tick("a", 3, 1, 5.0)  # a holds the reaper role
    lapse(town, "b")
    tick = town.hosts.tick("a", 3, 1, 5.0)
    assert tick.moved == ["loose"]
    assert town.hosts.states() == {"a": "live", "b": "lost"}
    # the pinned agent waits on b, its running task back at the front, the attempt counted
    after = town.agent("dev")
    assert (after.host, after.epoch) == ("b", 2)
    assert [c.message.task_id for c in town.inflight(dev.id)] == []
    inbox = [m for m in town.r.lrange(town.keys.inbox(dev.id), 0, -1)]
    assert [m.split('"task_id":"')[1][:36] for m in inbox] == [first.id, queued.id]
    assert town.task(first.id).state == "assigned" and town.task(first.id).attempts == 1
    # the unpinned one moved to a, with a new epoch; its task waits there
    moved = town.agent("loose")
    assert (moved.host, moved.epoch) == ("a", 3)
    assert town.task(moving.id).state == "assigned" and town.queued_counts([moved]) == {moved.id: 1}
    status = town.status()
    assert next(a for a in status["agents"] if a["name"] == "dev")["health"] == "lost"
    assert {h["name"]: h["agents"] for h in status["hosts"]} == {"a": ["free", "loose"], "b": ["dev"]}
    # a second sweep does nothing more
    assert town.hosts.tick("a", 3, 1, 5.0).moved == [] and town.agent("dev").epoch == 2


def test_a_host_comes_back_learns_it_was_lost(make):
    town = make()
    town.hosts.tick("a", 3, 1, 5.0)
    town.hosts.tick("b", 3, 2, 5.0)
    lapse(town, "b")
    town.hosts.tick("a", 3, 1, 5.0)
    back = town.hosts.tick("b", 3, 2, 5.0)
    assert back.returned and town.hosts.states()["b"] == "live"
    assert not town.hosts.tick("b", 3, 2, 5.0).returned
    kinds = [f["type"] for _, f in town.r.xrange(town.keys.events)]
    assert kinds.count("host_lost") == 1 and kinds.count("host_returned") == 1


def test_a_stale_runner_writes_nothing(make):
    """A runner of host b, paused while b was declared lost: its heartbeat, its outcome and its
    claim are refused; the attempt the new owner runs is the one recorded."""
    town = make()
    town.hosts.tick("a", 3, 1, 5.0)
    town.hosts.tick("b", 3, 2, 5.0)
    dev = town.spawn("dev", "claude", host="b")
    old = make()
    old.fence = ("b", "1")
    task, claimed = running_task(old, dev)
    old.heartbeat(dev.id)  # holds
    lapse(town, "b")
    town.hosts.tick("a", 3, 1, 5.0)
    town.r.hset(town.keys.agent(dev.id), "host", "a")  # (as if it had been unpinned and moved)
    with pytest.raises(Fenced, match="stale"):
        old.heartbeat(dev.id)
    with pytest.raises(Fenced):
        old.finish_task(dev.id, claimed, TaskState.COMPLETED, exit_code=0, output=b"old")
    with pytest.raises(Fenced):
        old.check_fence(dev.id)
    with pytest.raises(Fenced):  # a CLI it started as the loss was declared: not marked running
        old.start_task(dev.id, task.id, cli_pid=12345)
    assert (town.task(task.id).state, town.task(task.id).attempts, town.agent("dev").cli_pid) == ("assigned", 1, None)
    assert not old.unclaim(dev.id, claimed)  # already back in the inbox: not pushed twice
    assert town.queued_counts([dev]) == {dev.id: 1}
    # the new owner runs it: its outcome is the one recorded
    new = make()
    new.fence = ("a", town.r.hget(town.keys.agent(dev.id), "epoch"))
    again = new.claim(dev.id, 0.01)
    new.check_fence(dev.id)
    new.set_agent_state(dev.id, AgentState.IDLE)
    new.start_task(dev.id, task.id)
    new.finish_task(dev.id, again, TaskState.COMPLETED, exit_code=0, output=b"new")
    done = town.task(task.id)
    assert (done.state, done.output, done.attempts) == ("completed", "new", 2)


def test_a_finish_retries_when_the_record_changes_under_it(make, monkeypatch):
    """The outcome's check is WATCHed: a write to the agent's record between the check and the
    transaction makes it check again (here: a move, so it is refused)."""
    town = make()
    town.hosts.tick("a", 3, 1, 5.0)
    dev = town.spawn("dev", "claude")
    runner = make()
    runner.fence = ("a", "1")
    _, claimed = running_task(runner, dev)
    real = runner._finish

    def moved_meanwhile(*args, **kwargs):
        town.r.hincrby(town.keys.agent(dev.id), "epoch", 1)
        monkeypatch.setattr(runner, "_finish", real)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_finish", moved_meanwhile)
    with pytest.raises(Fenced):
        runner.finish_task(dev.id, claimed, TaskState.COMPLETED, exit_code=0)
    assert town.task(claimed.message.task_id).state == "running"


def test_a_clean_stop_is_not_a_loss(make):
    town = make()
    town.hosts.tick("a", 3, 1, 5.0)
    town.hosts.tick("b", 3, 2, 5.0)
    dev = town.spawn("dev", "claude", host="b")
    town.hosts.release("b")
    town.hosts.tick("a", 3, 1, 5.0)
    assert town.hosts.states()["b"] == "stopped" and town.agent("dev").epoch == 1 == dev.epoch


def test_agents_from_before_hosts_are_placed_on_the_first_supervisor(make):
    town = make()
    dev = town.spawn("dev", "claude")
    town.r.execute_command("HDEL", town.keys.agent(dev.id), "host", "pinned", "epoch")
    assert town.hosts.adopt_unplaced("a") == 1
    assert (town.agent("dev").host, town.agent("dev").epoch) == ("a", 1)


def test_cluster_and_hosts_settings(tmp_path):
    from tinytown.supervisor.config import load
    config = init_town(tmp_path, "t", max_agents=5)
    path = tmp_path / "tinytown.toml"
    base = path.read_text()
    path.write_text(base + '\n[cluster]\nhost = "build1"\nlease_ttl = 3\n[hosts.build2]\nmax_agents = 2\n')
    config = load(tmp_path)
    assert (config.host_name(), config.host_name("x"), config.cluster.lease_ttl) == ("build1", "x", 3.0)
    assert (config.host_capacity("build1"), config.host_capacity("build2")) == (5, 2)
    for extra, why in (('[hosts.b]\nmax_agents = 0\n', r"tinytown.toml:\d+: max_agents: must be positive"),
                       ('[hosts.b]\nmax_agent = 2\n', r"max_agent: unknown key in \[hosts.b\]"),
                       ('[cluster]\nlease_ttl = 1\nlease_renew = 2\n', r"lease_ttl: must be longer than lease_renew"),
                       ('[cluster]\nhost = "a b"\n', r"host: must be letters")):
        path.write_text(base + "\n" + extra)
        with pytest.raises(TinytownError, match=why):
            load(tmp_path)
    with pytest.raises(TinytownError, match="invalid host name"):
        config.host_name("no/slash")


def test_tt_start_refuses_a_bad_host_name_in_one_line(town):
    out = town.tt("start", "--host", "no/slash", check=False)
    assert out.returncode != 0 and out.err.count("\n") == 1 and "invalid host name" in out.err
    empty = town.tt("spawn", "x", "--host", "", check=False)  # (it was taken for "any host")
    assert empty.returncode == 1 and empty.err == "tt: error: invalid host name '': use letters, digits, '-', " \
        "'_' or '.', starting with a letter or digit, at most 63 characters\n"


# --- supervisors on several "hosts", sharing one password-protected Redis -----------------------
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402
from conftest import FAST_POLICY, race, wait_for  # noqa: E402
from test_remote_redis import point_at  # noqa: E402

# Small leases, so a loss is seen within a test: lost 1 s after the last renewal.
CLUSTER = FAST_POLICY.replace("heartbeat_interval = 0.5", "heartbeat_interval = 0.2") + """
[cluster]
lease_renew = 0.2
lease_ttl = 1.0
"""


class Host:
    """One machine of the town: its own copy of the town folder (tinytown.toml pointing at the
    shared Redis) and its supervisor, `tt start --host NAME` in the foreground."""

    def __init__(self, harness, name: str, record):
        self.harness, self.name, self.root = harness, name, harness.root
        harness.record = record  # one gate and record folder for every host's CLIs
        harness.env["FAKE_AGENT_RECORD"] = str(record)
        self.proc = None
        self.town = harness.town()

    def tt(self, *args, **kwargs):
        return self.harness.tt(*args, **kwargs)

    def assign(self, agent: str, text: str) -> str:
        return self.harness.assign(agent, text)

    def start(self) -> "Host":
        log = open(self.root / "supervisor-out.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "start", "--host", self.name],
                                     cwd=self.root, env=self.harness.env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(lambda: self.town.hosts.states().get(self.name) == "live" and self.harness.supervisor_pid(),
                 30, f"host {self.name}'s supervisor to hold its lease")
        return self

    def tree(self) -> list[psutil.Process]:
        """The supervisor and everything under it (runners, CLIs): the machine's processes."""
        try:
            top = psutil.Process(self.proc.pid)
            return [top, *top.children(recursive=True)]
        except psutil.Error:
            return []

    def signal_all(self, sig: int) -> None:
        for proc in self.tree():
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass

    def kill(self) -> None:
        """The machine dies: every process of it at once. All are stopped first, so none acts while
        the others are being killed, and then killed children first: a stopped runner whose
        supervisor died first would be in an orphaned process group, which the kernel sends SIGHUP
        and SIGCONT, and a runner that ran its stop handler before its SIGKILL came (seen once on
        a loaded machine) gave its task's attempt back as a stopped one, as no dead host can."""
        tree = self.tree()
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for proc in reversed(tree) if sig == signal.SIGKILL else tree:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
        self.proc.wait()

    def clis(self) -> list[psutil.Process]:
        """The model CLIs running on this host (fake agents: TT_TASK_ID in their environment)."""
        found = []
        for proc in self.tree():
            try:
                if "TT_TASK_ID" in proc.environ() and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                pass
        return found


def _hosts(make_town, url: str, record):
    """Factory of Hosts sharing the Redis at `url`; each stopped (its processes gone) afterwards."""
    record.mkdir()
    made = []

    def make(name: str) -> Host:
        harness = make_town(policy=CLUSTER, folder=f"host-{name}")
        point_at(harness, url)
        host = Host(harness, name, record)
        made.append(host)
        return host

    yield make
    for host in made:
        if host.proc is not None and host.proc.poll() is None:
            host.signal_all(signal.SIGCONT)
            host.proc.send_signal(signal.SIGTERM)
    for host in made:
        if host.proc is not None:
            try:
                host.proc.wait(30)
            except subprocess.TimeoutExpired:
                host.signal_all(signal.SIGKILL)
                host.proc.wait()


@pytest.fixture
def hosts(make_town, remote_redis, tmp_path):
    """Factory: Host(name), all sharing one password-protected redis-server."""
    yield from _hosts(make_town, remote_redis.url, tmp_path / "record")


@pytest.fixture
def cluster_hosts(make_town, redis_cluster, tmp_path):
    """Factory: Host(name), all sharing a 3-master Redis Cluster (the url names one node)."""
    yield from _hosts(make_town, redis_cluster.url, tmp_path / "record")


def task_events(town: Town, task_id: str) -> list[str]:
    return [f["type"] for _, f in town.r.xrange(town.keys.events) if f.get("task") == task_id]


def test_a_killed_host_s_task_runs_again_on_another_host(hosts):
    a = hosts("a").start()
    a.tt("spawn", "w", "--shared")
    b = hosts("b").start()
    assert a.town.agent("w").host == "a"
    task = a.assign("w", "@gate open\n@echo done")
    wait_for(lambda: a.town.task(task).state == "running" and a.clis(), 30, "the task to run on a")

    a.kill()
    lost_at = time.monotonic()
    wait_for(lambda: a.town.agent("w").host == "b" and a.town.task(task).attempts == 2
             and a.town.task(task).state == "running" and b.clis(), 30, "the task to run again on b")
    print(f"host a killed -> task running again on b after {time.monotonic() - lost_at:.2f}s (lease_ttl 1 s)")
    (b.harness.record / "open").touch()
    done = b.harness.wait_task(task)
    assert (done["state"], done["attempts"]) == ("completed", 2) and "done" in done["output"]
    status = b.harness.json("status")
    assert {h["name"]: h["state"] for h in status["hosts"]} == {"a": "lost", "b": "live"}
    assert task_events(b.town, task).count("task_requeued") == 1
    assert not a.tree()  # nothing of the dead host left


def test_host_loss_on_a_redis_cluster(cluster_hosts):
    """The leases, the election and the loss's one script work where a town's keys share a slot."""
    a = cluster_hosts("a").start()
    a.tt("spawn", "w", "--shared")
    b = cluster_hosts("b").start()
    task = a.assign("w", "@gate open\n@echo moved")
    wait_for(lambda: a.town.task(task).state == "running" and a.clis(), 30, "the task to run on a")
    a.kill()
    wait_for(lambda: a.town.agent("w").host == "b" and b.clis(), 30, "the task to run again on b")
    (b.harness.record / "open").touch()
    assert b.harness.wait_task(task)["attempts"] == 2


def test_a_paused_host_does_not_finish_work_it_no_longer_owns(hosts):
    """SIGSTOP a host past lease_ttl: its task runs again on another host; opened meanwhile, the
    gate lets both CLIs finish, but only the new owner's outcome is recorded; the paused host's
    runner, back, writes nothing and leaves nothing running."""
    a = hosts("a").start()
    a.tt("spawn", "w", "--shared")
    b = hosts("b").start()
    task = a.assign("w", "@gate open\n@echo finished")
    wait_for(lambda: a.town.task(task).state == "running" and a.clis(), 30, "the task to run on a")
    a.signal_all(signal.SIGSTOP)
    wait_for(lambda: a.town.agent("w").host == "b" and a.town.task(task).attempts == 2 and b.clis(), 30,
             "the task to run again on b")
    (b.harness.record / "open").touch()
    done = b.harness.wait_task(task)
    assert (done["state"], done["attempts"]) == ("completed", 2)

    a.signal_all(signal.SIGCONT)  # a's CLI finds the gate open and exits 0: its outcome is refused
    # the runner finds itself fenced (its heartbeat, its outcome), or its supervisor, renewing its
    # lease, finds the host was declared lost and kills it first: either way it writes nothing
    logs = [a.root / ".tt" / "logs" / "w.log", a.root / "supervisor-out.log"]
    wait_for(lambda: any("fenced" in log.read_text(errors="replace") for log in logs), 30,
             "a's runner to be fenced")
    wait_for(lambda: not a.clis() and len(a.tree()) == 1, 30, "a's runner and CLI to be gone")
    wait_for(lambda: a.town.hosts.states().get("a") == "live", 30, "a to renew its lease again")
    events = task_events(a.town, task)
    assert events.count("task_completed") == 1 and events[-1] == "task_completed", events
    assert a.town.task(task).attempts == 2
    # a took nothing back: the agent stays on b, and its next task runs there
    assert a.town.agent("w").host == "b"
    after = a.assign("w", "@echo next")
    assert b.harness.wait_task(after)["state"] == "completed"
    recorded = b.harness.recorded(after)[0]
    assert recorded["env"]["TT_TOWN_DIR"] == str(b.root)


def test_a_pinned_agent_waits_for_its_host(hosts):
    a = hosts("a").start()
    b = hosts("b").start()
    a.tt("spawn", "p", "--shared", "--host", "a")
    task = b.assign("p", "@gate open\n@echo pinned")
    # running as recorded, not only its CLI started: the start is what counts an attempt
    wait_for(lambda: a.town.task(task).state == "running" and a.clis(), 30, "the task to run on a")
    a.kill()
    wait_for(lambda: a.town.hosts.states().get("a") == "lost", 30, "a to be declared lost")
    agent = next(x for x in b.harness.json("list") if x["name"] == "p")
    assert (agent["host"], agent["health"]) == ("a", "lost") and "Lost" in b.tt("list").out
    assert a.town.task(task).state == "assigned" and not b.clis()
    later = b.tt("assign", "p", "@echo after a is back")
    assert "tt: note: p's host a is lost: pinned there, it waits until that host is back, and this with it" \
        in later.err  # (queued all the same)
    watch = b.tt("attach", "p", "--read-only", check=False, timeout=20)  # (it said "p is idle" and waited)
    assert (watch.returncode, watch.err) == (1, "tt: error: p's host a is lost: attach works once it is back\n")
    restarted = b.tt("restart", "p", check=False)  # (no heartbeat: it was taken for hung, and killed)
    assert (restarted.returncode, restarted.err.count("\n")) == (1, 1) and "nothing to restart" in restarted.err
    assert b.town.agent("p").hold == "" and "lost 1" in b.tt("status").out
    stale = b.harness.config().supervisor.heartbeat_stale
    wait_for(lambda: b.town.agent("p").health(stale) == "unresponsive", 30, "p's heartbeat to go stale")
    b.tt("close", "p")  # (nobody settles it while a is lost) ...
    reopened = b.tt("restart", "p", timeout=20)  # ... and a restart reopens it, not kills it
    assert "stopping it first" not in reopened.out and "it starts once that host is back" in reopened.err
    assert b.town.agent("p").hold == ""
    a.start()  # the host returns: its agent's task runs there, the attempt counted
    (a.harness.record / "open").touch()
    done = a.harness.wait_task(task)
    assert (done["state"], done["attempts"]) == ("completed", 2)


def test_an_unpinned_agent_on_a_lost_host_with_no_room_elsewhere_says_it_moves_once_there_is(hosts):
    """It showed `lost` with an empty note, and `tt assign` said the work waits until its host is
    back: it moves as soon as a live host has room, which the note now says."""
    a = hosts("a").start()
    b = hosts("b")
    with (b.root / "tinytown.toml").open("a") as fh:
        fh.write("\n[hosts.b]\nmax_agents = 1\n")
    b.start()
    a.tt("spawn", "u", "--shared")
    b.tt("spawn", "fill", "--shared", "--host", "b")
    assert a.town.agent("u").host == "a"
    a.kill()
    wait_for(lambda: a.town.hosts.states().get("a") == "lost", 30, "a to be declared lost")
    note = "u's host a is lost: it moves to a live host once one has room (max_agents), or a is back"
    status = " ".join(b.tt("status").out.split())
    assert note in status
    # no pid of a's dead supervisor and runner in the PID columns (they named no process any more)
    assert re.search(r"\ba lost u \d+/\d+ - ", status) and re.search(r"\bu lost \S+ - ", status), status
    assert f"tt: note: {note}, and this with it" in b.tt("assign", "u", "@echo moved").err
    c = hosts("c").start()  # room: u moves there, and its task runs
    wait_for(lambda: c.town.agent("u").host == "c", 30, "u to move to c")
    assert c.harness.wait_task(c.town.tasks("u")[0].id)["state"] == "completed"


def test_a_host_started_with_a_name_other_than_its_config_s_is_that_host_to_its_folder_s_commands(hosts):
    """`tt start --host a` where tinytown.toml says [cluster] host = "elsewhere": the supervisor
    runs as a, but the folder's own commands took `elsewhere` for this host: status said "none
    here", spawn placed by the wrong host's room, and attach went through Redis."""
    a = hosts("a")
    toml = a.root / "tinytown.toml"
    toml.write_text(toml.read_text().replace("[cluster]\n", '[cluster]\nhost = "elsewhere"\n', 1))
    a.start()
    assert a.harness.config().cluster.host == "elsewhere"
    mine = a.harness.json("status")["supervisor"]
    assert (mine["host"], mine["state"], mine["pid"]) == ("a", "running", a.harness.supervisor_pid())
    a.tt("spawn", "dev", "--shared")
    assert a.town.agent("dev").host == "a"
    from tinytown.supervisor.remote_attach import attach_route
    wait_for(lambda: a.harness.config().attach_socket("dev").exists(), 30, "dev's attach socket")
    assert attach_route(a.harness.config(), "dev") == "local"


def test_a_failed_agent_on_a_lost_host_is_restarted_with_a_note_and_never_stopped_first(hosts):
    """Nobody settles a lost host's agents: its failed one is reopened from elsewhere, to start
    once that host is back, and no stop is sent to the runner that died with it."""
    a = hosts("a")
    with (a.root / "tinytown.toml").open("a") as fh:
        fh.write('\n[agent_clis.broken]\ncommand = "no-such-cli-here"\n')
    a.start()
    b = hosts("b").start()
    a.tt("spawn", "f", "--shared", "--host", "a", "--model", "broken")
    a.assign("f", "@echo never")
    wait_for(lambda: a.town.agent("f").state == "failed", 30, "f to fail on a")
    a.kill()
    wait_for(lambda: a.town.hosts.states().get("a") == "lost", 30, "a to be declared lost")
    restarted = b.tt("restart", "f", timeout=20)
    assert "stopping it first" not in restarted.out and "Restarting agent f (it was failed)" in restarted.out
    assert "tt: note: its host a is lost: it starts once that host is back" in restarted.err
    assert b.town.agent("f").state != "failed"


def test_one_host_stopping_leaves_the_others_commands_working(hosts):
    """A clean stop of host a wrote the town's one supervisor record `stopped`: on host b, whose
    supervisor runs, tt status, list, assign and spawn then waited 30 s for it to say `running`
    and failed ("running but not ready")."""
    a = hosts("a").start()
    b = hosts("b").start()
    a.tt("spawn", "on-a", "--shared", "--host", "a")
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(30)
    queued = b.tt("assign", "on-a", "@echo when a is back", timeout=20)  # (it said only "Assigned task")
    assert "tt: note: on-a's host a is stopped: this waits until `tt start` runs there again" in queued.err
    assert "its host a is stopped: it runs once `tt start` runs there" in " ".join(b.tt("status").out.split())
    assert "its host a is stopped: it starts once `tt start` runs there" in b.tt("restart", "on-a").err
    b.tt("spawn", "after", "--shared", "--host", "b", timeout=20)
    assert b.harness.wait_task(b.assign("after", "@echo still served"))["state"] == "completed"
    assert "after" in b.tt("status", timeout=20).out
    # each folder's status shows its own host's supervisor, not the last one to write the record
    mine = b.harness.json("status")["supervisor"]
    assert (mine["host"], mine["state"], mine["pid"]) == ("b", "running", b.harness.supervisor_pid())
    theirs = a.harness.json("status")["supervisor"]
    assert (theirs["host"], theirs["state"], theirs["pid"]) == ("a", "stopped", None)


def test_status_counts_the_live_hosts_room_and_shows_them_with_no_agent(hosts):
    """max_agents is each host's: `tt status` said "2/4 agents" of a town with room for 8 on two
    hosts, and showed no hosts table at all until an agent was spawned."""
    a = hosts("a").start()
    b = hosts("b").start()
    room = a.harness.json("status")["max_agents"]
    status = " ".join(b.tt("status").out.split())
    assert f"0/{2 * room} agents on 2 live hosts; add one with `tt spawn NAME`" in status
    assert "HOST STATE AGENTS CAPACITY" in status and f"a live - 0/{room}" in status
    a.tt("spawn", "on-a", "--shared", "--host", "a")
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(30)
    status = " ".join(b.tt("status", timeout=20).out.split())
    assert f"0/{room} agents on 1 live host, 1 on hosts not live " in status and f"a stopped on-a 1/{room}" in status
    b.proc.send_signal(signal.SIGTERM)
    b.proc.wait(30)
    assert "no live host of 2, 1 on hosts not live " in " ".join(b.tt("status").out.split())  # (it said 1/0)


def test_forget_host_removes_a_stopped_or_lost_host_with_no_agents_and_refuses_the_rest(hosts):
    """Every host the town ever ran on stayed in `tt status` for good, a machine long retired too."""
    a = hosts("a").start()
    b = hosts("b").start()
    c = hosts("c").start()
    d = hosts("d").start()
    a.tt("spawn", "on-c", "--shared", "--host", "c")
    a.tt("spawn", "on-d", "--shared", "--host", "d")
    for host in (b, c):
        host.proc.send_signal(signal.SIGTERM)
        host.proc.wait(30)
    d.kill()
    wait_for(lambda: a.town.hosts.states().get("d") == "lost", 30, "d to be declared lost")
    # a dead machine's pinned agent: nobody stops it, so prune takes it as it is (it was refused)
    assert "host d still has agent(s) on-d" in a.tt("forget-host", "d", check=False).err
    a.tt("prune", "on-d")
    forgot = a.tt("forget-host", "b", "d")
    assert forgot.out == "Forgot host b\nForgot host d\n"
    assert sorted(a.town.hosts.states()) == ["a", "c"] and " b " not in a.tt("status").out
    for name, why in (("a", "host a is live: only a stopped or lost host is forgotten"),
                      ("c", "host c still has agent(s) on-c placed on it: `tt prune` them first"),
                      ("zz", "no host named 'zz'")):
        refused = a.tt("forget-host", name, check=False)
        assert (refused.returncode, refused.err.count("\n")) == (1, 1) and why in refused.err, refused.err
    b.start()  # (it joins again, as a new host)
    assert sorted(a.town.hosts.states()) == ["a", "b", "c"]


def test_a_forgotten_host_that_comes_back_says_so_and_runs_nothing_it_had(hosts):
    """A host paused past its lease, declared lost and then forgotten (`tt forget-host`), comes
    back: it joins as a new host and says so, and its runners, whose agents run elsewhere now,
    are stopped at once (it used to join silently, as if it had never been)."""
    a = hosts("a").start()
    a.tt("spawn", "w", "--shared")
    b = hosts("b").start()
    wait_for(lambda: a.town.agent("w").state == "idle" and len(a.tree()) > 1, 30, "w's runner on a")
    a.signal_all(signal.SIGSTOP)
    wait_for(lambda: a.town.agent("w").host == "b", 30, "w to move to b")
    assert b.tt("forget-host", "a").out == "Forgot host a\n"
    a.signal_all(signal.SIGCONT)
    out = a.root / "supervisor-out.log"
    wait_for(lambda: "host a was forgotten" in out.read_text(errors="replace"), 30, "a to say it was forgotten")
    wait_for(lambda: len(a.tree()) == 1, 30, "a's runner to be gone")
    assert a.town.hosts.states().get("a") == "live" and a.town.agent("w").host == "b"
    assert b.harness.wait_task(a.assign("w", "@echo next"))["state"] == "completed"


def test_tt_stop_in_a_folder_without_a_supervisor_stops_the_town_on_its_hosts(hosts):
    """`tt stop` in a folder of the town where no supervisor runs said "not running" while hosts a
    and b ran. It now asks the town to stop, as from a host's folder, and waits for the hosts."""
    a, b = hosts("a").start(), hosts("b").start()
    a.tt("spawn", "dev", "--shared", "--host", "a")
    a.harness.wait_agent("dev")
    elsewhere = hosts("c")  # (never started: a laptop with the town's config)
    done = elsewhere.tt("stop")
    assert done.out == "Stopped town testtown on 2 host(s): a, b\n", done.out
    assert a.proc.wait(30) is not None and b.proc.wait(30) is not None
    assert not a.tree() and not b.tree()  # every supervisor, runner and CLI gone
    assert a.town.hosts.states() == {"a": "stopped", "b": "stopped"}
    assert elsewhere.harness.json("status")["running"] is False  # (its Redis answers: it said true)
    assert elsewhere.tt("stop").out == "Town testtown is not running\n"

def test_each_host_s_stop_report_counts_its_own_re_queued_tasks(hosts):
    """Each host's report of a town-wide stop listed every task re-queued in the town meanwhile."""
    a, b = hosts("a").start(), hosts("b").start()
    tasks = {}
    for host in (a, b):
        name = f"on-{host.name}"
        a.tt("spawn", name, "--shared", "--host", host.name)
        tasks[host.name] = a.assign(name, "@gate never\n@echo unreachable")
        wait_for(lambda: a.town.task(tasks[host.name]).state == "running", 30, f"{name}'s task to run")
    hosts("c").tt("stop", "--now")
    for host in (a, b):
        host.proc.wait(30)
        report = json.loads(host.harness.config().last_stop_file.read_text())
        assert report["requeued"] == [tasks[host.name]], (host.name, report)


def test_tt_stop_in_a_hosts_folder_says_the_other_hosts_stopped_too(hosts):
    """The stop request is the town's: `tt stop` in host b's folder stopped host a as well, and
    said only "Stopped town testtown: 1 runner(s) (on-b)"."""
    a, b = hosts("a").start(), hosts("b").start()
    for host in (a, b):
        a.tt("spawn", f"on-{host.name}", "--shared", "--host", host.name)
        a.harness.wait_agent(f"on-{host.name}")
    done = b.tt("stop")
    assert done.out == "Stopped town testtown: 1 runner(s) (on-b)\nStopped on the town's other host(s) too: a\n"
    assert a.proc.wait(30) is not None and a.town.hosts.states() == {"a": "stopped", "b": "stopped"}
    assert json.loads(b.tt("stop", "--json").out) == {"running": False}


def test_a_stop_request_reaches_every_host_whichever_stops_first(hosts):
    """The town's one stop request was a field the first host to finish stopping cleared (and a
    host starting cleared too): a host that read it after that ran on, and `tt stop` from another
    folder waited for it in vain. The request is now a count no supervisor clears."""
    from tinytown.supervisor.stopping import StopMode, ask
    a, b = hosts("a").start(), hosts("b").start()
    b.signal_all(signal.SIGSTOP)  # (b reads the request only after a has stopped)
    try:
        ask(a.town.r, a.town.keys, StopMode.GRACEFUL)
        a.proc.wait(30)
    finally:
        b.signal_all(signal.SIGCONT)
    assert b.proc.wait(30) is not None  # (before: b ran on)
    c = hosts("c").start()  # a new start after the request: it runs, it is not stopped by it
    c.harness.tt("spawn", "dev", "--shared")
    assert c.harness.wait_task(c.assign("dev", "@echo still running"))["state"] == "completed"

def test_a_command_in_a_folder_without_a_supervisor_adds_no_host(hosts):
    """`tt assign` (or spawn) in a folder of the town where no supervisor runs started one there
    in the background: a new host named after the machine, which then got agents placed on it.
    While the town runs on other hosts, the work goes into Redis and nothing starts here."""
    a = hosts("a").start()
    a.tt("spawn", "dev", "--shared")
    elsewhere = hosts("c")  # (never started: a laptop with the town's config)
    task = elsewhere.assign("dev", "@echo from the laptop")
    assert elsewhere.harness.wait_task(task)["state"] == "completed"
    spawned = elsewhere.tt("spawn", "helper", "--shared")
    assert "started the town's supervisor" not in spawned.err and a.town.agent("helper").host == "a"
    assert sorted(a.town.hosts.states()) == ["a"] and not elsewhere.harness.supervisor_pid()
    status = elsewhere.tt("status")  # (it showed whichever host's supervisor wrote the town's record last)
    assert "supervisor: none in this folder (`tt start` here adds a host)" in status.out
    assert elsewhere.harness.json("status")["supervisor"]["state"] == "none here"

def test_logs_and_attach_in_a_folder_the_agent_left_read_where_it_runs_now(hosts):
    """After host a was killed and w moved to b, a's folder still held w's log file and attach
    socket: `tt logs w` there showed the old file (its last line a run since redone on b), and
    `tt attach w` tried the dead socket. Both now go through Redis for an agent placed elsewhere."""
    from tinytown.supervisor.config import load
    from tinytown.supervisor.remote_attach import attach_route
    a = hosts("a").start()
    a.tt("spawn", "w", "--shared")
    b = hosts("b").start()
    assert a.harness.wait_task(a.assign("w", "@echo first, on a"))["state"] == "completed"
    a.kill()
    wait_for(lambda: a.town.agent("w").host == "b", 30, "w to move to b")
    assert b.harness.wait_task(b.assign("w", "@echo second, on b"))["state"] == "completed"
    assert (a.root / ".tt" / "logs" / "w.log").exists() and a.harness.config().attach_socket("w").exists()
    shown = a.tt("logs", "w").out
    assert "first, on a" in shown and "second, on b" in shown  # (from the stream: both runs)
    assert attach_route(load(a.root), "w") == "redis" and attach_route(load(b.root), "w") == "local"

def test_a_folder_that_never_was_a_host_starts_nothing_while_the_hosts_are_stopped(hosts):
    """With every host stopped, `tt assign` in a folder that never was one (a laptop with the
    town's config) started a supervisor there: a new host, which could not run the task (its agent
    is on a) and stayed in the hosts table for good. It now starts nothing and says what it waits for."""
    a = hosts("a").start()
    a.tt("spawn", "dev", "--shared")
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(30)
    laptop = hosts("c")
    queued = laptop.tt("assign", "dev", "@echo when a is back")
    assert "started the town's supervisor" not in queued.err and not laptop.harness.supervisor_pid()
    assert ("town 'testtown' runs on host(s) a, none running now: this waits for `tt start` in one of their folders "
            "(or here, to add this machine as a host)") in queued.err
    refused = laptop.tt("spawn", "helper", "--shared", check=False)
    assert refused.returncode == 1 and "no host of town 'testtown' is running (a): `tt start` in one of their " \
        "folders first" in refused.err, refused.err
    assert sorted(a.town.hosts.states()) == ["a"]
    a.start()  # (the work waited in Redis)
    assert a.harness.wait_task(queued.out.split()[2])["state"] == "completed"

def test_a_command_in_a_hosts_folder_starts_its_killed_supervisor_again(hosts):
    """A folder's own lease outlives its SIGKILLed supervisor for a moment: that is not the town
    running elsewhere, so `tt assign` there starts the supervisor again, as it did (review)."""
    a = hosts("a").start()
    a.tt("spawn", "dev", "--shared")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    assert a.town.hosts.live() == ["a"]  # (its lease has not lapsed yet)
    task = a.tt("assign", "dev", "@echo back")
    assert "started the town's supervisor" in task.err
    assert a.harness.wait_task(task.out.split()[2])["state"] == "completed"

def test_a_second_supervisor_cannot_take_a_live_hosts_name(hosts):
    """A copy of the town (a cloned machine, a second checkout) started with a live host's name
    ran that host's agents too: one agent's tasks on two machines at once, its branch split, and
    its stop marked the real host stopped."""
    a = hosts("a").start()
    a.tt("spawn", "dev", "--shared", "--host", "a")
    a.harness.wait_agent("dev")
    impostor = hosts("a-copy")
    refused = impostor.tt("start", "--host", "a", check=False, timeout=60)
    assert refused.returncode == 1 and "host a is live" in refused.err and "--host" in refused.err, refused.err
    assert "Traceback" not in refused.err and impostor.harness.supervisor_pid() is None
    assert a.town.hosts.states()["a"] == "live"
    assert a.harness.wait_task(a.assign("dev", "@echo still a's"))["state"] == "completed"


def test_a_background_start_in_a_hosts_folder_comes_back_as_that_host(hosts):
    """`tt assign` in the folder of host a, stopped, started a supervisor named after the machine:
    a new host, while a's agents stayed stopped with their work queued."""
    a = hosts("a").start()
    a.tt("spawn", "dev", "--shared", "--host", "a")
    a.harness.wait_agent("dev")
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(30)
    task = a.assign("dev", "@echo back on a")  # starts the town's supervisor here, in the background
    assert a.harness.wait_task(task)["state"] == "completed"
    assert sorted(a.town.hosts.states()) == ["a"] and a.town.hosts.states()["a"] == "live"



def git_hosts(hosts, tmp_path, remote_set: bool = True) -> tuple[Host, Host]:
    """Hosts a and b (not started) whose folders are checkouts of one repository with a bare
    remote (named in [workspace] remote if remote_set), as a team clones its project."""
    from test_workspaces_town import git
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    a, b = hosts("a"), hosts("b")
    for host in (a, b):
        if remote_set:
            host.harness.append_config('\n[workspace]\nremote = "origin"\n')
        git(host.root, "init", "-q", "-b", "main")
        git(host.root, "remote", "add", "origin", str(remote))
    (a.root / "app.py").write_text("print('hello')\n")
    git(a.root, "add", "-A")
    git(a.root, "commit", "-q", "-m", "first commit")
    git(a.root, "push", "-q", "origin", "main")
    git(b.root, "fetch", "-q", "origin")
    git(b.root, "reset", "-q", "origin/main")
    return a, b


def test_a_worktree_agent_spawned_for_another_host_gets_its_worktree_there(hosts, tmp_path):
    """`tt spawn w --host a` in host b's folder made agents/w and branch tt/w in b's checkout,
    where w never runs; its runner on a made its own. Now only a's is made, at its first task."""
    a, b = git_hosts(hosts, tmp_path)
    a.start()
    b.start()
    refused = b.tt("spawn", "w", "--host", "a", "--from", "main", check=False)
    assert (refused.returncode, refused.err) == (1, "tt: error: --from with --host a: the branch is made on the host "
                                                    "the agent runs on; run this tt spawn in host a's folder\n")
    spawned = b.tt("spawn", "w", "--host", "a")
    assert "Spawned agent w" in spawned.out and "in agents/w (branch tt/w) on host a" in spawned.out
    assert "tt: agents/w is made on host a at its first task" in spawned.err
    assert not (b.root / "agents" / "w").exists()
    assert subprocess.run(["git", "rev-parse", "--verify", "-q", "tt/w"], cwd=b.root).returncode == 1  # no branch
    done = b.harness.wait_task(b.assign("w", "Write it\n@write made.py MADE = 1"))
    assert done["state"] == "completed" and done["branch"] == "tt/w", done
    assert (a.root / "agents" / "w" / "made.py").exists() and not (b.root / "agents" / "w").exists()
    b.tt("close", "w")
    b.harness.wait_agent("w", ("stopped",))
    pruned = b.tt("prune", "w")  # (it said only "Pruned w": a user took the worktree on a for gone)
    assert "its worktree and branch on host a stay there: `git worktree remove agents/w`" in pruned.out
    assert (a.root / "agents" / "w" / "made.py").exists()


def test_an_unpinned_agent_placed_on_another_host_leaves_no_worktree_here(hosts, tmp_path):
    """`tt spawn w` in a's folder, placed on b (more room), left agents/w and branch tt/w in a's
    checkout: `tt merge w` there then said "already in main" of work done on b. The worktree made
    here is removed again once the placement is known; --from, which needs the branch made here,
    is refused unless the agent is pinned here."""
    a, b = git_hosts(hosts, tmp_path)
    a.start()
    b.start()
    a.tt("spawn", "p", "--shared", "--host", "a")  # (a has less room now: the next goes to b)
    refused = a.tt("spawn", "w", "--from", "main", check=False)
    assert (refused.returncode, refused.err) == (1, "tt: error: --from makes w's branch in this checkout, but the town "
                                                    "runs on other hosts too and w may be placed on one of them: pin "
                                                    "it here with --host a\n")
    spawned = a.tt("spawn", "w")
    assert "in agents/w (branch tt/w) on host b" in spawned.out
    assert "tt: agents/w is made on host b at its first task" in spawned.err
    assert not (a.root / "agents" / "w").exists()
    assert subprocess.run(["git", "rev-parse", "--verify", "-q", "tt/w"], cwd=a.root).returncode == 1
    done = a.harness.wait_task(a.assign("w", "Write it\n@write made.py MADE = 1"))
    assert done["state"] == "completed" and (b.root / "agents" / "w" / "made.py").exists()
    merged = a.tt("merge", "w", check=False)
    assert merged.returncode != 0 and "not in this checkout" in merged.err, merged.err


@pytest.mark.parametrize("remote_set", [True, False], ids=["remote", "no-remote"])
def test_an_agent_that_moves_hosts_carries_its_work(hosts, tmp_path, remote_set):
    """A worktree agent whose host was lost started its next task on another host from the town's
    first commit: its branch, with its earlier tasks' work, stayed on the lost host. Its latest
    head is now fetched from [workspace] remote and merged into its branch there first; without a
    remote the task fails before its CLI, saying why (on stale code it would look like success)."""
    a, b = git_hosts(hosts, tmp_path, remote_set)
    a.start()
    a.tt("spawn", "w")  # a worktree, and not pinned: it moves when its host is lost
    b.start()
    first = a.harness.wait_task(a.assign("w", "Add the feature\n@write feature.py FEATURE = 1"))
    assert first["state"] == "completed" and first["head"], first

    a.kill()
    wait_for(lambda: a.town.agent("w").host == "b", 30, "w to move to b")
    second = b.assign("w", "Look at the feature\n@ls")
    if not remote_set:  # every task would run without it: the agent fails, its tasks wait (none failed)
        b.harness.wait_agent("w", ("failed",))
        assert b.town.agent("w").reason == (
            f"its latest work is not here: its latest task {first['id']}'s work ({first['head'][:12]}) is on another "
            "host and [workspace] remote is not set: nothing to fetch it from (see README, \"Workspaces on several "
            "hosts\"); its tasks wait until it can be had, then tt restart w (or tt restart w --without-latest "
            "to go on without it)")
        status = " ".join(b.tt("status").out.split())
        assert status.count("tt restart w ") == 2 and "to try again" not in status  # (the reason once, and no more)
        waiting = b.town.task(second)
        assert (waiting.state, waiting.attempts) == ("assigned", 0) and not (b.harness.record / f"{second}.ls").exists()
        # a lost for good: its work cannot be had, and the agent goes on without it when told to
        went_on = b.tt("restart", "w", "--without-latest")
        assert f"w goes on without its latest work (task {first['id']}, on host a)" in went_on.out
        done = b.harness.wait_task(second)
        assert done["state"] == "completed" and "feature.py" not in (b.harness.record / f"{second}.ls").read_text()
        refused = b.tt("restart", "w", "--without-latest", check=False)
        assert (refused.returncode, refused.err.count("\n")) == (1, 1) and "w has no latest work to leave" in refused.err
        return
    done = b.harness.wait_task(second)
    assert done["state"] == "completed", done
    assert "feature.py" in (b.harness.record / f"{second}.ls").read_text().split()  # its CLI had its work
    assert subprocess.run(["git", "merge-base", "--is-ancestor", first["head"], "tt/w"], cwd=b.root).returncode == 0
    assert done["base"] == first["head"]  # (what the second task changed is its own)
    log = (b.root / ".tt" / "logs" / "w.log").read_text()
    assert f"brought in its latest work from host a (task {first['id']}, {first['head'][:12]})" in log
    # in a's folder, tt/w is what w did there: not its latest work (it said "w: already in main")
    for command in ("diff", "merge"):
        stale = a.tt(command, "w", check=False)
        assert stale.returncode == 1 and "agent w works on host b now: branch tt/w here holds only its work " \
            "from when it worked here" in stale.err, stale.err


# --- chaos: 4 agents on 3 hosts; one host killed, another paused past its lease ----------------
# The suite runs a short one; ./scripts/chaos-hosts [TASKS] a longer one.
CHAOS_TASKS = int(os.environ.get("HOSTS_CHAOS_TASKS", "120"))
# Each run of a CLI, logged before it starts: "<task> <host folder> <time>" (never through a shell).
RUN_LOGGER = """import os, sys, time
line = "%s %s %.6f\\n" % (os.environ["TT_TASK_ID"], os.environ["TT_TOWN_DIR"], time.time())
fd = os.open(os.path.join(os.environ["FAKE_AGENT_RECORD"], "runs.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(fd, line.encode())
os.close(fd)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_chaos_hosts_killed_and_paused_lose_nothing_and_run_nothing_twice(hosts, tmp_path):
    from conftest import FAKE_BIN, town_processes
    logger = tmp_path / "run_logger.py"
    logger.write_text(RUN_LOGGER)
    cli = f'\n[agent_clis.logged]\ncommand = [{json_str(sys.executable)}, {json_str(logger)}, {json_str(FAKE_BIN / "claude")}]\n'
    made = [hosts(name) for name in ("a", "b", "c")]
    for host in made:
        host.harness.append_config(cli)
        host.start()
    a, b, c = made
    names = [f"agent{i}" for i in range(4)]
    for name in names:
        a.tt("spawn", name, "--shared", "--model", "logged")
    placed = {name: a.town.agent(name).host for name in names}
    assert sorted(placed.values()) == ["a", "a", "b", "c"], placed  # the most room first, ties by name
    tasks = []
    for i in range(CHAOS_TASKS):
        tasks.append(a.assign(names[i % 4], f"@sleep 0.0{i % 5}\n@echo task {i}"))

    def finished() -> int:
        return a.town.task_counts()["completed"] + a.town.task_counts()["failed"]

    wait_for(lambda: finished() >= CHAOS_TASKS // 4, 120, "a quarter of the tasks to finish")
    a.kill()
    killed_at = time.monotonic()
    wait_for(lambda: finished() >= CHAOS_TASKS // 2 and a.town.hosts.states()["a"] == "lost", 120,
             "half of the tasks to finish, a lost")
    b.signal_all(signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_for(lambda: a.town.hosts.states()["b"] == "lost" and time.monotonic() - stopped_at >= 2.0, 60,
             "b to be lost, and paused for twice lease_ttl")
    b.signal_all(signal.SIGCONT)
    wait_for(lambda: finished() == CHAOS_TASKS, 300, "every task to finish")
    print(f"chaos: {CHAOS_TASKS} tasks; a killed, then b paused {time.monotonic() - stopped_at:.1f}s "
          f"({time.monotonic() - killed_at:.1f}s after the kill)")

    town = c.town
    records = {t: town.task(t) for t in tasks}
    for task in records.values():  # completed, or failed with a reason
        assert task.state == "completed" or (task.state == "failed" and task.reason), task
    # no CLI ran for a task after its outcome was recorded (by whichever host)
    runs = [line.split() for line in (c.harness.record / "runs.log").read_text().splitlines()]
    for task_id, _where, at in runs:
        assert float(at) < records[task_id].finished_at, (task_id, _where)
    # none recorded twice (the events stream holds them all at this size)
    finishes = [f.get("task") for _, f in town.r.xrange(town.keys.events) if f["type"] in ("task_completed", "task_failed")]
    if CHAOS_TASKS <= 500:
        assert sorted(finishes) == sorted(tasks)
    assert {town.agent(n).host for n in names} == {"c"}  # a and b were lost: all moved to c
    for host in made:
        host.signal_all(signal.SIGCONT)
        if host.proc.poll() is None:
            host.proc.send_signal(signal.SIGTERM)
    for host in made:
        host.proc.wait(60)
        wait_for(lambda: not town_processes(host.root), 20, f"host {host.name}'s processes to exit")


def json_str(value) -> str:
    import json
    return json.dumps(str(value))
