"""Agent, Task and Message, their states, and the one table of allowed state transitions."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from enum import Enum

from .stopping import StopMode  # noqa: F401 - (defined there: `tt stop` imports it without this module)


class AgentState(str, Enum):
    STARTING = "starting"
    IDLE = "idle"
    WORKING = "working"
    WAITING = "waiting"    # working, but its CLI asks a question nobody answered (shown: "waiting for input")
    STOPPING = "stopping"
    STOPPED = "stopped"
    BACKOFF = "backoff"
    FAILED = "failed"
    PAUSED = "paused"      # `tt interrupt`: no runner, takes nothing, until `tt resume`


class Hold(str, Enum):
    """What a user asked of an agent's runner (the agent's `hold` field, kept until `tt resume` or
    `tt restart`): the supervisor stops the runner and does not start it again while it is set."""

    PAUSE = "pause"        # `tt interrupt`: the task in hand finishes, then `paused`
    CLOSE = "close"        # `tt close`: the task in hand finishes, then `stopped` for good
    KILL = "kill"          # `tt kill`: the task in hand goes back to the queue now, then `stopped`

    @property
    def final_state(self) -> "AgentState":
        return AgentState.PAUSED if self is Hold.PAUSE else AgentState.STOPPED


class TaskState(str, Enum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


A, T = AgentState, TaskState
# -> paused: the supervisor records it once the runner of an agent `tt interrupt` held is gone
# (it may have exited from any of the live states, or never been started again after a stop).
AGENT_TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    A.STARTING: frozenset({A.IDLE, A.STOPPING, A.STOPPED, A.BACKOFF, A.FAILED, A.PAUSED}),
    A.IDLE: frozenset({A.WORKING, A.STOPPING, A.STOPPED, A.BACKOFF, A.FAILED, A.STARTING, A.PAUSED}),
    A.WORKING: frozenset({A.IDLE, A.WAITING, A.STOPPING, A.STOPPED, A.BACKOFF, A.FAILED, A.STARTING, A.PAUSED}),
    # waiting: the runner saw its CLI stop on a question; back to working at the next output.
    A.WAITING: frozenset({A.WORKING, A.IDLE, A.STOPPING, A.STOPPED, A.BACKOFF, A.FAILED, A.STARTING, A.PAUSED}),
    A.STOPPING: frozenset({A.STOPPED, A.BACKOFF, A.FAILED, A.STARTING, A.PAUSED}),
    A.STOPPED: frozenset({A.STARTING, A.PAUSED}),
    A.BACKOFF: frozenset({A.STARTING, A.STOPPED, A.FAILED, A.PAUSED}),
    A.FAILED: frozenset({A.STARTING, A.STOPPED}),
    A.PAUSED: frozenset({A.STARTING, A.STOPPED}),   # `tt resume`; `tt close`/`kill` of a paused agent
}
TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    T.PENDING: frozenset({T.ASSIGNED, T.CANCELLED}),
    # assigned -> pending: `tt close/kill/prune --to-backlog` gives a queued task to the backlog.
    T.ASSIGNED: frozenset({T.RUNNING, T.FAILED, T.CANCELLED, T.PENDING}),
    # running -> assigned: a stop or a crash puts the task back in the inbox.
    T.RUNNING: frozenset({T.COMPLETED, T.FAILED, T.ASSIGNED, T.CANCELLED}),
    T.COMPLETED: frozenset(),
    T.FAILED: frozenset(),
    T.CANCELLED: frozenset(),
}
del A, T


class InvalidTransition(ValueError):
    pass


def check_agent_transition(old: str | AgentState | None, new: AgentState) -> AgentState:
    """Raise InvalidTransition unless old -> new is allowed (None = a new agent)."""
    if old is None or old == "":
        if new is not AgentState.STARTING:
            raise InvalidTransition(f"a new agent starts as 'starting', not {new.value!r}")
        return new
    old = AgentState(old)
    if new != old and new not in AGENT_TRANSITIONS[old]:
        raise InvalidTransition(f"agent cannot go from {old.value!r} to {new.value!r}")
    return new


def check_task_transition(old: str | TaskState | None, new: TaskState) -> TaskState:
    if old is None or old == "":
        if new not in (TaskState.PENDING, TaskState.ASSIGNED):
            raise InvalidTransition(f"a new task is 'pending' or 'assigned', not {new.value!r}")
        return new
    old = TaskState(old)
    if new != old and new not in TASK_TRANSITIONS[old]:
        raise InvalidTransition(f"task cannot go from {old.value!r} to {new.value!r}")
    return new


def new_id() -> str:
    import uuid  # here: `tt stop` and the quick reads import this module and make no ids
    return str(uuid.uuid4())


def now() -> float:
    return time.time()


class _Hash:
    """Round-trips a dataclass through a Redis hash (all values as strings)."""

    @classmethod
    def from_hash(cls, data: dict):
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                for k, v in data.items()}
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            raw = data[f.name]
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if kind == "bool":  # (written "1"/"0"; "" by a field's reset)
                values[f.name] = raw not in ("", "0")
            elif "float" in kind:
                values[f.name] = float(raw) if raw != "" else None
            elif "int" in kind:
                values[f.name] = int(raw) if raw != "" else None
            else:
                values[f.name] = raw
        return cls(**values)

    def to_hash(self) -> dict[str, str]:
        return {k: _hash_value(v) for k, v in asdict(self).items()}

    def to_json(self) -> dict:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}


def _hash_value(value) -> str:
    """A field as the hash holds it: flags as "1"/"0", which the Lua scripts compare with."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value.value if isinstance(value, Enum) else value)


