"""`scripts/bench`: Tinytown against supervisord and RQ, measured side by side in one run.

    scripts/bench                      # every benchmark, default size (under five minutes on 2 cores)
    scripts/bench restart dispatch     # only these
    scripts/bench --size tiny          # each once, tiny (what the test suite runs)
    scripts/bench --list

Prints one table (min / median / max of the repeats, ratio to the peer, pass/fail against the
target), writes the results as JSON and a PNG of the latency distributions to bench-results/.
Exits 0 whatever the figures; --strict exits 1 when a row fails.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .common import BENCH_DIR, REPO, Row, clean_env, table


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "host": platform.node()}


def main(argv: list[str] | None = None) -> int:
    from .suite import BENCHMARKS, SIZES
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="*", metavar="BENCHMARK", help=f"any of: {', '.join(BENCHMARKS)}")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--out", type=Path, default=REPO / "bench-results", help="folder for the JSON and PNG")
    p.add_argument("--no-peers", action="store_true", help="measure Tinytown only (no throwaway venv)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 if any row fails")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, fn in BENCHMARKS.items():
            print(f"{name:12} {(fn.__doc__ or '').strip()}")
        return 0
    unknown = [n for n in args.only if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)} (see --list)")
    names = args.only or list(BENCHMARKS)
    size = SIZES[args.size]

    from tinytown.supervisor.config import Config
    from tinytown.supervisor.redis_server import find_binary

    from . import peers
    from .suite import Context
    peers_ok, why = False, "--no-peers"
    if not args.no_peers:
        try:
            peers.ensure_venv(log=lambda text: print(text, file=sys.stderr, flush=True))
            peers_ok, why = True, ""
            from . import town
            town.TT = str(peers.install_tinytown())  # `tt` timed as a user's install runs it
        except peers.PeersUnavailable as exc:
            why = str(exc)
            print(f"bench: {why}; measuring Tinytown alone", file=sys.stderr)
    redis_binary = find_binary(Config(root=REPO, name="bench"))
    ctx = Context(peers_ok, why, redis_binary)

    started = time.time()
    rows: list[Row] = []
    errors: dict[str, str] = {}
    for name in names:
        t0 = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            rows += BENCHMARKS[name](size, ctx)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            rows.append(Row(name, f"{name} (error)", "-", note=errors[name]))
            rows[-1].passed = False
        print(f"bench: {name} took {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)

    print(table(rows))
    elapsed = time.time() - started
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)), "size": args.size,
              "seconds": round(elapsed, 1), "machine": machine(), "git": _git_head(),
              "peers": peers.versions() if peers_ok else {"unavailable": why},
              "rows": [r.to_json() for r in rows], "errors": errors}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1))
    (args.out / "latest.json").write_text(json.dumps(result, indent=1))
    print(f"\nran in {elapsed:.0f}s; results: {json_path}")
    if not args.no_plot and peers_ok:
        png = args.out / f"bench-{stamp}.png"
        out = subprocess.run([str(peers.venv_python()), str(BENCH_DIR / "plot.py"), str(json_path), str(png)],
                             capture_output=True, text=True, env=clean_env(), cwd="/")
        if out.returncode == 0:
            print(f"latency plot: {png}")
        else:
            print(f"bench: the plot failed: {out.stderr.strip()[-500:]}", file=sys.stderr)
    failed = [r.key for r in rows if r.passed is False]
    if errors:
        return 2
    return 1 if (args.strict and failed) else 0


def _git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
