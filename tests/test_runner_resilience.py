"""What a runner does when its log cannot be written, and when a stop meets a task that finished or a
Redis that is gone (issue 12, items 5 and 13). Real towns, real processes, a real redis-server.

We run as root, so a read-only folder does not stop a write: a full disk is the agent's log made a
link to /dev/full (ENOSPC), a file-size limit is RLIMIT_FSIZE (EFBIG), and a rotation that fails
is a folder where the rotated file must go.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
from conftest import FAST_POLICY, REPO, town_processes, wait_for


def with_policy(**overrides) -> str:
    text = FAST_POLICY
    for key, value in overrides.items():
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
    return text + "\n"


def stream_output(town, name: str) -> bytes:
    """Everything in the agent's Redis output stream."""
    t = town.town()
    try:
        entries = t.r.xrange(t.keys.output(t.agent_id(name)))
    finally:
        t.r.close()
    return "".join(fields["data"] for _id, fields in entries).encode("utf-8", "surrogateescape")


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- the log cannot be written (item 5) ------------------------------------------------------------
def test_a_log_on_a_full_disk_costs_the_log_not_the_task(town):
    logs = town.root / ".tt" / "logs"
    logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    (logs / "dev.log").symlink_to("/dev/full")  # every write: ENOSPC
    town.tt("spawn", "dev")
    first = town.wait_task(town.assign("dev", "@echo hello from a full disk"))
    assert first["state"] == "completed" and "hello from a full disk" in first["output"]
    assert b"hello from a full disk" in stream_output(town, "dev")
    agent = town.agent("dev")
    assert "No space left on device" in agent["warning"] and "dev.log" in agent["warning"]
    status = " ".join(town.tt("status").out.split())
    assert "No space left on device" in status
    # the runner lives on: the next task runs on the same runner
    second = town.wait_task(town.assign("dev", "@exit 4"))
    assert second["state"] == "failed" and second["exit_code"] == 4
    assert town.agent("dev")["pid"] == agent["pid"]


def test_a_log_that_cannot_rotate_is_kept_and_the_warning_goes_when_it_can(make_town):
    town = make_town(extra="\n[logs]\nmax_bytes = 4096\nbackups = 1\n")
    logs = town.root / ".tt" / "logs"
    blocker = logs / "dev.log.1"
    blocker.mkdir(mode=0o700, parents=True)
    (blocker / "in-the-way").touch()  # dev.log cannot be renamed onto a folder that is not empty
    town.tt("spawn", "dev")
    task = town.wait_task(town.assign("dev", "@print 20000\n@echo end-of-big"))
    assert task["state"] == "completed" and "end-of-big" in task["output"]
    assert "cannot rotate" in town.agent("dev")["warning"]
    assert b"end-of-big" in (logs / "dev.log").read_bytes()  # nothing lost: the file grew instead
    (blocker / "in-the-way").unlink()
    blocker.rmdir()
    assert town.wait_task(town.assign("dev", "@print 5000"))["state"] == "completed"
    wait_for(lambda: town.agent("dev")["warning"] == "", 30, "the warning to clear")
    assert (logs / "dev.log.1").is_file()


def test_a_file_size_limit_is_a_log_problem_not_the_runners_death(town):
    """RLIMIT_FSIZE: past it a write fails with EFBIG, and SIGXFSZ, whose default ends a process,
    must not end the runner."""
    script = textwrap.dedent(f"""
        import resource, sys
        from tinytown.supervisor.config import load
        from tinytown.supervisor.runner import Runner
        from tinytown.supervisor.agent_log import AgentLog
        config = load({str(town.root)!r})
        Runner(config, "no-agent")._install_signals()
        log = AgentLog(config, "limited")
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        log.write(b"x" * 20000)
        print("first:", log.problem)
        log.note("still here")
        print("alive")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "first: log cannot write limited.log: File too large" in proc.stdout
    assert "alive" in proc.stdout


# --- an outcome that exists wins (item 13) -------------------------------------------------------
TRAPPER = """
[agent_clis.trapper]
command = ["sh", "-c", "trap 'echo finished on TERM; exit 0' TERM; echo started; while :; do sleep 0.05; done"]
prompt = "stdin"
"""


@pytest.mark.parametrize("how", [[], ["--now"]], ids=["graceful", "now"])
def test_a_cli_that_exits_0_as_a_stop_kills_it_is_completed_not_run_again(make_town, how):
    town = make_town(policy=with_policy(stop_grace=0.3), extra=TRAPPER)
    town.tt("spawn", "dev", "--cli", "trapper")
    task_id = town.assign("dev", "go")
    log = town.root / ".tt" / "logs" / "dev.log"
    wait_for(lambda: log.exists() and b"started\r\n" in log.read_bytes(), 30, "the CLI to set its trap")
    out = town.tt("stop", *how).out
    assert "Re-queued" not in out and "wait" not in out, out
    assert json.loads((town.root / ".tt" / "last-stop.json").read_text())["requeued"] == []
    town.tt("spawn", "other")  # the town back (in the background): dev would run what waits for it
    town.wait_agent("dev", ("idle",))
    task = town.task(task_id)
    assert task["state"] == "completed", task
    assert task["exit_code"] == 0 and "finished on TERM" in task["output"]
    assert log.read_bytes().count(b"started\r\n") == 1


def test_a_stop_is_answered_while_the_runner_waits_for_a_redis_that_is_gone(town):
    town.tt("spawn", "dev")
    assert town.wait_task(town.assign("dev", "@echo one"))["state"] == "completed"
    runner = town.agent("dev")["pid"]
    supervisor = psutil.Process(town.supervisor_pid())
    [server] = [p for p in town_processes(town.root) if "redis-server" in p.name()]
    supervisor.suspend()  # nobody starts redis-server again: the runner waits for it
    try:
        server.kill()
        # the runner's inbox wait broke; it sleeps between attempts to connect again
        wait_for(lambda: open(f"/proc/{runner}/syscall").read().split()[0] == str(_CLOCK_NANOSLEEP), 30,
                 "the runner to wait for Redis")
        os.kill(runner, signal.SIGTERM)  # what the supervisor sends on `tt stop`
        wait_for(lambda: dead(runner), 10, "the runner to answer the stop")
    finally:
        supervisor.resume()
    assert "Traceback" not in (town.root / ".tt" / "logs" / "dev.log").read_text(errors="replace")


_CLOCK_NANOSLEEP = 230  # x86_64; time.sleep's system call
