"""The supervisor: one per town. Starts redis-server, keeps one runner per agent, stops in order.

It is a reconciler: desired state is the agent registry in Redis, actual state is
its child processes, and one loop makes the two match whenever something happens: a child exits
(SIGCHLD), a `tt` command nudges (pub/sub), a backoff timer fires, or a stop is asked.
No threads: runners are forked, and fork and threads do not mix.
"""
from __future__ import annotations

import ctypes  # noqa: F401 - loaded before any fork: procutil's prctl calls run in the children
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace

from . import lock, stopping
from .config import CONFIG_FILE, Config, ensure_runtime_dir, load, remember_started
from .control import ControlChannel
from .errors import TinytownError
from .agent_log import tail_text
from .agent_control import AgentControl
from .models import Agent, AgentState, Hold, InvalidTransition, StopMode
from .procutil import (adopted, become_subreaper, close_on_exec_all, describe_status, drain, exit_now, file_stamp,
                       kill_leftovers, kill_with_group, killpg, reap, reap_adopted, set_parent_death_signal,
                       set_process_name, signal_wakeup_pipe, wait_exit, wait_until)
from .procutil import running as process_running
from .redis_server import RedisServer
from .resp import RespConnectionError, RespError, disk_full
from .resp import connect as resp_connect
from .hosts import FENCED_EXIT, fencing, machine_id
from .runner import AGENT_FAILED_EXIT, KILL_WAIT_SECONDS, run_forked
from .restart_policy import GiveUp, RestartRecord
from .town import Town

# How long `tt stop` gives a process a task left running (a server, a gpg-agent) after SIGTERM.
ADOPTED_STOP_GRACE = 2.0
# How often a running town looks whether tinytown.toml changed (one stat; `tt reload` asks at once).
CONFIG_CHECK_SECONDS = 1.0
FORK_RETRY_SECONDS = 1.0   # a runner's fork refused (the pid limit, memory): tried again after this
# What a running town cannot change: its keys, and where its Redis is. The rest applies live.
RESTART_ONLY = {"name": "name", "use_socket": "[redis] use_socket", "socket_path": "[redis] socket_path",
                "redis_host": "[redis] host", "redis_port": "[redis] port", "redis_server": "[redis] server",
                "redis_url": "[redis] url", "password_env": "[redis] password_env", "tls_ca_cert": "[redis] tls_ca_cert",
                "tls_cert": "[redis] tls_cert", "tls_key": "[redis] tls_key"}
LIVE_NAMES = {"clis": "[agent_clis]", "supervisor": "[supervisor]", "logs": "[logs]",
              "detach_keys": "[attach] detach_keys", "cluster": "[cluster]", "hosts": "[hosts]"}


@dataclass
class RunnerProc:
    agent_id: str
    name: str
    pid: int
    started_at: float
    stop_requested: bool = False
    hold: str = ""              # the models.Hold it was signalled for (`tt interrupt/close/kill`)
    kill_at: float | None = None  # `tt kill`: past this (monotonic), the runner is SIGKILLed
    fenced: bool = False        # its agent was placed again (this host declared lost): it writes nothing
    stop_grace: float = 0.0     # the grace its config gives a stop (a reload changes the next runner's only)


@dataclass
class StopReport:
    stopped: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    pending: int = 0            # tasks in the inboxes of this host's agents
    waiting: int = 0            # theirs and the backlog's, pending on dependencies


@dataclass
class Stopping:
    """A stop under way: the mode the one loop is in once a stop is asked."""

    mode: StopMode
    since: str                  # the events stream's id when it began (what was re-queued since)
    deadline: float             # monotonic: past it, what still runs is killed
    report: StopReport = field(default_factory=StopReport)
    unmarked: list[str] = field(default_factory=list)  # reaped, not yet recorded: one write for many
    mark_at: float = 0.0


