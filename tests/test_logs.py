"""`tt logs`: recent output, following (across runner restarts and log rotation), several agents
interleaved with prefixes, one task's output, and reading through Redis from another folder."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from conftest import wait_for


class Follower:
    """`tt logs -f ...` running in the background; a thread collects what it prints."""

    def __init__(self, town, *args, cwd=None, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "logs", "-f", *args], cwd=cwd or town.root,
                                     env={**town.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = bytearray()
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self):
        while True:
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                return
            self.out += data

    @property
    def text(self) -> str:
        return bytes(self.out).decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 20):
        wait_for(lambda: needle in self.text, timeout, f"{needle!r} from tt logs -f (got {self.text[-300:]!r})")

    def stop(self) -> int:
        """Ctrl+C, as a user ends it: exit status 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(20)
        self.thread.join(10)
        return code


@pytest.fixture
def follow():
    started = []

    def start(town, *args, **kwargs):
        follower = Follower(town, *args, **kwargs)
        started.append(follower)
        return follower

    yield start
    for follower in started:
        if follower.proc.poll() is None:
            follower.proc.kill()
            follower.proc.wait()


def seq_lines(text: str) -> list[str]:
    return re.findall(r"^seq \d{6}$", text, re.M)


def test_recent_output_last_lines_raw_and_clean(town):
    town.tt("spawn", "dev")
    task = town.assign("dev", "@seq 150\n@echo \x1b[31mred\x1b[0m text")
    assert town.wait_task(task)["state"] == "completed"
    out = town.tt("logs", "dev").out
    lines = out.splitlines()
    assert len(lines) == 100                              # the default: the last 100 lines
    assert lines[-3:-1] == ["red text", "done"] and f"task {task} completed" in lines[-1]
    assert "seq 000150" in lines and "seq 000040" not in lines
    assert "\r" not in out and "\x1b" not in out          # escape sequences and CRs cleaned away
    assert town.tt("logs", "dev", "-n", "2").out.splitlines()[0] == "done"
    raw = town.tt("logs", "dev", "--raw", "-n", "3").stdout
    assert b"\x1b[31mred\x1b[0m text\r\n" in raw           # bytes as the CLI wrote them (pty CRLF)
    assert town.tt("logs", "dev", "-n", "0").out == ""


def test_follow_ends_on_ctrl_c_even_inside_a_finalizer(town, follow, tmp_path):
    """As `tt events -f` (tests/test_agent_control.py): a KeyboardInterrupt swallowed in a gc
    callback used to leave the follower polling for ever."""
    from conftest import interrupt_inside_gc
    town.tt("spawn", "dev")
    town.wait_task(town.assign("dev", "@echo first-marker"))
    extra, marker = interrupt_inside_gc(tmp_path)
    follower = follow(town, "dev", env=extra)
    follower.wait_for("first-marker")
    marker.touch()
    assert follower.proc.wait(20) == 0 and not marker.exists()


def test_follow_sees_a_new_line(town, follow):
    town.tt("spawn", "dev")
    town.wait_task(town.assign("dev", "@echo first-marker"))
    follower = follow(town, "dev")
    follower.wait_for("first-marker")               # history printed: it is following now
    town.wait_task(town.assign("dev", "@echo second-marker"), states=("running", "completed"))
    follower.wait_for("second-marker", timeout=10)
    assert follower.stop() == 0
    assert follower.text.count("first-marker") == 1 and follower.text.count("second-marker") == 1
    assert " | " not in follower.text               # one agent named: no prefixes


