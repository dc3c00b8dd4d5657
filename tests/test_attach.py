"""`tt attach` driven through a real pseudo-terminal (pexpect), against real runners and the fake CLI."""
from __future__ import annotations

import os
import signal
import stat
import sys

import pexpect
import pytest

from conftest import wait_for


@pytest.fixture
def attach():
    """Factory: `tt attach ARGS` in its own pty; every one still running is killed afterwards."""
    yield from attach_factory()


def attach_factory(*options: str):
    """The attach fixture's body; `options` go after the factory's ARGS (test_remote_attach.py's --via-redis)."""
    started = []

    def start(town, *args, dimensions=(30, 100)):
        child = pexpect.spawn(sys.executable, ["-m", "tinytown.cli.main", "attach", *args, *options],
                              cwd=str(town.root), env=town.env, dimensions=dimensions, timeout=20, maxread=65536)
        started.append(child)
        child.expect_exact("detaches")                 # the banner: attached, and how to leave
        return child

    yield start
    for child in started:
        if child.isalive():
            child.kill(signal.SIGKILL)
        child.close(force=True)


def log_text(town, agent: str = "dev") -> str:
    path = town.root / ".tt" / "logs" / f"{agent}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def detach(child, key: str = "]") -> None:
    child.sendcontrol(key)
    child.expect_exact(b"\x1b[?25h\x1b[?1000l")  # whatever the CLI switched on, off again
    child.expect_exact("detached from")
    expect_clean_exit(child)


def expect_clean_exit(child) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_replay_prompt_answer_and_detach(town, attach):
    town.tt("spawn", "dev")
    town.wait_task(town.assign("dev", "@echo earlier-output"))
    task = town.assign("dev", "@echo asking-now\n@ask\n@echo after-answer")
    wait_for(lambda: "Proceed? [y/N]" in log_text(town), 20, "the CLI's prompt")
    pid = town.agent("dev")["pid"]
    viewer = attach(town, "dev")
    assert "Ctrl-]" in viewer.before.decode()        # the detach key is printed on attach
    viewer.expect_exact("earlier-output")           # replayed: the screen is not blank
    viewer.expect_exact("Proceed? [y/N]")
    viewer.expect_exact(f"dev is working on task {task}")
    viewer.send("y\r")                              # typed into the CLI's terminal
    viewer.expect_exact("proceeding")
    viewer.expect_exact("after-answer")
    viewer.expect_exact("dev is idle")
    finished = town.wait_task(task)
    assert finished["state"] == "completed" and finished["exit_code"] == 0
    task2 = town.assign("dev", "@ask")
    viewer.expect_exact(f"dev is working on task {task2}")
    viewer.expect_exact("Proceed? [y/N]")
    detach(viewer)                                  # back to the shell, the agent keeps running
    agent = town.agent("dev")
    assert agent["state"] == "working" and agent["pid"] == pid and town.task(task2)["state"] == "running"
    again = attach(town, "dev")
    again.expect_exact("Proceed? [y/N]")
    again.send("n\r")
    again.expect_exact("aborted")
    assert town.wait_task(task2)["exit_code"] == 1
    detach(again)


def test_idle_agent_stays_attached_until_a_task(town, attach):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    viewer = attach(town, "dev", "--detach-keys", "ctrl-p,ctrl-q")
    assert "Ctrl-P Ctrl-Q " in viewer.before.decode()
    viewer.expect_exact("dev is idle: waiting for the next task")
    task = town.assign("dev", "@echo live-line")
    viewer.expect_exact(f"dev is working on task {task}")
    viewer.expect_exact("live-line")
    viewer.expect_exact("dev is idle")
    viewer.sendcontrol("p")
    viewer.send("x")                                # not the sequence: passed on, still attached
    assert viewer.isalive()
    viewer.sendcontrol("p")
    detach(viewer, "q")


def test_read_only_sends_nothing(town, attach):
    town.tt("spawn", "dev")
    task = town.assign("dev", "@ask")
    wait_for(lambda: "Proceed? [y/N]" in log_text(town), 20, "the CLI's prompt")
    watcher = attach(town, "dev", "--read-only")
    assert "read-only" in watcher.before.decode()
    watcher.expect_exact("Proceed? [y/N]")
    watcher.send("y\r")                             # would make the CLI proceed if it got through
    detach(watcher)
    viewer = attach(town, "dev")                    # connects after the watcher's keys were handled
    viewer.expect_exact("dev is working")
    viewer.send("n\r")
    viewer.expect_exact("aborted")
    assert town.wait_task(task)["exit_code"] == 1
    assert "proceeding" not in log_text(town)


