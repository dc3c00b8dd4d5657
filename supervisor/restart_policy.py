"""Whether, and when, the supervisor starts an agent's runner again after it exited.

One small object per agent holds the count of quick failures in a row; `decide` turns a runner's
exit into a decision without touching a process, a clock or Redis (supervisord's
`Subprocess.transition` is the model), so the policy is tested on its own (tests/test_restart_policy.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import SupervisorPolicy
from .procutil import describe_status


@dataclass(frozen=True)
class Restart:
    """Start the runner again after `delay` seconds (0: at once)."""

    delay: float
    reason: str
    fast_failures: int


@dataclass(frozen=True)
class GiveUp:
    """Do not start it again until a user asks (`tt restart`): the agent is `failed`."""

    reason: str
    fast_failures: int


@dataclass
class RestartRecord:
    """One agent's restart bookkeeping, kept in memory by the supervisor (not the agent's
    health in `tt status`, which is read from its record in Redis)."""

    fast_failures: int = 0
    next_start: float = 0.0     # monotonic time before which an agent in backoff is not started
    gave_up: bool = False

    def decide(self, status: int, uptime: float, policy: SupervisorPolicy) -> Restart | GiveUp:
        """The decision for a runner that exited with waitpid `status` after `uptime` seconds.

        A runner up for `start_seconds` counts as started, so its exit starts a new series; the
        first restart of a series is immediate, the next ones back off geometrically, and
        `max_fast_failures` quick failures in a row give up.
        """
        failures = 1 if uptime >= policy.start_seconds else self.fast_failures + 1
        reason = f"runner {describe_status(status)} after {uptime:.1f}s"
        if failures >= policy.max_fast_failures:
            return GiveUp(reason, failures)
        delay = 0.0 if failures == 1 else min(
            policy.backoff_max, policy.backoff_first * policy.backoff_factor ** (failures - 2))
        return Restart(delay, reason, failures)

    def apply(self, decision: Restart | GiveUp, now: float) -> None:
        """Remember a decision taken at monotonic time `now`."""
        self.fast_failures = decision.fast_failures
        self.gave_up = isinstance(decision, GiveUp)
        self.next_start = now + decision.delay if isinstance(decision, Restart) and decision.delay > 0 else 0.0

    def waiting(self, now: float) -> bool:
        """In backoff: not to be started before `next_start`."""
        return self.next_start > now

    def reset(self) -> None:
        """`tt restart`: a new series, started at once."""
        self.fast_failures, self.next_start, self.gave_up = 0, 0.0, False
