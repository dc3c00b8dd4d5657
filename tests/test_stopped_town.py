"""Reading a stopped town from its recorded state (supervisor/snapshot.py), and a running task's
output so far: the commands read, say so, leave nothing running and change nothing in .tt/."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from conftest import town_processes, wait_for


@pytest.fixture
def private_tmp(town):
    """A short TMPDIR of the test's own for the `tt` commands: where a reader's folder would be."""
    folder = Path(tempfile.mkdtemp(prefix="ttst-", dir="/tmp"))
    town.env["TMPDIR"] = str(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_socket():
            st = path.stat()
            found[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return found


def nothing_left(town, tmp: Path) -> None:
    assert town_processes(town.root) == []
    readers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp) in " ".join(p.info["cmdline"] or [])]
    assert readers == []
    assert list(tmp.iterdir()) == []


def stopped_town_with_tasks(town) -> tuple[str, str]:
    town.tt("spawn", "dev")
    done = town.assign("dev", "@echo recorded output line\nfirst task")
    failed = town.assign("dev", "@echo it went wrong\n@exit 3")
    town.wait_task(done)
    town.wait_task(failed)
    town.tt("stop")
    return done, failed


def test_a_stopped_towns_records_are_read_and_nothing_changes(town, private_tmp):
    done, failed = stopped_town_with_tasks(town)
    runtime = town.root / ".tt"
    assert any(p.name.startswith("appendonly") for p in (runtime / "redis").iterdir())
    before = files_of(runtime)

    listed = town.tt("tasks")
    assert "stopped" in listed.err and done[:8] in listed.out and failed[:8] in listed.out
    assert {t["id"]: t["state"] for t in town.json("tasks")} == {done: "completed", failed: "failed"}
    task = town.task(done)
    assert task["state"] == "completed" and "recorded output line" in task["output"]
    assert "recorded output line" in town.tt("task", done[:8]).out

    logs = town.tt("logs", "--task", failed)
    assert "it went wrong" in logs.out and "stopped" in logs.err
    assert "recorded output line" in town.tt("logs", "--redis", "dev").out
    assert "it went wrong" in town.tt("logs", "--since", "1h", "dev").out

    status = town.json("status")
    assert status["running"] is False and status["supervisor"]["state"] == "stopped"
    assert [(a["name"], a["state"]) for a in status["agents"]] == [("dev", "stopped")]
    assert status["tasks"]["completed"] == 1 and status["tasks"]["failed"] == 1
    text = town.tt("status").out
    assert "stopped" in text and "not running" in text and "dev" in text
    assert "its host" not in text  # (one machine's town: its host is the town, never said apart)
    typo = town.tt("logs", "dve", check=False)  # (a review found "cannot reach the town's Redis")
    assert (typo.returncode, typo.err) == (1, "tt: error: no agent named 'dve' (see `tt list`)\n")

    assert files_of(runtime) == before
    nothing_left(town, private_tmp)


def test_a_change_to_a_stopped_town_says_to_start_it(town, private_tmp):
    """Commands that write (cancel, interrupt, resume, prune, backlog remove) cannot use the
    read-only copy a stopped town is read from: one line saying so, not Redis's refusal."""
    from test_cli_errors import one_error_line
    town.tt("spawn", "dev")
    queued = town.assign("dev", "@gate never")
    town.wait_task(queued, states=("running",))
    later = town.json("backlog", "add", "later")["id"]
    town.tt("stop", "--now")
    runtime = town.root / ".tt"
    before = files_of(runtime)
    for args in (("cancel", queued), ("interrupt", "dev"), ("resume", "dev"), ("prune", "dev"),
                 ("backlog", "remove", later)):
        line = one_error_line(town.tt(*args, check=False), "is not running: start it (`tt start`) to")
        assert "Redis" not in line
    waited = town.tt("wait", queued, check=False)  # back in the inbox: it cannot finish while stopped
    assert waited.returncode == 2 and "the town is stopped" in waited.out  # (as at a timeout)
    one_error_line(waited, "is not running: 1 of these task(s) cannot finish until it starts")
    import json
    assert json.loads(town.tt("wait", queued, "--json", check=False).stdout)[0]["finished"] is False
    assert files_of(runtime) == before
    nothing_left(town, private_tmp)