def test_follow_survives_runner_restart_and_rotation(make_town, follow):
    # Backups enough to hold the whole run: a follower that falls behind must still find every
    # line (identity by inode across the renames), whatever the timing.
    town = make_town(extra="\n[logs]\nmax_bytes = 1024\nbackups = 60\n")
    town.tt("spawn", "dev")
    town.wait_task(town.assign("dev", "@echo before-restart"))
    follower = follow(town, "dev", "-n", "1")
    follower.wait_for("completed")
    old_pid = town.agent("dev")["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: town.agent("dev")["pid"] not in (None, old_pid) and town.agent("dev")["state"] == "idle",
             20, "a new runner for dev")
    town.wait_task(town.assign("dev", "@echo after-restart"))
    follower.wait_for("after-restart")
    # 3000 lines written one at a time (each directive flushes): ~33 KB, rotated every KiB
    task = town.assign("dev", "\n".join(f"@echo seq {i:06d}" for i in range(1, 3001)))
    assert town.wait_task(task)["state"] == "completed"
    follower.wait_for(f"task {task} completed")
    assert (town.root / ".tt" / "logs" / "dev.log.1").exists()
    assert follower.stop() == 0
    assert seq_lines(follower.text) == [f"seq {i:06d}" for i in range(1, 3001)]  # none lost, none twice
    assert follower.text.count("before-restart") == 0 and follower.text.count("after-restart") == 1
    # history reaches back through the backups too
    assert seq_lines(town.tt("logs", "dev", "-n", "2000").out) == [f"seq {i:06d}" for i in range(1003, 3001)]


def test_two_agents_interleaved_with_prefixes(town, follow):
    town.tt("spawn", "alpha")
    town.tt("spawn", "b")
    follower = follow(town)                          # no names: every agent
    town.wait_task(town.assign("alpha", "@echo one-from-alpha"))
    follower.wait_for("one-from-alpha")
    town.wait_task(town.assign("b", "@echo two-from-b"))
    follower.wait_for("two-from-b")
    town.wait_task(town.assign("alpha", "@echo three-from-alpha"))
    follower.wait_for("three-from-alpha")
    assert follower.stop() == 0
    text = follower.text
    assert "alpha | one-from-alpha\n" in text and "b     | two-from-b\n" in text
    assert text.index("one-from-alpha") < text.index("two-from-b") < text.index("three-from-alpha")
    assert "\x1b[" not in text                     # not a terminal: no colour
    history = town.tt("logs", "alpha", "b").out
    assert "alpha | three-from-alpha" in history and "b     | two-from-b" in history


def test_prefix_colours_and_partial_lines():
    from tinytown.cli.logview import Printer
    out = io.BytesIO()
    printer = Printer(out, prefix=True, colour=True, raw=False)
    printer.add("a")
    printer.add("bb")
    printer.feed("a", b"\x1b[1mbold\x1b[0m\r\nProceed? ")
    printer.feed("bb", b"50%\r100%\n")
    printer.flush_partial(force=True)
    text = out.getvalue().decode()
    assert "\x1b[36ma  | \x1b[0mbold\n" in text           # cyan prefix, the CLI's own escapes removed
    assert "\x1b[33mbb | \x1b[0m100%\n" in text            # a redrawn line shows as drawn last
    assert text.endswith("a  | \x1b[0mProceed? \n")


def test_one_task_and_since(town, follow):
    town.tt("spawn", "dev")
    first = town.assign("dev", "@echo output-of-first")
    town.wait_task(first)
    second = town.assign("dev", "@echo before-gate\n@gate open-it\n@echo output-of-second")
    town.wait_task(second, states=("running",))
    out = town.tt("logs", "--task", first[:8]).out
    assert "output-of-first" in out and "output-of-second" not in out
    follower = follow(town, "--task", second)
    follower.wait_for("before-gate")
    (town.record / "open-it").touch()
    assert follower.proc.wait(20) == 0               # ends by itself when the task finishes
    follower.thread.join(10)
    assert "output-of-second" in follower.text and "output-of-first" not in follower.text
    assert "output-of-first" in town.tt("logs", "dev", "--since", "1h").out
    assert town.tt("logs", "dev", "--since", "2999-01-01T00:00").out == ""
    for long_ago in ("21000d", "0001-01-01T00:00"):     # before 1970: all of it, not a Redis error
        assert "output-of-first" in town.tt("logs", "dev", "--since", long_ago).out


