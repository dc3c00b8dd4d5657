"""Bad input through the real `tt` command: one clear line on stderr, non-zero exit, nothing lost."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TownHarness, town_processes, wait_for

COMMANDS = ["init", "spawn", "list", "assign", "status", "tasks", "task", "start", "stop", "restart"]


def one_error_line(proc, *needles):
    assert proc.returncode != 0, proc.out
    lines = proc.err.strip().splitlines()
    assert len(lines) == 1, proc.err
    assert "Traceback" not in proc.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(tmp_path, command):
    proc = subprocess.run([sys.executable, "-m", "tinytown.cli.main", command, "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "Usage: tt " + command in proc.stdout


def test_no_town_here(tmp_path):
    t = TownHarness(tmp_path)
    one_error_line(t.tt("list", check=False), "no tinytown.toml")


def test_malformed_toml_names_the_line(town):
    (town.root / "tinytown.toml").write_text('name = "x"\nmax_agents = [1,\n')
    one_error_line(town.tt("spawn", "dev", check=False), "tinytown.toml", "line 2")
    assert town.supervisor_pid() is None


def test_unknown_preset_bad_name_duplicate_and_unknown_agent(town):
    one_error_line(town.tt("spawn", "dev", "--model", "gpt-17", check=False), "unknown CLI 'gpt-17'")
    assert town.supervisor_pid() is None  # nothing started for a command that could not succeed
    one_error_line(town.tt("spawn", "bad name", check=False), "invalid agent name")
    town.tt("spawn", "dev")
    one_error_line(town.tt("spawn", "dev", check=False), "already exists")
    one_error_line(town.tt("assign", "nobody", "do it", check=False), "no agent named 'nobody'")
    one_error_line(town.tt("task", "no-such-task", check=False), "no task")
    one_error_line(town.tt("assign", "dev", check=False), "no task text")
    assert [a["name"] for a in town.json("list")] == ["dev"]


def test_max_agents_refuses_and_registers_nothing(make_town):
    town = make_town()
    text = (town.root / "tinytown.toml").read_text().replace("max_agents = 10", "max_agents = 2")
    (town.root / "tinytown.toml").write_text(text)
    town.tt("spawn", "a")
    town.tt("spawn", "b")
    one_error_line(town.tt("spawn", "c", check=False), "max_agents reached (2)")
    assert [a["name"] for a in town.json("list")] == ["a", "b"]


def test_read_commands_on_a_stopped_town(town):
    assert "not running" in town.tt("status").out
    assert town.json("status")["running"] is False
    one_error_line(town.tt("list", check=False), "not running")
    assert "not running" in town.tt("stop").out


def test_socket_path_over_the_os_limit_is_moved(make_town):
    town = make_town(folder="d" * 70 + "/" + "e" * 60)
    assert len(os.fsencode(town.root / ".tt" / "redis.sock")) > 107
    town.tt("spawn", "dev")
    status = town.json("status")
    assert len(os.fsencode(status["redis"])) <= 107 and status["redis"].startswith("/tmp/")
    assert town.wait_task(town.json("assign", "dev", "hi")["id"])["state"] == "completed"
    sock = status["redis"]
    assert oct(os.stat(sock).st_mode & 0o777) == "0o700"
    town.tt("stop")


def test_redis_server_missing(town):
    town.append_config('\n')
    text = (town.root / "tinytown.toml").read_text().replace(
        'socket_path = "redis.sock"', 'socket_path = "redis.sock"\nserver = "/nonexistent/redis-server"')
    (town.root / "tinytown.toml").write_text(text)
    one_error_line(town.tt("spawn", "dev", check=False), "redis-server not found")
    assert town_processes(town.root) == []


def test_second_start_says_one_is_running(town):
    town.tt("spawn", "dev")
    pid = town.supervisor_pid()
    proc = town.tt("start", check=False, timeout=30)
    one_error_line(proc, "already running", str(pid))
    assert town.supervisor_pid() == pid


def test_foreground_start_and_ctrl_c(town):
    proc = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "start"], cwd=town.root, env=town.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: town.supervisor_pid() == proc.pid, 20, "the foreground supervisor")
        town.tt("spawn", "dev")
        assert town.wait_task(town.json("assign", "dev", "hi")["id"])["state"] == "completed"
        proc.send_signal(2)  # what Ctrl+C delivers
        assert proc.wait(30) == 0
        out = proc.stdout.read().decode()
        assert "runner dev started" in out and "stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert town_processes(town.root) == []


def test_shell_completion_offers_commands_agents_and_task_ids(town):
    """click's completion protocol, as bash/zsh/fish call it; names and ids come from the town."""
    def complete(words: str, cword: int, shell: str = "bash") -> list[str]:
        env = {**town.env, "_TT_COMPLETE": f"{shell}_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        proc = subprocess.run([sys.executable, "-m", "tinytown.cli.main"], cwd=town.root, env=env,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
        return [line.split(",", 1)[1] for line in proc.stdout.splitlines() if line]

    town.tt("spawn", "dev")
    town.tt("spawn", "devops")
    town.tt("spawn", "reviewer")
    task_id = town.assign("dev", "hello")
    assert complete("tt as", 1) == ["assign"]
    assert complete("tt assign de", 2) == ["dev", "devops"]
    assert complete("tt logs -f re", 3) == ["reviewer"]
    assert complete(f"tt task {task_id[:4]}", 2) == [task_id]
    assert complete("tt tasks --agent d", 3) == ["dev", "devops"]
    backlog = town.json("backlog", "add", "--role", "nobody", "for a role no agent has")["id"]
    assert complete("tt backlog remove ", 3) == [backlog]  # the backlog's, not every task's
    later = town.json("backlog", "add", "--after", backlog, "after it")["id"]  # (waits: nobody takes `backlog`)
    assert complete("tt backlog remove ", 3) == [backlog, later]  # (offered only once released, before)
    town.tt("stop")
    assert complete("tt assign de", 2) == []  # a stopped town: nothing offered, nothing printed
    for shell in ("bash", "zsh", "fish"):
        script = subprocess.run([sys.executable, "-m", "tinytown.cli.main"], env={**town.env, "_TT_COMPLETE": f"{shell}_source"},
                                capture_output=True, text=True, timeout=30).stdout
        assert "_TT_COMPLETE" in script
    assert town.tt("--version").out.startswith("tt, version ")


def test_usage_errors_and_absurd_durations_say_one_line(town):
    """A bad option is one line too (exit 2; tt wait 3), and a duration that is nan, inf or absurd is refused
    before it reaches Redis or the store (`"task_timeout": NaN` is not JSON)."""
    for args in (("spawn", "dev", "--task-timeout", "nan"), ("spawn", "dev", "--task-timeout", "inf"),
                 ("wait", "x", "--timeout", "nan"), ("wait", "x", "--timeout", "1e20")):
        line = one_error_line(town.tt(*args, check=False), "Invalid value for")
        assert f"see tt {args[0]} --help" in line
    one_error_line(town.tt("spawn", "dev", "--task-timeout", "1e7", check=False), "between 0 and 2678400 seconds")
    assert town.supervisor_pid() is None  # nothing started for a command that could not succeed
    town.tt("spawn", "dev")
    dashed = town.tt("assign", "dev", "-x do this", check=False)
    assert dashed.returncode == 2
    one_error_line(dashed, "No such option '-x'", "goes after --")
    assert town.json("tasks") == []
    assert "goes after" not in one_error_line(town.tt("tasks", "--bad", check=False), "No such option '--bad'")
    one_error_line(town.tt("--bogus", "list", check=False), "No such option '--bogus'", "see tt --help")


def test_an_empty_task_id_and_an_unknown_agent_or_task_say_so(town):
    town.tt("spawn", "dev")
    one_error_line(town.tt("task", "", check=False), "no task id given")
    one_error_line(town.tt("logs", "--task", "", check=False), "no task id given")
    assert "--after" not in one_error_line(town.tt("wait", "", check=False), "empty reference in tt wait")
    for command in ("diff", "merge"):
        one_error_line(town.tt(command, "nobody", check=False), "no agent or task 'nobody'")


def test_an_error_quoting_the_config_never_reaches_the_terminal_raw(town):
    """A CLI's name with an escape sequence (a tinytown.toml from a cloned repository) is refused,
    and the refusal itself is printed cleaned."""
    with open(town.root / "tinytown.toml", "a") as fh:
        fh.write('[agent_clis."x\\u001b]0;TITLE\\u0007"]\ncommand = "claude"\n')
    line = one_error_line(town.tt("list", check=False), "a CLI's name")
    assert "\x1b" not in line and "\x07" not in line and "toml: x: a CLI" in line   # (the OSC gone whole)


def test_a_reader_that_stops_early_ends_tt_quietly(town):
    """`tt list | head -1`: the reader has what it wanted; no "BrokenPipeError" line."""
    town.tt("spawn", "dev")
    proc = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "list"], cwd=town.root, env=town.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # gone before tt writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 141 and err == "", err
    failed = town.assign("dev", "@exit 3")
    town.wait_task(failed)
    proc = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "wait", failed], cwd=town.root, env=town.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # (a command that ends in sys.exit: it used to say "Exception ignored", exit 120)
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 141 and err == "", err


