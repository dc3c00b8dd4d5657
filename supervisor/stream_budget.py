"""How much of an agent's output flood goes into its Redis stream: a token bucket per agent.

Why: the stream (Keys.output) is a capped copy of the output for readers elsewhere (`tt logs
--task`, `--since`, a follower or an attach on another host); the log file has all of it. A CLI
printing flat out (a 100 MB dump) made Redis parse, store and append to its AOF every byte only
to trim most of it again (the stream keeps ~64 MiB): ~15 % of the runner's throughput on 2 cores,
and on a town sharing a Redis across hosts, every host's share of it. Past RATE (after a BURST),
the newest output is kept and the rest left to the log, with a line in the stream saying how much
(`gap_line`). An AI CLI prints kilobytes a second; the budget never touches it.
"""
from __future__ import annotations

RATE = 4 * 1024 * 1024       # bytes a second into the stream, flat out
BURST = 8 * 1024 * 1024      # bytes at once, after a quiet spell


class StreamBudget:
    def __init__(self, now: float, rate: float = RATE, burst: float = BURST):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, now

    def take(self, pieces: list[bytes], now: float) -> tuple[list[bytes], int]:
        """Of `pieces` (oldest first), the newest that fit in the budget, the oldest of them cut to
        fit; and how many bytes were left out."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        kept: list[bytes] = []
        room = int(self.tokens)
        for piece in reversed(pieces):
            if room <= 0:
                break
            part = piece if len(piece) <= room else piece[len(piece) - room:]
            kept.append(part)
            room -= len(part)
        kept.reverse()
        sent = sum(map(len, kept))
        self.tokens -= sent
        return kept, sum(map(len, pieces)) - sent


def gap_line(left_out: int, host: str) -> bytes:
    """What a stream reader sees where output was left out (on its own line)."""
    return (f"\n[tt: {left_out} bytes of output left out of the Redis copy (over {RATE // (1024 * 1024)} MiB/s); "
            f"the agent's log on {host} has them]\n").encode()