class Supervisor:
    def __init__(self, config: Config, say=None, ready_fd: int | None = None, host: str | None = None):
        self.config = config
        self.host = config.host_name(host)        # this machine's name in the town (supervisor/hosts.py)
        self.machine = machine_id()               # which machine this is, whatever its host name
        self.lease_at = 0.0                       # monotonic: when the lease is renewed next
        self.reaper = ""                          # the host that handles lost hosts, as last seen
        self.policy = config.supervisor
        self._say = say or (lambda text: print(text, flush=True))
        self.ready_fd = ready_fd
        self.procs: dict[str, RunnerProc] = {}
        self.exited: list[tuple[RunnerProc, int]] = []  # reaped runners whose exit is not yet recorded
        self.again = False  # a pass cut short by a lost Redis: run the next one at once
        self.restarts: dict[str, RestartRecord] = {}
        self.signalled: StopMode | None = None   # a stop asked by SIGTERM/SIGINT: graceful, then now
        self.stopping: Stopping | None = None
        self.redis = RedisServer(config)
        self.lock_fd: int | None = None
        self.town: Town | None = None
        self.control: ControlChannel | None = None
        self.selector: selectors.BaseSelector | None = None
        self.wake_r = self.wake_w = -1
        self.disk_full = False                    # Redis refuses writes (MISCONF): said once
        self.joined = False                       # a lease renewal has gone through (_renew_lease)
        self.fork_refused: set[str] = set()       # agents whose runner's fork was refused: said once
        self.config_stamp = self._config_stamp()  # tinytown.toml as `config` was read from it
        self.reloads_done = 0                     # `tt reload` requests answered
        self.stops_seen = 0                       # `tt stop` requests made before this supervisor started

    def say(self, text: str) -> None:
        """Tell the user; if the terminal is gone (SIGHUP is ignored), go on in .tt/supervisor.log."""
        try:
            self._say(text)
        except OSError:
            fd = os.open(self.config.supervisor_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            try:
                self._say(text)
            except OSError:
                pass

    # --- life cycle --------------------------------------------------------------------------
    def serve(self) -> int:
        ensure_runtime_dir(self.config.runtime_dir)
        try:
            self.lock_fd = lock.acquire(self.config.runtime_dir)
        except lock.AlreadyRunning as exc:
            self._notify_ready(f"running {exc.pid or ''}")
            raise TinytownError(str(exc)) from None
        try:
            self._remember_host()  # (first: this folder's commands take it for this host's name from now on)
            remember_started(self.config, self.config_stamp)  # (what reading commands use while it is broken)
            self._install_signals()
            become_subreaper()
            close_on_exec_all()
            leftover = kill_leftovers(self.config.log_dir, self.config.root)  # a SIGKILLed supervisor's
            if leftover:
                self.say(f"killed {len(leftover)} process(es) left by the previous supervisor")
            self.redis.start()
            self.town = Town(self.config, resp_connect(self.config, long_lived=True))  # (not redis-py: see resp.py)
            # What was asked before this start (read first: a stop asked once this host shows as
            # live, from its record or its lease, is this host's to act on).
            asked = self._retrying(self.town.requests)  # (a read: never refused for a full disk)
            self.reloads_done, self.stops_seen = asked.reloads, asked.stops
            self._retrying(lambda: self.town.record_supervisor_started(os.getpid(), self.host))
            self._retrying(self._join)  # before any runner: agents are run where they are placed
            self._retrying(lambda: self.town.record_config("", "", self.reloads_done))
            self._retrying(self._recover_coordination)  # before any runner: nothing races it
            self.control = ControlChannel(self.config, self.town.keys.control)
            self.control.connect()
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.wake_r, selectors.EVENT_READ)
            self.selector.register(self.control, selectors.EVENT_READ)
            if self.redis.embedded:
                where = self.config.redis_socket if self.config.use_socket else f"port {self.config.redis_port}"
                self.say(f"town {self.config.name}: supervisor pid {os.getpid()}, redis-server pid {self.redis.pid} on {where}")
            else:
                self.say(f"town {self.config.name}: supervisor pid {os.getpid()} on host {self.host}, Redis at {self.config.redis_where}")
            self._retrying(self._reconcile)
            self._describe_for_stop()
            self._notify_ready(f"ok {os.getpid()}")
            report = self._loop()
            self._write_report(report)
            return 0
        except BaseException as exc:
            self._notify_ready(f"error {exc}")
            self._kill_everything()
            raise
        finally:
            self.redis.stop()
            if self.lock_fd is not None:
                lock.release(self.lock_fd)

    def _describe_for_stop(self) -> None:
        """Write what `tt stop` needs into the lock file, so it can ask without reading the config
        (stopping.py); again after a reload, which may change stop_grace."""
        socket_path = str(self.config.redis_socket) if self.redis.embedded and self.config.use_socket else ""
        lock.describe(self.lock_fd, stopping.Card(self.config.name, socket_path, self._longest_grace(),
                                                  str(self.config.last_stop_file)).encode())

    def _longest_grace(self) -> float:
        """The longest a graceful stop may take: runners keep the grace of the config they were
        forked with (a reload that shortened it reaches the next runner only)."""
        return max([self.policy.stop_grace, *(proc.stop_grace for proc in self.procs.values())])

    def _notify_ready(self, line: str) -> None:
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, (line.replace("\n", " ") + "\n").encode())
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def _install_signals(self) -> None:
        self.wake_r, self.wake_w = signal_wakeup_pipe()
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal closing is not a stop
        # Cancel relays go to runners (SIGUSR2); a runner forked a moment ago still has this
        # handler, not the default (which would end it): the signal is lost, and its `begin`
        # finds the cancel request on the task anyway.
        signal.signal(signal.SIGUSR2, lambda *_: None)

    def _on_stop_signal(self, *_):
        # SIGTERM/SIGINT = `tt stop`; a second one while stopping = `tt stop --now`
        self.signalled = StopMode.NOW if (self.signalled or self.stopping) else StopMode.GRACEFUL

    # --- the loop ----------------------------------------------------------------------------
    def _loop(self) -> StopReport:
        """The one event loop (honcho's one-queue manager is the model): it wakes when a child
        exits (SIGCHLD), a `tt` command nudges (pub/sub), a timer is due or a stop is asked, and
        each pass makes the town match its registry; once a stop is asked, each pass takes the
        stop a step further instead, until it returns the stop's report."""
        nudged = True  # look for a stop request once before the first wait
        while True:
            again, self.again = self.again, False
            events = self.selector.select(0 if again else self._next_timeout())
            for key, _ in events:
                if key.fileobj is self.control:
                    nudged = True
                    if not self.control.drain():
                        self._redis_lost()
                else:
                    drain(self.wake_r)
            # Woken by the config timer alone, with nothing else to do: one stat and back to sleep
            # (an idle town must cost next to nothing).
            if (not events and not again and self.stopping is None and not self.disk_full and not self.exited
                    and not self._restart_due() and not self._kill_due() and not self._lease_due()
                    and self._config_stamp() == self.config_stamp):
                continue
            try:
                if self.disk_full and self.town.persistence_error() is None:
                    self.disk_full = False
                    self.say("Redis writes again")
                self._reap()
                if self._lease_due():  # stopping too: a long graceful stop must not look like a loss
                    self._renew_lease()
                if self.stopping is None:
                    self._kill_overdue()
                    asked = self.town.requests()
                    mode = self.signalled or self._stop_asked(asked)
                    if mode is None:
                        self._check_config(asked.reloads)  # before any runner is forked with it
                        self._reconcile()
                        continue
                    self._begin_stop(mode)
                elif nudged or self.signalled is StopMode.NOW:
                    # `tt stop --now` writes the request and then publishes on the control channel
                    if self.signalled is StopMode.NOW or self._stop_asked(self.town.requests()) is StopMode.NOW:
                        self._stop_now()
                nudged = False
                if self._stop_step():
                    return self._finish_stop()
            except RespConnectionError as exc:
                # redis-server went away under a command: start it again (its append-only file
                # keeps the town); what this pass did not finish, the next one redoes.
                self.say(f"lost Redis ({exc}); reconnecting")
                self._redis_lost()
                self.again = True
                time.sleep(0.01)  # (a Redis that is up but refuses us must not make this spin)
            except RespError as exc:
                if not disk_full(exc):
                    raise
                # Redis cannot write its append-only file (a full disk) and refuses writes: the
                # town keeps what it has, and the next pass (CONFIG_CHECK_SECONDS) tries again.
                # Restarting anything would only fail the same way.
                self._refused(exc)
                if self.stopping is not None:
                    self.stopping.unmarked = []  # not to be recorded: the next start sees to it

    def _next_timeout(self) -> float | None:
        """Seconds until the next timer: a restart after backoff, or a stop's deadlines."""
        now = time.monotonic()
        if self.stopping is not None:
            wait = self.stopping.deadline - now
            if self.stopping.unmarked:
                wait = min(wait, self.stopping.mark_at - now)
            return max(0.0, min(wait, self.lease_at - now))
        waits = [r.next_start for r in self.restarts.values() if r.next_start and not r.gave_up]
        waits.append(self.lease_at)
        waits += [proc.kill_at for proc in self.procs.values() if proc.kill_at is not None]
        return max(0.0, min([*waits, now + CONFIG_CHECK_SECONDS]) - now)

    def _restart_due(self) -> bool:
        now = time.monotonic()
        return any(r.next_start and not r.gave_up and r.next_start <= now for r in self.restarts.values())

    def _lease_due(self) -> bool:
        return time.monotonic() >= self.lease_at

    def _kill_due(self) -> bool:
        now = time.monotonic()
        return any(proc.kill_at is not None and proc.kill_at <= now for proc in self.procs.values())

    def _kill_overdue(self) -> None:
        """`tt kill` of a runner that did not exit in time (hung, stopped): SIGKILL it and its CLI's
        group; its exit is then handled as a crash (its task back in the inbox)."""
        now = time.monotonic()
        for proc in list(self.procs.values()):
            if proc.kill_at is not None and proc.kill_at <= now:
                proc.kill_at = None
                self.say(f"runner {proc.name} did not stop when killed; SIGKILL")
                killpg(proc.pid, signal.SIGKILL)
                self._kill_cli(proc.agent_id)

    def _redis_lost(self) -> None:
        """A connection to redis-server broke: if the server died, start it again (its append-only
        file keeps the town); if it is still there, only reconnect."""
        self.selector.unregister(self.control)
        self.control.close()
        proc = self.redis.proc
        if proc is not None and proc.poll() is None:
            try:
                self.control.connect()
                self.selector.register(self.control, selectors.EVENT_READ)
                return  # alive and answering: a connection broke, the server did not
            except OSError:  # dying: the connection broke before the process was gone
                self.control.close()
                try:
                    wait_exit(proc, 2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if proc is not None:
            self.say(f"redis-server exited ({describe_status_code(proc.returncode)}); restarting it")
        self.redis.start()
        self.control.connect()
        self.selector.register(self.control, selectors.EVENT_READ)

    # --- tinytown.toml, read again ---------------------------------------------------------------
    def _config_stamp(self) -> tuple | None:
        return file_stamp(self.config.root / CONFIG_FILE)

    def _stop_asked(self, asked) -> StopMode | None:
        """The stop a `tt stop` asked since this supervisor started, if any (stopping.ask)."""
        return (asked.stop or StopMode.GRACEFUL) if asked.stops > self.stops_seen else None

    def _check_config(self, reloads_asked: int) -> None:
        """Read tinytown.toml again if it changed or `tt reload` asked: apply what can change live
        (runners are forked from here, so the next one gets it), keep the rest and say it needs a
        restart; keep the previous config whole, and say why, if the new one is invalid."""
        stamp = self._config_stamp()
        if stamp == self.config_stamp and reloads_asked <= self.reloads_done:
            return
        self.config_stamp = stamp
        try:
            error, note = "", self._apply_config(load(self.config.root))
        except TinytownError as exc:
            error, note = str(exc), ""
            self.say(f"tinytown.toml not applied: {exc} (the town runs on its previous config)")
        else:
            self.say(f"tinytown.toml read again: {note}")
        self.reloads_done = max(self.reloads_done, reloads_asked)
        self._tick()  # this host's max_agents, as spawns read it, before `tt reload` hears back
        self.town.record_config(error, note, self.reloads_done)

    def _apply_config(self, new: Config) -> str:
        """Make `new` the supervisor's config, except what only a restart can change; what it did."""
        old = self.config
        changed = [f.name for f in fields(Config) if f.name != "root" and getattr(new, f.name) != getattr(old, f.name)]
        kept = [name for name in changed if name in RESTART_ONLY]
        applied = [name for name in changed if name not in RESTART_ONLY]
        new = replace(new, **{name: getattr(old, name) for name in kept})
        self.config = self.town.config = new  # (the Redis server keeps its own: it does not change)
        self.policy = new.supervisor
        self._describe_for_stop()
        parts = []
        if applied:
            parts.append("applied " + ", ".join(LIVE_NAMES.get(name, name) for name in applied)
                         + (" (running agents keep theirs until `tt restart AGENT`)"
                            if set(applied) & {"clis", "supervisor", "logs"} else ""))
        if kept:
            parts.append("needs a restart of the town (`tt stop`, then `tt start`): "
                         + ", ".join(RESTART_ONLY[name] for name in kept))
        return "; ".join(parts) or "no change"

    # --- this host's lease (supervisor/hosts.py) -------------------------------------------------
    def _join(self) -> None:
        """The first renewal, at start; agents registered before hosts existed are placed here.
        Refused while another supervisor holds this host's lease: two supervisors of one host
        would each run its agents (a cloned machine, a second checkout started as this host).
        One that died on this machine (its pid gone) is taken over at once."""
        holder = self.town.hosts.live_holder(self.host) if fencing(self.config) else None  # (else: one machine's Redis)
        if holder is not None:
            pid, machine = holder
            ours = machine == self.machine
            if pid != str(os.getpid()) and not (ours and pid.isdigit() and not process_running(int(pid))):
                where = "this machine" if ours else (machine.split("/")[0] or "another machine")
                raise TinytownError(f"host {self.host} is live: its supervisor (pid {pid} on {where}) holds its lease; "
                                    "start this one as another host (tt start --host NAME), or stop that one first")
        tick = self._tick()
        if tick.returned:
            self.say(f"host {self.host} was declared lost while its supervisor was away; "
                     "its unpinned agents run elsewhere now")
        adopted_count = self.town.hosts.adopt_unplaced(self.host)
        if adopted_count:
            self.say(f"{adopted_count} agent(s) from before hosts existed placed on host {self.host}")

    def _remember_host(self) -> None:
        """This folder's host name: what its commands take for this host while this supervisor
        runs (lifecycle.host_here), and what a supervisor a later `tt` starts here takes."""
        try:
            self.config.host_file.write_text(self.host + "\n", encoding="utf-8")
        except OSError as exc:  # (a name from before is not left to be taken for this one's)
            self.say(f"cannot write {self.config.host_file}: {exc.strerror or exc}")
            try:
                self.config.host_file.unlink()
            except OSError:
                pass

    def _tick(self):
        cluster = self.config.cluster
        self.lease_at = time.monotonic() + cluster.lease_renew
        tick = self.town.hosts.tick(self.host, self.config.host_capacity(self.host), os.getpid(), cluster.lease_ttl,
                                    self.machine)
        self.joined = True  # (a renewal went through: a record missing after this was removed)
        if tick.reaper != self.reaper:
            if tick.reaper == self.host and self.reaper:  # (a takeover; not a first start)
                self.say(f"host {self.host} handles lost hosts now, after host {self.reaper} (elected through Redis)")
            self.reaper = tick.reaper
        if tick.moved:
            self.say(f"moved from lost hosts: {', '.join(tick.moved)}")
        return tick

    def _renew_lease(self) -> None:
        """Renew the lease. If this host was declared lost meanwhile (it was paused, or cut off,
        longer than lease_ttl), every runner it has is fenced: killed, writing nothing; the
        agents that wait for this host (pinned) get new runners at the next reconcile. So too if
        it was lost and then forgotten (`tt forget-host`): its record is new again."""
        joined = self.joined
        tick = self._tick()
        if tick.returned:
            self.say(f"host {self.host} was declared lost (no renewal for [cluster] lease_ttl = "
                     f"{self.config.cluster.lease_ttl:g}s); its runners are stopped, their tasks run elsewhere")
        elif not tick.before and joined:  # (a renewal before found its record: this one found none)
            self.say(f"host {self.host} was forgotten (`tt forget-host`) while its supervisor was away: it joins "
                     "the town again as a new host; its runners are stopped, their agents run elsewhere")
        else:
            return
        for proc in self.procs.values():
            self._fence(proc)

    def _fence(self, proc: RunnerProc) -> None:
        """A runner whose agent was placed again: SIGKILL (its group; its CLI has a session of its
        own, hung up with the pty, and killed as an orphan when reaped), no record written."""
        if not proc.fenced:
            proc.fenced = True
            killpg(proc.pid, signal.SIGKILL)

    # --- reconcile ---------------------------------------------------------------------------
    def _recover_coordination(self) -> None:
        """Dependents of tasks that finished without their release (a crash in between, or an
        outcome written by hand) are released or cancelled, and free agents take backlog work."""
        released, cancelled, claimed = self.town.coordination.recover()
        if released or cancelled or claimed:
            self.say(f"recovered: {released} task(s) released, {cancelled} cancelled, {claimed} claimed from the backlog")

    def _relay_cancels(self) -> None:
        """`tt cancel` of a task in flight: its runner is told (SIGUSR2) to stop the CLI. The
        request stays on the task until its outcome is written, so a missed nudge or a restart of
        the supervisor only delays this; a duplicate signal is harmless (the runner re-reads it)."""
        for _task_id, agent_id in self.town.coordination.cancel_requests():
            proc = self.procs.get(agent_id)
            if proc is not None:
                try:
                    os.kill(proc.pid, signal.SIGUSR2)
                except ProcessLookupError:
                    pass

    def _reconcile(self) -> None:
        self._relay_cancels()
        everywhere = self.town.agents()
        if any(not a.host for a in everywhere):  # written without a host (by hand, or an old `tt`)
            self.town.hosts.adopt_unplaced(self.host)  # (one script: one supervisor gets each)
            everywhere = self.town.agents()
        agents = [a for a in everywhere if a.host == self.host]  # only those placed on this host
        elsewhere = {a.id for a in everywhere if a.host != self.host}
        for proc in list(self.procs.values()):
            if proc.agent_id in elsewhere:
                self._fence(proc)  # moved while this host was lost
        cap = self.config.host_capacity(self.host)
        if len(agents) > cap:
            # Over the cap (max_agents lowered while they run, a hand edit): keep those at work,
            # then those running, each in the order they were made; an idle one goes before a
            # busy one, whose task would be interrupted. A runner already told to stop counts as
            # gone, so one that finishes its task meanwhile is not stopped in turn.
            busy = (AgentState.WORKING.value, AgentState.WAITING.value)
            live = {agent_id for agent_id, proc in self.procs.items() if not proc.stop_requested}
            agents = [a for _, a in sorted(enumerate(agents), key=lambda ia: (
                not (ia[1].id in live and ia[1].state in busy), ia[1].id not in live, ia[0]))]
        allowed = agents[:cap]
        allowed_ids = {a.id for a in allowed}
        for agent_id, proc in self.procs.items():
            if agent_id not in allowed_ids and not proc.stop_requested:
                self._signal_runner(proc, signal.SIGTERM)
        held_back = f"not started: the town already runs max_agents ({cap}) agents"
        for agent in agents[cap:]:  # more than max_agents registered (a hand edit, or a race)
            if agent.id not in self.procs and agent.reason != held_back:
                try:
                    self.town.set_agent_state(agent.id, AgentState.STOPPED, pid="", cli_pid="", reason=held_back)
                except (InvalidTransition, ValueError):  # a record edited by hand: it is not run anyway
                    pass
                self.say(f"agent {agent.name} not started: max_agents is {cap}")
        now = time.monotonic()
        for agent in allowed:
            if agent.hold:  # `tt interrupt/close/kill`: its runner goes, and is not started again
                self._hold(agent)
                continue
            if agent.id in self.procs:
                proc = self.procs[agent.id]
                if agent.restart_asked and not proc.hold:  # `tt restart` of a live runner: it finishes
                    self._signal_runner(proc, signal.SIGHUP)  # its task and exits, and is started again
                    proc.hold = "restart"                     # (_runner_exited, as after a resume)
                continue
            if len(self.procs) >= cap:  # one held back is still exiting: start this one when it has
                break
            record = self.restarts.setdefault(agent.id, RestartRecord())
            if agent.state == AgentState.FAILED.value:
                record.gave_up = True
                continue
            if agent.state == AgentState.STARTING.value and (record.gave_up or record.waiting(now)):
                record.reset()  # `tt restart` clears the record
            if record.waiting(now):
                continue
            record.next_start = 0.0
            try:
                self._start_runner(agent.id, agent.name)
            except (InvalidTransition, ValueError) as exc:  # a record edited by hand: not the whole town
                self.say(f"agent {agent.name} not started: {exc}")

    def _hold(self, agent: Agent) -> None:
        """A held agent (agent_control.py): its runner is told to finish its task and exit (SIGHUP)
        or to stop now (SIGUSR1, `tt kill`); with no runner left, it is recorded paused or stopped."""
        proc = self.procs.get(agent.id)
        if proc is not None:
            if agent.hold == Hold.KILL.value and proc.hold != Hold.KILL.value:
                self._signal_runner(proc, signal.SIGUSR1)
                proc.kill_at = time.monotonic() + KILL_WAIT_SECONDS + 3.0  # (as a stop's deadline)
            elif not proc.hold:
                self._signal_runner(proc, signal.SIGHUP)
            proc.hold = agent.hold
            return
        self.restarts.pop(agent.id, None)  # (a backoff timer of its own would only wake us)
        if agent.state != Hold(agent.hold).final_state.value or agent.to_backlog:
            try:
                done = AgentControl(self.town).settle(agent)
            except (InvalidTransition, ValueError) as exc:  # a record edited by hand: not the whole town
                self.say(f"agent {agent.name} not settled: {exc}")
                return
            if done:
                self.say(f"agent {agent.name}: {done}")

    def _start_runner(self, agent_id: str, name: str) -> None:
        self.town.set_agent_state(agent_id, AgentState.STARTING, pid="", cli_pid="", current_task="",
                                  restart_at="", restart_asked="")
        log_path = self.config.log_file(name)
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:  # (EAGAIN: the pid limit, a runaway agent's helpers; ENOMEM) this agent waits, not the town
            self._fork_refused(agent_id, name, exc)
            return
        if pid == 0:  # --- child: becomes the runner and never returns
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                os.setpgid(0, 0)  # Ctrl+C on `tt start` reaches the supervisor only
                set_parent_death_signal(signal.SIGUSR1, parent)
                # Only the supervisor holds the town's lock: a runner outliving it (for the moment
                # its parent-death signal takes) must not make the next `tt start` wait.
                for fd in (self.wake_r, self.wake_w, self.lock_fd, self.ready_fd):
                    if fd is not None:
                        os.close(fd)
                set_process_name(f"tt-runner {name}")
                self.control.close()
                self.selector.close()
                log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                null_fd = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null_fd, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.close(log_fd)
                os.close(null_fd)
            except BaseException:
                os._exit(70)
            run_forked(self.config, agent_id, log_path, self.host)
            os._exit(70)  # not reached
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        self.procs[agent_id] = RunnerProc(agent_id, name, pid, time.monotonic(), stop_grace=self.policy.stop_grace)
        self.fork_refused.discard(agent_id)
        self.town.set_runner_pid(agent_id, pid)
        self.say(f"runner {name} started (pid {pid})")

    def _fork_refused(self, agent_id: str, name: str, exc: OSError) -> None:
        """A runner could not be forked: the agent waits in `backoff` and is tried again after
        FORK_RETRY_SECONDS, as long as it takes (the machine, not the agent, is at fault)."""
        self.restarts.setdefault(agent_id, RestartRecord()).next_start = time.monotonic() + FORK_RETRY_SECONDS
        reason = f"cannot start its runner: {exc.strerror or exc} (the machine's process or memory limit?)"
        self.town.set_agent_state(agent_id, AgentState.BACKOFF, pid="", cli_pid="", reason=reason,
                                  restart_at=f"{time.time() + FORK_RETRY_SECONDS:.6f}")
        if agent_id not in self.fork_refused:  # (said once until a fork goes through, not each second)
            self.fork_refused.add(agent_id)
            self.say(f"cannot start runner {name}: {exc}; trying again every {FORK_RETRY_SECONDS:g}s")

    def _signal_runner(self, proc: RunnerProc, sig: int) -> None:
        proc.stop_requested = True
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    # --- exits and restart policy --------------------------------------------------------------
    def _reap(self) -> None:
        for proc, status in reap_runners(self.procs):
            if self.stopping is not None:  # recorded in one write with the others (_stop_step)
                self.stopping.report.stopped.append(proc.name)
                self.stopping.unmarked.append(proc.agent_id)
            else:
                self.exited.append((proc, status))
        while self.exited:  # one at a time: one a lost Redis cut short is done again next pass
            proc, status = self.exited[0]
            if proc.agent_id not in self.procs:  # (else it was restarted before Redis went)
                try:
                    self._runner_exited(proc, status)
                except (InvalidTransition, ValueError, TypeError) as exc:  # a record edited by hand: not the
                    self.say(f"runner {proc.name}'s exit not handled: {exc}")  # whole town (the reconcile looks again)
            self.exited.pop(0)
        if self.redis.proc and self.redis.proc.poll() is not None:
            self._redis_lost()
        reap_adopted(self._own_children())

    def _kill_cli(self, agent_id: str) -> None:
        """SIGKILL the process group of the CLI the agent's record names (it leads a session of its
        own, so a runner's group does not hold it), if the agent is still on this host: a pid
        recorded on another machine names nothing here."""
        host, pid = self.town.r.execute_command("HMGET", self.town.keys.agent(agent_id), "host", "cli_pid")
        if host in (self.host, None, ""):
            killpg(int(pid) if pid else None, signal.SIGKILL)

    def _own_children(self) -> set[int]:
        """The runners and redis-server: every other child is an orphan adopted as subreaper."""
        known = {proc.pid for proc in self.procs.values()}
        if self.redis.proc is not None:
            known.add(self.redis.proc.pid)
        return known

    def _runner_exited(self, proc: RunnerProc, status: int) -> None:
        if proc.fenced or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == FENCED_EXIT):
            # Its agent is placed again (elsewhere, or here with a new epoch): whatever it left is
            # the new placement's; only its CLI, ours as subreaper, is killed here.
            kill_with_group(adopted(self._own_children(), agent_ids={proc.agent_id}), signal.SIGKILL)
            self.restarts.pop(proc.agent_id, None)
            self.say(f"runner {proc.name} fenced: its agent was placed again after this host was declared lost")
            return
        self._kill_cli(proc.agent_id)  # the runner died mid-task: its CLI's whole group goes too
        # and a CLI it started but had not yet recorded, now ours as subreaper (what earlier tasks
        # left running, a gpg-agent or an ssh master, is not this task's: it stays)
        running = {c.message.task_id for c in self.town.inflight(proc.agent_id) if c.message.task_id}
        if running:
            kill_with_group(adopted(self._own_children(), running), signal.SIGKILL)
        # What it had claimed waits at the front of the inbox (a failed agent's work shows as
        # pending, not as running) for the next runner, which counts the attempt.
        self.town.put_back_inflight(proc.agent_id)
        if (os.WIFEXITED(status) and os.WEXITSTATUS(status) == AGENT_FAILED_EXIT) or \
                self.town.agent_state(proc.agent_id) == AgentState.FAILED.value:
            # The runner recorded the agent failed (its CLI cannot be run, its work cannot be
            # brought here), whether or not it lived to exit saying so: not started again until
            # `tt restart` (the reconcile leaves failed agents alone).
            self.restarts.setdefault(proc.agent_id, RestartRecord()).gave_up = True
            self.say(f"runner {proc.name}: the agent is failed until `tt restart {proc.name}` (tt status says why)")
            return
        if self.stopping is None and (proc.hold or not proc.stop_requested):
            try:
                agent = self.town.agent_by_id(proc.agent_id)
            except TinytownError:  # removed
                agent = None
            if agent is not None and agent.hold:  # paused, closed or killed: recorded, not restarted
                self.say(f"runner {proc.name} stopped ({agent.hold})")
                self._hold(agent)
                return
            if agent is not None and proc.hold:  # `tt resume` (or restart) came while it finished its task
                self.say(f"runner {proc.name} stopped; {'restarted' if proc.hold == 'restart' else 'resumed'}: "
                         "starting it again")
                self._start_runner(proc.agent_id, proc.name)
                return
        if proc.stop_requested or self.stopping is not None:
            if self.town.agent_exists(proc.agent_id):
                self.town.set_agent_state(proc.agent_id, AgentState.STOPPED, pid="", cli_pid="")
            self.say(f"runner {proc.name} stopped")
            return
        if not self.town.agent_exists(proc.agent_id):
            return
        record = self.restarts.setdefault(proc.agent_id, RestartRecord())
        decision = record.decide(status, time.monotonic() - proc.started_at, self.policy)
        record.apply(decision, time.monotonic())
        tail = tail_text(self.config.log_file(proc.name))
        reason = decision.reason + (f"; last output: {tail}" if tail else "")
        if isinstance(decision, GiveUp):
            self.town.fail_agent(proc.agent_id, proc.name, reason)
            self.say(f"runner {proc.name} failed {decision.fast_failures} times in a row; giving up ({reason})")
            return
        self.town.record_restart(proc.agent_id, proc.name, reason, decision.delay)
        if decision.delay <= 0:
            self.say(f"runner {proc.name} exited ({describe_status(status)}); restarting")
            self._start_runner(proc.agent_id, proc.name)
            return
        self.town.set_agent_state(proc.agent_id, AgentState.BACKOFF, pid="", cli_pid="", reason=reason,
                                  restart_at=f"{time.time() + decision.delay:.6f}")
        self.say(f"runner {proc.name} exited ({describe_status(status)}); restarting in {decision.delay:.2f}s")

    # --- stop: the loop's other mode -------------------------------------------------------------
    def _begin_stop(self, mode: StopMode) -> None:
        self.town.set_supervisor_state("stopping")
        since = self.town.event("town_stopping", mode=mode.value)
        grace = 0.0 if mode is StopMode.NOW else self._longest_grace()
        self.stopping = Stopping(mode, since, time.monotonic() + grace + KILL_WAIT_SECONDS + 3.0)
        # While a runner lives, the agent's state is its own to write (it says `stopping` when it
        # gets the signal): a write from here could race with it recording a finished task.
        # Every runner gets its signal before the first exit interrupts the loop (SIGCHLD is
        # held back meanwhile; the wakeup pipe still hears of it once unblocked).
        sig = signal.SIGUSR1 if mode is StopMode.NOW else signal.SIGTERM
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            for proc in self.procs.values():
                self._signal_runner(proc, sig)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        self.say(f"stopping ({mode.value})")  # (once every runner has been told)

    def _stop_now(self) -> None:
        """`tt stop --now` (or a second Ctrl+C) during a graceful stop: skip the grace period."""
        stopping = self.stopping
        if stopping.mode is StopMode.NOW:
            return
        stopping.mode = self.signalled = StopMode.NOW
        self.say("stopping now")
        for proc in self.procs.values():
            self._signal_runner(proc, signal.SIGUSR1)
        stopping.deadline = min(stopping.deadline, time.monotonic() + KILL_WAIT_SECONDS + 3.0)

    def _stop_step(self) -> bool:
        """Record the runners reaped since the last write (every 0.1 s, or once all are gone);
        True once nothing is left to wait for."""
        stopping = self.stopping
        now = time.monotonic()
        if stopping.unmarked and (not self.procs or now >= stopping.mark_at):
            self.town.mark_stopped(*stopping.unmarked)
            stopping.unmarked = []
            stopping.mark_at = now + 0.1
        return not self.procs or now >= stopping.deadline

    def _finish_stop(self) -> StopReport:
        stopping = self.stopping
        report = stopping.report
        self._retrying(lambda: self.town.mark_stopped(*stopping.unmarked))
        stopping.unmarked = []
        for proc in self.procs.values():  # past every deadline: no mercy
            killpg(proc.pid, signal.SIGKILL)
            self._retrying(lambda: self._kill_cli(proc.agent_id))
            os.waitpid(proc.pid, 0)
            report.killed.append(proc.name)
            self._retrying(lambda: self.town.mark_stopped(proc.agent_id))
        self.procs.clear()
        self._stop_adopted()
        self._retrying(lambda: self._record_stop(report, stopping.since))
        self.say(f"stopped {len(report.stopped) + len(report.killed)} runner(s); "
                 f"{len(report.requeued)} task(s) re-queued; {report.pending} queued, {report.waiting} on dependencies")
        return report

    def _record_stop(self, report: StopReport, since: str) -> None:
        agents = [a for a in self.town.agents() if a.host in (self.host, "")]  # other hosts' run on
        self.town.mark_stopped(*[agent.id for agent in agents  # those in backoff, or never started
                                 if agent.state not in (AgentState.FAILED.value, AgentState.STOPPED.value,
                                                        AgentState.PAUSED.value)])
        # (the town's events: on several hosts stopping at once, each counts its own agents' tasks)
        requeued = [fields.get("task", "") for fields in self.town.events_since(since, "task_requeued")]
        here = {agent.name for agent in agents}
        report.requeued = [task for task, owner in zip(requeued, self.town.task_field(requeued, "agent"))
                           if owner in here]
        report.pending = sum(self.town.queued_counts(agents).values())  # by id: the states are not read
        waiting = self.town.coordination.waiting_counts()
        report.waiting = waiting.get("", 0) + sum(waiting.get(agent.id, 0) for agent in agents)
        self.town.hosts.release(self.host)  # stopped, not lost: its agents wait for it
        self.town.record_supervisor_stopped()

    def _refused(self, exc: RespError) -> None:
        if not self.disk_full:
            self.say(f"disk full: Redis refuses writes ({exc}); the town keeps what it has and tries again")
        self.disk_full = True

    def _retrying(self, call, attempts: int = 3):
        """call() against Redis; if the connection breaks (redis-server died while the town
        stops), reconnect, starting the server again if need be, and try again. A write Redis
        refuses for a full disk is let go: a start or a stop must not die of it."""
        for attempt in range(attempts):
            try:
                return call()
            except RespConnectionError as exc:  # (first: it is a RespError too)
                if attempt == attempts - 1:
                    raise
                self.say(f"lost Redis ({exc}); reconnecting")
                self._redis_lost()
            except RespError as exc:
                if not disk_full(exc):
                    raise
                self._refused(exc)
                return None

    def _stop_adopted(self, grace: float = ADOPTED_STOP_GRACE) -> None:
        """A CLI's helper that left its group (setsid, a double fork: a server, a gpg-agent) outlived
        its CLI and became ours as subreaper: `tt stop` leaves nothing running, but asks first."""
        leftovers = adopted(self._own_children())
        if not leftovers:
            return
        kill_with_group(leftovers, signal.SIGTERM)
        gone = set()

        def all_gone() -> bool:
            gone.update(reap_adopted(self._own_children()))
            return gone.issuperset(leftovers)

        if not wait_until(all_gone, grace):
            kill_with_group([pid for pid in leftovers if pid not in gone], signal.SIGKILL)
            wait_until(all_gone, 2.0)
        self.say(f"stopped {len(leftovers)} process(es) the agents' tasks had left running")

    def _write_report(self, report: StopReport) -> None:
        path = self.config.last_stop_file
        data = {"stopped": report.stopped, "killed": report.killed, "requeued": report.requeued,
                "pending": report.pending, "waiting": report.waiting, "at": time.time()}
        path.write_text(json.dumps(data))

    def _kill_everything(self) -> None:
        """On an unexpected supervisor error: leave no runner or CLI behind."""
        for proc in self.procs.values():
            killpg(proc.pid, signal.SIGKILL)
            try:  # the CLI has a session of its own: its helpers are not in the runner's group
                self._kill_cli(proc.agent_id)
            except Exception:  # noqa: BLE001 - Redis may be what failed
                pass
            try:
                os.waitpid(proc.pid, 0)
            except ChildProcessError:
                pass
        self.procs.clear()
        kill_with_group(adopted(self._own_children()), signal.SIGKILL)  # orphaned CLIs, ours as subreaper


