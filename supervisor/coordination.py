"""Work that flows between agents, in Redis: dependencies, the shared backlog and roles, notes, cancel.

The steps that must be atomic run as the Lua scripts of supervisor/coordination_lua.py; this module
resolves what a user typed (task ids, prefixes, agent names) into ids first, checks what can be
checked, and turns replies into models. The two calls meant for the finishing path (`queue_release`,
`queue_claim`) add a script to a MULTI/EXEC pipeline the caller executes with its own writes.

The scripts' contracts are in coordination_lua.py; the keys in keys.py.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from .config import validate_name
from .coordination_lua import SCRIPTS
from .errors import TinytownError
from .resp import ReplyError
from .models import AgentState, Note, Task, TaskState, new_id, now
from .town import EVENTS_MAXLEN

UNFINISHED = (TaskState.PENDING.value, TaskState.ASSIGNED.value, TaskState.RUNNING.value)


def caller(town_name: str, env=os.environ) -> str:
    """Who is acting: the agent whose CLI runs this `tt` (its runner sets TT_AGENT, and TT_TOWN to
    the town, so an agent of another town is not taken for one of this town's), else "user"."""
    agent = env.get("TT_AGENT", "")
    return agent if agent and env.get("TT_TOWN") == town_name else "user"


def split_refs(refs, what: str = "--after") -> list[str]:
    """`--after a --after b,c` -> ["a", "b", "c"]: repeatable and comma-separated alike."""
    out = []
    for ref in refs:
        for part in ref.split(","):
            part = part.strip()
            if not part:
                raise TinytownError(f"empty reference in {what} {ref!r}")
            out.append(part)
    return out


def _pairs(flat) -> dict:
    return dict(zip(flat[::2], flat[1::2])) if flat else {}


def _ids(joined: str) -> list[str]:
    return [i for i in joined.split(",") if i]


@dataclass
class Created:
    """What `create_task` made: the task as stored, and where it went."""

    task: Task
    taken_by: str = ""       # a backlog task handed at once to this (idle) agent


@dataclass
class Upstream:
    """A dependency as the dependent's prompt shows it."""

    id: str
    agent: str
    state: str
    exit_code: int | None
    output: str


@dataclass
class Begun:
    """The reply of `begin`: what a runner needs between claiming a task and starting its CLI."""

    status: str              # ok | gone | finished | cancel
    task: Task | None
    agent_state: str
    notes: list[Note] = field(default_factory=list)
    upstream: list[Upstream] = field(default_factory=list)
    work: tuple[str, str] = ("", "")  # the agent's latest work: (task, host that made it) (Agent.work_task)


class Coordination:
    """The coordination store of one town: takes the Town whose client and keys it uses."""

    def __init__(self, town, events_maxlen: int = EVENTS_MAXLEN):
        self.town = town
        self.r = town.r
        self.keys = town.keys
        k = self.keys
        templates = {
            "task": k.task(""), "tasks": k.task_index, "agent": k.agent(""), "agents": k.agent_index,
            "inbox": k.inbox(""), "inflight": k.inflight(""), "events": k.events,
            "dependents": k.dependents(""), "awaited": k.awaited, "backlog": k.backlog(""),
            "backlog_roles": k.backlog_roles, "roles": k.roles(""), "note": k.note(""), "notes": k.notes(""),
            "delivered_notes": k.delivered_notes(""), "cancel_requests": k.cancel_requests,
            "output": k.output(""), "host": k.host(""),
        }
        self.ctx = json.dumps({"keys": templates, "events_maxlen": events_maxlen,
                               "control": k.control}, separators=(",", ":"))

    # --- running the scripts ---------------------------------------------------------------
    def _run(self, name: str, *args):
        """Run a script (resp.Script: EVALSHA, the text only when Redis does not have it yet);
        TTERR replies raise TinytownError with their text."""
        try:
            return SCRIPTS[name](self.r, (self.keys.task_index,), (self.ctx, *args))
        except ReplyError as exc:
            raise _user_error(exc) from None

    def _queue(self, pipe, name: str, *args) -> None:
        """Add a script to `pipe` (a MULTI/EXEC the caller executes): by SHA1, its text loaded
        once per connection (resp.Pipeline.execute, which also says what a NOSCRIPT there does)."""
        SCRIPTS[name](pipe, (self.keys.task_index,), (self.ctx, *args))

    # --- references ------------------------------------------------------------------------
    def resolve_task(self, ref: str) -> str:
        """A task id from an id or a unique prefix of one."""
        if not ref:
            raise TinytownError("no task id given")
        if self.r.exists(self.keys.task(ref)):
            return ref
        matches = [t for t in self.r.zrange(self.keys.task_index, 0, -1) if t.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise TinytownError(f"task id {ref!r} is ambiguous" if matches else f"no task {ref!r}")

    def resolve_refs(self, refs, what: str = "--after", idle: list[str] | None = None) -> list[str]:
        """Dependency ids from `--after` (or `tt wait`) references, in order, each once. idle: the
        agents named that have no task at all (nothing to wait for) are appended to it.

        A reference naming an agent means every task of that agent not finished yet or, when it
        has none, the task it finished last (none at all: nothing to wait for). So `tt wait tester
        && tt assign reviewer --after dev,tester` carries dev's and tester's work whether they
        finished a minute or a millisecond ago, and a wait that starts just after the agent
        finished reports how it ended. Anything else is a task id or a unique prefix of one. An unknown reference is a TinytownError, raised before
        anything is written. A cycle cannot be made: every dependency exists before its
        dependent, whose own list is fixed when it is created.
        """
        ids: list[str] = []
        names = split_refs(refs, what)
        agents = self.r.hgetall(self.keys.agent_index) if names else {}
        by_agent = None
        for ref in names:
            if ref in agents:
                if by_agent is None:
                    by_agent = self._tasks_by_agent()
                unfinished, latest = by_agent.get(agents[ref], ([], ""))
                ids.extend(unfinished or ([latest] if latest else []))
                if idle is not None and not (unfinished or latest):
                    idle.append(ref)
                continue
            try:
                ids.append(self.resolve_task(ref))
            except TinytownError as exc:
                if str(exc).startswith("no task"):
                    raise TinytownError(f"{what} {ref!r}: no task or agent of that name in town "
                                        f"{self.town.config.name!r}") from None
                raise
        return list(dict.fromkeys(ids))

    def _tasks_by_agent(self) -> dict[str, tuple[list[str], str]]:
        """Agent id -> (its unfinished task ids, oldest first; the task it finished last), in one
        read of every task's agent, state and end: only when a reference names an agent. By id,
        not name: a pruned agent's name may be a new agent's now."""
        ids = self.r.zrange(self.keys.task_index, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.execute_command("HMGET", self.keys.task(task_id), "agent_id", "state", "finished_at")
        found: dict[str, tuple[list[str], str]] = {}
        last_end: dict[str, float] = {}
        for task_id, (agent_id, state, finished_at) in zip(ids, pipe.execute() if ids else []):
            if not agent_id:
                continue
            unfinished, _ = found.setdefault(agent_id, ([], ""))
            if state in UNFINISHED:
                unfinished.append(task_id)
            elif float(finished_at or 0) >= last_end.get(agent_id, -1.0):
                found[agent_id], last_end[agent_id] = (unfinished, task_id), float(finished_at or 0)
        return found

    def create_task(self, description: str, *, agent: str | None = None, role: str | None = None,
                    after=(), context: bool = True, created_by: str = "user") -> Created:
        """A task for `agent` (its inbox), or without one for the backlog (`role`, or any agent),
        after the tasks `after` names (see resolve_refs), in one atomic step.

        With unfinished dependencies it is `pending` until the last completes. A dependency that
        already failed or was cancelled makes it `cancelled` at once, with the reason: the same
        outcome it would have had a moment later, so a script building a graph sees one rule (a
        refusal would instead break every later step that names this task).
        """
        if not description.strip():
            raise TinytownError("the task description is empty")
        if agent is not None and role is not None:
            raise TinytownError("a role is for backlog tasks; a task for a named agent has none")
        if role is not None:
            validate_name("role", role)
        deps = self.resolve_refs(after)
        agent_id = self.town.agent_id(agent) if agent is not None else ""
        if agent_id:
            self.town.check_prompts(agent_id, [description])
        task = Task(id=new_id(), agent=agent or "", agent_id=agent_id, description=description,
                    state=TaskState.PENDING.value, created_at=now(), after=",".join(deps),
                    backlog=agent is None, role=role or "", no_context=not context,
                    created_by=created_by)
        fields = task.to_hash()
        del fields["state"]  # the script decides it
        flat = [x for kv in fields.items() for x in kv]
        state, reason, taker, deps_left = self._run("create", task.id, len(deps), *deps, *flat)
        task.state, task.reason, task.deps_left = state, reason, int(deps_left)
        if state == TaskState.CANCELLED.value:
            task.finished_at = now()
        if task.backlog and taker:  # handed at once to an idle agent
            task.agent, task.agent_id = taker, self.town.agent_id(taker)
            return Created(task, taker)
        return Created(task)

    def backlog_add(self, description: str, *, role: str | None = None, after=(), context: bool = True,
                    created_by: str = "user") -> Created:
        """Queue work for whichever agent matching `role` (None: any agent) is free first."""
        return self.create_task(description, role=role, after=after, context=context, created_by=created_by)

    # --- the finishing path ----------------------------------------------------------------
    def queue_release(self, pipe, task_id: str) -> None:
        """In the transaction that records a task's outcome: release (or cancel) its dependents."""
        self._queue(pipe, "release", task_id)

    def queue_claim(self, pipe, agent_id: str) -> None:
        """In a transaction that makes an agent idle: it takes the oldest backlog task it may, if
        its inbox and in-flight list are empty by then."""
        self._queue(pipe, "claim", agent_id, "", "1")

    def release(self, task_id: str) -> tuple[int, int]:
        """Release a finished task's dependents now: (released, cancelled). Idempotent; nothing
        for a task not finished yet."""
        released, cancelled = self._run("release", task_id)
        return int(released), int(cancelled)

    def recover(self) -> tuple[int, int, int]:
        """At supervisor start: every finished task with dependents left (a crash between an
        outcome and its release, or an outcome written without one) is released, and every free
        agent takes backlog work it may. (released, cancelled, claimed). Reads only the tasks
        someone waits on, never every task."""
        released, cancelled, claimed = self._run("recover")
        return int(released), int(cancelled), int(claimed)

    def blocked_by(self, tasks: list[Task]) -> dict[str, list[str]]:
        """Task id -> the ids it runs after that have not completed (one round trip for all)."""
        wanted = {d for t in tasks for d in _ids(t.after)}
        order = list(wanted)
        pipe = self.r.pipeline(transaction=False)
        for dep in order:
            pipe.hget(self.keys.task(dep), "state")
        states = dict(zip(order, pipe.execute())) if order else {}
        return {t.id: [d for d in _ids(t.after) if states.get(d) != TaskState.COMPLETED.value] for t in tasks}

    def dependency_json(self, tasks: list[Task]) -> dict[str, dict]:
        """Task id -> {"after": [...], "blocked_by": [...]}: what --json adds to each task."""
        blocked = self.blocked_by(tasks)
        return {t.id: {"after": _ids(t.after), "blocked_by": blocked[t.id]} for t in tasks}

    # --- the runner's step between claim and CLI ----------------------------------------------
    def begin(self, agent_id: str, task_id: str) -> Begun:
        """Take a claimed task's notes into its record and read what its prompt needs (task,
        notes, upstream outputs) with the agent's state, in one atomic round trip."""
        status, task, agent_state, notes, upstream, work = self._run("begin", agent_id, task_id)
        return Begun(
            status=status,
            task=Task.from_hash(_pairs(task)) if task else None,
            agent_state=agent_state or "",
            notes=[Note.from_hash(_pairs(n)) for n in notes if n],
            upstream=[Upstream(u[0] or "", u[1] or "", u[2] or "", int(u[3]) if u[3] not in (None, "") else None,
                               u[4] or "") for u in upstream if u and u[0]],
            work=(work[0] or "", work[1] or ""),
        )

    # --- backlog and roles -----------------------------------------------------------------
    def set_roles(self, agent: str, roles) -> list[str]:
        """Give an agent exactly these roles (replacing any), then let it take matching backlog
        work if it is free."""
        roles = list(dict.fromkeys(roles))
        for role in roles:
            validate_name("role", role)
        agent_id = self.town.agent_id(agent)
        pipe = self.r.pipeline()
        pipe.execute_command("DEL", self.keys.roles(agent_id))
        if roles:
            pipe.execute_command("SADD", self.keys.roles(agent_id), *roles)
        self.queue_claim(pipe, agent_id)
        pipe.execute()
        return roles

    def roles(self, agent_ids: list[str]) -> dict[str, list[str]]:
        """Agent id -> its roles, sorted (one round trip for all)."""
        pipe = self.r.pipeline(transaction=False)
        for agent_id in agent_ids:
            pipe.execute_command("SMEMBERS", self.keys.roles(agent_id))
        return {a: sorted(r or []) for a, r in zip(agent_ids, pipe.execute())} if agent_ids else {}

    def backlog(self) -> list[Task]:
        """Unclaimed backlog tasks, oldest first: those any matching idle agent may take, and
        those still waiting on dependencies (Town.explained says on which), which enter it when
        the last one completes. (Read in a few round trips: a task released in between is
        listed once, as released.)"""
        released = self._released_backlog()
        seen = {t.id for t in released}
        waiting = [t for t in self._tasks(self._waiting_task_ids())
                   if t.backlog and not t.agent and t.state == TaskState.PENDING.value and t.deps_left > 0
                   and t.id not in seen]
        return sorted(released + waiting, key=lambda t: t.created_at)

    def _tasks(self, ids: list[str]) -> list[Task]:
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.keys.task(task_id))
        return [Task.from_hash(d) for d in (pipe.execute() if ids else []) if d]

    def _released_backlog(self) -> list[Task]:
        roles = self.r.execute_command("SMEMBERS", self.keys.backlog_roles) or []
        pipe = self.r.pipeline(transaction=False)
        for role in roles:
            pipe.execute_command("ZRANGE", self.keys.backlog(role), 0, -1, "WITHSCORES")
        scored = []
        for flat in pipe.execute() if roles else []:
            scored += [(float(score), task_id) for task_id, score in zip(flat[::2], flat[1::2])]
        return self._tasks([task_id for _, task_id in sorted(scored)])

    def _waiting_task_ids(self) -> list[str]:
        """The tasks some unfinished task still has in its dependents list: those pending on
        dependencies. Read from the awaited tasks, not from every task: two round trips,
        whatever the town's history."""
        awaited = list(self.r.execute_command("SMEMBERS", self.keys.awaited) or [])
        if not awaited:
            return []
        pipe = self.r.pipeline(transaction=False)
        for task_id in awaited:
            pipe.lrange(self.keys.dependents(task_id), 0, -1)
        return sorted({task_id for ids in pipe.execute() for task_id in ids})

    def waiting_counts(self) -> dict[str, int]:
        """Agent id -> how many of its tasks are `pending` on unfinished dependencies (`tt status`
        and `tt list` count them with its queue); "" -> backlog tasks, which have no agent yet."""
        waiting = self._waiting_task_ids()
        if not waiting:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for task_id in waiting:
            pipe.execute_command("HMGET", self.keys.task(task_id), "agent_id", "state")
        counts: dict[str, int] = {}
        for agent_id, state in pipe.execute():
            if state == TaskState.PENDING.value:
                counts[agent_id or ""] = counts.get(agent_id or "", 0) + 1
        return counts

    def unserved_roles(self, agents: list) -> list[str]:
        """Roles with backlog work that no agent of `agents` can take (`tt status`: nobody can take
        it): none has the role, or those that have it are closed, paused or failed, so they take
        nothing until a `tt resume`/`tt restart`. Counts each role's backlog (ZCARD), never reads
        the tasks: a long backlog costs `tt status` nothing."""
        roles = [role for role in self.r.execute_command("SMEMBERS", self.keys.backlog_roles) or [] if role != "*"]
        pipe = self.r.pipeline(transaction=False)
        for role in roles:
            pipe.execute_command("ZCARD", self.keys.backlog(role))
        waiting = [role for role, count in zip(roles, pipe.execute() if roles else []) if count]
        if not waiting:
            return []
        able = [a.id for a in agents if not a.hold and a.state != AgentState.FAILED.value]
        served = {r for roles in self.roles(able).values() for r in roles}
        return sorted(set(waiting) - served)

    def claim(self, agent: str, task_ref: str | None = None) -> str | None:
        """Give `agent` the oldest backlog task its roles match (or the one named), atomically:
        two claimers never get the same task. The task id, or None if nothing matches."""
        agent_id = self.town.agent_id(agent)
        task_id = self.resolve_task(task_ref) if task_ref else ""
        return self._run("claim", agent_id, task_id, "0") or None

    def backlog_remove(self, task_ref: str, by: str = "user") -> int:
        """Drop an unclaimed backlog task: it becomes cancelled (tasks are records, never deleted)
        and so do its dependents. How many dependents were cancelled with it."""
        task_id = self.resolve_task(task_ref)
        _, cascaded = self._run("cancel", task_id, f"removed from the backlog by {by}", "1")
        return int(cascaded)

    # --- notes -----------------------------------------------------------------------------
    def send(self, agent: str, text: str, *, urgent: bool = False, sender: str = "user") -> Note:
        """Leave a note for `agent`, delivered with its next task (before the task's text)."""
        if not text.strip():
            raise TinytownError("the note is empty")
        agent_id = self.town.agent_id(agent)
        note = Note(id=new_id(), to=agent, sender=sender, text=text, urgent=urgent, created_at=now())
        pipe = self.r.pipeline()
        pipe.hset(self.keys.note(note.id), mapping=note.to_hash())
        pipe.rpush(self.keys.notes(agent_id), note.id)
        self.town._event(pipe, "note_sent", note=note.id, agent=agent, sender=sender, urgent=int(urgent))
        pipe.execute()
        return note

    def inbox(self, agent: str, delivered: bool = False) -> list[Note]:
        """Notes waiting for `agent`, in the order sent; with `delivered`, those already delivered
        first (in the order delivered)."""
        agent_id = self.town.agent_id(agent)
        ids = self.r.lrange(self.keys.delivered_notes(agent_id), 0, -1) if delivered else []
        ids += self.r.lrange(self.keys.notes(agent_id), 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for note_id in ids:
            pipe.hgetall(self.keys.note(note_id))
        return [Note.from_hash(d) for d in (pipe.execute() if ids else []) if d]

    # --- cancel ----------------------------------------------------------------------------
    def cancel(self, task_ref: str, by: str = "user") -> tuple[str, int]:
        """Cancel a task: ("cancelled", dependents cancelled with it) when it was waiting (pending,
        in an inbox or the backlog); ("requested", 0) when in flight: its runner stops the CLI and
        records it cancelled. A finished task is a TinytownError and nothing changes."""
        task_id = self.resolve_task(task_ref)
        outcome, cascaded = self._run("cancel", task_id, f"cancelled by {by}", "0")
        return outcome, int(cascaded)

    def cancel_requests(self) -> list[tuple[str, str]]:
        """(task id, agent id) of each in-flight task a cancel waits on: for the supervisor to
        signal those runners (on start, and on each nudge)."""
        ids = self.r.execute_command("SMEMBERS", self.keys.cancel_requests) or []
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(self.keys.task(task_id), "state")
            pipe.hget(self.keys.task(task_id), "agent_id")
        values = pipe.execute() if ids else []
        return [(t, a) for t, s, a in zip(ids, values[::2], values[1::2]) if s in UNFINISHED and a]

    # --- agents leaving (supervisor/agent_control.py) -----------------------------------------
    def give_back(self, agent_id: str, only_backlog: bool = False) -> int:
        """An agent's queued tasks (its inbox, and its tasks waiting on dependencies) to the shared
        backlog, keeping their place; how many. Only for an agent no runner works for.
        only_backlog: only those it had taken from the backlog (an agent that failed)."""
        return int(self._run("give_back", agent_id, "1" if only_backlog else "0"))

    def remove_agent(self, agent_id: str, name: str, to_backlog: bool, check_only: bool = False) -> tuple[int, int]:
        """`tt prune`: the agent and its keys leave the registry (its tasks stay), or a TinytownError
        saying why not. (tasks given back, undelivered notes dropped); check_only: (tasks queued,
        notes waiting) and nothing changes."""
        moved, notes = self._run("prune", agent_id, name, "1" if to_backlog else "0", "1" if check_only else "0")
        return int(moved), int(notes)

    # --- wait --------------------------------------------------------------------------------
    def wait(self, task_ids: list[str], timeout: float | None = None) -> dict[str, str]:
        """Block until every task is finished: id -> its final state (those still unfinished at
        `timeout` are missing). No polling: XREAD BLOCK on the town's events wakes it when
        something happens, and then the states are read again (one round trip), so a trimmed
        stream or an outcome written without its event loses nothing. The client must allow a
        reply to take as long as the block (resp.connect(long_lived=True))."""
        ids = list(dict.fromkeys(task_ids))
        last = self.r.execute_command("XREVRANGE", self.keys.events, "+", "-", "COUNT", 1)
        last = last[0][0] if last else "0-0"  # read before the states: a later finish is after it
        deadline = None if timeout is None else time.monotonic() + timeout
        done: dict[str, str] = {}
        while True:
            left = [t for t in ids if t not in done]
            pipe = self.r.pipeline(transaction=False)
            for task_id in left:
                pipe.hget(self.keys.task(task_id), "state")
            for task_id, state in zip(left, pipe.execute() if left else []):
                if state is None:
                    raise TinytownError(f"no task {task_id!r}")
                if TaskState(state).terminal:
                    done[task_id] = state
            if len(done) == len(ids):
                return done
            block = 0 if deadline is None else int((deadline - time.monotonic()) * 1000)
            if deadline is not None and block <= 0:
                return done
            reply = self.r.execute_command("XREAD", "COUNT", 1000, "BLOCK", block, "STREAMS",
                                           self.keys.events, last)
            for _stream, entries in reply or []:
                if entries:
                    last = entries[-1][0]

    def cancel_request(self, task_id: str) -> str:
        """Why a running task is to be stopped ("" if it is not): what a runner reads when told."""
        return self.r.hget(self.keys.task(task_id), "cancel_request") or ""


def _user_error(exc: Exception) -> Exception:
    text = str(exc)
    if "TTERR " in text:
        return TinytownError(text.split("TTERR ", 1)[1].strip())
    return exc

