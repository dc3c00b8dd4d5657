"""The tutorial's first town, typed as a user would, against a real supervisor and redis-server."""
from __future__ import annotations

import subprocess

from conftest import town_processes, wait_for

PROMPTS = {
    "dev": "Create a REST API endpoint POST /users that:\n- Accepts {email, password, name}\n"
           "- Validates email format\n- Hashes password with bcrypt\n- Returns {id, email, name, created_at}",
    "tester": "Write integration tests for POST /users:\n- Test successful creation\n"
              "- Test duplicate email rejection\n- Test invalid email format\n- Test missing required fields",
    "reviewer": "Review the implementation and tests when ready:\n- Check for security issues\n"
                "- Verify error handling\n- Ensure tests cover edge cases",
}


def test_first_town_scenario(tmp_path, make_town):
    root = tmp_path / "feature-builder"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    from conftest import TownHarness
    t = TownHarness(root)
    out = t.tt("init", "--name", "feature-builder").out
    assert "feature-builder" in out
    toml = (root / "tinytown.toml").read_text()
    for line in ('name = "feature-builder"', 'default_cli = "claude"', "max_agents = 10", "[redis]",
                 "use_socket = true", 'socket_path = "redis.sock"'):
        assert line in toml
    assert (root / "agents").is_dir() and (root / ".tt").is_dir()
    assert ".tt/" in (root / ".gitignore").read_text()

    try:
        first = t.tt("spawn", "dev", "--model", "claude")
        assert "supervisor" in first.err  # says it started one in the background
        t.tt("spawn", "tester", "--model", "auggie")
        t.tt("spawn", "reviewer", "--model", "codex")
        listing = t.tt("list").out
        for name in PROMPTS:
            assert f"  {name} (" in listing
        ids = {}
        for name, prompt in PROMPTS.items():
            out = t.tt("assign", name, prompt).out
            ids[name] = out.split("task ")[1].split()[0]
        status = t.tt("status").out
        assert "feature-builder" in status and "dev" in status
        for name, task_id in ids.items():
            task = t.wait_task(task_id)
            assert task["state"] == "completed", task
            assert task["exit_code"] == 0 and task["attempts"] == 1 and task["agent"] == name
            info, prompt = t.recorded(task_id)
            assert prompt == PROMPTS[name].encode()
            assert info["env"]["TT_TASK_ID"] == task_id and info["env"]["TT_AGENT"] == name
            assert info["cwd"] == str(root) and info["stdout_isatty"]
            assert "received" in task["output"]
        # the presets' command lines reached the CLIs as designed
        assert t.recorded(ids["dev"])[0]["argv"] == ["--print", "--dangerously-skip-permissions"]
        assert t.recorded(ids["reviewer"])[0]["argv"] == ["exec", "--dangerously-bypass-approvals-and-sandbox", "-"]
        status = t.json("status")
        assert status["tasks"]["completed"] == 3
        assert {a["name"]: a["state"] for a in status["agents"]} == {n: "idle" for n in PROMPTS}
        stop = t.tt("stop").out
        assert "Stopped town feature-builder" in stop
        assert town_processes(root) == []
        assert t.supervisor_pid() is None
    finally:
        t.cleanup()


def test_state_survives_stop_and_start(town):
    town.tt("spawn", "dev")
    task_id = town.json("assign", "dev", "hello")["id"]
    town.wait_task(task_id)
    town.tt("stop")
    assert "not running" in town.tt("status").out
    town.tt("restart", "dev")  # any writing command brings the town back
    assert town.task(task_id)["state"] == "completed"
    agents = town.json("list")
    assert [a["name"] for a in agents] == ["dev"]
    wait_for(lambda: town.agent("dev")["state"] == "idle", 20, "dev idle after restart")


def test_stop_leaves_no_process(town):
    for name in ("a", "b", "c"):
        town.tt("spawn", name)
    task_id = town.json("assign", "a", "@sleep 30")["id"]
    town.wait_task(task_id, states=("running",))
    assert len(town_processes(town.root)) >= 5  # supervisor, redis, 3 runners, the CLI
    out = town.tt("stop", "--now").out
    assert task_id in out  # re-queued, and said so
    assert town_processes(town.root) == []