def test_follow_through_redis_from_another_folder(town, tmp_path, follow):
    """Another machine sees no .tt/logs, only the town's Redis: output still follows."""
    town.tt("spawn", "dev")
    town.wait_task(town.assign("dev", "@echo old-output"))
    viewer = tmp_path / "elsewhere"
    viewer.mkdir()
    (viewer / "tinytown.toml").write_text(
        f'name = "testtown"\n[redis]\nurl = "unix://{town.config().redis_socket}"\n')
    assert "old-output" in town.tt("logs", "dev", cwd=viewer).out
    follower = follow(town, "dev", cwd=viewer)
    follower.wait_for("old-output")
    town.wait_task(town.assign("dev", "@echo new-output\n@echo \x1b[32mgreen\x1b[0m"))
    follower.wait_for("new-output")
    follower.wait_for("green")
    assert follower.stop() == 0
    assert "\x1b" not in follower.text and follower.text.count("new-output") == 1


def test_logs_errors(town):
    town.tt("spawn", "dev")
    for args, message in ((("nosuch",), "no agent named 'nosuch'"),
                          (("dev", "--since", "yesterday-ish"), "--since 'yesterday-ish'"),
                          (("dev", "--task", "x"), "either agent names or --task"),
                          (("--task", "nosuchtask"), "no task 'nosuchtask'"),
                          (("../x",), "invalid agent name")):
        proc = town.tt("logs", *args, check=False)
        assert proc.returncode == 1 and proc.err.startswith("tt: error: ") and message in proc.err, proc.err
        assert len(proc.err.strip().splitlines()) == 1


def test_log_file_reader_across_rotations(tmp_path):
    """The reader alone, with the real writer: behind by several rotations, deleted files, history."""
    from tinytown.supervisor.config import Config, LogPolicy
    from tinytown.supervisor.agent_log import AgentLog
    from tinytown.supervisor.log_readers import LogFile, cut_lines
    for backups, read_every in ((0, 1), (2, 1), (2, 25), (40, 400)):  # (40, 400): ~20 rotations behind
        root = tmp_path / f"b{backups}-{read_every}"
        config = Config(root=root, name="t", logs=LogPolicy(max_bytes=1024, backups=backups))
        log = AgentLog(config, "a")
        reader = LogFile(config.log_file("a"))
        assert reader.start(10) == b""
        written, got = bytearray(), bytearray()
        for i in range(2000):
            line = b"line %06d %s\n" % (i, b"x" * (i % 90))
            log.write(line)
            written += line
            if i % read_every == 0:
                got += reader.read()
        got += reader.read()
        # never repeated or out of order; complete whenever the backups held what it had not read
        assert got == written, (backups, read_every)
        if backups:
            assert LogFile(config.log_file("a")).start(15) == cut_lines(bytes(written), 15)
        log.close()
        reader.close()


def test_rotation_keeps_the_backups_and_frees_what_it_discards(tmp_path):
    """The file a rotation discards is unlinked at once and freed off the writer's path
    (agent_log._discard): only the log and its backups are left, and no fd of the writer's
    process still holds a deleted one once the rotation's helper threads are done."""
    from tinytown.supervisor.config import Config, LogPolicy
    from tinytown.supervisor.agent_log import AgentLog
    for backups in (0, 2):
        config = Config(root=tmp_path / str(backups), name="t", logs=LogPolicy(max_bytes=1024, backups=backups))
        log = AgentLog(config, "a")
        for i in range(200):
            log.write(b"line %06d %s\n" % (i, b"x" * 90))
        log.close()
        logs = config.log_file("a").parent
        assert {p.name for p in logs.iterdir()} == {"a.log", *(f"a.log.{n}" for n in range(1, backups + 1))}
        assert (logs / "a.log").read_bytes().startswith(b"line ")
        wait_for(lambda: not _fds_under(logs), 10, "the discarded files' fds closed")