@dataclass
class Agent(_Hash):
    id: str
    name: str
    cli: str
    state: str = AgentState.STARTING.value
    pid: int | None = None           # the runner's pid
    cli_pid: int | None = None       # the model CLI's pid (= its process group) while working
    current_task: str = ""
    restarts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    heartbeat_at: float | None = None
    task_timeout: float | None = None
    reason: str = ""                 # why it is failed/backoff: last exit status and output tail
    restart_at: float | None = None  # in backoff: when the supervisor starts it again
    warning: str = ""                # what it works on despite (its log cannot be written...)
    hold: str = ""                   # a Hold's value: what `tt interrupt/close/kill` asked ("": none)
    to_backlog: bool = False          # once its runner is gone, its queued tasks go to the backlog
    restart_asked: bool = False       # `tt restart` of a live runner: a new one after the task in hand
    workspace: str = ""              # "worktree" (agents/NAME on `branch`) or "shared" ("": shared)
    branch: str = ""                 # its worktree's branch (tt/NAME), fixed at spawn
    # Where it runs (supervisor/hosts.py): the host whose supervisor runs its runner, whether
    # `tt spawn --host` pinned it there, and its placement's number: a runner started for an
    # older epoch writes nothing more (fencing a host that comes back after being declared lost).
    host: str = ""
    pinned: bool = False
    epoch: int = 0
    # Its worktree's latest work: the task whose head it is, and the host that made it. A runner on
    # another host brings its branch there to that head before its next task (Workspace._carry).
    work_task: str = ""
    work_host: str = ""
    answers: str = ""                # JSON [[regex, text], ...]: typed into its CLI when asked (`tt spawn --answer`)
    question: str = ""               # while `waiting`: the question its CLI stopped on (cleaned text)
    # `tt spawn --keep-context`: each task continues the CLI session of the last one (CliSpec.continued).
    keep_context: bool = False        # on, fixed at spawn
    session: str = ""                # the session id its CLI last printed ("": none seen)
    session_task: str = ""           # the last task whose session the next one continues ("": none yet)

    @property
    def busy(self) -> bool:
        """Running a task: working, or waiting for input in the middle of one."""
        return self.state in (AgentState.WORKING.value, AgentState.WAITING.value)

    def answer_pairs(self) -> tuple[tuple[str, str], ...]:
        """`answers` parsed (a record a hand edit broke: none)."""
        try:
            found = json.loads(self.answers) if self.answers else []
            return tuple((str(expect), str(send)) for expect, send in found)
        except (ValueError, TypeError):
            return ()

    def health(self, stale_after: float, at: float | None = None) -> str:
        """What `tt status` tells a user at a glance: healthy (idle or working with a fresh heartbeat),
        unresponsive (idle or working, heartbeat older than `stale_after`), restarting (backoff),
        failed, or the state itself (starting, stopping, stopped)."""
        if self.state == AgentState.IDLE.value or self.busy:
            stale = self.heartbeat_at is not None and (at or now()) - self.heartbeat_at > stale_after
            return "unresponsive" if stale else "healthy"
        return {AgentState.BACKOFF.value: "restarting"}.get(self.state, self.state)