def test_init_force_on_a_running_town_and_tasks_of_an_unknown_agent_are_refused(town):
    """`tt init --force --name other` on a running town wrote a config whose name hid every record
    it had; `tt tasks --agent dve` said "No tasks" where every other command knows no such agent."""
    town.tt("spawn", "dev")
    before = (town.root / "tinytown.toml").read_text()
    one_error_line(town.tt("init", "--force", "--name", "other", check=False), "is running: `tt stop` it")
    assert (town.root / "tinytown.toml").read_text() == before
    one_error_line(town.tt("tasks", "--agent", "dve", check=False), "no agent named 'dve'")
    assert town.tt("tasks", "--agent", "dev").out.strip() == "No tasks"
    town.tt("stop")
    assert "Initialized town 'other'" in town.tt("init", "--force", "--name", "other").out


def test_a_broken_tinytown_toml_leaves_a_running_town_readable_and_says_so(town):
    """While tinytown.toml does not load, the town runs on its previous config, and `tt status`
    was to show the edit not applied; every command died loading the same file first."""
    town.tt("spawn", "dev")
    task = town.assign("dev", "@echo before the edit")
    town.wait_task(task)
    path = town.root / "tinytown.toml"
    good = path.read_text()
    path.write_text(good.replace("max_agents = ", "stop_grace = 3\nmax_agents = ", 1))
    status = wait_for(lambda: (lambda p: p if "not applied" in p.out else None)(town.tt("status")), 20,
                      "tt status to show the edit not applied")
    assert status.returncode == 0 and "stop_grace: unknown key" in status.out
    [warning] = status.err.splitlines()
    assert warning.startswith("tt: warning: ") and "tinytown.toml:3: stop_grace: unknown key" in warning
    assert "previous config" in warning
    for args in (("list",), ("tasks",), ("task", task), ("logs", "dev"), ("events",), ("inbox", "dev")):
        shown = town.tt(*args)
        assert shown.err.count("\n") == 1 and "previous config" in shown.err, args
    assert "before the edit" in town.tt("task", task).out
    one_error_line(town.tt("assign", "dev", "x", check=False), "stop_grace: unknown key")  # writes wait for a fix
    town.tt("stop")
    one_error_line(town.tt("status", check=False), "stop_grace: unknown key")  # nothing runs on it now
    path.write_text(good)
