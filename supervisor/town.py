"""The Redis operations shared by the `tt` commands, the supervisor and the runners.

Every multi-key change happens in one MULTI/EXEC, so a crash between two writes
cannot leave a task both in an inbox and finished, or an agent registered past `max_agents`.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import NamedTuple

from .config import OUTPUT_TAIL_BYTES, PRESETS, Config, validate_name, validate_task_timeout
from .errors import TinytownError
from .hosts import SCRIPTS as HOST_SCRIPTS
from .hosts import Fenced, Hosts, fencing
from .keys import Keys
from .models import (AGENT_TRANSITIONS, Agent, AgentState, Hold, InvalidTransition, Message, StopMode, Task,
                     TaskState, check_agent_transition, check_task_transition, new_id, now)
from .resp import RespClient, RespError, Script, WatchError, connect


EVENTS_MAXLEN = 5000

# KEYS[1]: an agent's hash; ARGV: the new state, the states it may follow (",a,b,": see
# _ALLOWED_BEFORE), then field, value pairs to write with it. Returns the old state.
SET_AGENT_STATE = Script("""
local old = redis.call('HGET', KEYS[1], 'state') or ''
if old ~= ARGV[1] and not string.find(ARGV[2], ',' .. old .. ',', 1, true) then
  local from = old == '' and 'no record' or ("'" .. old .. "'")
  return redis.error_reply("TRANSITION agent cannot go from " .. from .. " to '" .. ARGV[1] .. "'")
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], unpack(ARGV, 3))
return old
""")
# For each state, the states it may follow, as the script reads them: models.AGENT_TRANSITIONS
# turned around. A record that is not there (never made, or pruned: `tt prune`) is never written:
# spawn makes an agent's record whole, and a state write racing with a prune must not bring back
# a record with a state and nothing else.
_ALLOWED_BEFORE = {
    new: "," + ",".join(sorted({old.value for old, nexts in AGENT_TRANSITIONS.items() if new in nexts})) + ","
    for new in AgentState
}


def _transition_error(exc: Exception) -> Exception:
    """The script's refusal as InvalidTransition; any other error as it came."""
    text = str(exc)
    if text.startswith("TRANSITION "):
        return InvalidTransition(text[len("TRANSITION "):])
    return exc


@dataclass
class Claimed:
    """A message a runner moved from its inbox to its in-flight list."""

    raw: str
    message: Message


# An agent whose runner is up and may be replaced by `tt restart` once its task is done.
LIVE_STATES = (AgentState.IDLE.value, AgentState.WORKING.value, AgentState.WAITING.value)