def test_a_command_a_stopped_town_refuses_starts_nothing(town, private_tmp):
    """A command that would start a stopped town checks what it needs of the town's records first:
    a typo in an agent's name (or a dependency) started the town, and every queued task with it."""
    from test_cli_errors import one_error_line
    town.tt("spawn", "dev")
    town.tt("stop")
    for args, why in ((("assign", "dve", "x"), "no agent named 'dve'"),
                      (("assign", "dev", "x", "--after", "nosuch"), "nosuch"),
                      (("assign", "dve", "--each", "-"), "no agent named 'dve'"),
                      (("send", "dve", "hello"), "no agent named 'dve'"),
                      (("restart", "dve"), "no agent named 'dve'"),
                      (("backlog", "add", "x", "--after", "nosuch"), "nosuch"),
                      (("spawn", "dev"), "dev")):
        one_error_line(town.tt(*args, check=False, input="a\nb\n"), why)
        assert town.supervisor_pid() is None and town_processes(town.root) == [], args
    nothing_left(town, private_tmp)
    assert town.wait_task(town.assign("dev", "@echo started for this one"))["state"] == "completed"


def test_a_wait_whose_town_stops_under_it_exits_2_saying_so(town, private_tmp):
    """A town stopped while `tt wait` blocks: its Redis goes, and the wait reads the copy as for
    a town stopped before it began (exit 2: the task cannot finish now), not exit 1 on a lost
    connection, which a script reads as "a task failed"."""
    import subprocess
    import sys
    town.tt("spawn", "dev")
    running = town.assign("dev", "@gate never")
    town.wait_task(running, states=("running",))
    waiter = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "wait", running, "--timeout", "120"],
                              cwd=town.root, env=town.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = town.town().r
    wait_for(lambda: any(c.get("cmd") == "xread" for c in client.client_list()), message="tt wait blocks on events")
    town.tt("stop", "--now")
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 2, (out, err)
    assert "is not running: 1 of these task(s) cannot finish until it starts" in err and "Redis" not in err
    assert running in out
    nothing_left(town, private_tmp)


def test_a_command_during_a_stop_leaves_its_work_for_the_next_start(town, private_tmp):
    """`tt assign` (an agent's own, too) while the town stops: written into the town, which stops
    as asked; not held until the stop ends and then the town started again, undoing the stop."""
    import json
    import subprocess
    import sys
    town.tt("spawn", "dev")
    running = town.assign("dev", "@gate finish")
    town.wait_task(running, states=("running",))
    stopper = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "stop"], cwd=town.root, env=town.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = town.town()
    wait_for(lambda: store.r.hget(store.keys.supervisor, "state") == "stopping", message="the town stopping")
    assigned = town.tt("assign", "dev", "after the stop", "--json", timeout=8)   # (the grace is 10 s)
    assert "is stopping: this waits in it for the next `tt start`" in assigned.err, assigned.err
    later = json.loads(assigned.stdout)["id"]
    (town.record / "finish").touch()
    assert stopper.wait(60) == 0
    assert town.supervisor_pid() is None
    assert {t["id"]: t["state"] for t in town.json("tasks")}[later] == "assigned"
    nothing_left(town, private_tmp)


def test_wait_on_a_stopped_town_says_how_its_tasks_ended(town, private_tmp):
    done, failed = stopped_town_with_tasks(town)
    assert town.tt("wait", done).returncode == 0
    out = town.tt("wait", done, failed, check=False)
    assert out.returncode == 1 and "failed" in out.out and "Traceback" not in out.err
    nothing_left(town, private_tmp)