def reap_runners(procs: dict[str, RunnerProc]) -> list[tuple[RunnerProc, int]]:
    """Collect the runners that exited, removing them from `procs`; (runner, waitpid status) each.

    Exited children are looked at first without being collected (waitid WNOWAIT), so 50 runners
    stopping cost 50 calls, not one waitpid per runner for each of 50 wakeups. An exited child that
    is not a runner (redis-server, an adopted orphan) is left to its owner, and the runners are
    then asked one by one."""
    by_pid = {proc.pid: proc for proc in procs.values()}
    found = []
    while by_pid:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break
        if info is None:
            return found  # nothing else has exited
        proc = by_pid.pop(info.si_pid, None)
        if proc is None:
            break  # not a runner: leave it, and ask the runners one by one
        status = reap(proc.pid)
        del procs[proc.agent_id]
        found.append((proc, 0 if status is None else status))
    for pid, proc in by_pid.items():
        status = reap(pid)
        if status is not None:
            del procs[proc.agent_id]
            found.append((proc, status))
    return found


def describe_status_code(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    return f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"


def main(argv: list[str] | None = None) -> int:
    """`python -m tinytown.supervisor.daemon ROOT [--ready-fd N]`: how `tt spawn` starts a background supervisor."""
    import argparse

    from .config import load
    parser = argparse.ArgumentParser(prog="tt-supervisor")
    parser.add_argument("root")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--host")
    args = parser.parse_args(argv)
    try:
        config = load(args.root)
        return Supervisor(config, ready_fd=args.ready_fd, host=args.host).serve()
    except TinytownError as exc:
        print(f"tt supervisor: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    exit_now(main())
