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
from dataclasses import dataclass, field

from . import lock
from .config import Config, ensure_runtime_dir
from .control import ControlChannel
from .errors import TinytownError
from .agent_log import tail_text
from .models import AgentState, InvalidTransition, Message, TaskState
from .procutil import (adopted, become_subreaper, close_on_exec_all, describe_status, drain, exit_now,
                       kill_leftovers, kill_with_group, killpg, reap, reap_adopted, set_parent_death_signal,
                       set_process_name, signal_wakeup_pipe, wait_exit, wait_until)
from .redis_server import RedisServer
from .resp import RespConnectionError
from .resp import connect as resp_connect
from .runner import KILL_WAIT_SECONDS, run_forked
from .town import Claimed, Town, host

# How long `tt stop` gives a process a task left running (a server, a gpg-agent) after SIGTERM.
ADOPTED_STOP_GRACE = 2.0


@dataclass
class RunnerProc:
    agent_id: str
    name: str
    pid: int
    started_at: float
    stop_requested: bool = False


@dataclass
class Health:
    """Restart bookkeeping for one agent, kept in memory by the supervisor."""

    fast_failures: int = 0
    next_start: float = 0.0     # monotonic time before which a backoff agent is not restarted
    gave_up: bool = False


@dataclass
class StopReport:
    stopped: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    pending: int = 0


