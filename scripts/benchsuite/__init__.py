"""scripts/bench: Tinytown measured side by side with supervisord and RQ."""
