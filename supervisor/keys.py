"""Every Redis key and channel name Tinytown uses, and nowhere else (RQ's discipline).

All keys of a town share the prefix `tt:<town>:` so several towns can share one Redis.
"""
from __future__ import annotations


class Keys:
    def __init__(self, town: str):
        self.prefix = f"tt:{town}:"

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
