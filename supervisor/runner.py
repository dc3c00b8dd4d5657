"""One runner per agent: wait on the inbox, run the model CLI for each task, record the outcome.

The runner is forked from the supervisor (already-imported modules make this ~1 ms, where a fresh
interpreter costs ~150 ms). It blocks in BLMOVE (inbox -> in-flight), so a task starts within one
Redis hop, and a task whose runner dies stays in the in-flight list to be re-delivered.

Signals from the supervisor: SIGTERM = finish the current task (within stop_grace) then exit;
SIGHUP = finish the current task, however long it takes, then exit (`tt interrupt`, `tt close`);
SIGUSR1 = stop now (also sent by the kernel if the supervisor dies): the CLI is killed and its
task put back at the front of the inbox, unless it finished meanwhile (exit code 0): an outcome
that exists is recorded, so no task runs twice. With nothing to finish (waiting on the inbox, or
for a Redis that went away) a stop is answered at once. SIGUSR2 = `tt cancel` asked for the
running task (the reason is on the task's record, `cancel_request`): its CLI's group is stopped
(SIGTERM, SIGKILL after stop_grace) and the task recorded cancelled, output kept.

Between claiming a task and starting its CLI the runner `begin`s it (supervisor/coordination.py):
the notes left for the agent move into the task's record, and the prompt is composed from them, the
user's text and the dependencies' outputs (supervisor/prompt_blocks.py).

Output goes to the log, the attach viewers, the task's tail and a Redis stream (past a rate, only
the newest of a flood: supervisor/stream_budget.py). A log that cannot
be written (a full disk, a file-size limit, a rotation that fails) costs the log, not the task: the
agent carries a warning (`tt status`) until a write succeeds again.
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .config import Config, root_caveat
from .errors import TinytownError
from .hosts import FENCED_EXIT, Fenced, fencing
from .agent_log import AgentLog, in_pieces, keep_tail_of, tail_bytes
from .attach_server import REPLAY_BYTES, AttachServer
from .models import AgentState, InvalidTransition, StopMode, TaskState
from .output_watch import Notice, OutputWatch
from .procutil import drain, exit_now, signal_wakeup_pipe
from .prompt_blocks import compose
from .pty_session import CliSession, CliUnusable
from .remote_attach import RemoteInput
from .resp import RespConnectionError, RespError, Sender, disk_full
from .resp import connect as resp_connect
from .stream_budget import StreamBudget, gap_line
from .town import OUTPUT_TAIL_BYTES, WORK_NOT_HERE, Claimed, Town, agent_workspace
from .workspace import Carried, WorkNotHere, WorkspaceError
from .workspace_remote import bring_here, push_head

STREAM_FLUSH_SECONDS = 0.02
STREAM_FLUSH_BYTES = 64 * 1024
THROTTLED_RECHECK = 0.05    # while a flood is held back from the stream: how often to see if it may go
EXIT_DRAIN_SECONDS = 0.5
REFUSED_RETRY_SECONDS = 1.0  # Redis refuses writes (a full disk): a finished task's outcome is tried again this often
AGENT_FAILED_EXIT = 78      # (sysexits' EX_CONFIG) the runner failed its agent: its CLI cannot run, its work is elsewhere
KILL_WAIT_SECONDS = 2.0
# After a batch of output, the pump lets the next one gather this long (signals and deadlines
# still wake it): a CLI printing flat out then costs a wakeup per ~100 KiB, not per 4 KiB pty
# read, and the reader thread is not held off the GIL by a busy main thread. Output reaches the
# log at most this much later.
BATCH_SECONDS = 0.001
# ... and this long while a flood is held back from the Redis stream and nobody is attached: then
# no reader wants the batches sooner (the log has the output from the pty's reader thread), and
# each wakeup of the main thread during a flood costs the pipeline on 2 cores. Of the bare pty
# loop's rate, 100 MB floods read 0.60 at 1 ms, 0.70-0.74 at 10 ms, 0.79 at 25 ms and 0.84-0.85
# at 50 ms (7 and 9 alternated rounds, 2026-12-02). The reader's queue (pty_reader.QUEUE_BYTES,
# 8 MiB) holds 50 ms of output up to 160 MB/s.
FLOOD_BATCH_SECONDS = 0.05


class _StopNow(Exception):
    """Raised from the signal handler to break out of a wait with nothing to finish."""


class Ending(Enum):
    """How a CLI's run ended, as the pump saw it; _record turns it into the task's state."""

    EXITED = "exited"        # its exit status is the outcome (also when it exited 0 as it was killed)
    TIMED_OUT = "timed out"  # killed at the task timeout
    STOPPED = "stopped"      # killed by a stop before it finished: back in the inbox
    CANCELLED = "cancelled"  # killed by `tt cancel`: recorded cancelled, output kept
    STALLED = "stalled"      # killed as stuck (output_watch: silent, or one line over and over): failed


@dataclass
class PumpClock:
    """The pump's deadlines (time.monotonic()), and how long it may wait for the next one."""

    next_beat: float                    # the agent's heartbeat
    timeout_at: float | None = None     # the task's timeout
    grace_at: float | None = None       # a graceful stop's end: then the CLI is killed
    kill_at: float | None = None        # SIGTERM sent: SIGKILL from then on
    drain_until: float | None = None    # the CLI exited: how long its last output may take to arrive
    flush_at: float | None = None       # output waits for the Redis stream until then
    batch_at: float = 0.0               # the next batch of output is taken from then
    watch_at: float | None = None       # the output watch looks at the silence then (a stall, a question)

    def cli_exited(self, now: float) -> None:
        """The CLI has exited with output perhaps still in its pty: that output may take until
        EXIT_DRAIN_SECONDS to arrive, and is taken as it comes (see batch_taken)."""
        self.drain_until = now + EXIT_DRAIN_SECONDS
        self.batch_at = now

    def batch_taken(self, now: float, gather: float) -> None:
        """The next batch may gather `gather` seconds; not once the CLI has exited: its last
        output ends its task (a flood's 50 ms batches held its end up to 50 ms)."""
        self.batch_at = now if self.drain_until is not None else now + gather

    def wait(self, now: float) -> float:
        """Seconds until the next deadline still ahead (those passed have been acted on)."""
        ahead = [deadline for deadline in (self.next_beat, self.batch_at, self.grace_at, self.kill_at,
                                           self.timeout_at if self.kill_at is None else None,
                                           self.drain_until, self.flush_at,
                                           self.watch_at if self.kill_at is None else None)
                 if deadline is not None and deadline > now]
        return min(ahead) - now if ahead else 3600.0


