"""The CLI's session as the runner starts it (posix_spawn on a pty of its own) and drives it through
pexpect's public fdspawn: what a pexpect or kernel change must not break.

Against the fake CLI (fixtures/fake_agent.py), real ptys, real processes; no town needed.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import sys
from pathlib import Path

import pexpect
import pytest

from tinytown.supervisor.config import CliSpec
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.pty_session import CliSession

from conftest import FAKE_BIN, wait_for

STDIN_CLI = CliSpec("claude", ("claude", "--print"), "stdin")


@pytest.fixture
def record(tmp_path) -> Path:
    folder = tmp_path / "record"
    folder.mkdir()
    return folder


@pytest.fixture
def sessions():
    made: list[CliSession] = []
    yield made
    for session in made:
        session.close()


def start(sessions, record: Path, prompt: bytes, spec: CliSpec = STDIN_CLI, task_id: str = "t1",
          dimensions=(40, 160)) -> CliSession:
    env = dict(os.environ, FAKE_AGENT_RECORD=str(record), TT_TASK_ID=task_id,
               PATH=os.pathsep.join([str(FAKE_BIN), str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    session = CliSession(spec, prompt, record / f"{task_id}.prompt-file", record.parent, env, dimensions=dimensions)
    sessions.append(session)
    session.start()
    return session


def wait_exit(session: CliSession) -> None:
    wait_for(session.poll, 30, "the CLI's exit")


def pty_number(master_fd: int) -> int:
    """The device number of the pty whose master side this is (its /dev/pts/N)."""
    _TIOCGPTN = 0x80045430
    n = struct.unpack("I", fcntl.ioctl(master_fd, _TIOCGPTN, b"\0" * 4))[0]
    return os.stat(f"/dev/pts/{n}").st_rdev


def test_prompt_arrives_on_stdin_byte_exact_and_the_pty_is_its_terminal(sessions, record):
    # Every byte value, NULs and invalid UTF-8 included, and past what a tty line would take.
    prompt = b"@gate open\n" + bytes(range(256)) * 600 + b"\xff\xfe\n"
    session = start(sessions, record, prompt)
    term = session.expecter()
    term.expect_exact(b"received %d bytes of prompt" % len(prompt))
    wait_for(lambda: (record / "t1.json").exists(), 30, "the fake CLI's record")

    # While it waits at the gate: it leads a session of its own, whose controlling terminal is
    # the pty, which is also its stdout and stderr; stdin is the prompt (a file, not the terminal).
    stat = Path(f"/proc/{session.pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    pgrp, sid, tty_nr = int(fields[2]), int(fields[3]), int(fields[4])
    assert sid == pgrp == session.pid
    assert tty_nr == pty_number(session.fd)
    for fd in (1, 2):
        assert os.stat(f"/proc/{session.pid}/fd/{fd}").st_rdev == tty_nr
    assert not os.readlink(f"/proc/{session.pid}/fd/0").startswith("/dev/pts/")

    (record / "open").touch()
    term.expect_exact(b"done")
    wait_exit(session)
    info = json.loads((record / "t1.json").read_text())
    assert (record / "t1.prompt").read_bytes() == prompt
    assert info["stdin_isatty"] is False and info["stdout_isatty"] is True
    assert info["argv"] == ["--print"]
    assert session.exit_code == 0 and session.signal is None
    assert session.outcome() == "exit code 0"


def test_exit_code_and_killing_signal_are_reported(sessions, record):
    failing = start(sessions, record, b"@exit 3\n", task_id="exit")
    crashing = start(sessions, record, b"@crash\n", task_id="crash")
    stopped = start(sessions, record, b"@sleep 300\n", task_id="sleep")
    stopped.expecter().expect_exact(b"received")
    stopped.kill_group(signal.SIGTERM)
    for session in (failing, crashing, stopped):
        session.expecter().expect(pexpect.EOF)  # (EOF: the terminal's last holder is gone)
        wait_exit(session)
    assert (failing.exit_code, failing.signal, failing.outcome()) == (3, None, "exit code 3")
    assert (crashing.signal, crashing.outcome()) == (signal.SIGSEGV, "killed by SIGSEGV")
    assert (stopped.signal, stopped.outcome()) == (signal.SIGTERM, "killed by SIGTERM")


def test_window_size_is_set_and_resized(sessions, record):
    session = start(sessions, record, b"@winsize\n@wait-winsize 50 200\n", dimensions=(33, 121))
    term = session.expecter()
    term.expect_exact(b"winsize 33 121")
    session.resize(50, 200)
    term.expect_exact(b"winsize 50 200")
    term.expect_exact(b"done")


def test_keystrokes_reach_a_cli_that_asks_and_are_echoed_once(sessions, record):
    """The terminal echoes, as any does: `tt attach` puts the user's own terminal in raw mode, so
    without it a line-mode prompt (a `read`, ssh's yes/no) showed nothing of what was typed."""
    session = start(sessions, record, b"@ask\n")
    term = session.expecter()
    term.expect_exact(b"Proceed? [y/N] ")
    session.write(b"y\n")
    term.expect_exact(b"proceeding")
    assert term.before.count(b"y") == 1  # echoed by the terminal: a viewer sees the key once
    term.expect_exact(b"done")
    wait_exit(session)
    assert session.exit_code == 0


def test_the_reader_thread_takes_all_output_to_the_end(sessions, record):
    session = start(sessions, record, b"@seq 20000\n")
    reader = session.start_reader()
    logged: list[bytes] = []
    reader.go(logged.append)
    got, eof = bytearray(), False
    while not eof:
        wait_for(lambda: reader.chunks or reader.eof, 30, "output")
        chunks, eof = reader.take()
        got += b"".join(chunks)
    assert got.count(b"seq ") == 20000 and got.rstrip().endswith(b"done")
    assert b"".join(logged) == got  # the sink (the log) saw every byte, in order
    wait_exit(session)
    assert session.exit_code == 0


def test_a_flood_reaches_the_log_in_blocks_and_a_short_line_at_once(sessions, record):
    """A flood and a short line after it (a prompt) reach the log whole and in order, while the
    runner takes nothing (its main thread held up). (How many writes: the test below.)"""
    flood = CliSpec("sh", ("sh", "-c", "head -c 2000000 /dev/zero; sleep 0.2; echo Proceed?; exec sleep 300"),
                    "stdin")
    session = start(sessions, record, b"", spec=flood)
    reader = session.start_reader()
    logged: list[bytes] = []
    reader.go(logged.append)
    wait_for(lambda: b"Proceed?" in b"".join(logged), 30, "the line after the flood in the log")
    assert b"".join(logged) == b"\0" * 2000000 + b"Proceed?\r\n"
    chunks, _ = reader.take()
    assert b"".join(chunks) == b"".join(logged)


def test_full_reads_reach_the_log_in_blocks_and_a_short_one_at_once():
    """How many writes the log gets, with the reads made one at a time (a pipe whose each write is
    read before the next), so that the count does not hang on the machine's timing: a pty's
    reader that keeps up gets short reads, each flushed, and one that falls behind full ones."""
    from tinytown.supervisor.pty_reader import LOG_BLOCK, PtyReader
    read_end, write_end = os.pipe()
    reader = PtyReader(read_end)  # (it reads a dup of its own)
    os.close(read_end)
    reader.start()
    logged: list[bytes] = []
    reader.go(logged.append)
    full = b"x" * 4095  # (what a pty hands over at once)
    try:
        for n in range(1, 101):
            os.write(write_end, full)
            wait_for(lambda: reader.size == n * len(full), 10, "the read")
        assert len(logged) <= 100 * len(full) // LOG_BLOCK  # (a write per read: 100)
        os.write(write_end, b"Proceed? ")  # short: at once, with all before it, though nothing is taken
        wait_for(lambda: b"".join(logged) == full * 100 + b"Proceed? ", 10, "the short read in the log")
    finally:
        os.close(write_end)
    wait_for(lambda: reader.eof, 10, "the end of the output")
    chunks, eof = reader.take()
    assert eof and b"".join(chunks) == b"".join(logged)
    reader.abandon()


def test_a_burst_the_cli_then_waits_after_reaches_the_log_with_the_runner_held_up(sessions, record):
    """A CLI's redraw or summary in one write, then a wait: in the log at once, take() or not
    (a review found 3 000 bytes held until the runner's next batch)."""
    burst = CliSpec("sh", ("sh", "-c", "head -c 3000 /dev/zero; exec sleep 300"), "stdin")
    session = start(sessions, record, b"", spec=burst)
    reader = session.start_reader()
    logged: list[bytes] = []
    reader.go(logged.append)
    wait_for(lambda: len(b"".join(logged)) == 3000, 30, "the burst in the log")


def test_the_log_gets_nothing_before_go_and_then_what_was_read(sessions, record):
    """The runner writes its "task started" line between start_reader() and go(): the thread
    reads at once (a CLI that prints at once is not held up), but the CLI's output must not reach
    the log before that line."""
    session = start(sessions, record, b"@echo early bird\n")
    reader = session.start_reader()
    wait_for(lambda: reader.eof, 30, "the end of the output")
    logged: list[bytes] = []
    reader.go(logged.append)
    assert b"early bird" in b"".join(logged)
    assert b"early bird" in b"".join(reader.take()[0])  # (and the pump still gets it)


def test_a_log_sink_that_fails_costs_the_log_only(sessions, record, capfd):
    """A sink raising something other than OSError (a bug, no memory) must not end the reader
    thread: the output still reaches take() to its end, and stderr says what went wrong."""
    session = start(sessions, record, b"@seq 2000\n")
    reader = session.start_reader()
    def broken(data: bytes) -> None:
        raise MemoryError("no memory for the log")
    reader.go(broken)
    got = bytearray()
    while not reader.eof or reader.chunks:
        wait_for(lambda: reader.chunks or reader.eof, 30, "output")
        got += b"".join(reader.take()[0])
    assert got.count(b"seq ") == 2000
    assert "no memory for the log" in capfd.readouterr().err


def test_close_kills_the_group_reaps_and_releases_the_terminal(sessions, record):
    session = start(sessions, record, b"@child\n@sleep 300\n")
    session.start_reader()  # (its thread blocked in a read when close() comes)
    children = record / "t1.children"
    wait_for(lambda: children.exists() and children.read_text().strip(), 30, "the CLI's helper")
    helper = int(children.read_text().split()[0])
    fd, pid = session.fd, session.pid
    session.close()
    assert session.signal == signal.SIGKILL and session.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left
    wait_for(lambda: not Path(f"/proc/{helper}").exists() or "Z" in _state(helper), 10, "the helper's end")


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "Z"
    return stat[stat.rindex(")") + 2:].split()[0]


def test_a_cli_that_is_not_there_is_one_clear_error(sessions, record):
    with pytest.raises(TinytownError, match="cannot start 'no-such-cli': command not found"):
        start(sessions, record, b"hi", spec=CliSpec("x", ("no-such-cli",), "stdin"))


def test_the_prompt_as_an_argument_and_as_a_file(sessions, record):
    text = "a prompt -- with 'quotes', $HOME and ünïcode"  # (one that starts with '-' is refused: test_config)
    arg = start(sessions, record, text.encode(), spec=CliSpec("x", ("claude", "--message", "{prompt}"), "arg"),
                task_id="arg")
    by_file = start(sessions, record, text.encode(), spec=CliSpec("x", ("aider", "--message-file"), "file"),
                    task_id="file")
    for session in (arg, by_file):
        session.expecter().expect(pexpect.EOF)
        wait_exit(session)
        assert session.exit_code == 0
    assert (record / "arg.prompt").read_bytes() == text.encode()
    assert (record / "file.prompt").read_bytes() == text.encode()
    by_file.close()
    assert not by_file.prompt_file.exists()  # the session removes the prompt file it wrote