def test_window_size_follows_the_terminal(town, attach):
    town.tt("spawn", "dev")
    task = town.assign("dev", "@wait-winsize 30 100\n@wait-winsize 33 111")
    town.wait_task(task, states=("running",))
    viewer = attach(town, "dev", dimensions=(30, 100))
    viewer.expect_exact("winsize 30 100")           # the size on attach reached the CLI
    viewer.setwinsize(33, 111)                      # SIGWINCH to tt attach, passed on
    viewer.expect_exact("winsize 33 111")
    assert town.wait_task(task)["state"] == "completed"
    detach(viewer)


def test_two_viewers_see_the_same_output(town, attach):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    first = attach(town, "dev")
    second = attach(town, "dev", "--read-only")
    for viewer in (first, second):
        viewer.expect_exact("dev is idle")
    town.assign("dev", "@echo shared-line\n@seq 500")
    for viewer in (first, second):
        viewer.expect_exact("shared-line")
        viewer.expect_exact("seq 000500")
    detach(first)
    second.expect_exact("dev is idle")
    town.tt("stop")                                 # a viewer still attached is told, and ends
    second.expect_exact("dev's runner stopped")
    expect_clean_exit(second)


def test_killed_or_stalled_viewer_leaves_the_runner_healthy(town, attach):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    pid = town.agent("dev")["pid"]
    sock = town.config().attach_socket("dev")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600 and stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    doomed = attach(town, "dev")
    stalled = attach(town, "dev")
    for viewer in (doomed, stalled):
        viewer.expect_exact("dev is idle")
    task = town.assign("dev", "@gate go\n@print 4000000\n@echo big-done")
    doomed.expect_exact("dev is working")
    stalled.expect_exact("dev is working")
    os.kill(doomed.pid, signal.SIGKILL)             # gone abruptly, mid-task
    os.kill(stalled.pid, signal.SIGSTOP)            # reads nothing from here on
    (town.record / "go").touch()
    assert town.wait_task(task, timeout=60)["state"] == "completed"   # never waited for either
    agent = town.agent("dev")
    assert agent["pid"] == pid and agent["restarts"] == 0 and agent["state"] == "idle"
    os.kill(stalled.pid, signal.SIGCONT)
    stalled.expect("bytes of output skipped", timeout=60)
    stalled.expect_exact("dev is idle")
    detach(stalled)
    fresh = attach(town, "dev")                     # and attach still works
    fresh.expect_exact("big-done")
    detach(fresh)


def test_typing_into_a_cli_that_reads_nothing_never_stalls_attach(town, attach):
    # The pty is in blocking mode for its reader thread: a keystroke the terminal cannot take
    # now is dropped, never waited for by the thread that also serves the viewers.
    town.tt("spawn", "dev")
    task = town.assign("dev", "@echo not-reading\n@gate go\n@seq 3")
    viewer = attach(town, "dev")
    viewer.expect_exact("not-reading")
    for _ in range(64):  # 64 KiB: far more than a pty's buffers hold
        viewer.send("a" * 1023 + "\r")
    (town.record / "go").touch()
    viewer.expect_exact("seq 000003")               # output still flows to the viewer
    viewer.expect_exact("dev is idle")
    assert town.wait_task(task)["state"] == "completed"
    detach(viewer)


def test_attach_errors(town):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    for args, message in ((("nosuch",), "no agent named 'nosuch'"),
                          (("dev",), "needs a terminal"),
                          (("dev", "--detach-keys", "ctrl-"), "--detach-keys"),
                          (("a/b",), "invalid agent name")):
        proc = town.tt("attach", *args, check=False)
        assert proc.returncode == 1 and proc.err.startswith("tt: error: ") and message in proc.err, proc.err
        assert len(proc.err.strip().splitlines()) == 1
    town.tt("stop")
    proc = town.tt("attach", "dev", "--read-only", check=False)
    assert proc.returncode == 1 and "not running" in proc.err
    town.append_config('\n[attach]\ndetach_keys = "ctrl-"\n')
    proc = town.tt("attach", "dev", check=False)
    assert proc.returncode == 1 and "detach_keys" in proc.err and "tinytown.toml:" in proc.err


def test_the_replay_of_the_logs_end_has_terminal_line_ends(tmp_path):
    """A restarted runner replays the log's end, whose own lines end in a bare newline; a viewer's
    terminal is raw, so each must be CR LF there (else the next line starts mid-row)."""
    from tinytown.supervisor.attach_server import AttachServer
    server = AttachServer(tmp_path / "a.sock", "dev", b"[tt 10:00:00] task t1 started\nclaude: hi\r\n")
    assert server._replay() == b"[tt 10:00:00] task t1 started\r\nclaude: hi\r\n"