class Supervisor:
    def __init__(self, config: Config, say=None, ready_fd: int | None = None):
        self.config = config
        self.policy = config.supervisor
        self._say = say or (lambda text: print(text, flush=True))
        self.ready_fd = ready_fd
        self.procs: dict[str, RunnerProc] = {}
        self.exited: list[tuple[RunnerProc, int]] = []  # reaped runners whose exit is not yet recorded
        self.again = False  # a pass cut short by a lost Redis: run the next one at once
        self.health: dict[str, Health] = {}
        self.stop_mode: str | None = None
        self.redis = RedisServer(config)
        self.lock_fd: int | None = None

    def say(self, text: str) -> None:
        """Tell the user; if the terminal is gone (SIGHUP is ignored), go on in .tt/supervisor.log."""
        try:
            self._say(text)
        except OSError:
            fd = os.open(self.config.runtime_dir / "supervisor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
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
            self._install_signals()
            become_subreaper()
            close_on_exec_all()
            leftover = kill_leftovers(self.config.log_dir, self.config.root)  # a SIGKILLed supervisor's
            if leftover:
                self.say(f"killed {len(leftover)} process(es) left by the previous supervisor")
            self.redis.start()
            self.town = Town(self.config, resp_connect(self.config, long_lived=True))  # (not redis-py: see resp.py)
            self.town.r.hset(self.town.keys.supervisor, mapping={
                "pid": os.getpid(), "host": host(), "state": "running", "started_at": f"{time.time():.6f}",
                "stop": "", "root": str(self.config.root)})
            self.control = ControlChannel(self.config, self.town.keys.control)
            self.control.connect()
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.wake_r, selectors.EVENT_READ)
            self.selector.register(self.control, selectors.EVENT_READ)
            where = self.config.redis_socket if self.config.use_socket else f"port {self.config.redis_port}"
            self.say(f"town {self.config.name}: supervisor pid {os.getpid()}, redis-server pid {self.redis.pid} on {where}")
            self._reconcile()
            self._notify_ready(f"ok {os.getpid()}")
            self._loop()
            report = self._shutdown()
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

    def _on_stop_signal(self, *_):
        # SIGTERM/SIGINT = `tt stop`; a second one while stopping = `tt stop --now`
        self.stop_mode = "now" if self.stop_mode else "graceful"

    # --- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while self.stop_mode is None:
            timeout = 0 if self.again else self._next_timer()
            self.again = False
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.control:
                    if not self.control.drain():
                        self._redis_lost()
                else:
                    drain(self.wake_r)
            try:
                self._reap()
                requested = self._requested_stop()
                if requested:
                    self.stop_mode = requested
                if self.stop_mode is None:
                    self._reconcile()
            except RespConnectionError as exc:
                # redis-server went away under a command: start it again (its append-only file
                # keeps the town); what this pass did not finish, the next one redoes.
                self.say(f"lost Redis ({exc}); reconnecting")
                self._redis_lost()
                self.again = True
                time.sleep(0.01)  # (a Redis that is up but refuses us must not make this spin)

    def _next_timer(self) -> float | None:
        waits = [h.next_start for h in self.health.values() if h.next_start and not h.gave_up]
        if not waits:
            return None
        return max(0.0, min(waits) - time.monotonic())

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

    # --- reconcile ---------------------------------------------------------------------------
    def _reconcile(self) -> None:
        agents = self.town.agents()
        cap = self.config.max_agents
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
            if agent.id in self.procs:
                continue
            if len(self.procs) >= cap:  # one held back is still exiting: start this one when it has
                break
            health = self.health.setdefault(agent.id, Health())
            if agent.state == AgentState.FAILED.value:
                health.gave_up = True
                continue
            if agent.state == AgentState.STARTING.value and (health.gave_up or health.next_start > now):
                self.health[agent.id] = health = Health()  # `tt restart` clears the record
            if health.next_start > now:
                continue
            health.next_start = 0.0
            try:
                self._start_runner(agent.id, agent.name)
            except (InvalidTransition, ValueError) as exc:  # a record edited by hand: not the whole town
                self.say(f"agent {agent.name} not started: {exc}")

    def _start_runner(self, agent_id: str, name: str) -> None:
        self.town.set_agent_state(agent_id, AgentState.STARTING, pid="", cli_pid="", current_task="",
                                  restart_at="")
        log_path = self.config.log_file(name)
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
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
            run_forked(self.config, agent_id, log_path)
            os._exit(70)  # not reached
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        self.procs[agent_id] = RunnerProc(agent_id, name, pid, time.monotonic())
        self.town.r.hset(self.town.keys.agent(agent_id), "pid", pid)
        self.say(f"runner {name} started (pid {pid})")

    def _signal_runner(self, proc: RunnerProc, sig: int) -> None:
        proc.stop_requested = True
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    # --- exits and restart policy --------------------------------------------------------------
    def _reap(self) -> None:
        for agent_id, proc in list(self.procs.items()):
            status = reap(proc.pid)
            if status is None:
                continue
            del self.procs[agent_id]
            self.exited.append((proc, status))
        while self.exited:  # one at a time: one a lost Redis cut short is done again next pass
            proc, status = self.exited[0]
            if proc.agent_id not in self.procs:  # (else it was restarted before Redis went)
                self._runner_exited(proc, status)
            self.exited.pop(0)
        if self.redis.proc and self.redis.proc.poll() is not None and self.stop_mode is None:
            self._redis_lost()
        reap_adopted(self._own_children())

    def _kill_cli(self, agent_id: str) -> None:
        """SIGKILL the process group of the CLI the agent's record names (it leads a session of its
        own, so a runner's group does not hold it)."""
        cli_pid = self.town.r.hget(self.town.keys.agent(agent_id), "cli_pid")
        killpg(int(cli_pid) if cli_pid else None, signal.SIGKILL)

    def _own_children(self) -> set[int]:
        """The runners and redis-server: every other child is an orphan adopted as subreaper."""
        known = {proc.pid for proc in self.procs.values()}
        if self.redis.proc is not None:
            known.add(self.redis.proc.pid)
        return known

    def _runner_exited(self, proc: RunnerProc, status: int) -> None:
        agent_key = self.town.keys.agent(proc.agent_id)
        self._kill_cli(proc.agent_id)  # the runner died mid-task: its CLI's whole group goes too
        # and a CLI it started but had not yet recorded, now ours as subreaper (what earlier tasks
        # left running, a gpg-agent or an ssh master, is not this task's: it stays)
        running = {c.message.task_id for c in self.town.inflight(proc.agent_id) if c.message.task_id}
        if running:
            kill_with_group(adopted(self._own_children(), running), signal.SIGKILL)
        # What it had claimed waits at the front of the inbox (a failed agent's work shows as
        # pending, not as running) for the next runner, which counts the attempt.
        self.town.put_back_inflight(proc.agent_id)
        if proc.stop_requested:
            if self.town.r.exists(agent_key):
                self.town.set_agent_state(proc.agent_id, AgentState.STOPPED, pid="", cli_pid="")
            self.say(f"runner {proc.name} stopped")
            return
        if not self.town.r.exists(agent_key):
            return
        health = self.health.setdefault(proc.agent_id, Health())
        uptime = time.monotonic() - proc.started_at
        if uptime >= self.policy.start_seconds:
            health.fast_failures = 0
        health.fast_failures += 1
        tail = tail_text(self.config.log_file(proc.name))
        reason = f"runner {describe_status(status)} after {uptime:.1f}s" + (f"; last output: {tail}" if tail else "")
        if health.fast_failures >= self.policy.max_fast_failures:
            health.gave_up = True
            self.town.set_agent_state(proc.agent_id, AgentState.FAILED, pid="", cli_pid="",
                                      current_task="", reason=reason, restart_at="")
            self.say(f"runner {proc.name} failed {health.fast_failures} times in a row; giving up ({reason})")
            self._event("agent_failed", agent=proc.name, reason=reason)
            return
        delay = 0.0 if health.fast_failures == 1 else min(
            self.policy.backoff_max, self.policy.backoff_first * self.policy.backoff_factor ** (health.fast_failures - 2))
        self.town.r.hincrby(agent_key, "restarts", 1)
        self._event("agent_restarting", agent=proc.name, reason=reason, delay=f"{delay:.3f}")
        if delay <= 0:
            self.say(f"runner {proc.name} exited ({describe_status(status)}); restarting")
            self._start_runner(proc.agent_id, proc.name)
            return
        health.next_start = time.monotonic() + delay
        self.town.set_agent_state(proc.agent_id, AgentState.BACKOFF, pid="", cli_pid="", reason=reason,
                                  restart_at=f"{time.time() + delay:.6f}")
        self.say(f"runner {proc.name} exited ({describe_status(status)}); restarting in {delay:.2f}s")

    def _event(self, kind: str, **fields) -> None:
        pipe = self.town.r.pipeline()
        self.town._event(pipe, kind, **fields)
        pipe.execute()

    # --- stop ----------------------------------------------------------------------------------
    def _shutdown(self) -> StopReport:
        mode = self.stop_mode or "graceful"
        self.say(f"stopping ({mode})")
        report = StopReport()
        self._retrying(lambda: self.town.r.hset(self.town.keys.supervisor, "state", "stopping"))
        since = self._retrying(lambda: self.town.r.xadd(self.town.keys.events, {"type": "town_stopping", "mode": mode}))
        # While a runner lives, the agent's state is its own to write (it says `stopping` when it
        # gets the signal): a write from here could race with it recording a finished task.
        sig = signal.SIGUSR1 if mode == "now" else signal.SIGTERM
        # Every runner gets its signal before the first exit interrupts the loop (SIGCHLD is
        # held back meanwhile; the wakeup pipe still hears of it once unblocked).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            for proc in self.procs.values():
                self._signal_runner(proc, sig)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        grace = 0.0 if mode == "now" else self.policy.stop_grace
        deadline = time.monotonic() + grace + KILL_WAIT_SECONDS + 3.0
        nudged = True  # look for a `tt stop --now` once before the first wait
        unmarked: list[str] = []  # reaped, not yet recorded: one write for many, not one per wakeup
        mark_at = time.monotonic() + 0.1
        while self.procs and time.monotonic() < deadline:
            wait = deadline - time.monotonic()
            if unmarked:
                wait = min(wait, mark_at - time.monotonic())
            for key, _ in self.selector.select(max(0.0, wait)):
                if key.fileobj is self.control:
                    self.control.drain()
                    nudged = True
                else:
                    drain(self.wake_r)
            for agent_id, proc in list(self.procs.items()):
                if reap(proc.pid) is not None:
                    del self.procs[agent_id]
                    report.stopped.append(proc.name)
                    unmarked.append(agent_id)
            if unmarked and (not self.procs or time.monotonic() >= mark_at):
                self._retrying(lambda: self._mark_stopped(*unmarked))
                unmarked = []
                mark_at = time.monotonic() + 0.1
            # `tt stop --now` writes the request and then publishes on the control channel
            asked_now = nudged and self._retrying(self._requested_stop) == "now"
            nudged = False
            if mode != "now" and (self.stop_mode == "now" or asked_now):
                # `tt stop --now` (or a second Ctrl+C) during a graceful stop: skip the grace period
                mode = self.stop_mode = "now"
                self.say("stopping now")
                for proc in self.procs.values():
                    self._signal_runner(proc, signal.SIGUSR1)
                deadline = min(deadline, time.monotonic() + KILL_WAIT_SECONDS + 3.0)
        self._retrying(lambda: self._mark_stopped(*unmarked))
        for proc in self.procs.values():  # past every deadline: no mercy
            killpg(proc.pid, signal.SIGKILL)
            self._retrying(lambda: self._kill_cli(proc.agent_id))
            os.waitpid(proc.pid, 0)
            report.killed.append(proc.name)
            self._retrying(lambda: self._mark_stopped(proc.agent_id))
        self.procs.clear()
        self._stop_adopted()
        self._retrying(lambda: self._record_stop(report, since))
        self.say(f"stopped {len(report.stopped) + len(report.killed)} runner(s); "
                 f"{len(report.requeued)} task(s) re-queued; {report.pending} waiting")
        return report

    def _record_stop(self, report: StopReport, since: str) -> None:
        agents = self.town.agents()
        self._mark_stopped(*[agent.id for agent in agents  # those in backoff, or never started
                             if agent.state not in (AgentState.FAILED.value, AgentState.STOPPED.value)])
        events = self.town.r.xrange(self.town.keys.events, min=since)
        report.requeued = [fields.get("task", "") for _id, fields in events if fields.get("type") == "task_requeued"]
        report.pending = sum(self.town.pending_counts(agents).values())  # by id: the states are not read
        self.town.r.hset(self.town.keys.supervisor, mapping={"state": "stopped", "stop": "", "pid": ""})

    def _retrying(self, call, attempts: int = 3):
        """call() against Redis; if the connection breaks (redis-server died while the town
        stops), reconnect, starting the server again if need be, and try again."""
        for attempt in range(attempts):
            try:
                return call()
            except RespConnectionError as exc:
                if attempt == attempts - 1:
                    raise
                self.say(f"lost Redis ({exc}); reconnecting")
                self._redis_lost()

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

    def _mark_stopped(self, *agent_ids: str) -> None:
        """Record agents as stopped, and put back what their runners claimed but never started
        (a runner stopped while idle exits without writing anything): two round trips for any
        number of agents, so 50 runners stop in one go."""
        if not agent_ids:
            return
        reads = self.town.r.pipeline(transaction=False)
        for agent_id in agent_ids:
            reads.hget(self.town.keys.agent(agent_id), "state")
            reads.lrange(self.town.keys.inflight(agent_id), 0, -1)
        found = reads.execute()
        pipe = self.town.r.pipeline(transaction=False)
        for agent_id, old, inflight in zip(agent_ids, found[::2], found[1::2]):
            if old is not None:  # no record: the agent was removed
                self.town.set_agent_state(agent_id, AgentState.STOPPED, pipe=pipe, old=old, pid="", cli_pid="",
                                          current_task="", restart_at="")
            for raw in inflight:  # claimed as the stop came (rare)
                self._put_back_unstarted(agent_id, raw)
        pipe.execute()

    def _put_back_unstarted(self, agent_id: str, raw: str) -> None:
        try:
            claimed = Claimed(raw, Message.decode(raw))
            # assigned: claimed as the stop came; running: its runner died under it (or was killed
            # past every deadline), which counts as an attempt
            if self.town.task(claimed.message.task_id).state in (TaskState.ASSIGNED.value, TaskState.RUNNING.value):
                self.town.requeue(agent_id, claimed)
        except (TinytownError, ValueError, TypeError):
            pass  # not a task we can put back: the next runner's recovery decides

    def _requested_stop(self) -> str | None:
        return self.town.r.hget(self.town.keys.supervisor, "stop") or None

    def _write_report(self, report: StopReport) -> None:
        path = self.config.runtime_dir / "last-stop.json"
        data = {"stopped": report.stopped, "killed": report.killed, "requeued": report.requeued,
                "pending": report.pending, "at": time.time()}
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
    args = parser.parse_args(argv)
    try:
        config = load(args.root)
        return Supervisor(config, ready_fd=args.ready_fd).serve()
    except TinytownError as exc:
        print(f"tt supervisor: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    exit_now(main())