def test_ctrl_c_while_a_wait_reads_a_stopped_town_leaves_no_copy_of_it(town, private_tmp, tmp_path):
    """tt wait's Ctrl+C leaves at once (cli/entry.py end_on_ctrl_c), past any `finally`: the
    reader's copy of the town's records (prompts, output) stayed in the temp folder. The hook
    sends the SIGINT as the reader's redis-server is started."""
    done, _ = stopped_town_with_tasks(town)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "def interrupt(event, args):\n"
        "    if event == 'subprocess.Popen' and 'redis-server' in str(args[0]):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.addaudithook(interrupt)\n")
    proc = subprocess.run([sys.executable, "-m", "tinytown.cli.main", "wait", done], cwd=town.root,
                          env={**town.env, "PYTHONPATH": str(hook)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    wait_for(lambda: not town_processes(town.root), 10, "the reader's redis-server gone")
    nothing_left(town, private_tmp)


def test_a_town_killed_outright_shows_its_agents_stopped_not_healthy(town, private_tmp):
    town.tt("spawn", "dev")
    running = town.assign("dev", "@gate never")
    town.wait_task(running, states=("running",))
    runner = town.agent("dev")["pid"]
    os.kill(town.supervisor_pid(), signal.SIGKILL)  # no stop: the records say working, healthy
    wait_for(lambda: town.supervisor_pid() is None and not psutil.pid_exists(runner), 30, "the town to be down")
    status = town.json("status")
    assert status["running"] is False
    assert [(a["name"], a["state"], a["health"], a["pid"]) for a in status["agents"]] == [("dev", "stopped", "stopped", None)]
    assert status["agents"][0]["reason"] in ("working when the town went down", "stopping when the town went down")
    assert "healthy" not in town.tt("status").out
    town.tt("spawn", "other")  # the next supervisor kills the CLI the dead one left, and runs the task again
    town.tt("stop", "--now")


def test_logs_follow_on_a_stopped_towns_stream_ends(town, private_tmp):
    done, _ = stopped_town_with_tasks(town)
    followed = town.tt("logs", "-f", "--task", done, timeout=30)
    assert "recorded output line" in followed.out and "nothing more to follow" in followed.err
    events = town.tt("events", "-f", timeout=30)  # (it used to follow the copy, and its redis-server, forever)
    assert "task_completed" in events.out and "nothing more to follow" in events.err
    files = town.tt("logs", "-f", "-n", "5", timeout=30)  # the agents' files here: no runner writes more
    assert "it went wrong" in files.out and "nothing more to follow" in files.err
    nothing_left(town, private_tmp)


def test_the_town_starts_again_after_being_read(town, private_tmp):
    done, failed = stopped_town_with_tasks(town)
    town.json("tasks")
    town.json("status")
    town.tt("restart", "dev")  # a writing command starts the town on its recorded state
    assert town.json("status")["running"] is True
    assert town.task(done)["state"] == "completed" and town.task(failed)["state"] == "failed"
    again = town.assign("dev", "@echo after the restart")
    assert "after the restart" in town.wait_task(again)["output"]
    assert town.tt("tasks").err == ""  # running: no note


def test_a_reader_never_runs_while_a_supervisor_holds_the_lock(town, private_tmp):
    """A supervisor starting meanwhile wins: with the town's lock held, no copy is made or read."""
    from tinytown.supervisor import lock
    from tinytown.supervisor.snapshot import Snapshot
    stopped_town_with_tasks(town)
    held = lock.acquire(town.root / ".tt")
    try:
        reader = Snapshot(town.config())
        assert reader.open() is False and reader.folder is None and reader.proc is None
    finally:
        lock.release(held)
    nothing_left(town, private_tmp)


def test_a_record_that_cannot_be_read_is_one_line_and_nothing_left(town, private_tmp):
    stopped_town_with_tasks(town)
    aof = town.root / ".tt" / "redis" / "appendonly.aof"
    aof.write_bytes(b"*3\r\n$3\r\nSET\r\nnot a command at all\r\n" * 3)
    proc = town.tt("tasks", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.err
    assert proc.err.strip().startswith("tt: error: cannot read the stopped town's recorded state")
    nothing_left(town, private_tmp)


def test_a_running_tasks_output_so_far(town):
    town.tt("spawn", "dev")
    task_id = town.assign("dev", "@echo halfway there\n@gate finish-it\n@echo all done")
    wait_for(lambda: "halfway there" in town.task(task_id)["output"], 20, "the output so far")
    data = town.task(task_id)
    assert data["state"] == "running" and data["output_so_far"] is True and "all done" not in data["output"]
    shown = town.tt("task", task_id).out
    assert "output so far" in shown and "halfway there" in shown
    assert "halfway there" in town.tt("task", task_id, "--raw").out
    (town.record / "finish-it").touch()
    data = town.wait_task(task_id)
    assert "all done" in data["output"] and "output_so_far" not in data
    assert "output so far" not in town.tt("task", task_id).out


def test_a_stopped_tcp_town_is_read_the_same_way(town, private_tmp):
    """use_socket = false: a Redis that answers on the port is read as before; none, and the
    recorded state here is read like a socket town's."""
    from test_hardening import free_port
    port = free_port()
    path = town.root / "tinytown.toml"
    path.write_text(path.read_text().replace('use_socket = true\nsocket_path = "redis.sock"',
                                             f'use_socket = false\nport = {port}'))
    done, failed = stopped_town_with_tasks(town)
    assert {t["id"]: t["state"] for t in town.json("tasks")} == {done: "completed", failed: "failed"}
    status = town.json("status")
    assert status["running"] is False and status["redis"] == f"127.0.0.1:{port}"
    assert "it went wrong" in town.tt("logs", "--task", failed).out
    nothing_left(town, private_tmp)
