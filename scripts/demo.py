"""The tutorial's first town, end to end, with fixtures/fake_agent.py standing in for claude/auggie/codex.

The reviewer's task is assigned `--after dev --after tester`: the demo shows it pending while they
work, starting only once both completed, and the context block (their outcomes and output) its CLI
received after the user's text.

Runs in a fresh temp folder (or the one given), prints each `tt` command and its output, and stops the
town at the end so nothing is left running.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = {
    "dev": "Create a REST API endpoint POST /users that:\n- Accepts {email, password, name}\n"
           "- Validates email format\n- Hashes password with bcrypt\n- Returns {id, email, name, created_at}\n"
           "@sleep 1\n@echo wrote src/users.py",
    "tester": "Write integration tests for POST /users:\n- Test successful creation\n"
              "- Test duplicate email rejection\n@sleep 1.5\n@echo wrote tests/test_users.py",
    "reviewer": "Review the implementation and tests:\n- Check for security issues\n@sleep 0.5\n"
                "@echo LGTM",
}
MODELS = {"dev": "claude", "tester": "auggie", "reviewer": "codex"}


def tt(*args: str, show: bool = True, cwd: Path) -> str:
    if show:
        shown = " ".join(shlex.quote(a) if "\n" not in a else '"' + a.splitlines()[0] + ' …"' for a in args)
        print(f"\n$ tt {shown}", flush=True)
    proc = subprocess.run(["tt", *args], cwd=cwd, capture_output=True, text=True)
    if show:
        sys.stdout.write(proc.stdout)
        sys.stdout.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo: tt {args[0]} failed ({proc.returncode})")
    return proc.stdout


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="tt-demo-")) / "feature-builder"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PATH"] = f"{REPO / 'fixtures' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    record = folder.parent / "record"  # the fake CLIs keep each prompt they received here
    record.mkdir(exist_ok=True)
    os.environ["FAKE_AGENT_RECORD"] = str(record)
    print(f"Demo town in {folder} (fake agent CLIs from {REPO / 'fixtures' / 'bin'})")
    subprocess.run(["git", "init", "-q"], cwd=folder, check=False)
    try:
        tt("init", "--name", "feature-builder", cwd=folder)
        for name, model in MODELS.items():
            tt("spawn", name, "--model", model, cwd=folder)
        tt("list", cwd=folder)
        ids = {}
        for name in ("dev", "tester"):
            ids[name] = json.loads(tt("assign", name, TASKS[name], "--json", cwd=folder, show=False))["id"]
            print(f"\n$ tt assign {name} \"{TASKS[name].splitlines()[0]} …\"\nAssigned task {ids[name]} to {name}")
        print(f"\n$ tt assign reviewer \"{TASKS['reviewer'].splitlines()[0]} …\" --after dev --after tester")
        review = json.loads(tt("assign", "reviewer", TASKS["reviewer"], "--after", "dev", "--after", "tester",
                               "--json", cwd=folder, show=False))
        ids["reviewer"] = review["id"]
        print(f"Assigned task {review['id']} to reviewer (state {review['state']}, waits on "
              f"{len(review['blocked_by'])} tasks)")
        tt("tasks", cwd=folder)
        print("\n(waiting for the reviewer, which starts once dev and tester completed…)", flush=True)
        tt("wait", "reviewer", "--timeout", "60", cwd=folder)
        found = {name: json.loads(tt("task", task_id, "--json", cwd=folder, show=False)) for name, task_id in ids.items()}
        for name in ("dev", "tester"):
            print(f"{name} finished at {found[name]['finished_at']:.3f}")
        print(f"reviewer started at {found['reviewer']['started_at']:.3f} "
              f"({found['reviewer']['started_at'] - max(found['dev']['finished_at'], found['tester']['finished_at']):.3f} s after the last of them)")
        prompt = (record / f"{ids['reviewer']}.prompt").read_text(errors="replace")
        print("\nWhat the reviewer's CLI received (the user's text, then the context block):")
        print("    " + prompt.replace("\n", "\n    "))
        tt("status", cwd=folder)
        tt("task", ids["dev"], cwd=folder)
        tt("logs", "-n", "4", cwd=folder)
    finally:
        tt("stop", cwd=folder)
    done = [json.loads((folder / ".tt" / "last-stop.json").read_text())]
    print(f"\nDemo finished: every task done, town stopped ({len(done[0]['stopped'])} runners).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
