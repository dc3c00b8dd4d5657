"""The git work a task adds when agents have worktrees (supervisor/workspace.py), on a repository of
5 000 files: `begin` + `end` around a task that changes one file and adds one, and the same for a
task that first merges an upstream task's head (a real merge: both branches moved on); and end to
end, a running town's task with a worktree against one in the shared folder (workspace_town).

Shared mode does no git work at all, so its column is the task's own file writes: the row's
figure is what worktrees add to a task. `./scripts/bench workspace` runs it in the suite; alone:

    PYTHONPATH=scripts .venv/bin/python -m benchsuite.workspace [--files 5000] [--tasks 40]
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tinytown.supervisor.workspace import Workspace

from .common import Row

TARGET_MS = 30.0


def make_repo(root: Path, files: int) -> Path:
    """A repository of `files` small files in folders of 100, committed once."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        folder = root / "src" / f"d{i // 100}"
        if i % 100 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i % 100}.py").write_text(f"VALUE = {i}\n" * 20)
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "files"]):
        subprocess.run(["git", *args], cwd=root, check=True, env=env, capture_output=True)
    return root


def _change(root: Path, n: int, who: str) -> None:
    (root / "src" / "d0" / f"f{n % 100}.py").write_text(f"VALUE = {who} {n}\n")
    (root / "src" / f"new_{who}_{n}.py").write_text(f"NEW = {n}\n")


def _children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def measure(files: int = 5000, tasks: int = 40) -> dict[str, list[float]]:
    """Milliseconds per task: "shared" (the change alone), "worktree" (begin + change + end),
    "dependency" (begin merging an upstream head + change + end); "*_cpu", the CPU time the
    git processes of each used (steadier than wall time on a busy machine); and "git_status", one
    plain `git status` of the worktree (the machine's own pace, for reading the others)."""
    out: dict[str, list[float]] = {"shared": [], "worktree": [], "dependency": [],
                                   "worktree_cpu": [], "dependency_cpu": [], "git_status": []}
    with tempfile.TemporaryDirectory(prefix="tt-bench-ws-") as tmp:
        town = make_repo(Path(tmp) / "town", files)
        dev, reviewer = Workspace(town, "dev"), Workspace(town, "reviewer")
        dev.ensure()
        reviewer.ensure()
        for n in range(tasks):
            t0 = time.perf_counter()
            _change(town, n, "shared")
            out["shared"].append((time.perf_counter() - t0) * 1000)

            c0, t0 = _children_cpu_ms(), time.perf_counter()
            dev.begin(f"dev-{n}")
            _change(dev.path, n, "dev")
            upstream = dev.end(f"dev-{n}", "change one file, add one").head
            out["worktree"].append((time.perf_counter() - t0) * 1000)
            out["worktree_cpu"].append(_children_cpu_ms() - c0)

            c0, t0 = _children_cpu_ms(), time.perf_counter()
            reviewer.begin(f"rev-{n}", after=[upstream])     # both branches moved on: a real merge
            _change(reviewer.path, n, "rev")
            reviewer.end(f"rev-{n}", "review")
            out["dependency"].append((time.perf_counter() - t0) * 1000)
            out["dependency_cpu"].append(_children_cpu_ms() - c0)
        # What the 30 ms is worth on this machine now: one `git status` of the same worktree.
        for _ in range(min(tasks, 20)):
            t0 = time.perf_counter()
            subprocess.run(["git", "status", "--porcelain"], cwd=dev.path, check=True, capture_output=True)
            out["git_status"].append((time.perf_counter() - t0) * 1000)
    return out


def measure_town(files: int = 5000, tasks: int = 40) -> dict[str, list[float]]:
    """End to end in a running town inside a git repository of `files` files: `tt assign` -> the
    task finished (its event), for an agent with a worktree and one in the shared folder, tasks
    alternated between them, one at a time. The CLI (`sh`) writes its prompt into one file."""
    from .suite import _last_event, _wait_events
    from .town import BenchTown
    from tinytown.supervisor.config import load
    out: dict[str, list[float]] = {"worktree": [], "shared": []}
    with BenchTown(["sh", "-c", "cat > src/d0/f0.py"], name="benchws") as bt:
        make_repo(bt.root, files)
        bt.config = load(bt.root)
        bt.start_background()
        town = bt.town
        workspace = Workspace(bt.root, "w")
        workspace.ensure()
        town.spawn("w", "bench", workspace="worktree", branch=workspace.branch)
        town.spawn("s", "bench")
        bt.wait_blocked(2)
        for n in range(tasks):
            for agent, kind in (("w", "worktree"), ("s", "shared")):
                since = _last_event(town)
                t0 = time.perf_counter()
                task = town.assign(agent, f"VALUE = {n}\n")
                _wait_events(town, since, {task.id}, 60)
                out[kind].append((time.perf_counter() - t0) * 1000)
                bt.wait_blocked(2, interval=0.001)
    return out


def workspace(size: dict, ctx) -> list[Row]:
    """Git work per task with worktrees (begin + end, and with a merged dependency), 5 000 files;
    and a running town's tasks with a worktree against the shared folder."""
    files = size.get("workspace_files", 5000)
    samples = measure(files, size.get("workspace_tasks", 40))
    rows = []
    town = measure_town(files, size.get("workspace_tasks", 40))
    row = Row("workspace_town", f"task assigned -> finished, agent with a worktree, {files} files", "ms",
              peer_name='the same, [workspace] mode = "shared"', target=f"p50 <= shared p50 + {TARGET_MS:g} ms",
              latency=True)
    row.tt, row.peer = town["worktree"], town["shared"]
    added = statistics.median(town["worktree"]) - statistics.median(town["shared"])
    row.note = f"a worktree adds {added:.1f} ms (p50) to a task's round trip"
    rows.append(row.judge(absolute=lambda v: v - statistics.median(town["shared"]) <= TARGET_MS))
    for key, what in (("worktree", f"git work per task with worktrees (begin + end), {files} files"),
                      ("dependency", f"the same, merging an upstream task's head first, {files} files")):
        row = Row(f"workspace_{key}", what, "ms", peer_name="shared mode (no git)",
                  target=f"p50 <= {TARGET_MS:g} ms", latency=True)
        row.tt, row.peer = samples[key], samples["shared"]
        row.note = (f"CPU time of its git processes: p50 {statistics.median(samples[key + '_cpu']):.1f} ms; "
                    f"one plain `git status` of the same worktree: p50 {statistics.median(samples['git_status']):.1f} ms")
        rows.append(row.judge(absolute=lambda v: v <= TARGET_MS))
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--tasks", type=int, default=40)
    args = parser.parse_args()
    for name, values in measure(args.files, args.tasks).items():
        values.sort()
        print(f"{name:10} p50 {statistics.median(values):6.1f} ms   min {values[0]:6.1f}   "
              f"p90 {values[int(len(values) * 0.9)]:6.1f}   max {values[-1]:6.1f}   (n={len(values)})")
