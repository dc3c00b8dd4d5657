"""Every Redis key and channel name Tinytown uses, and nowhere else (RQ's discipline).

All keys of a town share the prefix `tt:{<town>}:` so several towns can share one Redis. The
braces are a Redis Cluster hash tag: only `<town>` is hashed, so every key of a town sits in one
slot, on one node, and MULTI/EXEC and Lua scripts across them work on a Redis Cluster too.
"""
from __future__ import annotations


def legacy_prefix(town: str) -> str:
    """The prefix before keys had a hash tag (an append-only file from then is renamed at start)."""
    return f"tt:{town}:"


class Keys:
    def __init__(self, town: str):
        self.prefix = f"tt:{{{town}}}:"

    # --- registry -------------------------------------------------------------------------
    @property
    def agent_index(self) -> str:
        """Hash name -> agent id: the registry of agents, and the duplicate-name guard."""
        return self.prefix + "agents"

    def agent(self, agent_id: str) -> str:
        """Hash of one agent's fields (see models.Agent)."""
        return f"{self.prefix}agent:{agent_id}"

    # --- work -----------------------------------------------------------------------------
    def task(self, task_id: str) -> str:
        """Hash of one task's fields (see models.Task)."""
        return f"{self.prefix}task:{task_id}"

    @property
    def task_index(self) -> str:
        """Sorted set of task ids scored by creation time, for `tt tasks`."""
        return self.prefix + "tasks"

    def inbox(self, agent_id: str) -> str:
        """List of JSON messages for one agent; LPUSH/RPUSH in, BLMOVE out (left end first)."""
        return f"{self.prefix}inbox:{agent_id}"

    def inflight(self, agent_id: str) -> str:
        """List holding the message a runner is working on; survives the runner's death."""
        return f"{self.prefix}inflight:{agent_id}"

    # --- output and events ----------------------------------------------------------------
    def output(self, agent_id: str) -> str:
        """Capped stream of an agent's CLI output chunks, so other machines can follow it."""
        return f"{self.prefix}output:{agent_id}"

    def attach_in(self, agent_id: str) -> str:
        """List of what `tt attach` on another host sends an agent's runner (hello, keystrokes,
        window size, still-here, bye: supervisor/remote_attach.py), oldest first. It expires
        unless a viewer keeps writing to it, so keys nobody took are never typed later."""
        return f"{self.prefix}attach_in:{agent_id}"

    @property
    def events(self) -> str:
        """Capped stream of town events (spawned, task started/finished, restarts...)."""
        return self.prefix + "events"

    # --- supervisor -----------------------------------------------------------------------
    @property
    def supervisor(self) -> str:
        """Hash: pid, host, state, started_at, stop (requested stop mode)."""
        return self.prefix + "supervisor"

    @property
    def control(self) -> str:
        """Pub/sub channel: "something changed, reconcile" nudges to the supervisor."""
        return self.prefix + "control"

    # --- work that flows between agents (supervisor/coordination.py) ----------------------
    # The Lua scripts build these keys as `template + id` from the names below called with "",
    # so each must end with the id (tests/test_coordination_store.py checks it).
    def dependents(self, task_id: str) -> str:
        """List of the pending task ids waiting on this task, in creation order; deleted once
        this task finished and its dependents were released (or cancelled)."""
        return f"{self.prefix}dependents:{task_id}"

    @property
    def awaited(self) -> str:
        """Set of task ids that still have a dependents list: all the supervisor re-releases at
        start, instead of scanning every task."""
        return self.prefix + "awaited"

    def backlog(self, role: str) -> str:
        """Sorted set of unclaimed backlog task ids for one role ("*": any agent), by creation time."""
        return f"{self.prefix}backlog:{role}"

    @property
    def backlog_roles(self) -> str:
        """Set of the roles that have had a backlog sorted set, for listing the whole backlog."""
        return self.prefix + "backlog-roles"

    def roles(self, agent_id: str) -> str:
        """Set of an agent's roles (`tt spawn --role`), matched against backlog tasks."""
        return f"{self.prefix}roles:{agent_id}"

    def note(self, note_id: str) -> str:
        """Hash of one note (see models.Note)."""
        return f"{self.prefix}note:{note_id}"

    def notes(self, agent_id: str) -> str:
        """List of the ids of the notes waiting for an agent's next task, in the order sent."""
        return f"{self.prefix}notes:{agent_id}"

    def delivered_notes(self, agent_id: str) -> str:
        """List of the ids of the notes already delivered to an agent, in the order delivered."""
        return f"{self.prefix}delivered:{agent_id}"

    @property
    def cancel_requests(self) -> str:
        """Set of the ids of in-flight tasks whose cancel waits for their runner to stop the CLI."""
        return self.prefix + "cancel-requests"

    # --- hosts: one supervisor per machine (supervisor/hosts.py) ---------------------------
    # Built by the Lua scripts as `template + name`, like the coordination keys above.
    @property
    def hosts(self) -> str:
        """Set of the names of every host that ever ran a supervisor for this town."""
        return self.prefix + "hosts"

    def host(self, name: str) -> str:
        """Hash of one host: state (live, lost, stopped), lease_until (ms, Redis's clock),
        renewed_at, max_agents, pid, since."""
        return f"{self.prefix}host:{name}"

    @property
    def reaper(self) -> str:
        """String holding the name of the host elected to handle lost hosts; it lapses (PX) with
        its holder's lease, so a survivor takes it over."""
        return self.prefix + "reaper"
