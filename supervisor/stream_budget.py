"""How much of an agent's output flood goes into its Redis stream: a token bucket per agent.

Why: the stream (Keys.output) is a capped copy of the output for readers elsewhere (`tt logs
--task`, `--since`, a follower or an attach on another host); the log file has all of it. A CLI
printing flat out (a 100 MB dump) made Redis parse, store and append to its AOF every byte only
to trim most of it again (the stream keeps ~64 MiB): ~15 % of the runner's throughput on 2 cores,
and on a town sharing a Redis across hosts, every host's share of it. An AI CLI prints kilobytes a
second; the budget never touches it. At 8 MiB then 4 MiB/s, what still went cost a flood ~13 % of
its rate (0.65 of the bare pty loop's against 0.78 at 2 MiB then 1 MiB/s, 10 alternated rounds of
100 MB): Redis parsing and persisting a sample no reader needs that large.

Shape: output flows while the bucket (BURST, refilled at RATE) covers it. Once a flush would
overdraw it, the stream gets nothing while only the newest WINDOW bytes are held (from a line's
start where one is near); when the bucket has refilled by WINDOW, or the task ends, one gap line
(`gap_line`: how many bytes, where the log is) and the held window go. So a flood reads as its
start, a coherent window about four times a second, and its end, not as thousands of slivers.
"""
from __future__ import annotations

from collections import deque

RATE = 1024 * 1024           # bytes a second into the stream, flat out
BURST = 2 * 1024 * 1024      # bytes at once, after a quiet spell
WINDOW = 256 * 1024          # the newest output held while throttled, sent whole
LINE_SEARCH = 4096           # a held window starts after a newline found this near its cut


class StreamBudget:
    def __init__(self, now: float, rate: float = RATE, burst: float = BURST, window: int = WINDOW):
        self.rate, self.burst, self.window = rate, burst, window
        self.tokens, self.at = float(burst), now
        self.reset()

    def take(self, pieces: list[bytes], now: float, final: bool = False) -> tuple[int, list[bytes]]:
        """Of `pieces` (the output since the last call, oldest first): (bytes left out before what
        is returned, to be said in a gap line first; 0 for none), what goes to the stream now."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        size = sum(map(len, pieces))
        if not self.throttled:
            if size <= self.tokens:
                self.tokens -= size
                return 0, pieces
            self.throttled = True
        # Held as the pieces came, whole ones dropped from the front while the rest still fills
        # the window: a flood's bytes are not copied here (a bytearray trimmed at its front at
        # every batch copied the window over and over: ~40 % of the runner's main thread).
        held = self.held
        held.extend(pieces)
        self.held_size += size
        while held and self.held_size - len(held[0]) >= self.window:
            dropped = len(held.popleft())
            self.held_size -= dropped
            self.left_out += dropped
        if not (final or self.tokens >= self.window):
            return 0, []
        out = b"".join(held)
        if len(out) > self.window:
            cut = len(out) - self.window
            newline = out.find(b"\n", cut - 1, cut + LINE_SEARCH)  # (from cut - 1: cut may start a line)
            cut = newline + 1 if newline != -1 else cut
            self.left_out += cut
            out = out[cut:]
        gap = self.left_out
        self.reset()
        self.tokens = max(0.0, self.tokens - len(out))
        return gap, [out] if out else []

    def reset(self) -> None:
        """A new task: nothing of the last one is held (its end sent it all)."""
        self.held: deque[bytes] = deque()
        self.held_size = self.left_out = 0
        self.throttled = False


def gap_line(left_out: int, host: str) -> bytes:
    """What a stream reader sees where output was left out (on its own line)."""
    return (f"\n[tt: {left_out} bytes of output left out of the Redis copy (over {RATE // (1024 * 1024)} MiB/s); "
            f"the agent's log on {host} has them]\n").encode()
