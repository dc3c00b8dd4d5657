"""Where a CLI's output goes as the runner copies it: the log, the Redis stream (entries of 64 KiB at
most), and the task's tail. Real town, real pty."""
from __future__ import annotations


def test_output_reaches_the_log_and_the_stream_whole_and_the_task_its_tail(town):
    town.tt("spawn", "dev")
    task = town.wait_task(town.assign("dev", "@seq 60000"))  # ~660 KB, many batches
    assert task["state"] == "completed"
    t = town.town()
    try:
        entries = [fields for _id, fields in t.r.xrange(t.keys.output(t.agent_id("dev")))]
    finally:
        t.r.close()
    assert entries and all(e["task"] == task["id"] for e in entries)
    assert all(len(e["data"].encode("utf-8", "surrogateescape")) <= 64 * 1024 for e in entries)
    streamed = "".join(e["data"] for e in entries)
    lines = [line for line in streamed.split("\r\n") if line.startswith("seq ")]
    assert lines == [f"seq {i:06d}" for i in range(1, 60001)]  # every line, in order, once
    log = (town.root / ".tt" / "logs" / "dev.log").read_bytes()
    assert streamed.encode() in log
    assert streamed.endswith(task["output"]) and len(task["output"]) == 64 * 1024


def test_the_log_says_a_task_started_before_its_output(town):
    """The pty's reader thread writes the log, and starts reading only once the runner has written
    its "task started" line (pty_reader.go)."""
    town.tt("spawn", "dev")
    task = town.wait_task(town.assign("dev", "@echo first words"))
    log = (town.root / ".tt" / "logs" / "dev.log").read_bytes()
    started, output = log.find(f"task {task['id']} started".encode()), log.find(b"first words")
    assert 0 <= started < output


def test_batches_gather_longer_only_in_a_flood_nobody_watches():
    """The pump takes output every BATCH_SECONDS, or FLOOD_BATCH_SECONDS while the stream budget
    holds a flood back and no viewer, here or on another host, is attached."""
    from types import SimpleNamespace
    from tinytown.supervisor.runner import BATCH_SECONDS, FLOOD_BATCH_SECONDS, Runner
    def wait(throttled: bool, viewers: dict, far_until: float = 0.0) -> float:
        runner = SimpleNamespace(stream_budget=SimpleNamespace(throttled=throttled),
                                 attach=SimpleNamespace(viewers=viewers, far_until=far_until))
        return Runner._batch_wait(runner, now=100.0)
    assert wait(throttled=True, viewers={}) == FLOOD_BATCH_SECONDS > BATCH_SECONDS
    assert wait(throttled=False, viewers={}) == BATCH_SECONDS
    assert wait(throttled=True, viewers={3: object()}) == BATCH_SECONDS
    assert wait(throttled=True, viewers={}, far_until=101.0) == BATCH_SECONDS


def test_a_cli_that_exited_mid_flood_has_its_last_output_taken_at_once():
    """A flood's batches gather FLOOD_BATCH_SECONDS; once its CLI has exited, what is left in the pty
    ends the task, so it is taken as it comes (it held a 100 MB flood's end up to 50 ms)."""
    from tinytown.supervisor.runner import EXIT_DRAIN_SECONDS, FLOOD_BATCH_SECONDS, PumpClock
    clock = PumpClock(next_beat=1000.0)
    clock.batch_taken(10.0, FLOOD_BATCH_SECONDS)
    assert clock.batch_at == 10.0 + FLOOD_BATCH_SECONDS  # still printing: the batch gathers
    clock.cli_exited(10.01)
    assert clock.batch_at == 10.01 and clock.drain_until == 10.01 + EXIT_DRAIN_SECONDS
    clock.batch_taken(10.02, FLOOD_BATCH_SECONDS)
    assert clock.batch_at == 10.02  # the next read's output is taken as soon as it comes
