"""One runner per agent: wait on the inbox, run the model CLI for each task, record the outcome.

The runner is forked from the supervisor (already-imported modules make this ~1 ms, where a fresh
interpreter costs ~150 ms). It blocks in BLMOVE (inbox -> in-flight), so a task starts within one
Redis hop, and a task whose runner dies stays in the in-flight list to be re-delivered.

Signals from the supervisor: SIGTERM = finish the current task (within stop_grace) then exit;
SIGUSR1 = stop now (also sent by the kernel if the supervisor dies): the CLI is killed and its
task put back at the front of the inbox.
"""
from __future__ import annotations

import gc
import os
import select
import signal
import sys
import time
from pathlib import Path

from .config import Config
from .errors import TinytownError
from .agent_log import AgentLog, keep_tail, tail_bytes
from .attach_server import REPLAY_BYTES, AttachServer
from .models import AgentState, TaskState
from .procutil import drain, exit_now, signal_wakeup_pipe
from .pty_session import CliSession
from .resp import RespConnectionError, Sender
from .resp import connect as resp_connect
from .town import OUTPUT_TAIL_BYTES, Claimed, Town

STREAM_FLUSH_SECONDS = 0.02
STREAM_FLUSH_BYTES = 64 * 1024
EXIT_DRAIN_SECONDS = 0.5
KILL_WAIT_SECONDS = 2.0


class _StopNow(Exception):
    """Raised from the signal handler to break out of a blocking inbox wait."""