class Town:
    """The town's records in Redis. `client`: a resp.RespClient (default: a `tt` command's, with
    its reply timeout; the supervisor and the runners pass long-lived ones)."""

    def __init__(self, config: Config, client: RespClient | None = None):
        self.config = config
        self.keys = Keys(config.name)
        self.r = client if client is not None else connect(config)
        self._coordination = None
        self._hosts = None
        self._here: str | None = None
        # A runner's placement, (host, epoch) as strings: set, its heartbeat and its outcome are
        # refused once the agent was placed again (supervisor/hosts.py), raising hosts.Fenced.
        self.fence: tuple[str, str] | None = None

    @property
    def hosts(self) -> Hosts:
        """The town's hosts: leases, placement, host loss (supervisor/hosts.py)."""
        if self._hosts is None:
            self._hosts = Hosts(self, EVENTS_MAXLEN)
        return self._hosts

    @property
    def here(self) -> str:
        """This folder's host in the town (lifecycle.host_here), read once: one command, one answer."""
        if self._here is None:
            from .lifecycle import host_here
            self._here = host_here(self.config)
        return self._here

    @property
    def coordination(self):
        """The town's coordination store (supervisor/coordination.py: dependencies, backlog, notes,
        cancel), made on first use: it imports this module, so not at import time."""
        if self._coordination is None:
            from .coordination import Coordination
            self._coordination = Coordination(self)
        return self._coordination

    # --- helpers ---------------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except RespError:
            return False

    def _event(self, pipe, kind: str, **fields) -> None:
        data = {"type": kind, "at": f"{now():.6f}", **{k: str(v) for k, v in fields.items()}}
        pipe.xadd(self.keys.events, data, maxlen=EVENTS_MAXLEN, approximate=True)

    def nudge(self) -> None:
        """Tell the supervisor to reconcile (spawned agents, stop requests, restarts)."""
        self.r.publish(self.keys.control, "reconcile")

    # --- agents ----------------------------------------------------------------------------
    def spawn(self, name: str, cli: str, task_timeout: float | None = None, workspace: str = "shared",
              branch: str = "", host: str = "", answers: list[tuple[str, str]] | None = None,
              keep_context: bool = False) -> Agent:
        """Register an agent, placed on `host` (pinned there) or on the live host with the most
        free room, in one script (supervisor/hosts.py): racing spawns never exceed a host's
        max_agents. workspace: "worktree" (its CLI works in agents/NAME on `branch`, made by the
        caller beforehand) or "shared" (in the town folder). answers: (regex, text) pairs its
        runner types into its CLI's terminal (`tt spawn --answer`).
        keep_context: each task continues the last one's CLI session."""
        validate_name("agent", name)
        if host:
            validate_name("host", host)
        self.config.cli(cli)  # unknown preset -> TinytownError before anything is written
        validate_task_timeout(task_timeout)
        agent = Agent(id=new_id(), name=name, cli=cli, state=AgentState.STARTING.value,
                      created_at=now(), updated_at=now(), task_timeout=task_timeout, workspace=workspace,
                      branch=branch, answers=json.dumps(answers) if answers else "",
                      keep_context=keep_context)
        agent.host = self._place(agent, host, agent.to_hash())
        agent.pinned, agent.epoch = bool(host), 1
        return agent

    def check_spawn(self, name: str, host: str = "") -> None:
        """Refuse a spawn that cannot be registered (name taken, max_agents reached, no such
        host): also asked before a worktree is made for it, so a refused spawn leaves nothing behind."""
        self._place(Agent(id="", name=name, cli=""), host, {}, dry=True)

    def _place(self, agent: Agent, pin: str, fields: dict, dry: bool = False) -> str:
        here = self.here
        return self.hosts.place(agent.name, agent.id, pin, here, self.config.host_capacity(here), agent.cli,
                                fields, dry=dry)

    def agent_id(self, name: str) -> str:
        agent_id = self.r.hget(self.keys.agent_index, name)
        if not agent_id:
            raise TinytownError(f"no agent named {name!r} (see `tt list`)")
        return agent_id

    def agent(self, name: str) -> Agent:
        return self.agent_by_id(self.agent_id(name))

    def agent_by_id(self, agent_id: str) -> Agent:
        data = self.r.hgetall(self.keys.agent(agent_id))
        if not data:
            raise TinytownError(f"agent {agent_id} is registered but has no record")
        return Agent.from_hash(data)

    def agents(self) -> list[Agent]:
        """All registered agents, oldest first."""
        ids = list(self.r.hvals(self.keys.agent_index))
        pipe = self.r.pipeline(transaction=False)
        for agent_id in ids:
            pipe.hgetall(self.keys.agent(agent_id))
        found = [Agent.from_hash(d) for d in pipe.execute() if d]
        return sorted(found, key=lambda a: (a.created_at, a.name))

    def queued_counts(self, agents: list[Agent]) -> dict[str, int]:
        """Messages waiting in each agent's inbox (not counting the one in flight)."""
        pipe = self.r.pipeline(transaction=False)
        for a in agents:
            pipe.llen(self.keys.inbox(a.id))
        return {a.id: n for a, n in zip(agents, pipe.execute())}

    def set_agent_state(self, agent_id: str, state: AgentState, pipe=None, *, old: str | None = None,
                        **fields) -> None:
        """The one way an agent's state changes: checked against models.AGENT_TRANSITIONS inside Redis.

        The check and the write are one script, so two writers (a runner and its supervisor) cannot
        both pass the check and then overwrite each other: the table is a guarantee, not advice.
        old: the state the caller has just read: a transition it rules out fails before anything
        is sent (a pipeline then writes nothing of the rest either). In a pipeline, a transition
        refused inside Redis fails that command alone, when the pipeline executes.
        """
        if old is not None:
            check_agent_transition(old, state)
        values = {"updated_at": f"{now():.6f}"}
        values.update({k: "" if v is None else str(v) for k, v in fields.items()})
        args = [state.value, _ALLOWED_BEFORE[state]] + [x for pair in values.items() for x in pair]
        target = pipe if pipe is not None else self.r
        try:
            SET_AGENT_STATE(target, (self.keys.agent(agent_id),), args)
        except RespError as exc:
            raise _transition_error(exc) from None

    def become_idle(self, agent_id: str, **fields) -> None:
        """A runner starting: the agent `idle` and, in the same transaction, the oldest backlog
        task it may take (if its inbox and in-flight list are empty), so no free agent sits beside
        matching backlog work."""
        pipe = self.r.pipeline()
        self.set_agent_state(agent_id, AgentState.IDLE, pipe=pipe, **fields)
        self.coordination.queue_claim(pipe, agent_id)
        try:
            pipe.execute()
        except RespError as exc:
            raise _transition_error(exc) from None

    def heartbeat(self, agent_id: str) -> None:
        """The runner is alive. With a fence (a runner's placement), only while it holds: Fenced if
        the agent was placed again meanwhile (its host declared lost)."""
        if self.fence is None:
            self.r.hset(self.keys.agent(agent_id), "heartbeat_at", f"{now():.6f}")
            return
        if HOST_SCRIPTS["heartbeat"](self.r, (self.keys.agent(agent_id),), (*self.fence, f"{now():.6f}")) == 0:
            raise Fenced(self._fenced_why(agent_id))

    def check_fence(self, agent_id: str, watch: bool = False) -> None:
        """Fenced if this runner's placement is stale (before a CLI starts). watch: the agent's
        record stays WATCHed, for the MULTI/EXEC the caller runs next (in the same round trip)."""
        if self.fence is None:
            return
        reads = self.r.pipeline(transaction=False)
        if watch:
            reads.execute_command("WATCH", self.keys.agent(agent_id))
        reads.execute_command("HMGET", self.keys.agent(agent_id), "host", "epoch")
        host, epoch = reads.execute()[-1]
        if host is not None and (host, epoch) != self.fence:
            if watch:
                self._unwatch()
            raise Fenced(self._fenced_why(agent_id, host, epoch))

    def _unwatch(self) -> None:
        if self.r.sock is not None:  # still connected: the watch must not outlive its transaction
            self.r.execute_command("UNWATCH")

    def _fenced_why(self, agent_id: str, host: str | None = None, epoch: str | None = None) -> str:
        if host is None:
            host, epoch = self.r.execute_command("HMGET", self.keys.agent(agent_id), "host", "epoch")
        return (f"this runner's placement (host {self.fence[0]}, epoch {self.fence[1]}) is stale: the agent "
                f"is now on host {host} (epoch {epoch}); nothing more is written from here")

    def unclaim(self, agent_id: str, claimed: "Claimed") -> bool:
        """A message a fenced runner claimed: back to the front of the inbox (unless the host's
        loss already put it back), no attempt counted, nothing else written."""
        return bool(HOST_SCRIPTS["unclaim"](self.r, (self.keys.inflight(agent_id), self.keys.inbox(agent_id)),
                                           (claimed.raw,)))

    def restart_agent(self, name: str, without_latest: bool = False) -> tuple[Agent, str]:
        """Clear a failed/backoff agent so the supervisor starts it again; also one `tt interrupt`,
        `close` or `kill` held (agent_control.py): the hold goes, and its runner starts. A live
        runner (idle, working) is replaced by a new one, which reads the config as it is now,
        once the task in hand is done: restart_asked, which the supervisor acts on. Returns the
        agent as it was and what was done: "started", "replaced" or "" (nothing to do).

        without_latest: a failed agent whose latest work, made on another host, cannot be had where
        it runs now (that host was lost before pushing it) starts from its branch there without it:
        the record of that work goes (the commits stay on the host that made them)."""
        agent = self.agent(name)
        fields = {"reason": "", "hold": "", "to_backlog": ""}
        left = {}
        if without_latest:
            check_latest_to_leave(agent)
            fields.update(work_task="", work_host="")
            left = {"left": agent.work_task}
        if agent.state in (AgentState.FAILED.value, AgentState.BACKOFF.value, AgentState.STOPPED.value,
                           AgentState.PAUSED.value):
            self.set_agent_state(agent.id, AgentState.STARTING, **fields)
            done = "started"
        elif agent.hold:
            self.r.hset(self.keys.agent(agent.id), mapping={"hold": "", "to_backlog": ""})
            done = "started"
        elif agent.state in LIVE_STATES and self._ask_restart(agent.id):
            done = "replaced"
        else:
            return agent, ""  # starting or stopping already: nothing to ask, so no event says it was
        pipe = self.r.pipeline()
        self._event(pipe, "agent_restart_requested", agent=name, **left)
        pipe.publish(self.keys.control, f"restart {agent.id}")
        pipe.execute()
        return agent, done

    def _ask_restart(self, agent_id: str) -> bool:
        """restart_asked on an agent whose runner is still live, checked and written in one
        transaction: a second `tt restart` racing the supervisor's start of the new runner must
        not ask that one to go too (or make a record again for an agent removed meanwhile)."""
        key = self.keys.agent(agent_id)
        for _ in range(100):
            self.r.execute_command("WATCH", key)
            if self.r.hget(key, "state") not in LIVE_STATES:
                self._unwatch()
                return False
            pipe = self.r.pipeline()
            pipe.hset(key, "restart_asked", "1")
            try:
                pipe.execute()
                return True
            except WatchError:
                continue  # (the record changed in between: look again)
        return False

    # --- tasks -----------------------------------------------------------------------------
    def assign(self, name: str, description: str) -> Task:
        """Create a task and push its TaskAssign message onto the agent's inbox, atomically."""
        return self.assign_many(name, [description])[0]

    def assign_many(self, name: str, descriptions: list[str]) -> list[Task]:
        """Tasks for one agent, in this order, written in one MULTI/EXEC: all of them or none."""
        if not descriptions or any(not d.strip() for d in descriptions):
            raise TinytownError("the task description is empty")
        agent_id = self.agent_id(name)
        self.check_prompts(agent_id, descriptions)
        pipe = self.r.pipeline()
        tasks = []
        for description in descriptions:
            task = Task(id=new_id(), agent=name, agent_id=agent_id, description=description,
                        state=TaskState.ASSIGNED.value, created_at=now())
            pipe.hset(self.keys.task(task.id), mapping=task.to_hash())
            pipe.zadd(self.keys.task_index, {task.id: task.created_at})
            pipe.rpush(self.keys.inbox(agent_id), Message.task_assign(task.id).encode())
            self._event(pipe, "task_assigned", task=task.id, agent=name)
            tasks.append(task)
        pipe.execute()
        return tasks

    def check_prompts(self, agent_id: str, descriptions: list[str]) -> None:
        """Refuse, before anything is written, a text the agent's CLI cannot be handed intact (one
        that starts with '-' for a CLI that takes its prompt as an argument, or is too long for one)."""
        cli = self.r.hget(self.keys.agent(agent_id), "cli")
        spec = (self.config.clis.get(cli) or PRESETS.get(cli)) if cli else None
        if spec is not None:
            for description in descriptions:
                spec.check_prompt(description)

    def task(self, task_id: str) -> Task:
        """A task by id, or by a unique prefix of its id."""
        if not task_id:
            raise TinytownError("no task id given")
        data = self.r.hgetall(self.keys.task(task_id))
        if not data:
            matches = [t for t in self.r.zrange(self.keys.task_index, 0, -1) if t.startswith(task_id)]
            if len(matches) != 1:
                raise TinytownError(f"no task {task_id!r}" if not matches else f"task id {task_id!r} is ambiguous")
            data = self.r.hgetall(self.keys.task(matches[0]))
        return self.explained([Task.from_hash(data)])[0]

    def tasks(self, agent: str | None = None, state: str | None = None, limit: int = 0) -> list[Task]:
        ids = self.r.zrange(self.keys.task_index, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.keys.task(task_id))
        found = [Task.from_hash(d) for d in pipe.execute() if d]
        found = [t for t in found if (agent is None or t.agent == agent) and (state is None or t.state == state)]
        return self.explained(found[-limit:] if limit else found)

    def explained(self, tasks: list[Task]) -> list[Task]:
        """A task waiting for an agent that gave up or was held says so in its reason: "waiting:
        agent d failed: …", "waiting: agent d is closed (…)" (read, not stored: it holds exactly
        while the agent is so). A task in hand that a stop put back in a closing agent's queue
        waits there, and `tt wait` on it would otherwise time out unexplained."""
        self._explain_pending(tasks)
        waiting = [t for t in tasks if t.state == TaskState.ASSIGNED.value and not t.reason]
        if not waiting:
            return tasks
        agent_ids = sorted({t.agent_id for t in waiting})
        pipe = self.r.pipeline(transaction=False)
        for agent_id in agent_ids:
            pipe.execute_command("HMGET", self.keys.agent(agent_id), "state", "reason", "hold")
        found = dict(zip(agent_ids, pipe.execute()))
        for task in waiting:
            state, reason, hold = found[task.agent_id]
            if state == AgentState.FAILED.value:
                task.reason = f"waiting: agent {task.agent} failed: {reason or 'no reason recorded'}"
            elif hold and state in (AgentState.PAUSED.value, AgentState.STOPPED.value):
                task.reason = f"waiting: agent {task.agent} " + {
                    Hold.PAUSE.value: f"is paused (tt resume {task.agent})",
                    Hold.CLOSE.value: f"is closed (tt restart {task.agent} runs what waits for it)",
                }.get(hold, f"was killed (tt restart {task.agent})")
        return tasks

    def _explain_pending(self, tasks: list[Task]) -> None:
        """A pending task says what it waits for: "waits on <ids>" (its dependencies not completed
        yet), or "in the backlog" (read, not stored)."""
        pending = [t for t in tasks if t.state == TaskState.PENDING.value and not t.reason]
        if not pending:
            return
        blocked = self.coordination.blocked_by(pending)
        for task in pending:
            if blocked[task.id]:
                task.reason = "waits on " + ", ".join(i[:8] for i in blocked[task.id])
            elif task.backlog:
                task.reason = f"in the backlog (role {task.role})" if task.role else "in the backlog (any agent)"

    def task_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in TaskState}
        ids = self.r.zrange(self.keys.task_index, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(self.keys.task(task_id), "state")
        for state in pipe.execute():
            if state:
                counts[state] = counts.get(state, 0) + 1
        return counts

    # --- the runner's side -----------------------------------------------------------------
    def claim(self, agent_id: str, timeout: float) -> Claimed | None:
        """Block until a message arrives, moving it atomically into the in-flight list."""
        raw = self.r.blmove(self.keys.inbox(agent_id), self.keys.inflight(agent_id), timeout, "LEFT", "RIGHT")
        return None if raw is None else Claimed(raw, Message.decode(raw))

    def record_session(self, agent_id: str, session: str, task_id: str) -> None:
        """The CLI session a --keep-context agent's next task continues: `task_id`'s (id `session`)."""
        self.r.hset(self.keys.agent(agent_id), mapping={"session": session, "session_task": task_id})

    def set_agent_warning(self, agent_id: str, warning: str) -> None:
        """What the agent works on despite (its log cannot be written), for `tt status`; "" clears it."""
        self.r.hset(self.keys.agent(agent_id), "warning", warning)

    def set_waiting(self, agent_id: str, agent: str, task_id: str, question: str) -> None:
        """The agent's CLI stopped on a question nobody answered (runner's output_watch): `waiting`,
        the question on its record and in an event; question "" = output came again, `working`.
        InvalidTransition if the agent has moved on meanwhile (stopping...)."""
        pipe = self.r.pipeline()
        if question:
            self.set_agent_state(agent_id, AgentState.WAITING, pipe=pipe, question=question)
            self._event(pipe, "agent_waiting", agent=agent, task=task_id, question=question)
        else:
            self.set_agent_state(agent_id, AgentState.WORKING, pipe=pipe, question="")
        try:
            pipe.execute()
        except RespError as exc:
            raise _transition_error(exc) from None

    def inflight(self, agent_id: str) -> list[Claimed]:
        return [Claimed(raw, Message.decode(raw)) for raw in self.r.lrange(self.keys.inflight(agent_id), 0, -1)]

    def start_task(self, agent_id: str, task_id: str, cli_pid: int | None = None, task: Task | None = None,
                   agent_state: str | None = None, base: str = "") -> Task:
        """Mark a claimed task running (one more attempt) and its agent working.

        task, agent_state: as the runner just read them (Coordination.begin), to skip reading them again.
        base: the commit a worktree agent's task starts from.
        """
        task = task if task is not None else self.task(task_id)
        check_task_transition(task.state, TaskState.RUNNING)
        if self.fence is None:
            self._start(agent_id, task, cli_pid, agent_state, base)
        else:  # a runner whose agent was placed again must not mark it working with its CLI's pid
            for _ in range(100):
                self.check_fence(agent_id, watch=True)
                try:
                    self._start(agent_id, task, cli_pid, agent_state, base)
                    break
                except WatchError:
                    continue  # the agent's record changed in between: check again
                except BaseException:
                    self._unwatch()
                    raise
            else:
                raise TinytownError(f"could not start task {task.id}: the agent's record kept changing")
        task.state, task.attempts = TaskState.RUNNING.value, task.attempts + 1
        return task

    def _start(self, agent_id: str, task: Task, cli_pid: int | None, agent_state: str | None, base: str) -> None:
        task_id = task.id
        pipe = self.r.pipeline()
        pipe.hset(self.keys.task(task_id), mapping={"state": TaskState.RUNNING.value,
                                                     "started_at": f"{now():.6f}", "reason": "",
                                                     **({"base": base} if base else {})})
        pipe.hincrby(self.keys.task(task_id), "attempts", 1)
        # A task's start and end prove the runner alive, so a runner busy with back-to-back short
        # tasks never looks unresponsive.
        self.set_agent_state(agent_id, AgentState.WORKING, pipe=pipe, old=agent_state, current_task=task_id,
                             heartbeat_at=f"{now():.6f}", **({"cli_pid": cli_pid} if cli_pid else {}))
        self._event(pipe, "task_started", task=task_id, agent=task.agent)
        pipe.execute()

    def task_heads(self, task_ids: list[str]) -> list[str]:
        """The `head` commits of these tasks, in order, skipping those without one (a shared
        agent's, or gone): the work a dependent task starts by merging. One round trip."""
        return [head for head in self.task_field(task_ids, "head") if head]

    def task_field(self, task_ids: list[str], field: str) -> list[str]:
        """One field of each of these tasks, in order ("" where it has none). One round trip."""
        if not task_ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(self.keys.task(task_id), field)
        return [value or "" for value in pipe.execute()]

    def finish_task(self, agent_id: str, claimed: Claimed, state: TaskState, exit_code: int | None = None,
                    reason: str = "", output: bytes = b"", agent_state: AgentState = AgentState.IDLE,
                    work: dict[str, str] | None = None) -> None:
        """Write a task's outcome, drop it from in-flight, set the agent idle, release the task's
        dependents and let the agent take backlog work, in one transaction.

        agent_state: `stopping` when the task finished within a stop's grace period.
        work: what a worktree agent's task changed (base, head, branch, files, workspace_note).
        """
        task_id = claimed.message.task_id
        for _ in range(100):
            reads = self.r.pipeline(transaction=False)
            if self.fence is not None:  # refused if the agent was placed again: watched, checked, written
                reads.execute_command("WATCH", self.keys.agent(agent_id))
            reads.hget(self.keys.task(task_id), "state")
            reads.execute_command("HMGET", self.keys.agent(agent_id), "state", "host", "epoch")
            *_, old, (old_agent, host, epoch) = reads.execute()
            if self.fence is not None and host is not None and (host, epoch) != self.fence:
                self._unwatch()
                raise Fenced(self._fenced_why(agent_id, host, epoch))
            try:
                return self._finish(agent_id, task_id, claimed, old, old_agent, state, exit_code, reason, output,
                                    agent_state, work, host)
            except WatchError:
                continue  # the agent's record changed in between (a hold, a pid): read it again
            except BaseException:
                if self.fence is not None:
                    self._unwatch()
                raise
        raise TinytownError(f"could not record task {task_id}: the agent's record kept changing")

    def _finish(self, agent_id: str, task_id: str, claimed: Claimed, old, old_agent, state: TaskState, exit_code,
                reason, output, agent_state, work, host) -> None:
        pipe = self.r.pipeline()
        # (the host the agent is placed on: the one whose runner made this head)
        latest = {"work_task": task_id, "work_host": host or ""} if work and work.get("head") else {}
        if old is not None:
            check_task_transition(old, state)
            pipe.hset(self.keys.task(task_id), mapping={
                "state": state.value, "exit_code": "" if exit_code is None else str(exit_code),
                "finished_at": f"{now():.6f}", "reason": reason,
                "output": output[-OUTPUT_TAIL_BYTES:].decode("utf-8", "replace"), **(work or {}),
            })
        pipe.lrem(self.keys.inflight(agent_id), 1, claimed.raw)
        self.set_agent_state(agent_id, agent_state, pipe=pipe, old=old_agent, current_task="", cli_pid="",
                             question="", heartbeat_at=f"{now():.6f}", **latest)
        self._event(pipe, f"task_{state.value}", task=task_id, exit_code=exit_code, reason=reason)
        # In the same transaction as the outcome, so no crash can separate them: its dependents
        # are released (or cancelled), and an agent going idle takes backlog work it may.
        self.coordination.queue_release(pipe, task_id)
        if agent_state is AgentState.IDLE:
            self.coordination.queue_claim(pipe, agent_id)
        pipe.execute()

    def drop_message(self, agent_id: str, claimed: Claimed) -> None:
        """Discard an in-flight message that names no live task (cancelled or unknown)."""
        self.r.lrem(self.keys.inflight(agent_id), 1, claimed.raw)

    def requeue(self, agent_id: str, claimed: Claimed, give_back_attempt: bool = False) -> None:
        """Put an unfinished task back at the front of the inbox, state `assigned`.

        give_back_attempt: the run was cut short by a user's stop, not a crash, so it does not count.
        """
        task_id = claimed.message.task_id
        pipe = self.r.pipeline()
        pipe.lrem(self.keys.inflight(agent_id), 1, claimed.raw)
        pipe.lpush(self.keys.inbox(agent_id), claimed.raw)
        pipe.hset(self.keys.task(task_id), mapping={"state": TaskState.ASSIGNED.value, "started_at": ""})
        if give_back_attempt:
            pipe.hincrby(self.keys.task(task_id), "attempts", -1)
        self._event(pipe, "task_requeued", task=task_id)
        pipe.execute()

    def put_back_inflight(self, agent_id: str) -> list[str]:
        """After a runner died: its unfinished tasks go back to the front of its inbox, `assigned`,
        their attempts kept (Runner._handle fails a task whose runners died max_attempts times).
        The ids of the tasks put back."""
        back = []
        for claimed in reversed(self.inflight(agent_id)):  # LPUSH one by one: the order is kept
            state = self.r.hget(self.keys.task(claimed.message.task_id), "state")
            if state in (TaskState.ASSIGNED.value, TaskState.RUNNING.value):
                self.requeue(agent_id, claimed)
                back.append(claimed.message.task_id)
        return back

    # --- the supervisor's record, and what the supervisor writes --------------------------
    def supervisor_info(self) -> dict:
        return self.r.hgetall(self.keys.supervisor)

    def record_supervisor_started(self, pid: int, host_name: str | None = None) -> None:
        self.r.hset(self.keys.supervisor, mapping={
            "pid": pid, "host": host_name or host(), "state": "running", "started_at": f"{now():.6f}",
            "root": str(self.config.root)})

    def set_supervisor_state(self, state: str) -> None:
        self.r.hset(self.keys.supervisor, "state", state)

    def record_supervisor_stopped(self) -> None:
        self.r.hset(self.keys.supervisor, mapping={"state": "stopped", "pid": ""})

    def requests(self) -> Requests:
        """What `tt` commands asked of the supervisors, in one round trip (stopping.ask)."""
        stop, stops, reloads = self.r.execute_command("HMGET", self.keys.supervisor, "stop", "stops_asked",
                                                      "reloads_asked")
        return Requests(_stop_mode(stop), int(stops or 0), int(reloads or 0))

    def ask_reload(self) -> int:
        """`tt reload`: ask the supervisor to read tinytown.toml again; the request's number."""
        pipe = self.r.pipeline()
        pipe.hincrby(self.keys.supervisor, "reloads_asked", 1)
        pipe.publish(self.keys.control, "reload")
        return pipe.execute()[0]

    def record_config(self, error: str, note: str, reloads_done: int) -> None:
        """How the supervisor's last read of tinytown.toml went: an error (the town runs on its
        previous config), or what changed and what needs a restart."""
        self.r.hset(self.keys.supervisor, mapping={"config_error": error, "config_note": note,
                                                   "reloads_done": reloads_done})

    def event(self, kind: str, **fields) -> str:
        """Add one event to the town's stream; its id."""
        pipe = self.r.pipeline(transaction=False)
        self._event(pipe, kind, **fields)
        return pipe.execute()[0]

    def events_since(self, since: str, kind: str) -> list[dict]:
        """The events of one kind from stream id `since` on."""
        return [fields for _id, fields in self.r.xrange(self.keys.events, min=since) if fields.get("type") == kind]

    def agent_exists(self, agent_id: str) -> bool:
        return bool(self.r.exists(self.keys.agent(agent_id)))

    def agent_state(self, agent_id: str) -> str | None:
        """The agent's recorded state, in one read (None: no such agent)."""
        return self.r.hget(self.keys.agent(agent_id), "state")

    def cli_pid(self, agent_id: str) -> int | None:
        """The pid (and process group) of the CLI the agent's record names, if any."""
        pid = self.r.hget(self.keys.agent(agent_id), "cli_pid")
        return int(pid) if pid else None

    def set_runner_pid(self, agent_id: str, pid: int) -> None:
        self.r.hset(self.keys.agent(agent_id), "pid", pid)

    def fail_agent(self, agent_id: str, name: str, reason: str) -> None:
        """The agent `failed`, saying why, until `tt restart`: its runner found its CLI cannot
        start, or the supervisor gave up on a runner that kept crashing."""
        self.set_agent_state(agent_id, AgentState.FAILED, pid="", cli_pid="", current_task="", reason=reason,
                             restart_at="")
        self.event("agent_failed", agent=name, reason=reason)

    def record_restart(self, agent_id: str, name: str, reason: str, delay: float) -> None:
        """One more restart of an agent's runner, and its event, in one transaction."""
        pipe = self.r.pipeline()
        pipe.hincrby(self.keys.agent(agent_id), "restarts", 1)
        self._event(pipe, "agent_restarting", agent=name, reason=reason, delay=f"{delay:.3f}")
        pipe.execute()

    def mark_stopped(self, *agent_ids: str) -> None:
        """Record agents as stopped, and put back what their runners claimed but never started
        (a runner stopped while idle exits without writing anything): two round trips for any
        number of agents, so 50 runners stop in one go. A record edited by hand into a state
        that cannot become `stopped` is left as it is."""
        if not agent_ids:
            return
        reads = self.r.pipeline(transaction=False)
        for agent_id in agent_ids:
            reads.hget(self.keys.agent(agent_id), "state")
            reads.lrange(self.keys.inflight(agent_id), 0, -1)
        found = reads.execute()
        pipe = self.r.pipeline(transaction=False)
        for agent_id, old, inflight in zip(agent_ids, found[::2], found[1::2]):
            if old is not None:  # no record: the agent was removed
                try:
                    self.set_agent_state(agent_id, AgentState.STOPPED, pipe=pipe, old=old, pid="", cli_pid="",
                                         current_task="", restart_at="")
                except (InvalidTransition, ValueError):
                    pass
            for raw in inflight:  # claimed as the stop came (rare)
                self._put_back_unstarted(agent_id, raw)
        pipe.execute()

    def _put_back_unstarted(self, agent_id: str, raw: str) -> None:
        try:
            claimed = Claimed(raw, Message.decode(raw))
            # assigned: claimed as the stop came; running: its runner died under it (or was killed
            # past every deadline), which counts as an attempt
            if self.task(claimed.message.task_id).state in (TaskState.ASSIGNED.value, TaskState.RUNNING.value):
                self.requeue(agent_id, claimed)
        except (TinytownError, ValueError, TypeError):
            pass  # not a task we can put back: the next runner's recovery decides

    def persistence_error(self) -> str | None:
        """Why Redis cannot write its append-only file (it then refuses every write), or None.
        A read: it answers when nothing else can be written."""
        info = self.r.execute_command("INFO", "persistence")
        fields = info if isinstance(info, dict) else dict(  # (redis-py parses INFO; resp.py does not)
            line.split(":", 1) for line in info.splitlines() if ":" in line)
        if fields.get("aof_last_write_status", "ok") == "ok":
            return None
        return (f"disk full: Redis cannot write its append-only file in {self.config.runtime_dir / 'redis'}; "
                "the town keeps what it has and goes on once there is space")

    def status(self) -> dict:
        """The town at a glance. tasks: a count per state, and `blocked`: those waiting in the
        inbox of a failed agent (counted in `assigned` too), which nothing runs until `tt restart`."""
        agents = self.agents()
        queued = self.queued_counts(agents)
        waiting = self.coordination.waiting_counts()
        info = self.supervisor_info()
        tasks = self.task_counts()
        tasks["blocked"] = sum(queued.get(a.id, 0) for a in agents if a.state == AgentState.FAILED.value)
        roles = self.coordination.roles([a.id for a in agents])
        hosts = self.hosts.listing()
        host_states = {h["name"]: h["state"] for h in hosts}
        agent_data = []
        for a in agents:
            data = agent_json(a, queued.get(a.id, 0), self.config.supervisor.heartbeat_stale, self.config.root,
                              host_states, waiting=waiting.get(a.id, 0))
            data["roles"] = roles.get(a.id, [])
            agent_data.append(data)
        for h in hosts:
            h["agents"] = [a.name for a in agents if a.host == h["name"]]
        return {
            "town": self.config.name,
            "root": str(self.config.root),
            "redis": self.config.redis_where,
            "supervisor": {**self._supervisor_here(info, hosts),
                           "config_error": info.get("config_error", ""),
                           "disk_error": self.persistence_error() or ""},
            "max_agents": self.config.max_agents,
            "agents": agent_data,
            "hosts": hosts,
            "tasks": tasks,
            # backlog work whose role no agent has: it waits until one is spawned with it
            "unserved_roles": self.coordination.unserved_roles(agents),
        }

    def _supervisor_here(self, info: dict, hosts: list[dict]) -> dict:
        """pid, host and state of this folder's supervisor. On one host, the town's record; on
        several, that record is whichever supervisor started or stopped last, so this folder's
        host's own record says it (live: running), and a folder that is no host's (a laptop with
        the town's config) says it has none: "none here"."""
        me = self.here
        here = next((h for h in hosts if h["name"] == me), None)
        if here is None and hosts and fencing(self.config):
            return {"pid": None, "host": "", "state": "none here"}
        if len(hosts) > 1 and here is not None:
            state = {"live": "running"}.get(here["state"], here["state"])  # (else stopped, lapsed, lost)
            return {"pid": here["pid"] if state == "running" else None, "host": me, "state": state}
        return {"pid": int(info["pid"]) if info.get("pid") else None, "host": info.get("host", ""),
                "state": info.get("state", "")}


class Requests(NamedTuple):
    """What `tt` commands asked of the supervisors: the last stop's mode, how many stops and how
    many reloads were asked so far (a supervisor acts on those asked after its start)."""

    stop: StopMode | None
    stops: int
    reloads: int


def _stop_mode(value: str | None) -> StopMode | None:
    """A stop request as written by `tt stop`; an unknown word (a hand edit) counts as graceful."""
    if not value:
        return None
    try:
        return StopMode(value)
    except ValueError:
        return StopMode.GRACEFUL


# How a runner's failed reason starts when the agent's latest work, made on another host, cannot
# be had where it runs now (runner.py); `tt restart --without-latest` is for that failure alone.
WORK_NOT_HERE = "its latest work is not here"


def check_latest_to_leave(agent: Agent) -> None:
    """TinytownError unless `agent` failed because its latest work is not here (WORK_NOT_HERE)."""
    if (agent.state != AgentState.FAILED.value or not agent.reason.startswith(WORK_NOT_HERE)
            or not agent.work_task or agent.work_host in ("", agent.host)):
        raise TinytownError(f"{agent.name} has no latest work to leave: --without-latest is for an agent "
                            "failed because its latest work, made on another host, is not where it runs now")


def agent_json(agent: Agent, queued: int, stale_after: float, root=None, host_states: dict | None = None,
               waiting: int = 0) -> dict:
    """queued: its tasks in its inbox; waiting: its tasks pending on dependencies; `pending` is
    both, the work it has not started. root: the town folder, to say where the agent works
    (`workdir`) and what its worktree was left in the middle of (`workspace_problem`: a rebase...
    a few file checks, no git process). host_states: each host's state (Hosts.states): an agent
    waiting on a lost host is `lost`."""
    data = agent.to_json()
    data["workspace"] = agent.workspace or "shared"
    data["pending"], data["queued"], data["waiting"] = queued + waiting, queued, waiting
    data["health"] = agent.health(stale_after)
    host_state = (host_states or {}).get(agent.host, "")
    if host_state == "lost":
        data["health"] = "lost"
    elif host_state == "stopped" and "live" in host_states.values():  # (the town runs on, not here)
        data["host_stopped"] = True
    data["responsive"] = data["health"] != "unresponsive"
    if root is not None:
        workspace = agent_workspace(root, agent)
        data["workdir"] = str(workspace.workdir if workspace else root)
        problem = workspace.problem() if workspace else ""
        data["workspace_problem"] = problem and workspace.problem_line(problem)
    return data


def agent_workspace(root, agent: Agent):
    """The agent's worktree (supervisor/workspace.py; opening it starts no process), or None when
    its CLI works in the town folder."""
    if agent.workspace != "worktree":
        return None
    from .workspace import Workspace
    prefix = agent.branch[:-len(agent.name)] if agent.branch.endswith(agent.name) else "tt/"
    return Workspace(root, agent.name, prefix)


def host() -> str:
    return socket.gethostname()