@dataclass
class Task(_Hash):
    id: str
    agent: str                       # agent name
    agent_id: str
    description: str
    state: str = TaskState.ASSIGNED.value
    exit_code: int | None = None
    attempts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    reason: str = ""                 # why it failed
    output: str = ""                 # last 64 KiB of the CLI's output
    # Work that flows between agents (supervisor/coordination.py):
    after: str = ""                  # comma-separated ids of the tasks this one runs after
    deps_left: int = 0               # how many of those are not finished yet (while `pending`)
    backlog: bool = False             # queued for whichever matching agent is idle first
    role: str = ""                   # a backlog task's role ("": any agent)
    no_context: bool = False          # no upstream output appended to the prompt
    created_by: str = ""             # the agent that created it (TT_AGENT), or "user"
    notes: str = ""                  # comma-separated ids of the notes delivered with it
    cancel_request: str = ""         # in flight: why its runner is to stop it (`tt cancel`)
    # What it changed, in a worktree agent (supervisor/workspace.py): commits base..head on branch,
    # files a JSON list of FileChange.to_json(); workspace_note: what git had to do besides.
    base: str = ""
    head: str = ""
    branch: str = ""
    files: str = ""
    workspace_note: str = ""

    def to_json(self) -> dict:
        data = super().to_json()
        data["files"] = self.changed_files()
        return data

    def changed_files(self) -> list[dict]:
        """`files` parsed: [{"path", "added", "deleted"[, "old_path"]}] (workspace.FileChange.to_json)."""
        try:
            found = json.loads(self.files) if self.files else []
        except ValueError:
            return []
        return found if isinstance(found, list) else []


@dataclass
class Message:
    """One inbox entry. TaskAssign carries only the task id; the task hash holds the rest."""

    type: str
    id: str
    created_at: float
    task_id: str = ""

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> "Message":
        """An inbox entry; one that is not a message (written by hand or by another program)
        decodes as type "": whoever reads it drops it, saying what it was, rather than dying on
        it (a runner that died on one, and the supervisor after it, met it again at each start)."""
        try:
            data = json.loads(raw)
            message = cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})
        except (ValueError, TypeError, AttributeError):  # not JSON, not an object, fields missing
            return cls(type="", id="", created_at=0.0)
        if not (isinstance(message.type, str) and isinstance(message.task_id, str)):
            return cls(type="", id="", created_at=0.0)
        return message

    @classmethod
    def task_assign(cls, task_id: str) -> "Message":
        return cls(type="TaskAssign", id=new_id(), created_at=now(), task_id=task_id)


@dataclass
class Note(_Hash):
    """A note left for an agent (`tt send`), delivered with the agent's next task."""

    id: str
    to: str                          # agent name
    sender: str                      # an agent name, or "user"
    text: str
    urgent: bool = False
    created_at: float = 0.0
    delivered_at: float | None = None
    task: str = ""                   # the task it was delivered with

    def to_json(self) -> dict:
        data = super().to_json()
        data["from"] = data.pop("sender")  # `from` is what the issue and `tt inbox --json` call it
        return data
