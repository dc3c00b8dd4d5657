"""tinytown.toml edited while the town runs: the supervisor reads it again (by itself, or on `tt
reload`), applies what can change live, says what needs a restart, and keeps the old config with a
clear error when the new one is invalid."""
from __future__ import annotations

from conftest import wait_for


def edit(town, old: str, new: str) -> None:
    path = town.root / "tinytown.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def flat(text: str) -> str:
    return " ".join(text.split())


def test_a_preset_added_while_the_town_runs_can_be_used_at_once(town):
    town.tt("spawn", "a")
    town.wait_agent("a", ("idle",))
    town.append_config('\n[agent_clis.y]\ncommand = "claude --print"\nprompt = "stdin"\n')
    town.tt("spawn", "d", "--model", "y")  # no `tt reload`: the supervisor reads the file before it starts d
    task = town.wait_task(town.json("assign", "d", "@echo with the new preset")["id"])
    assert task["state"] == "completed" and "with the new preset" in task["output"]
    assert town.agent("d")["restarts"] == 0 and town.agent("d")["cli"] == "y"


def test_max_agents_raised_live(town):
    edit(town, "max_agents = 10", "max_agents = 1")
    town.tt("spawn", "a")
    assert "max_agents reached (1)" in town.tt("spawn", "b", check=False).err
    edit(town, "max_agents = 1", "max_agents = 3")
    out = town.tt("reload").out
    assert "applied max_agents" in out
    town.tt("spawn", "b")
    town.wait_agent("b", ("idle",))
    assert town.json("status")["max_agents"] == 3
    assert "3/3 agents" not in town.tt("status").out and "2/3 agents" in flat(town.tt("status").out)


def test_max_agents_lowered_live_stops_idle_agents_before_busy_ones(town):
    for name in ("a", "b", "c"):
        town.tt("spawn", name)
    busy = town.json("assign", "c", "@gate go")["id"]  # the last made, at work
    town.wait_task(busy, states=("running",))
    for name in ("a", "b"):
        town.wait_agent(name, ("idle",))
    edit(town, "max_agents = 10", "max_agents = 1")
    town.tt("reload")
    for name in ("a", "b"):
        town.wait_agent(name, ("stopped",))
    (town.record / "go").write_text("")
    task = town.wait_task(busy)
    assert task["state"] == "completed" and task["attempts"] == 1, task  # never interrupted


def test_a_name_edited_while_the_town_runs_is_named_in_one_line(town):
    town.tt("spawn", "dev")
    old = (town.root / "tinytown.toml").read_text().split('name = "', 1)[1].split('"', 1)[0]
    edit(town, f'name = "{old}"', 'name = "renamed"')
    status = town.tt("status", check=False, timeout=10)  # (it used to wait the whole start timeout)
    assert status.returncode == 1 and len(status.err.strip().splitlines()) == 1, status.err
    assert f"this town runs as {old!r}, but tinytown.toml now names it 'renamed'" in status.err
    edit(town, 'name = "renamed"', f'name = "{old}"')
    assert town.wait_agent("dev", ("idle",))


def test_an_invalid_edit_keeps_the_old_config_and_says_why(town):
    from tinytown.supervisor.resp import connect
    from tinytown.supervisor.town import Town
    town.tt("spawn", "a")
    queued = town.json("assign", "a", "@gate go\n@echo still fine")["id"]
    config = town.config()  # (every `tt` command reads the file: with it invalid, the test reads Redis itself)
    edit(town, "max_agents = 10", 'max_agents = "many"')

    reloaded = town.tt("reload", check=False)
    assert reloaded.returncode == 1 and reloaded.err.count("\n") == 1 and "Traceback" not in reloaded.err
    assert "max_agents: expected int" in reloaded.err and "previous config" in reloaded.err
    # the supervisor saw it too (it watches the file), and says so where `tt status` reads it
    t = Town(config, connect(config))
    wait_for(lambda: "expected int" in t.supervisor_info().get("config_error", ""), 20,
             "the supervisor to report the invalid file")
    # the town goes on with what it had
    (town.record / "go").touch()
    wait_for(lambda: t.task(queued).state == "completed", 30, "the queued task to complete")

    edit(town, 'max_agents = "many"', "max_agents = 10")
    wait_for(lambda: not t.supervisor_info().get("config_error"), 20, "the error to clear")
    assert town.wait_task(town.json("assign", "a", "@echo fixed")["id"])["state"] == "completed"
    t.r.close()


def test_status_shows_a_config_that_was_not_applied(town):
    town.tt("spawn", "a")
    town.wait_agent("a", ("idle",))
    t = town.town()
    t.record_config("/x/tinytown.toml:3: max_agents: expected int, got str", "", 0)
    t.r.close()
    text = flat(town.tt("status").out)
    assert "config: not applied: /x/tinytown.toml:3: max_agents: expected int" in text
    assert "previous config" in text
    assert "expected int" in town.json("status")["supervisor"]["config_error"]


def test_what_only_a_restart_can_change_is_named(town):
    town.tt("spawn", "a")
    town.wait_agent("a", ("idle",))
    edit(town, 'socket_path = "redis.sock"', 'socket_path = "redis.sock"\nserver = "/elsewhere/redis-server"')
    town.append_config("\n[logs]\nbackups = 5\n")
    out = flat(town.tt("reload").out)
    assert "applied [logs]" in out and "needs a restart of the town" in out and "[redis] server" in out
    again = flat(town.tt("reload").out)  # still pending until the town restarts; [logs] is done
    assert "[redis] server" in again and "applied" not in again
    assert town.wait_task(town.json("assign", "a", "@echo same town")["id"])["state"] == "completed"
