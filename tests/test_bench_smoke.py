"""scripts/bench, each benchmark once in its tiny size, so the benchmark cannot rot.

No timing is asserted here (the machine running the suite is busy with the suite): only that every
benchmark runs to the end, measures Tinytown, and, when the peers could be installed into the
benchmark's own venv (.bench-venv/, never the project's), measures the peer too.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = REPO / "scripts"  # the benchmark suite is scripts/benchsuite/
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
from benchsuite.suite import BENCHMARKS  # noqa: E402

ROWS = {"restart": ["restart"], "start_stop": ["start", "stop"], "dispatch": ["dispatch"],
        "release": ["release"], "backlog": ["backlog"],
        "throughput": ["tasks1", "tasks4"], "idle": ["memory", "cpu"], "list": ["list"], "assign": ["assign"], "pty": ["pty"],
        "logs": ["logs"], "workspace": ["workspace_town", "workspace_worktree", "workspace_dependency"],
        "hostloss": ["hostloss"], "attach": ["attach"]}
NO_PEER = {"tasks1", "logs", "hostloss"}


def run_bench(tmp_path, *args, timeout=240):
    out = subprocess.run([sys.executable, "-m", "benchsuite", "--size", "tiny", "--out", str(tmp_path), *args],
                         cwd=SCRIPTS, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    return json.loads((tmp_path / "latest.json").read_text()), out


@pytest.fixture(scope="module")
def peers_ready():
    """Install the peers once (cached in .bench-venv/); False when that is impossible (offline)."""
    from benchsuite import peers
    try:
        peers.ensure_venv(log=lambda text: None)
        return True
    except peers.PeersUnavailable:
        return False


def test_every_benchmark_is_covered():
    assert set(ROWS) == set(BENCHMARKS)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_runs_tiny(name, tmp_path, peers_ready):
    data, out = run_bench(tmp_path, name, "--no-plot")
    rows = {r["key"]: r for r in data["rows"]}
    assert sorted(rows) == sorted(ROWS[name]), data
    for key, row in rows.items():
        assert row["what"] in out.stdout  # it is in the printed table
        if key == "logs" and not row["tt"]:
            assert "n/a" in out.stdout
            continue
        assert row["tt"] and all(v >= 0 for v in row["tt"]), row
        if peers_ready and key not in NO_PEER:
            assert row["peer"], row
        assert row["passed"] in (True, False, None)


def test_table_json_and_plot(tmp_path, peers_ready):
    if not peers_ready:
        pytest.skip("the plot needs matplotlib from the benchmark's venv, which could not be installed")
    data, out = run_bench(tmp_path, "restart")
    assert "| benchmark" in out.stdout and "ratio" in out.stdout
    assert data["machine"]["cpus"] and data["rows"][0]["tt_summary"]["median"] > 0
    pngs = list(tmp_path.glob("bench-*.png"))
    assert pngs and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "latest.json").exists() and list(tmp_path.glob("bench-*.json"))