class Runner:
    def __init__(self, config: Config, agent_id: str):
        self.config = config
        self.agent_id = agent_id
        self.stop_mode: str | None = None       # None, "graceful" or "now"
        self.idle = True                          # a stop signal may interrupt the inbox wait
        self.wake_r = self.wake_w = -1
        self.stream = None                        # resp.Sender for the output stream, on first output

    # --- signals -----------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self.wake_r, self.wake_w = signal_wakeup_pipe()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl+C reaches the supervisor, which decides
        signal.signal(signal.SIGUSR1, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select via the wakeup fd
        # A write to a connection Redis or a viewer closed is an error to handle (EPIPE), not the
        # runner's death. (The CLI gets SIGPIPE back at its default: pty_session.)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_stop(self, signum, _frame) -> None:
        self.stop_mode = "now" if signum == signal.SIGUSR1 else (self.stop_mode or "graceful")
        if self.idle:
            attach = getattr(self, "attach", None)
            if attach is None or not attach.viewers:  # nothing to finish, nobody to tell: just go
                if attach is not None:
                    attach.remove_socket()
                exit_now(0)  # (what run() does on _StopNow, without unwinding a Redis read)
            raise _StopNow()

    # --- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        # No limit on a reply, and 30 s to reconnect: long enough for the supervisor to start
        # redis-server again after it died.
        self.town = Town(self.config, resp_connect(self.config, long_lived=True, retry_for=30.0))
        agent = self.town.agent_by_id(self.agent_id)
        self.name = agent.name
        self.spec = self.config.cli(agent.cli)
        self.task_timeout = agent.task_timeout or self.config.supervisor.task_timeout or None
        self.log = AgentLog(self.config, self.name)
        self.prompt_dir = self.config.runtime_dir / "prompts"
        self.prompt_dir.mkdir(mode=0o700, exist_ok=True)
        self.base_env = self._cli_env()
        self.attach = self._serve_attach()
        heartbeat = self.config.supervisor.heartbeat_interval
        try:
            self.idle = False  # from here a stop signal only sets stop_mode; the loop checks it
            self.town.set_agent_state(self.agent_id, AgentState.IDLE, pid=os.getpid(), current_task="",
                                      cli_pid="", reason="", restart_at="", heartbeat_at=f"{time.time():.6f}")
            self._recover_inflight()
            while self.stop_mode is None:
                self.idle = True
                if self.stop_mode is not None:  # a signal between the check above and idle = True
                    break
                try:
                    claimed = self.town.claim(self.agent_id, heartbeat)
                except RespConnectionError:
                    # redis-server went away during the wait. The move may have happened before
                    # the reply was lost, so look in the in-flight list once Redis is back.
                    self.idle = False
                    self._wait_for_redis()
                    self._recover_inflight()
                    continue
                self.idle = False
                if claimed is None:
                    self.town.heartbeat(self.agent_id)
                    continue
                if self.stop_mode is not None:  # claimed as the stop came: _exit_cleanly puts it back
                    break
                self._handle(claimed)
        except _StopNow:
            # Stopped while waiting on the inbox, so nothing to finish or record here. The read
            # the signal interrupted took this runner's Redis connection down, and 50 runners
            # reconnecting at once to write what the supervisor writes anyway made `tt stop` slow;
            # the supervisor marks the agent stopped and puts back a message claimed as the stop
            # came (and if the supervisor is gone, the next runner re-delivers it).
            if self.attach.viewers:  # only tell those watching why the terminal went away
                self.attach.close()
            else:
                self.attach.remove_socket()
            return 0
        self.idle = False
        self._exit_cleanly()
        self.attach.close()
        return 0

    def _cli_env(self) -> dict[str, str]:
        """The environment every CLI of this agent starts with (TT_TASK_ID is added per task)."""
        env = dict(os.environ)
        env.update(dict(self.spec.env))
        env.update({"TT_TOWN": self.config.name, "TT_TOWN_DIR": str(self.config.root), "TT_AGENT": self.name,
                    "TT_AGENT_ID": self.agent_id})
        env.setdefault("TERM", "xterm-256color")
        return env

    def _serve_attach(self) -> AttachServer:
        """`tt attach` for this agent, replaying the log's end to the first viewers after a restart."""
        server = AttachServer(self.config.attach_socket(self.name), self.name,
                              tail_bytes(self.log.path, REPLAY_BYTES))
        try:
            server.start()
        except (OSError, TinytownError) as exc:  # the agent works on without attach
            print(f"tt runner: cannot serve attach: {exc}", file=sys.stderr)
        return server

    def _wait_for_redis(self, timeout: float = 30.0) -> None:
        """Until Redis answers again (its supervisor restarts it); RespConnectionError past `timeout`.
        A connection made while the dead server's socket still stood may be reset at once: retry."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.town.r.ping()
                return
            except RespConnectionError:
                if time.monotonic() > deadline or self.stop_mode is not None:
                    raise
                time.sleep(0.02)

    def _recover_inflight(self) -> None:
        """Re-deliver what a previous runner of this agent had in flight when it died and no
        supervisor was there to put it back in the inbox (the supervisor itself was killed)."""
        for claimed in self.town.inflight(self.agent_id):
            if self.stop_mode is not None:
                return
            self._handle(claimed)

    def _handle(self, claimed: Claimed) -> None:
        message = claimed.message
        if message.type != "TaskAssign":
            self.town.drop_message(self.agent_id, claimed)
            return
        task, agent_state = self.town.claimed_task(self.agent_id, message.task_id)
        if task is None or TaskState(task.state).terminal:  # gone, cancelled while waiting, or finished
            self.town.drop_message(self.agent_id, claimed)
            return
        # A stop gives its attempt back, so on an unfinished task `attempts` counts the runs whose
        # runner died under them: enough of those and the task is the likely cause.
        if task.attempts >= self.config.supervisor.max_attempts:
            reason = f"agent crashed {task.attempts} times"
            self.log.note(f"task {task.id} failed: {reason}")
            self.town.finish_task(self.agent_id, claimed, TaskState.FAILED, reason=reason,
                                  output=task.output.encode("utf-8", "surrogateescape"))
            return
        self._run_task(claimed, task.id, task.description, task, agent_state)

    def _run_task(self, claimed: Claimed, task_id: str, description: str, task=None, agent_state=None) -> None:
        env = dict(self.base_env)
        env["TT_TASK_ID"] = task_id
        session = CliSession(self.spec, description.encode("utf-8", "surrogateescape"),
                             self.prompt_dir / f"{task_id}.prompt", self.config.root, env)
        # The CLI starts first and the task is marked running (with the CLI's pid) right after,
        # in one transaction: the round trip is not between the task's arrival and its start. A
        # runner dying in between leaves the task `assigned` in flight, to be delivered again,
        # and its CLI to the supervisor, which adopts and kills it.
        try:
            session.start()
            session.start_reader()
        except (TinytownError, OSError, RuntimeError) as exc:  # (no fd or thread left for the reader)
            self.town.start_task(self.agent_id, task_id, task=task, agent_state=agent_state)
            self.log.note(f"task {task_id} failed: {exc}")
            self.town.finish_task(self.agent_id, claimed, TaskState.FAILED, exit_code=None, reason=str(exc))
            session.close()
            return
        self.town.start_task(self.agent_id, task_id, task=task, agent_state=agent_state, cli_pid=session.pid)
        self.log.note(f"task {task_id} started")
        self.attach.task_started(task_id, session)
        try:
            outcome = self._pump(session, task_id)
        finally:
            self.attach.task_ended()  # viewers' keystrokes stop before the pty closes
            session.close()
        if outcome == "requeue":
            self.log.note(f"task {task_id} interrupted by stop; back in the inbox")
            self.town.requeue(self.agent_id, claimed, give_back_attempt=True)
            self.town.set_agent_state(self.agent_id, AgentState.STOPPING, current_task="", cli_pid="")
            return
        after = AgentState.STOPPING if self.stop_mode else AgentState.IDLE
        tail = bytes(self.tail)
        if outcome == "timeout":
            reason = f"timed out after {self.task_timeout:g}s"
            state, code = TaskState.FAILED, None
        elif session.signal:
            reason, state, code = session.outcome(), TaskState.FAILED, -session.signal
        else:
            code = session.exit_code
            state = TaskState.COMPLETED if code == 0 else TaskState.FAILED
            reason = "" if code == 0 else session.outcome()
        self.log.note(f"task {task_id} {state.value}" + (f": {reason}" if reason else ""))
        self.town.finish_task(self.agent_id, claimed, state, exit_code=code, reason=reason, output=tail,
                              agent_state=after)

    def _pump(self, session: CliSession, task_id: str) -> str:
        """Copy the CLI's output to the log, Redis and the task tail until it exits.

        Returns "done", "timeout" or "requeue" (stopped before it finished).
        """
        self.tail = bytearray()
        pending = bytearray()
        last_flush = time.monotonic()
        started = time.monotonic()
        next_beat = started + self.config.supervisor.heartbeat_interval
        grace_deadline = kill_deadline = None
        stream_key = self.town.keys.output(self.agent_id)
        maxlen = self.config.logs.stream_maxlen
        exited = timed_out = eof = False
        drain_deadline = None  # once the CLI has exited: how long its last output may take to arrive
        reader = session.reader
        fds = [reader.notify_r, self.wake_r]
        while True:
            now = time.monotonic()
            # -- decide on stop/timeout
            if self.stop_mode == "now" and kill_deadline is None:
                kill_deadline = now + KILL_WAIT_SECONDS
                session.kill_group(signal.SIGTERM)
            elif self.stop_mode == "graceful" and grace_deadline is None:
                grace_deadline = now + self.config.supervisor.stop_grace
                self.town.set_agent_state(self.agent_id, AgentState.STOPPING)  # `tt status` shows the wait
            if grace_deadline is not None and now >= grace_deadline and kill_deadline is None:
                self.stop_mode = "now"
                continue
            if self.task_timeout and now - started >= self.task_timeout and kill_deadline is None:
                session.kill_group(signal.SIGTERM)
                kill_deadline = now + KILL_WAIT_SECONDS
                timed_out = True
            if kill_deadline is not None and now >= kill_deadline:
                session.kill_group(signal.SIGKILL)
            timeouts = [next_beat - now, STREAM_FLUSH_SECONDS if pending else 3600]
            for deadline in (grace_deadline, kill_deadline, drain_deadline):
                if deadline is not None:
                    timeouts.append(deadline - now)
            if self.task_timeout and kill_deadline is None:
                timeouts.append(started + self.task_timeout - now)
            try:
                ready, _, _ = select.select(fds, [], [], max(0.0, min(timeouts)))
            except InterruptedError:
                ready = []
            if self.wake_r in ready:
                drain(self.wake_r)
            chunks, eof = reader.take()  # one log write, one hand-over to attach per batch
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.log.write(data)
                self.attach.output(data)
                keep_tail(self.tail, data, OUTPUT_TAIL_BYTES)
                pending += data
            now = time.monotonic()
            if pending and (len(pending) >= STREAM_FLUSH_BYTES or now - last_flush >= STREAM_FLUSH_SECONDS or eof):
                self._stream_add(stream_key, task_id, pending, maxlen)
                pending.clear()
                last_flush = now
            if now >= next_beat:
                self.town.heartbeat(self.agent_id)
                next_beat = now + self.config.supervisor.heartbeat_interval
            if not exited and (eof or not chunks):  # no waitpid per batch while output flows
                exited = session.poll()
                if exited and not eof:
                    # What it printed last may still be in the pty, and a helper of its group may
                    # hold the terminal open: the group goes now (close() would kill it anyway),
                    # and its output is read to the terminal's end.
                    session.kill_group(signal.SIGKILL)
                    drain_deadline = now + EXIT_DRAIN_SECONDS
            if exited and (eof or now >= drain_deadline):
                # (past the deadline: a helper that left the CLI's session holds the terminal;
                # the reader thread is let go, to end at that helper's next write or exit)
                if pending:
                    self._stream_add(stream_key, task_id, pending, maxlen)
                self._stream_flush()
                if kill_deadline is not None:
                    return "timeout" if timed_out else "requeue"
                return "done"
            if eof:
                fds = [self.wake_r]  # output closed; wait for the exit status

    def _stream_add(self, key: str, task_id: str, data: bytearray, maxlen: int) -> None:
        """Output into the agent's Redis stream without waiting for Redis (resp.Sender): the pump
        goes back to reading the pty at once."""
        if self.stream is None:
            self.stream = Sender(resp_connect(self.config))
        try:
            view = memoryview(data)
            for start in range(0, len(view), STREAM_FLUSH_BYTES):  # entries of 64 KiB at most: the
                piece = bytes(view[start:start + STREAM_FLUSH_BYTES])  # stream's size is maxlen x that
                self.stream.send("XADD", key, "MAXLEN", "~", maxlen, "*", "task", task_id, "data", piece)
        except RespConnectionError as exc:
            print(f"tt runner: output stream: {exc}", file=sys.stderr)
            self.stream = None

    def _stream_flush(self) -> None:
        """Wait for Redis to have the output (before the task's outcome is written)."""
        if self.stream is None:
            return
        try:
            self.stream.flush()
        except RespConnectionError as exc:
            print(f"tt runner: output stream: {exc}", file=sys.stderr)
            self.stream = None
            return
        if self.stream.errors:
            print(f"tt runner: output stream: {self.stream.errors[-1]}", file=sys.stderr)
            self.stream.errors.clear()

    def _exit_cleanly(self) -> None:
        """Put back anything claimed but not started, and say we stopped."""
        try:
            for claimed in self.town.inflight(self.agent_id):
                try:
                    state = self.town.task(claimed.message.task_id).state
                except TinytownError:
                    continue
                if state == TaskState.ASSIGNED.value:
                    self.town.requeue(self.agent_id, claimed)
            self.town.set_agent_state(self.agent_id, AgentState.STOPPING, current_task="", cli_pid="")
        except Exception as exc:  # Redis may already be going down with the supervisor
            print(f"tt runner: could not record stop: {exc}", file=sys.stderr)


def run_forked(config: Config, agent_id: str, log_path: Path) -> None:
    """Entry point in the forked child: never returns into the supervisor's code."""
    code = 1
    # Everything inherited from the supervisor lives as long as the runner: out of the collector's
    # sight, a full collection no longer walks every imported module (ms of pause in the middle of
    # a task) nor writes to their pages (which would unshare them from the supervisor's).
    gc.freeze()
    try:
        code = Runner(config, agent_id).run()
    except BaseException as exc:  # noqa: BLE001 - the runner's last word goes to the agent log
        import traceback
        traceback.print_exc()
        print(f"tt runner: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        exit_now(code)
