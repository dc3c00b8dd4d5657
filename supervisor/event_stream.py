"""The town's event stream as `tt events` reads it: the last N (of one agent), then what comes.

Every change the store makes appends an event (Town._event, the coordination scripts): a type,
`at` (epoch seconds) and fields such as task, agent, reason. Some events name only their task
(a task's outcome, a re-queue): their agent is read from the task, once per task, so `--agent`
finds them too; not for a task put in the backlog, which had no agent then. Following is XREAD BLOCK on the stream: no polling, a new event within a hop.
"""
from __future__ import annotations

from dataclasses import dataclass

BATCH = 500


@dataclass
class Event:
    id: str
    type: str
    at: float
    agent: str
    fields: dict

    def to_json(self) -> dict:
        data = {"id": self.id, "type": self.type, "at": self.at, **{k: _typed(k, v) for k, v in self.fields.items()}}
        if self.agent:
            data["agent"] = self.agent
        return data


# Events about a task that had no agent when they happened: not credited to the one that took it later.
WITHOUT_AGENT = {"task_backlogged"}


def _agent_from_task(fields: dict) -> bool:
    """Whether an event's agent is read from its task: it names a task and no agent at all (an
    outcome, a re-queue). One written with an empty agent (a backlog task released, pending)
    had none then, as a backlogged one."""
    return "agent" not in fields and bool(fields.get("task")) and fields.get("type") not in WITHOUT_AGENT

# A stream entry's values are strings; --json gives these their type (one "" is null).
_NUMBERS = {"exit_code": int, "returned": int, "notes_dropped": int, "delay": float}
_FLAGS = {"urgent", "to_backlog"}


def _typed(key: str, value: str):
    if key in _FLAGS:
        return value not in ("", "0", "False")
    kind = _NUMBERS.get(key)
    if kind is None:
        return value
    try:
        return kind(value) if value != "" else None
    except ValueError:  # (a hand-written entry: as it is)
        return value


class EventStream:
    def __init__(self, client, keys, agent: str | None = None):
        self.r = client
        self.keys = keys
        self.agent = agent
        self.task_agents: dict[str, str] = {}
        self.last = "0-0"  # the newest id seen: following goes on from there

    def last_events(self, n: int) -> list[Event]:
        """The newest `n` events (of the agent, if one was given), oldest first."""
        found: list[Event] = []
        top = "+"
        while True:
            batch = self.r.xrevrange(self.keys.events, top, "-", count=BATCH if n > 0 else 1)
            if top == "+" and batch:
                self.last = batch[0][0]  # following goes on right after the newest shown
            if n <= 0:
                return []
            found += [e for e in self._events(batch) if self._wanted(e)]
            if len(found) >= n:
                break
            if len(batch) < BATCH:
                break
            top = "(" + batch[-1][0]
        return list(reversed(found[:n]))

    def follow(self, block_ms: int) -> list[Event]:
        """Events after the last one seen, waiting up to block_ms for the first; oldest first."""
        reply = self.r.xread({self.keys.events: self.last}, count=BATCH, block=block_ms) or []
        entries = [entry for _stream, batch in reply for entry in batch]
        if entries:
            self.last = entries[-1][0]
        return [e for e in self._events(entries) if self._wanted(e)]

    def _wanted(self, event: Event) -> bool:
        return self.agent is None or event.agent == self.agent

    def _events(self, entries) -> list[Event]:
        unknown = sorted({f["task"] for _id, f in entries if _agent_from_task(f)} - set(self.task_agents))
        if unknown:  # one round trip for every task named without its agent
            pipe = self.r.pipeline(transaction=False)
            for task_id in unknown:
                pipe.hget(self.keys.task(task_id), "agent")
            self.task_agents.update(zip(unknown, (a or "" for a in pipe.execute())))
        events = []
        for entry_id, raw in entries:
            fields = dict(raw)
            from_task = _agent_from_task(fields)
            kind = fields.pop("type", "")
            try:
                at = float(fields.pop("at", "") or 0)
            except ValueError:
                at = 0.0
            agent = self.task_agents.get(fields.get("task", ""), "") if from_task else fields.pop("agent", "")
            events.append(Event(entry_id, kind, at, agent, fields))
        return events
