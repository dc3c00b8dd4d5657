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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = {
    "dev": "Create a REST API endpoint POST /users that:\n- Accepts {email, password, name}\n"
           "- Validates email format\n- Hashes password with bcrypt\n- Returns {id, email, name, created_at}\n"
           "@sleep 1\n@write src/users.py def create_user(): ...\n@echo wrote src/users.py",
    "tester": "Write integration tests for POST /users:\n- Test successful creation\n"
              "- Test duplicate email rejection\n@sleep 1.5\n@write tests/test_users.py def test_create(): ...\n"
              "@echo wrote tests/test_users.py",
    "reviewer": "Review the implementation and tests when ready:\n- Check for security issues\n@sleep 0.5\n"
                "@echo LGTM: reviewed what dev and tester reported (their results came with the task)",
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


def git(folder: Path, *args: str) -> str:
    """git in the demo's repository, as the demo's own user (no global identity needed)."""
    return subprocess.run(["git", "-c", "user.name=demo", "-c", "user.email=demo@example.invalid", *args],
                          cwd=folder, capture_output=True, text=True, check=True).stdout


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="tt-demo-")) / "feature-builder"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PATH"] = f"{REPO / 'fixtures' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    record = folder.parent / "prompts-handed"  # the fake CLIs keep what they were handed here
    record.mkdir(exist_ok=True)
    os.environ["FAKE_AGENT_RECORD"] = str(record)
    # The demo's "claude" is the fake, in a throwaway town: run as root, `tt spawn` would otherwise
    # warn that the real claude refuses to skip permissions there (README, "Using real CLIs").
    os.environ.setdefault("IS_SANDBOX", "1")
    print(f"Demo town in {folder} (fake agent CLIs from {REPO / 'fixtures' / 'bin'})")
    subprocess.run(["git", "init", "-q"], cwd=folder, check=False)
    try:
        tt("init", "--name", "feature-builder", cwd=folder)
        # A first commit: from here each agent works in a git worktree of its own (agents/NAME on
        # branch tt/NAME) and every task ends in one commit there.
        git(folder, "add", "-A")
        git(folder, "commit", "-q", "-m", "first commit")
        for name, model in MODELS.items():
            tt("spawn", name, "--model", model, cwd=folder)
        tt("list", cwd=folder)
        ids = {}
        for name in ("dev", "tester"):
            ids[name] = json.loads(tt("assign", name, TASKS[name], "--json", cwd=folder, show=False))["id"]
            print(f"\n$ tt assign {name} \"{TASKS[name].splitlines()[0]} …\"\nAssigned task {ids[name]} to {name}")
        # The reviewer reviews "when ready": its task waits for every unfinished task of dev and
        # tester, and then gets their outcomes and the end of their output after its own text.
        review = json.loads(tt("assign", "reviewer", TASKS["reviewer"], "--after", "dev", "--after", "tester",
                               "--json", cwd=folder, show=False))
        ids["reviewer"] = review["id"]
        print(f"\n$ tt assign reviewer \"{TASKS['reviewer'].splitlines()[0]} …\" --after dev --after tester")
        print(f"Assigned task {review['id']} to reviewer; it waits on {len(review['blocked_by'])} task(s)")
        tt("tasks", cwd=folder)
        tt("status", cwd=folder)
        print("\n(waiting for the agents to finish: tt wait follows the town's events, no polling)", flush=True)
        tt("wait", ids["dev"], ids["tester"], ids["reviewer"], cwd=folder)
        tt("status", cwd=folder)
        tt("tasks", cwd=folder)
        tt("task", ids["reviewer"], cwd=folder)
        handed = (record / f"{ids['reviewer']}.prompt").read_text(errors="replace")
        print("\nWhat the reviewer's CLI was handed: its task's text, then dev's and tester's results:\n")
        print("\n".join("    " + line for line in handed.splitlines()))
        tt("events", "-n", "12", cwd=folder)
        print("\n$ git log --oneline --graph tt/reviewer   (the reviewer's worktree holds dev's and tester's commits)")
        print(git(folder, "log", "--oneline", "--graph", "tt/reviewer"), end="")
        tt("merge", "reviewer", cwd=folder)  # everyone's work into the user's branch
        print("\n$ git log --oneline -1 && ls src tests")
        print(git(folder, "log", "--oneline", "-1") + git(folder, "ls-files", "src", "tests"), end="")
        tt("logs", "-n", "4", cwd=folder)
    finally:
        tt("stop", cwd=folder)
    done = [json.loads((folder / ".tt" / "last-stop.json").read_text())]
    print(f"\nDemo finished: every task done, town stopped ({len(done[0]['stopped'])} runners).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
