"""The restart policy on its own: exits in, decisions out, no process started."""
from __future__ import annotations

import signal

from tinytown.supervisor.config import SupervisorPolicy
from tinytown.supervisor.restart_policy import GiveUp, Restart, RestartRecord

POLICY = SupervisorPolicy(backoff_first=0.5, backoff_factor=2.0, backoff_max=3.0, start_seconds=1.0,
                          max_fast_failures=5)
KILLED = signal.SIGKILL          # a waitpid status: killed by SIGKILL
EXIT_3 = 3 << 8                  # a waitpid status: exit code 3


def crash_series(record: RestartRecord, uptimes, status=KILLED, now=100.0):
    decisions = []
    for uptime in uptimes:
        decision = record.decide(status, uptime, POLICY)
        record.apply(decision, now)
        decisions.append(decision)
    return decisions


def test_first_restart_is_immediate_then_backoff_grows_to_its_cap_then_it_gives_up():
    record = RestartRecord()
    decisions = crash_series(record, [0.1] * 5)
    assert [d.delay for d in decisions[:4]] == [0.0, 0.5, 1.0, 2.0]
    assert isinstance(decisions[4], GiveUp) and record.gave_up
    assert decisions[4].fast_failures == 5


def test_backoff_is_capped_at_backoff_max():
    policy = SupervisorPolicy(backoff_first=1.0, backoff_factor=10.0, backoff_max=3.0, max_fast_failures=10)
    record = RestartRecord()
    delays = []
    for _ in range(4):
        decision = record.decide(KILLED, 0.0, policy)
        record.apply(decision, 0.0)
        delays.append(decision.delay)
    assert delays == [0.0, 1.0, 3.0, 3.0]


def test_a_runner_up_for_start_seconds_starts_a_new_series():
    record = RestartRecord()
    crash_series(record, [0.1, 0.1, 0.1])
    assert record.fast_failures == 3
    [decision] = crash_series(record, [1.0])
    assert isinstance(decision, Restart) and decision.delay == 0.0 and record.fast_failures == 1


def test_the_reason_names_the_exit_and_the_uptime():
    decision = RestartRecord().decide(EXIT_3, 0.25, POLICY)
    assert decision.reason == "runner exit code 3 after 0.2s"
    assert "SIGKILL" in RestartRecord().decide(KILLED, 0.0, POLICY).reason


def test_decide_changes_nothing_until_applied():
    record = RestartRecord(fast_failures=2)
    for _ in range(3):
        assert record.decide(KILLED, 0.0, POLICY).fast_failures == 3
    assert record == RestartRecord(fast_failures=2)


def test_backoff_waits_until_its_time_and_reset_clears_it():
    record = RestartRecord()
    crash_series(record, [0.1, 0.1], now=100.0)  # the second: 0.5 s of backoff from t=100
    assert record.waiting(100.2) and not record.waiting(100.5)
    record.reset()
    assert record == RestartRecord() and not record.waiting(100.2)


def test_max_fast_failures_of_one_gives_up_at_the_first_crash():
    policy = SupervisorPolicy(max_fast_failures=1)
    assert isinstance(RestartRecord().decide(KILLED, 0.0, policy), GiveUp)