def _fds_under(folder) -> list[str]:
    """What this process's open fds point to under `folder` (a deleted file reads "... (deleted)")."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # (listdir's own fd, closed by now)
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def test_rotation_over_a_fifo_in_the_backups_place_does_not_block(tmp_path):
    """The file a rotation discards is opened first (agent_log._discard): a FIFO put in its place
    must neither block the writer (and with it the pty's reader) nor stop the rotation."""
    import threading
    from tinytown.supervisor.config import Config, LogPolicy
    from tinytown.supervisor.agent_log import AgentLog
    config = Config(root=tmp_path, name="t", logs=LogPolicy(max_bytes=1024, backups=1))
    log = AgentLog(config, "a")
    os.mkfifo(config.log_file("a").with_name("a.log.1"))
    writer = threading.Thread(target=lambda: [log.write(b"x" * 99 + b"\n") for _ in range(30)], daemon=True)
    writer.start()
    writer.join(10)
    assert not writer.is_alive(), "the rotation blocked on the FIFO"
    assert log.problem == "" and config.log_file("a").with_name("a.log.1").is_file()
    log.close()


def test_rotation_moves_the_runners_stderr_along(tmp_path):
    """A runner's stderr is its log file; after a rotation a traceback must land in the current one."""
    log = tmp_path / ".tt" / "logs" / "a.log"
    log.parent.mkdir(parents=True)
    script = ("import os, sys\nfrom pathlib import Path\n"
              "from tinytown.supervisor.config import Config, LogPolicy\nfrom tinytown.supervisor.agent_log import AgentLog\n"
              f"log = AgentLog(Config(root=Path({str(tmp_path)!r}), name='t', logs=LogPolicy(max_bytes=1024)), 'a')\n"
              "for i in range(100):\n    log.write(b'x' * 100 + b'\\n')\n"
              "print('after-rotation', file=sys.stderr, flush=True)\n")
    with open(log, "ab") as fh:
        subprocess.run([sys.executable, "-c", script], stdout=fh, stderr=fh, check=True)
    assert "after-rotation" in log.read_text()
    assert (tmp_path / ".tt" / "logs" / "a.log.1").exists()


def test_a_flood_of_output_is_all_in_the_log_and_its_start_and_end_in_redis(town):
    """Past the stream's budget (supervisor/stream_budget.py) a flood goes to Redis as its start,
    whole windows of its newest output (each after a line saying exactly how much was left out)
    and its end; the log file has every byte."""
    from tinytown.supervisor.resp import connect
    from tinytown.supervisor.stream_budget import BURST, LINE_SEARCH, WINDOW
    town.tt("spawn", "dev")
    size = 3 * BURST
    task_id = town.assign("dev", f"@print {size}")
    task = town.wait_task(task_id, timeout=60)
    assert task["state"] == "completed"
    config = town.config()
    entries = connect(config, decode=False).xrange(town.town().keys.output(town.agent("dev")["id"]), "-", "+")
    data = b"".join(fields[b"data"] for _, fields in entries if fields[b"task"] == task_id.encode())
    gap = rb"\n\[tt: (\d+) bytes of output left out of the Redis copy [^\]]*\]\n"
    counts = [int(n) for n in re.findall(gap, data)]
    parts = re.split(gap, data)[::2]                        # the output between the gap lines
    rows, rest = divmod(size, 80)                           # @print: rows of 79 x and a newline
    first_line = parts[0][:parts[0].index(b"\r\n") + 2]     # "claude: received N bytes of prompt"
    assert first_line.endswith(b"bytes of prompt\r\n") and len(parts[0]) >= BURST // 2   # the start, whole
    # The end, whole: the last window, and all that flowed after it once the bucket had room again.
    assert parts[-1].endswith(b"y" * rest + b"done\r\n") and len(parts[-1]) >= WINDOW - LINE_SEARCH
    assert all(part.startswith(b"x") for part in parts[1:])  # each window from a line's start
    seconds = (task["finished_at"] - task["started_at"]) if task.get("finished_at") else 60
    assert 1 <= len(counts) <= 2 + seconds * 5               # a few windows, not thousands of slivers
    assert sum(map(len, parts)) + sum(counts) == len(first_line) + rows * 81 + rest + len(b"done\r\n")
    logs = sorted(config.log_dir.glob("dev.log*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    log = b"".join(path.read_bytes() for path in logs)     # rotated ones first: the bytes in order
    assert log.count(b"x" * 79 + b"\r\n") == rows           # every byte in the log
    shown = town.tt("logs", "--task", task_id[:8]).out
    assert "bytes of output left out of the Redis copy" in shown and shown.rstrip().endswith("done")


def test_a_batchs_tail_is_kept_from_its_last_chunks_as_one_unbroken_run():
    """keep_tail_of (the task's tail, the attach replay ring) looks only at the chunks that hold
    the last `limit` bytes; what it keeps is always a run of the output with nothing missing."""
    from tinytown.supervisor.agent_log import keep_tail_of
    buf = bytearray(b"old")
    assert keep_tail_of(buf, [b"xy"], 15) is False and buf == b"oldxy"
    assert keep_tail_of(buf, [b"a" * 10, b"b" * 10, b"c" * 10], 15) is True
    assert buf == b"b" * 10 + b"c" * 10                        # not "oldxy" + b + c: a gap
    assert keep_tail_of(buf, [b"d" * 40], 15) is True and buf == b"d" * 15
    assert keep_tail_of(buf, [], 15) is False and buf == b"d" * 15


def test_the_stream_budget_sends_a_floods_start_windows_and_end_with_the_gaps_counted():
    from tinytown.supervisor.stream_budget import StreamBudget
    budget = StreamBudget(now=0.0, rate=100, burst=220, window=50)
    assert budget.take([b"a" * 100, b"b" * 100], now=0.0) == (0, [b"a" * 100, b"b" * 100])   # within the burst
    assert budget.take([b"c" * 60, b"d" * 40], now=0.0) == (0, [])       # overdrawn: the newest 50 held
    assert budget.take([b"e\n" + b"f" * 70], now=0.1) == (0, [])         # (still the newest 50)
    assert budget.take([], now=0.25) == (0, [])                          # not yet 50 back in the bucket
    assert budget.take([], now=0.3) == (122, [b"f" * 50])                # then the gap and the window
    assert budget.take([b"g" * 10], now=0.5) == (0, [b"g" * 10])         # flowing again
    assert budget.take([b"h" * 500], now=0.5) == (0, [])
    assert budget.take([b"i\nj"], now=0.5, final=True) == (502, [b"j"])  # the task's end, from a line's start
    cut = StreamBudget(now=0.0, rate=1, burst=1, window=8)
    assert cut.take([b"xxxx\nnewest"], now=0.0, final=True) == (5, [b"newest"])
    assert cut.take([], now=0.0, final=True) == (0, [])                  # nothing held: nothing said
    at_line = StreamBudget(now=0.0, rate=1, burst=1, window=8)
    assert at_line.take([b"xx\n1234\n678"], now=0.0, final=True) == (3, [b"1234\n678"])  # the cut starts a line


def test_a_100_mb_flood_puts_a_few_mib_into_redis_at_the_default_budget():
    """At 8 MiB then 4 MiB/s, a flood's copy cost it ~13 % of its rate on 2 cores (stream_budget.py):
    a 100 MB flood at 100 MB/s, batches of 1 MiB, now sends under 5 MiB to the stream."""
    from tinytown.supervisor.stream_budget import StreamBudget
    budget, sent, mib = StreamBudget(now=0.0), 0, 1 << 20
    for batch in range(100):
        gap, pieces = budget.take([b"x" * mib], now=batch * 0.01, final=batch == 99)
        sent += sum(map(len, pieces))
    assert mib < sent < 5 * mib  # (12 MiB before)


def test_a_failed_agents_last_output_is_cleaned_for_its_reason(tmp_path):
    """The reason the supervisor prints (and stores) when it gives up quotes the log's end: never
    an escape sequence a CLI wrote there."""
    from tinytown.supervisor.agent_log import tail_text
    log = tmp_path / "a.log"
    log.write_bytes(b"start\n\x1b]0;PWNED\x07\x1b[2J [bold]x[/] \x1b]52;c;cHduZWQ=\x07 end\r\n")
    assert tail_text(log) == "start |  [bold]x[/]  end"
