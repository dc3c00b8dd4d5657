"""The supervisor's ear: a subscription to the control channel whose only job is to make select() wake up.

A message on the control channel means "desired state changed, reconcile"; what changed is read
from Redis itself, so a missed or merged nudge loses nothing.
"""
from __future__ import annotations

from .config import Config
from .resp import RespConnectionError, Subscription, connect


class ControlChannel:
    def __init__(self, config: Config, channel: str):
        self.config = config
        self.channel = channel
        self.subscription: Subscription | None = None

    def connect(self) -> None:
        """Subscribe (RespConnectionError, an OSError, if Redis cannot be reached)."""
        self.subscription = connect(self.config, long_lived=True).subscribe(self.channel)

    def fileno(self) -> int:
        return self.subscription.fileno()

    def drain(self) -> bool:
        """Read whatever arrived; False if the connection closed (Redis went away)."""
        try:
            self.subscription.messages()
        except RespConnectionError:
            return False
        return True

    def close(self) -> None:
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None
