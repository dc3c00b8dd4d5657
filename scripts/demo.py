"""The tutorial's first town, end to end, with fixtures/fake_agent.py standing in for claude/auggie/codex.

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
    "reviewer": "Review the implementation and tests when ready:\n- Check for security issues\n@sleep 0.5\n"
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
    print(f"Demo town in {folder} (fake agent CLIs from {REPO / 'fixtures' / 'bin'})")
    subprocess.run(["git", "init", "-q"], cwd=folder, check=False)
    try:
        tt("init", "--name", "feature-builder", cwd=folder)
        for name, model in MODELS.items():
            tt("spawn", name, "--model", model, cwd=folder)
        tt("list", cwd=folder)
        ids = []
        for name, text in TASKS.items():
            ids.append(json.loads(tt("assign", name, text, "--json", cwd=folder, show=False))["id"])
            print(f"\n$ tt assign {name} \"{text.splitlines()[0]} …\"\nAssigned task {ids[-1]} to {name}")
        tt("status", cwd=folder)
        print("\n(waiting for the agents to finish…)", flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [t["state"] for t in json.loads(tt("tasks", "--json", cwd=folder, show=False))]
            if all(s in ("completed", "failed", "cancelled") for s in states):
                break
            time.sleep(0.2)
        tt("status", cwd=folder)
        tt("tasks", cwd=folder)
        tt("task", ids[0], cwd=folder)
        tt("logs", "-n", "4", cwd=folder)
    finally:
        tt("stop", cwd=folder)
    done = [json.loads((folder / ".tt" / "last-stop.json").read_text())]
    print(f"\nDemo finished: every task done, town stopped ({len(done[0]['stopped'])} runners).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
