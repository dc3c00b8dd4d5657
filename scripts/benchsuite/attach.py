"""`tt attach` from another host: a line typed -> its echo shown, through the town's Redis (keys into
the agent's attach_in list, the echo out of its output stream: supervisor/remote_attach.py) against a
local attach (the runner's unix socket), in the same run, on the same CLI.

The CLI is `cat /dev/tty`: it reads what is typed on its terminal (which does not echo) and prints
each line back, so the time from typing a line to seeing it is the attach's round trip. Each
viewer (`tt attach`, in a pty of its own, as a user runs it) is attached alone in turn, twice
each, so neither the order nor the other viewer weighs on the figures.
"""
from __future__ import annotations

import random
import statistics
import sys
import time

import pexpect

from .common import Row, clean_env, wait_until
from .town import BenchTown, tt_command

TARGET_MS = 10.0   # an echo within this feels immediate


def attach_latency(size: dict, ctx) -> list[Row]:
    """`tt attach` through Redis: a typed line -> its echo shown, against a local attach."""
    row = Row("attach", "`tt attach` through Redis: typed line -> echo shown", "ms", peer_name="local tt attach",
              target=f"p50 <= {TARGET_MS:g} ms", latency=True)
    samples = {"local": row.peer, "redis": row.tt}
    with BenchTown(["cat", "/dev/tty"]) as bt:
        bt.start_background()
        bt.spawn(1)
        task = bt.town.assign("a0", "echo what is typed")
        wait_until(lambda: bt.town.agent("a0").cli_pid, 10, 0.005, "the CLI to start")
        for _ in range(2):
            for route in ("local", "redis"):
                samples[route] += _echoes(bt, route, max(1, size["attach_samples"] // 2))
        _type_end_of_file(bt)
        wait_until(lambda: bt.town.task(task.id).state == "completed", 30, 0.01, "the CLI to finish")
    row.note = (f"median local {statistics.median(row.peer):.2f} ms, through Redis "
                f"{statistics.median(row.tt):.2f} ms (a local Redis: a remote one adds its round trips)")
    return [row.judge(absolute=lambda v: v <= TARGET_MS)]


def _attach(bt: BenchTown, route: str) -> pexpect.spawn:
    args = ["attach", "a0", "--town", str(bt.root)] + (["--via-redis"] if route == "redis" else [])
    argv = tt_command(*args)
    child = pexpect.spawn(argv[0], argv[1:], env=clean_env(), dimensions=(30, 100), timeout=20, maxread=65536)
    child.delayafterclose = child.delayafterterminate = 0
    child.delaybeforesend = None  # (pexpect waits 50 ms before each send by default)
    child.expect_exact("is working on task")
    return child


def _echoes(bt: BenchTown, route: str, count: int) -> list[float]:
    """Milliseconds from typing a line to seeing it, `count` times (after one unmeasured line)."""
    child = _attach(bt, route)
    times = []
    try:
        for i in range(count + 1):
            token = f"{route}-{i}-{time.monotonic_ns()}"
            t0 = time.monotonic()
            child.send(token + "\r")
            child.expect_exact(token)
            if i:  # the first is the warm-up: the runner may not have heard of a far viewer yet
                times.append((time.monotonic() - t0) * 1000)
            time.sleep(random.uniform(0.005, 0.03))  # (never in step with a poll)
        child.sendcontrol("]")
        child.expect_exact("detached from")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return times


def _type_end_of_file(bt: BenchTown) -> None:
    """Ctrl-D typed through a local attach: `cat` reads the end of its input and the task ends."""
    child = _attach(bt, "local")
    try:
        child.sendcontrol("d")
        child.expect_exact("is idle")
    finally:
        child.close(force=True)


if __name__ == "__main__":  # PYTHONPATH=scripts .venv/bin/python -m benchsuite.attach
    for result in attach_latency({"attach_samples": int(sys.argv[1]) if len(sys.argv) > 1 else 40}, None):
        print(result.what, f"redis {statistics.median(result.tt):.2f} ms", f"local {statistics.median(result.peer):.2f} ms")
