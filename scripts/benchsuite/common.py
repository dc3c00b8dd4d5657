"""Shared pieces of the benchmark: result rows, statistics, waiting, and the table.

Every row holds the raw samples of Tinytown and of its peer, measured in the same run on the same
machine; the claim is the ratio between them (and an absolute target where the issue sets one).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tinytown.supervisor.procutil import wait_exit  # noqa: F401  (used here and by peers.py, town.py)

REPO = Path(__file__).resolve().parent.parent.parent
BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Row:
    key: str                     # e.g. "restart"
    what: str                    # the table's first column
    unit: str                    # "ms", "s", "tasks/s", "MB", "%", "MB/s"
    tt: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    peer_name: str = ""          # "supervisord", "RQ Worker", "" (no peer)
    target: str = ""             # human text of the target
    higher_is_better: bool = False
    stat: str = "median"         # which statistic the target is judged on: median or max
    ratio: float | None = None   # Tinytown / peer (of `stat`), None without a peer
    passed: bool | None = None   # None = not judged (n/a)
    note: str = ""
    latency: bool = False        # plotted as a latency distribution

    def judge(self, absolute=None, max_ratio=None, min_ratio=None) -> "Row":
        """Fill ratio and passed: the absolute check (a function of the statistic) and the ratio bounds."""
        if not self.tt:
            self.passed = None
            return self
        value = self.value(self.tt)
        ok = True
        if self.peer:
            peer = self.value(self.peer)
            self.ratio = value / peer if peer else None
        if absolute is not None:
            ok = ok and absolute(value)
        if max_ratio is not None:
            ok = ok and (self.ratio is not None and self.ratio <= max_ratio)
        if min_ratio is not None:
            ok = ok and (self.ratio is not None and self.ratio >= min_ratio)
        if (max_ratio is not None or min_ratio is not None) and not self.peer:
            ok = None  # the peer could not be measured: the ratio part is unknown
        self.passed = ok
        return self

    def value(self, samples: list[float]) -> float:
        return max(samples) if self.stat == "max" else statistics.median(samples)

    def to_json(self) -> dict:
        data = asdict(self)
        data["tt_summary"] = summary(self.tt)
        data["peer_summary"] = summary(self.peer)
        return data


def summary(samples: list[float]) -> dict | None:
    if not samples:
        return None
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "n": len(samples)}


def wait_until(predicate, timeout: float, interval: float = 0.002, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def run_timed(cmd, timeout: float, check: bool = True, **kwargs) -> int:
    """subprocess.run(cmd) whose end is seen at once (see wait_exit); output to /dev/null."""
    import subprocess
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kwargs)
    try:
        code = wait_exit(proc, timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if check and code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    return code


def clean_env() -> dict[str, str]:
    """The environment for peers and `tt` subprocesses: no PYTHONPATH (supervisord's package is
    also called `supervisor`, and ours must never shadow it or the other way round)."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "TT_TOWN_DIR", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


# --- the table ---------------------------------------------------------------------------------

def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("ms",):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if unit == "s":
        return f"{value:.2f}"
    if unit == "%":
        return f"{value:.2f}"
    if unit in ("MB", "MB/s"):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def triple(samples: list[float], unit: str) -> str:
    s = summary(samples)
    if not s:
        return "n/a"
    return f"{fmt(s['min'], unit)} / {fmt(s['median'], unit)} / {fmt(s['max'], unit)}"


def table(rows: list[Row]) -> str:
    headers = ("benchmark", "unit", "Tinytown min / median / max", "peer", "peer min / median / max",
               "ratio", "target", "result")
    body = []
    for r in rows:
        if r.passed is None and not r.tt:
            result = "n/a"
        else:
            result = {True: "PASS", False: "FAIL", None: "n/a"}[r.passed]
        body.append((r.what, r.unit, triple(r.tt, r.unit), r.peer_name or "-",
                     triple(r.peer, r.unit) if r.peer_name else "-",
                     "-" if r.ratio is None else f"{r.ratio:.3g}", r.target, result))
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in body:
        lines.append("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")
    notes = [f"- {r.what}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))