class Runner:
    def __init__(self, config: Config, agent_id: str, host: str | None = None):
        self.config = config
        self.agent_id = agent_id
        self.host = host or config.host_name()    # the host whose supervisor started it
        self.stop_mode: StopMode | None = None
        self.idle = True                          # nothing to finish: a stop signal may end the wait
        self.cancel_asked = False                 # SIGUSR2 came: read the running task's cancel_request
        self.cancel_reason = ""                   # the running task is being cancelled, for this reason
        self.refused = False                      # Redis refused a heartbeat (a full disk): said in the log
        self.wake_r = self.wake_w = -1
        # Filled in by run(), from the agent's record once Redis answers:
        self.town: Town | None = None
        self.name = ""
        self.spec = None                          # the agent's CliSpec
        self.task_timeout: float | None = None
        self.log: AgentLog | None = None
        self.attach: AttachServer | None = None
        self.prompt_dir = config.prompt_dir
        self.base_env: dict[str, str] = {}        # every CLI's environment (TT_TASK_ID added per task)
        self.warning = ""                         # the agent's warning as last written (the log's state)
        # Per task: the output's last OUTPUT_TAIL_BYTES, and what the Redis stream has not had yet.
        self.tail = bytearray()
        self.tail_cut = False                     # the tail no longer holds the task's whole output
        self.unsent: list[bytes] = []
        self.unsent_bytes = 0
        self.stream: Sender | None = None         # for the output stream, on first output
        self.stream_budget = StreamBudget(time.monotonic())
        self.workspace = None                     # the agent's worktree (workspace.Workspace), if it has one
        self.workdir = config.root                # where its CLI runs: the worktree, or the town folder
        self.watch: OutputWatch | None = None     # what the output says (stalls, questions, failures)
        self.stall_reason = ""                    # the running CLI is stuck: why (it is being stopped)
        # --keep-context: the session the next task continues (the agent's session and session_task).
        self.keep_context = False
        self.session = ""
        self.session_task = ""

    # --- signals -----------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self.wake_r, self.wake_w = signal_wakeup_pipe()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl+C reaches the supervisor, which decides
        signal.signal(signal.SIGUSR1, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_stop)
        signal.signal(signal.SIGUSR2, self._on_cancel)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select via the wakeup fd
        # A write to a connection Redis or a viewer closed is an error to handle (EPIPE), not the
        # runner's death. (The CLI gets SIGPIPE back at its default: pty_session.)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # Past a file-size limit (RLIMIT_FSIZE) a log write fails with EFBIG, which the log
        # survives; the signal's default would end the runner.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def _on_stop(self, signum, _frame) -> None:
        # FINISH (SIGHUP) sets no deadline; a town's stop (SIGTERM) then brings stop_grace back.
        if signum == signal.SIGUSR1:
            self.stop_mode = StopMode.NOW
        elif signum == signal.SIGTERM:
            self.stop_mode = StopMode.GRACEFUL if self.stop_mode in (None, StopMode.FINISH) else self.stop_mode
        else:
            self.stop_mode = self.stop_mode or StopMode.FINISH
        if self.idle:
            attach = self.attach
            if attach is None or not attach.viewers:  # nothing to finish, nobody to tell: just go
                if attach is not None:
                    attach.remove_socket()
                exit_now(0)  # (what run() does on _StopNow, without unwinding a Redis read)
            raise _StopNow()

    def _on_cancel(self, _signum, _frame) -> None:
        """The supervisor relays a `tt cancel` of a task in flight. Only a flag: the pump acts on
        it (the wakeup pipe wakes it); idle, or between claim and start, it waits for the pump's
        first turn, which reads the task's record (so a duplicate or a stale signal does nothing)."""
        self.cancel_asked = True

    # --- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        # No limit on a reply, and 30 s to reconnect: long enough for the supervisor to start
        # redis-server again after it died.
        self.town = Town(self.config, resp_connect(self.config, long_lived=True, retry_for=30.0))
        agent = self.town.agent_by_id(self.agent_id)
        if agent.host and agent.host != self.host:  # moved while this runner was being started
            self._say(f"agent {agent.name} is now on host {agent.host}; this runner exits")
            return FENCED_EXIT
        if fencing(self.config):  # from here its writes hold only while the agent stays placed here
            self.town.fence = (self.host, str(agent.epoch or 0))
        self.name = agent.name
        self.spec = self.config.cli(agent.cli)
        self.watch = OutputWatch(self.spec, agent.answer_pairs())
        self.task_timeout = agent.task_timeout or self.config.supervisor.task_timeout or None
        self.keep_context = bool(agent.keep_context) and self.spec.can_continue
        self.session, self.session_task = agent.session, agent.session_task
        self.workspace = agent_workspace(self.config.root, agent)
        if self.workspace is not None:
            self.workdir = self.workspace.workdir
        self.log = AgentLog(self.config, self.name)
        self.prompt_dir.mkdir(mode=0o700, exist_ok=True)
        self.base_env = self._cli_env()
        self.attach = self._serve_attach()
        RemoteInput(self.config, self.agent_id, self.attach).start()  # `tt attach` from other hosts
        heartbeat = self.config.supervisor.heartbeat_interval
        # A wait on the inbox ends on Redis's side well within a lease: a host paused that long is
        # then no longer waiting there when the reaper puts its tasks back (hosts.py).
        claim_wait = min(heartbeat, self.config.cluster.lease_ttl / 2)
        try:
            self.idle = False  # from here a stop signal only sets stop_mode; the loop checks it
            self.warning = self.log.problem
            self.town.become_idle(self.agent_id, pid=os.getpid(), current_task="", cli_pid="", reason="",
                                  restart_at="", heartbeat_at=f"{time.time():.6f}", warning=self.warning,
                                  question="")
            self._recover_inflight()
            while self.stop_mode is None:
                self.idle = True
                if self.stop_mode is not None:  # a signal between the check above and idle = True
                    break
                # Idle until a message is claimed: the heartbeat and a wait for a Redis that went
                # away are cut short by a stop too (a message moved as the connection broke stays
                # in flight, for the next runner).
                try:
                    claimed = self.town.claim(self.agent_id, claim_wait)
                    if claimed is None:
                        self.town.heartbeat(self.agent_id)
                except RespConnectionError:
                    # redis-server went away during the wait (or is back but still loading its
                    # file: resp.Loading). The move may have happened before the reply was lost,
                    # so look in the in-flight list once Redis answers.
                    self._wait_for_redis()
                    self.idle = False
                    self._recover_inflight()
                    continue
                self.idle = False
                if claimed is None:
                    continue
                if self.stop_mode is not None:  # claimed as the stop came: _exit_cleanly puts it back
                    break
                self._handle(claimed)
        except Fenced as exc:
            # Its host was declared lost while it was paused (or cut off), and the agent placed
            # again: the CLI is gone (session.close), and nothing more is written from here.
            self._note(f"fenced: {exc}")
            self.attach.close()
            return FENCED_EXIT
        except (CliUnusable, WorkNotHere) as exc:
            # Failed until the user acts (the supervisor does not start it again); the backlog
            # work it had taken goes back for other agents, the rest waits, saying why.
            if isinstance(exc, CliUnusable):
                reason = (f"its CLI cannot start: {exc}; fix [agent_clis.{self.spec.name}] (or PATH), "
                          f"then tt restart {self.name}")
            else:
                reason = (f"{WORK_NOT_HERE}: {exc}; its tasks wait until it can be had, then tt restart "
                          f"{self.name} (or tt restart {self.name} --without-latest to go on without it)")
            self._note(reason)
            self.town.fail_agent(self.agent_id, self.name, reason)  # (first: a free agent is offered what goes back)
            self.town.coordination.give_back(self.agent_id, only_backlog=True)
            self.attach.close()
            return AGENT_FAILED_EXIT
        except _StopNow:
            # Stopped while waiting on the inbox (or for Redis), so nothing to finish or record here. The read
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
            self._say(f"cannot serve attach: {exc}")
        return server

    def _wait_for_redis(self, timeout: float = 30.0) -> None:
        """Until Redis answers again (its supervisor restarts it); RespConnectionError past `timeout`.
        A connection made while the dead server's socket still stood may be reset at once: retry.
        The runner is idle meanwhile: a stop ends the wait at once (_on_stop)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.town.r.ping()
                return
            except RespConnectionError:  # (resp.Loading included: back, still reading its file)
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
            if not message.type:
                raw = claimed.raw if isinstance(claimed.raw, str) else claimed.raw.decode("utf-8", "replace")
                self._note(f"dropped an inbox entry that is not a message: {raw[:200]!r}")
            self.town.drop_message(self.agent_id, claimed)
            return
        try:
            self.town.check_fence(self.agent_id)  # before anything of the task is written or run
        except Fenced:
            self.town.unclaim(self.agent_id, claimed)
            raise
        begun = self.town.coordination.begin(self.agent_id, message.task_id)
        if begun.status in ("gone", "finished"):  # gone, cancelled while waiting, or finished
            self.town.drop_message(self.agent_id, claimed)
            return
        task = begun.task
        after = AgentState.STOPPING if self.stop_mode else AgentState.IDLE
        if begun.status == "cancel":  # cancelled while claimed: no CLI, no attempt
            self._note(f"task {task.id} cancelled: {task.cancel_request}")
            self.town.finish_task(self.agent_id, claimed, TaskState.CANCELLED, reason=task.cancel_request,
                                  output=task.output.encode("utf-8", "surrogateescape"), agent_state=after)
            return
        # A stop gives its attempt back, so on an unfinished task `attempts` counts the runs whose
        # runner died under them: enough of those and the task is the likely cause.
        if task.attempts >= self.config.supervisor.max_attempts:
            reason, work = f"agent crashed {task.attempts} times", None
            # What the crashed runs left here: this task's work, committed as such (not where they
            # ran on another host: this worktree's tip is not this task's work, nor the agent's latest)
            if self.workspace is not None and self.workspace.ran_here(task.id):
                reason, work, _ = self._workspace_end(task.id, task.description, TaskState.FAILED, reason)
            self._note(f"task {task.id} failed: {reason}")
            self.town.finish_task(self.agent_id, claimed, TaskState.FAILED, reason=reason,
                                  output=self._streamed_output(task.id), work=work)
            return
        # The user's text byte for byte, with the notes before it and the dependencies' outcomes
        # after it (README, "What Tinytown adds to a prompt").
        prompt = compose(task.description, begun.notes, begun.upstream, self.config.tasks.context_bytes)
        self._run_task(claimed, task.id, prompt, task, begun.agent_state, begun.work)

    def _streamed_output(self, task_id: str) -> bytes:
        """The end of what a task's runs sent to the agent's Redis stream: its output, for a task
        whose runners died under it (none lived to record one). Best effort: what a runner had
        not sent yet when it died is in the log only."""
        from .log_readers import OutputStream
        try:
            client = resp_connect(self.config, decode=False)
            try:
                chunks = OutputStream(client, self.town.keys, {self.name: self.agent_id}, task=task_id).history(None)
            finally:
                client.close()
        except (TinytownError, OSError):  # (the failure is recorded all the same)
            return b""
        return b"".join(chunk for _, chunk in chunks)[-OUTPUT_TAIL_BYTES:]

    def _run_task(self, claimed: Claimed, task_id: str, prompt: bytes, task=None, agent_state=None,
                  latest: tuple[str, str] = ("", "")) -> None:
        env = dict(self.base_env)
        env["TT_TASK_ID"] = task_id
        subject = task.description if task is not None else ""  # the checkpoint commit's
        base = ""
        if self.workspace is not None:
            # Before the CLI: what an interrupted run left is committed, the work this task runs
            # after is merged in. A worktree that cannot be made ready fails the task, no CLI started.
            try:
                dependencies = _ids(task.after if task else "")
                after = self.town.task_heads(dependencies)
                carried = self._work_from_elsewhere(*latest)  # (its own, when it moved hosts)
                fetched = self._bring_carried(carried) + bring_here(  # what other hosts made, from the remote
                    self.workspace, dependencies, after, self.town.task_heads, self.config.workspace.remote,
                    self.config.name)
                begun = self.workspace.begin(task_id, after=after, carried=carried)
                if self.workdir != self.workspace.path:  # (a town in a subfolder: tracked files may not make it)
                    self.workdir.mkdir(parents=True, exist_ok=True)
            except WorkNotHere:  # every task would run without it: the agent fails, this task waits
                self.town.requeue(self.agent_id, claimed)
                raise
            except TinytownError as exc:  # Busy, MergeConflict, WorkspaceError
                self._fail_before_cli(claimed, task_id, task, agent_state, str(exc))
                return
            except OSError as exc:  # (that folder: a file of the branch's in its place, no permission)
                self._fail_before_cli(claimed, task_id, task, agent_state,
                                      f"cannot make {self.workdir}: {exc.strerror or exc}")
                return
            for note in fetched + begun.notes:
                self._note(note)
            base = begun.base
            prompt = _interrupted_line(begun) + prompt
        if self.stop_mode is StopMode.NOW:  # `tt stop --now` or `tt kill` came while it was readied (git)
            self._note(f"task {task_id} not started: stopped before its CLI was; back in the inbox")
            self.town.check_fence(self.agent_id)  # (SIGUSR1 is also its host's death: placed again?)
            self.town.requeue(self.agent_id, claimed)
            return
        spec = self.spec
        if self.keep_context and self.session_task:
            spec = spec.continued(self.session)
            self._note(f"task {task_id} continues the CLI session of task {self.session_task}"
                       + (f" (session {self.session})" if self.session else ""))
        session = CliSession(spec, prompt, self.prompt_dir / f"{task_id}.prompt", self.workdir, env)
        # The CLI starts first and the task is marked running (with the CLI's pid) right after,
        # in one transaction: the round trip is not between the task's arrival and its start. A
        # runner dying in between leaves the task `assigned` in flight, to be delivered again,
        # and its CLI to the supervisor, which adopts and kills it.
        try:
            session.start()
            session.start_reader()
        except CliUnusable:
            # Every task would fail the same way (and an idle agent would drain the backlog so):
            # this one goes back to the front of the queue (never started: no attempt was counted),
            # and the agent fails.
            session.close()
            self.town.requeue(self.agent_id, claimed)
            raise
        except (TinytownError, OSError, RuntimeError) as exc:  # (no fd or thread left for the reader)
            session.close()
            reason, work, _ = self._workspace_end(task_id, subject, TaskState.FAILED, str(exc))
            self._fail_before_cli(claimed, task_id, task, agent_state, reason, base, work)
            return
        try:
            self.town.start_task(self.agent_id, task_id, task=task, agent_state=agent_state, cli_pid=session.pid,
                                 base=base)
            self._note(f"task {task_id} started")
        except BaseException:  # Fenced (placed again while the CLI was starting: it goes, nothing
            session.close()    # recorded), or Redis gone: the runner ends, and the CLI first
            raise
        session.reader.go(self.log.write)  # (after the note: the log has it before the CLI's output)
        self.attach.task_started(task_id, session)
        try:
            ending = self._pump(session, task_id)
        finally:
            self.attach.task_ended()  # viewers' keystrokes stop before the pty closes
            session.close()
        self._record(claimed, task_id, session, ending, subject)

    def _bring_carried(self, carried: list[Carried]) -> list[str]:
        """Fetch the agent's latest work made elsewhere, if this repository lacks it (notes);
        WorkNotHere when it cannot be had."""
        if not carried:
            return []
        try:
            return bring_here(self.workspace, [c.task for c in carried], [c.head for c in carried],
                              self.town.task_heads, self.config.workspace.remote, self.config.name, "its latest task")
        except WorkspaceError as exc:
            raise WorkNotHere(str(exc)) from None

    def _work_from_elsewhere(self, work_task: str, work_host: str) -> list[Carried]:
        """The agent's latest work when another host made it (the agent moved here, or came back
        after working elsewhere): its branch here lacks it. [] otherwise (no Redis read then)."""
        if not work_task or work_host in ("", self.host):
            return []
        return [Carried(work_task, head, work_host) for head in self.town.task_heads([work_task])]

    def _fail_before_cli(self, claimed: Claimed, task_id: str, task, agent_state, reason: str, base: str = "",
                         work: dict | None = None) -> None:
        """A task whose CLI never started: failed, with why."""
        self.town.start_task(self.agent_id, task_id, task=task, agent_state=agent_state, base=base)
        self._note(f"task {task_id} failed: {reason}")
        self.town.finish_task(self.agent_id, claimed, TaskState.FAILED, exit_code=None, reason=reason, work=work)

    def _workspace_end(self, task_id: str, subject: str, state: TaskState, reason: str
                       ) -> tuple[str, dict | None, bool]:
        """After the CLI: its work committed on the agent's branch (failed tasks' too) and what the
        task changed, as the task record's fields; the reason, with the worktree's problem added
        (a CLI that left it mid-rebase, a repository nested in it, work that could not be
        committed: the task fails, as the third value says). (reason, None, False) in the shared
        folder."""
        if self.workspace is None:
            return reason, None, False
        try:
            ended = self.workspace.end(task_id, subject, failed=state is not TaskState.COMPLETED)
        except WorkspaceError as exc:  # (agents/NAME deleted mid-task...): the marker stays for the next begin
            # Failed, whatever the CLI's exit: its work is in no commit, and someone must look.
            self._note(f"task {task_id}: could not commit its work: {exc}")
            return "; ".join(r for r in (reason, f"could not commit its work: {exc}") if r), None, True
        if self.config.workspace.remote and ended.head and not ended.problem:  # for tasks on other hosts
            unpushed = push_head(self.workspace, self.config.workspace.remote, self.config.name, task_id, ended.head)
            ended.notes += [unpushed] if unpushed else []
        notes = ended.notes[1:] if ended.problem else ended.notes
        for note in ended.notes:
            self._note(note)
        if ended.problem:
            reason = "; ".join(r for r in (reason, ended.notes[0]) if r)
        if ended.failure:
            self._note(ended.failure)
            reason = "; ".join(r for r in (reason, ended.failure) if r)
        work = {"base": ended.base, "head": ended.head, "branch": ended.branch or "",
                "files": json.dumps([f.to_json() for f in ended.files]), "workspace_note": "; ".join(notes)}
        return reason, work, bool(ended.problem or ended.failure)

    def _record(self, claimed: Claimed, task_id: str, session: CliSession, ending: Ending, subject: str = "") -> None:
        """The task's outcome in Redis: finished (completed/failed), or back in the inbox."""
        if ending is Ending.STOPPED:
            # (no checkpoint: the worktree's marker stays, and the next attempt's begin commits
            # what this run left as `tt: interrupted <task>`)
            self._note(f"task {task_id} interrupted by stop; back in the inbox")
            self.town.check_fence(self.agent_id)
            self.town.requeue(self.agent_id, claimed, give_back_attempt=True)
            self.town.set_agent_state(self.agent_id, AgentState.STOPPING, current_task="", cli_pid="",
                                      question="")
            return
        if ending is Ending.TIMED_OUT:
            reason = f"timed out after {self.task_timeout:g}s"
            state, code = TaskState.FAILED, None
        elif ending is Ending.STALLED:
            reason, state, code = f"stalled ({self.stall_reason})", TaskState.FAILED, None
        elif ending is Ending.CANCELLED:
            reason, state = self.cancel_reason, TaskState.CANCELLED
            code = -session.signal if session.signal else session.exit_code
        elif session.signal:
            reason, state, code = session.outcome(), TaskState.FAILED, -session.signal
        else:
            # An exit status can lie (aider exits 0 having reached no model): a line of the output
            # that a fail pattern matches fails the task, and says why.
            code = session.exit_code
            said = self.watch.failure(bytes(self.tail))
            state = TaskState.COMPLETED if code == 0 and not said else TaskState.FAILED
            reason = said if code == 0 else ": ".join(r for r in (session.outcome(), said) if r)
        if state is TaskState.FAILED and b"root/sudo" in self.tail:  # claude's refusal as root: say what to do
            reason = "; ".join(r for r in (reason, root_caveat(self.spec, self.base_env)) if r)
        if self.keep_context:  # (a CLI that exited by itself with an error, its whole output in hand)
            self._remember_session(task_id, resume_failed=ending is Ending.EXITED and not session.signal
                                   and code not in (0, None) and not self.tail_cut)
        reason, work, workspace_failed = self._workspace_end(task_id, subject, state, reason)
        if workspace_failed:  # mid-rebase, a nested repository...: a human must look
            state = TaskState.FAILED
        self._note(f"task {task_id} {state.value}" + (f": {reason}" if reason else ""))
        self._once_written(lambda: self.town.finish_task(
            self.agent_id, claimed, state, exit_code=code, reason=reason, output=bytes(self.tail),
            agent_state=AgentState.STOPPING if self.stop_mode else AgentState.IDLE, work=work))

    def _beat(self) -> None:
        """The heartbeat mid-task. While Redis refuses writes (MISCONF: it cannot write its file,
        a full disk) the CLI works on, said once: the beat raised out of the pump, whose cleanup
        killed the CLI, and the task ran again as a crash."""
        if not self._unless_disk_full(lambda: self.town.heartbeat(self.agent_id)) and not self.refused:
            self.refused = True
            self._say("Redis refuses writes (disk full?): the CLI works on; its task is recorded once it takes them")

    def _once_written(self, write) -> None:
        """write() a finished task's outcome, waiting while Redis refuses writes (a full disk)
        rather than dying with the outcome in hand (the task would run again). A stop's deadline
        still ends the wait: the task is then in flight, for the next runner."""
        said = False
        while not self._unless_disk_full(write):
            if not said:  # (_say, not _note: a note would set the log's warning in Redis)
                said = True
                self._say("the task's outcome waits until Redis takes writes (disk full?)")
            time.sleep(REFUSED_RETRY_SECONDS)
        self.refused = False

    def _remember_session(self, task_id: str, resume_failed: bool) -> None:
        """The session the agent's next task continues: this one's, failed or not (what went wrong
        is worth remembering). Its id, when the CLI printed one, is read from the output's kept end
        once the task is over; else the last known id stays (a resumed session keeps its id), and
        with none the next task asks for the folder's last session, which every preset's CLI
        answers by starting a new one if there is none.

        Except a task that was to resume a session by its id and whose CLI exited with an error
        without printing one anywhere in its output (`resume_failed`: all of it kept, not killed
        by a timeout or a cancel): the session is gone (expired, deleted, another HOME), and kept,
        it would fail every task after this one. It is dropped: the next task starts a new
        session, and the log says so."""
        printed = self.spec.session_in(bytes(self.tail))
        if resume_failed and not printed and self.session and self.session_task and self.spec.session_pattern:
            self._note(f"task {task_id} could not continue session {self.session} (it failed and printed "
                       "no session id): the next task starts a new session")
            self.session = self.session_task = ""
        else:
            self.session = printed or self.session
            self.session_task = task_id
        self._once_written(lambda: self.town.record_session(self.agent_id, self.session, self.session_task))

    def _pump(self, session: CliSession, task_id: str) -> Ending:
        """Copy the CLI's output to the log, attach, Redis and the task's tail until it exits, and
        enforce a stop's grace and the task's timeout on the way."""
        self.tail = bytearray()
        self.tail_cut = False
        self.stream_budget.reset()
        reader = session.reader
        now = time.monotonic()
        heartbeat = self.config.supervisor.heartbeat_interval
        clock = PumpClock(next_beat=now + heartbeat, timeout_at=now + self.task_timeout if self.task_timeout else None)
        killed_for: Ending | None = None  # why the runner killed the CLI, if it did
        self.cancel_reason = self.stall_reason = ""
        self.watch.reset(now)
        clock.watch_at = self.watch.deadline()
        exited = eof = False
        while True:
            if self.cancel_asked and not exited:
                self.cancel_asked = False
                self.cancel_reason = self.town.coordination.cancel_request(task_id)
            if clock.watch_at is not None and now >= clock.watch_at and not exited:
                self._act_on(session, task_id, self.watch.check(now))
                clock.watch_at = self.watch.deadline()
            if not exited:
                killed_for = self._enforce(session, clock, now, killed_for)
            watch = [self.wake_r] if eof or now < clock.batch_at else [reader.notify_r, self.wake_r]
            try:
                ready, _, _ = select.select(watch, [], [], clock.wait(now))
            except InterruptedError:
                ready = []
            signalled = self.wake_r in ready
            if signalled:
                drain(self.wake_r)
            now = time.monotonic()
            chunks: list[bytes] = []
            if not eof and now >= clock.batch_at:
                chunks, eof = reader.take()
                if chunks:
                    self._output(chunks, clock, now)
                    clock.batch_taken(now, self._batch_wait(now))
                    for notice in self.watch.feed(chunks, now):
                        self._act_on(session, task_id, notice)
                    clock.watch_at = self.watch.deadline()
            # (a viewer on another host reads the stream: no batching then, its echo must not wait)
            if clock.flush_at is not None and (eof or now >= clock.flush_at or self.unsent_bytes >= STREAM_FLUSH_BYTES
                                               or now < self.attach.far_until):
                self._stream_send(task_id)
                # A flood's held window goes once the budget allows, output or not (stream_budget.py).
                clock.flush_at = now + THROTTLED_RECHECK if self.stream_budget.throttled else None
            if now >= clock.next_beat:
                self._beat()
                clock.next_beat = now + heartbeat
            # No waitpid per batch while output flows (SIGCHLD wakes the pump, and _enforce polls).
            if not exited and (eof or not chunks or signalled or session.reaped):
                exited = session.poll()
                if exited and not eof:
                    # What it printed last may still be in the pty, and a helper of its group may
                    # hold the terminal open: the group goes now (close() would kill it anyway),
                    # and its output is read to the terminal's end.
                    session.kill_group(signal.SIGKILL)
                    clock.cli_exited(now)
            if exited and (eof or now >= clock.drain_until):
                # (past the deadline: a helper that left the CLI's session holds the terminal;
                # the reader thread is let go, to end at that helper's next write or exit)
                self._stream_send(task_id, final=True)
                self._stream_flush()
                if killed_for is None or (session.signal is None and session.exit_code == 0):
                    return Ending.EXITED  # exit 0 as it was being killed: it finished
                return killed_for

    def _batch_wait(self, now: float) -> float:
        """How long the next batch of output may gather (see FLOOD_BATCH_SECONDS)."""
        if self.stream_budget.throttled and not self.attach.viewers and now >= self.attach.far_until:
            return FLOOD_BATCH_SECONDS
        return BATCH_SECONDS

    def _enforce(self, session: CliSession, clock: PumpClock, now: float, killed_for: Ending | None) -> Ending | None:
        """A stop's grace, the task's timeout and a cancel: SIGTERM to the CLI's group when one
        runs out (or comes), SIGKILL after KILL_WAIT_SECONDS (a cancel: stop_grace); why the CLI
        is being killed (None: it is not)."""
        if self.stop_mode is StopMode.GRACEFUL and clock.grace_at is None:
            clock.grace_at = now + self.config.supervisor.stop_grace
            self._unless_disk_full(lambda: self.town.set_agent_state(self.agent_id, AgentState.STOPPING))  # (shown)
        if clock.grace_at is not None and now >= clock.grace_at:
            self.stop_mode = StopMode.NOW
        if killed_for is None:
            if self.stop_mode is StopMode.NOW:
                why = Ending.STOPPED
            elif clock.timeout_at is not None and now >= clock.timeout_at:
                why = Ending.TIMED_OUT
            elif self.cancel_reason:
                why = Ending.CANCELLED
            elif self.stall_reason:
                why = Ending.STALLED
            else:
                return None
            if session.poll():  # it has exited already: its status is the outcome, nothing to kill
                return None
            session.kill_group(signal.SIGTERM)
            # A cancelled CLI gets a stop's grace to wind down (its output is kept).
            wait = self.config.supervisor.stop_grace if why is Ending.CANCELLED else KILL_WAIT_SECONDS
            clock.kill_at = now + wait
            return why
        if now >= clock.kill_at:
            session.kill_group(signal.SIGKILL)
        return killed_for

    def _output(self, chunks: list[bytes], clock: PumpClock, now: float) -> None:
        """A batch of the CLI's output (in the log already: the reader thread wrote it there): to the
        attach viewers, the task's tail, and queued for the Redis stream (sent at STREAM_FLUSH_BYTES
        or STREAM_FLUSH_SECONDS)."""
        self.attach.output(chunks)
        self.tail_cut = keep_tail_of(self.tail, chunks, OUTPUT_TAIL_BYTES) or self.tail_cut
        self.unsent += chunks  # (cut into the stream's entries when sent)
        self.unsent_bytes += sum(map(len, chunks))
        if self.log.problem != self.warning:
            self._set_warning(self.log.problem)
        if clock.flush_at is None:
            clock.flush_at = now + STREAM_FLUSH_SECONDS

    def _act_on(self, session: CliSession, task_id: str, notice: Notice | None) -> None:
        """What the output watch saw: type an answer, stop a stalled CLI (_enforce kills it, as at
        a timeout), show the agent waiting for input, or working again."""
        if notice is None:
            return
        if notice.kind == "answer":
            session.write(notice.answer.send)
            self._note(f"answered {notice.line!r} with {notice.answer.send.decode('utf-8', 'replace')!r}"
                       f" (expect {notice.answer.expect!r})")
            self._unless_disk_full(lambda: self.town.event(
                "agent_answered", agent=self.name, task=task_id, question=notice.line,
                expect=notice.answer.expect, sent=notice.answer.send.decode("utf-8", "replace")))
        elif notice.kind == "stalled":
            if not self.stall_reason:
                self.stall_reason = notice.line
                self._note(f"task {task_id} stalled: {notice.line}; stopping its CLI")
        else:
            if notice.kind == "waiting":
                self._note(f"waiting for input: {notice.line!r} (tt attach {self.name} to answer)")
            try:
                self._unless_disk_full(lambda: self.town.set_waiting(
                    self.agent_id, self.name, task_id, notice.line if notice.kind == "waiting" else ""))
            except InvalidTransition:  # stopping: `tt status` shows that instead
                pass

    def _stream_send(self, task_id: str, final: bool = False) -> None:
        """The output not yet in the agent's Redis stream, in entries of STREAM_FLUSH_BYTES at most
        (the stream's size is stream_maxlen x that), within the stream's budget (a flood is sent as
        its start, windows of its newest output and its end, each window after a line saying how
        much was left to the log: stream_budget.py), without waiting for Redis (resp.Sender): the
        pump goes back to the pty at once."""
        gap, sent = self.stream_budget.take(self.unsent, time.monotonic(), final)
        self.unsent, self.unsent_bytes = [], 0
        pieces = in_pieces(sent, STREAM_FLUSH_BYTES)
        if gap:
            pieces.insert(0, gap_line(gap, self.host))
        if not pieces:
            return
        key, maxlen = self.town.keys.output(self.agent_id), self.config.logs.stream_maxlen
        if self.stream is None:
            self.stream = Sender(resp_connect(self.config))
        try:
            for piece in pieces:
                self.stream.send("XADD", key, "MAXLEN", "~", maxlen, "*", "task", task_id, "data", piece)
        except RespConnectionError as exc:
            self._say(f"output stream: {exc}")
            self.stream = None

    def _stream_flush(self) -> None:
        """Wait for Redis to have the output (before the task's outcome is written)."""
        if self.stream is None:
            return
        try:
            self.stream.flush()
        except RespConnectionError as exc:
            self._say(f"output stream: {exc}")
            self.stream = None
            return
        if self.stream.errors:
            self._say(f"output stream: {self.stream.errors[-1]}")
            self.stream.errors.clear()

    # --- the log, and what it cannot write -----------------------------------------------------
    def _note(self, text: str) -> None:
        """A line of the runner's own in the agent's log (task started, finished...)."""
        self.log.note(text)
        if self.log.problem != self.warning:
            self._set_warning(self.log.problem)

    def _set_warning(self, text: str) -> None:
        """The log's trouble (or its end) on the agent's record, for `tt status`. On a full disk
        the log and Redis's file fail together: the record waits for Redis (tried again with the
        next batch), the CLI works on."""
        if not self._unless_disk_full(lambda: self.town.set_agent_warning(self.agent_id, text)):
            return
        self.warning = text
        if text:
            self._say(f"warning: {text}")

    def _unless_disk_full(self, write) -> bool:
        """write() to Redis, let go (False) if Redis refuses it for want of disk: what a running
        task records on the way (a warning, a question, `stopping`) is not worth its CLI."""
        try:
            write()
            return True
        except RespError as exc:
            if not disk_full(exc):
                raise
            return False

    @staticmethod
    def _say(text: str) -> None:
        """A line on the runner's stderr (the agent's log too): lost, not fatal, if it cannot be written."""
        try:
            print(f"tt runner: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

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
            self._say(f"could not record stop: {exc}")


def _ids(joined: str) -> list[str]:
    """The task ids of a comma-separated field (Task.after)."""
    return [part for part in joined.split(",") if part]


def _interrupted_line(begun) -> bytes:
    """What the next attempt's prompt says first when an interrupted run left work behind."""
    if not begun.interrupted_task:
        return b""
    task, commit = begun.interrupted_task, begun.interrupted_commit[:12]
    return (f"[Tinytown] An earlier run of task {task} was interrupted; the changes it had made are committed "
            f"as {commit} (\"tt: interrupted {task}\") and are in your working tree.\n\n").encode()


def run_forked(config: Config, agent_id: str, log_path: Path, host: str | None = None) -> None:
    """Entry point in the forked child: never returns into the supervisor's code."""
    code = 1
    # Everything inherited from the supervisor lives as long as the runner: out of the collector's
    # sight, a full collection no longer walks every imported module (ms of pause in the middle of
    # a task) nor writes to their pages (which would unshare them from the supervisor's).
    gc.freeze()
    try:
        code = Runner(config, agent_id, host).run()
    except BaseException as exc:  # noqa: BLE001 - the runner's last word goes to the agent log
        import traceback
        traceback.print_exc()
        print(f"tt runner: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        exit_now(code)
