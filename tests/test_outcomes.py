"""Outcomes that tell the truth and questions answered or surfaced (supervisor/output_watch.py):
the watch's pure core on made-up batches, its config keys, then real towns (real runner, pty,
redis) running the fake CLI's misleading behaviours."""
from __future__ import annotations

import json
import os

import psutil
import pytest

from tinytown.supervisor.config import PRESETS, CliSpec, load, parse_answer
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.output_watch import RESUMED, OutputWatch, failure_line

from conftest import wait_for

RECONNECT = b"ERROR: Reconnecting... waiting for network\r\n"


def watch(**rules) -> OutputWatch:
    answers = rules.pop("agent_answers", ())
    return OutputWatch(CliSpec("x", ("x",), **rules), answers)


# --- the pure core ------------------------------------------------------------------------------

def test_a_fail_pattern_finds_the_last_matching_line_cleaned():
    import re
    tail = (b"working\r\n\x1b[31mlitellm.APIConnectionError: first\x1b[0m\r\nretrying\r\n"
            b"\x1b[1mlitellm.InternalServerError: Connection error.\x1b[0m\r\nTokens: 0 sent\r\n")
    assert failure_line(tail, [re.compile(r"litellm\.\w*Error")]) == "litellm.InternalServerError: Connection error."
    assert failure_line(tail, [re.compile(r"^API Error:")]) == ""
    assert failure_line(b"API Error: x\r\n", []) == ""
    # anchored: a line that only mentions it is not the CLI's own error
    assert failure_line(b"fixed the API Error: handling\r\n", [re.compile(r"^API Error:")]) == ""
    assert watch(fail_patterns=(r"^FATAL",)).failure(b"ok\r\nFATAL: \x1b]0;title\x07disk\r\n") == "FATAL: disk"


def test_a_question_an_answer_or_an_error_at_the_end_of_a_long_line_is_found():
    """Patterns look at the whole line; only what is shown is cut (a prompt keeps its end)."""
    import re
    long = b"a " * 150
    w = watch()
    w.feed([long + b"Continue? "], 1.0)
    notice = w.check(1.0 + w.question_after)
    assert notice.kind == "waiting" and notice.line.endswith("a Continue?") and len(notice.line) == 200
    answered = watch(answers=(("Overwrite .*\\?", "n\r"),)).feed([long + b"Overwrite x.py? "], 1.0)
    assert [(n.kind, n.answer.send) for n in answered] == [("answer", b"n\r")]
    assert failure_line(long + b"FATAL: out of disk\r\n", [re.compile(r"FATAL: \w+")]).startswith("a a ")


def test_the_same_line_batch_after_batch_is_a_stall_but_a_run_of_equal_lines_at_once_is_not():
    w = watch(stall_repeats=3)
    assert w.feed([b"x" * 79 + b"\r\n"] * 1 + [], 1.0) == ()
    assert w.feed([(b"y" * 79 + b"\r\n") * 40], 1.1) == ()  # forty at once: one batch, counted once
    assert w.feed([RECONNECT], 2.0) == () and w.feed([b"\r\n", RECONNECT], 3.0) == ()  # (blank lines: no matter)
    stalled = w.feed([RECONNECT], 4.0)
    assert [n.kind for n in stalled] == ["stalled"]
    assert stalled[0].line == "the same line 3 times: ERROR: Reconnecting... waiting for network"
    w.reset(0.0)
    for at in range(5):  # another line between each: never stalled
        assert w.feed([RECONNECT + b"attempt %d\r\n" % at], float(at)) == ()
    # a line redrawn with \r is the line shown last; equal once cleaned counts as the same
    w.reset(0.0)
    assert w.feed([b"\x1b[33mwaiting\x1b[0m\r\n"], 1.0) == () and w.feed([b"spin\rwaiting\r\n"], 2.0) == ()
    assert [n.kind for n in w.feed([b"waiting\r\n"], 3.0)] == ["stalled"]
    assert watch().feed([RECONNECT], 1.0) == ()  # stall_repeats 0: off


def test_silence_past_stall_timeout_is_a_stall():
    w = watch(stall_timeout=30.0, question="")
    w.reset(100.0)
    assert w.deadline() == 130.0 and w.check(129.0) is None
    w.feed([b"still here\r\n"], 120.0)
    assert w.deadline() == 150.0 and w.check(149.9) is None
    notice = w.check(150.0)
    assert notice.kind == "stalled" and notice.line == "no output for 30s"
    assert watch(question="").deadline() is None  # nothing to wait for: the pump only wakes on output


def test_a_prompt_is_answered_once_each_time_it_is_asked():
    w = watch(answers=(("Overwrite .*\\?", "n\r"),), agent_answers=(("Proceed\\?", "y\r"), ("\\[y/N\\]", "Y\r")))
    assert w.feed([b"reading files\r\n"], 1.0) == ()
    first = w.feed([b"\x1b[1mProceed? [y/N] \x1b[0m"], 2.0)
    # the first pattern to match the line, as pexpect's expect() picks (earliest match in the text)
    assert [(n.kind, n.line, n.answer.send) for n in first] == [("answer", "Proceed? [y/N]", b"y\r")]
    assert w.feed([b" "], 2.1) == ()            # more of the same line: answered already
    assert w.feed([b"\r\n"], 2.2) == ()         # the line ends: still the same line
    again = w.feed([b"Proceed? [y/N] "], 3.0)   # asked again: answered again
    assert [n.answer.send for n in again] == [b"y\r"]
    assert [n.answer.send for n in w.feed([b"\r\nOverwrite a.txt?\r\n"], 4.0)] == [b"n\r"]  # the preset's
    assert w.feed([b"nothing to answer\r\n"], 5.0) == ()
    # a prompt that arrives in pieces: across reads of one batch, and across batches
    assert [n.line for n in w.feed([b"ok\r\nPro", b"ceed? [y/N] "], 6.0)] == ["Proceed? [y/N]"]
    assert w.feed([b"\r\nOverwr"], 7.0) == () and [n.line for n in w.feed([b"ite b.txt?"], 7.1)] == ["Overwrite b.txt?"]
    # a line redrawn in place is one line: answered once, however often it is drawn again
    w = watch(answers=(("Allow\\?", "y\r"),))
    assert len(w.feed([b"Allow? (y/n) "], 1.0)) == 1
    assert w.feed([b"\x1b[2K\x1b[GAllow? (y/n) " * 5], 1.1) == ()


def test_a_prompt_at_the_end_of_a_flood_is_answered_and_a_flood_is_no_repeat():
    w = watch(stall_repeats=2, agent_answers=(("Apply\\?", "y\r"),))
    flood = [(b"same line\r\n" * 6000)[:65536] for _ in range(4)]
    assert w.feed(flood, 1.0) == () and w.feed(flood, 2.0) == () and w.feed(flood, 3.0) == ()
    answered = w.feed([*flood, b"same line\r\nApply? "], 4.0)
    assert [(n.kind, n.line) for n in answered] == [("answer", "Apply?")]


def test_an_unanswered_question_shows_after_some_silence_and_clears_on_output():
    w = watch(question_after=5.0)
    w.reset(0.0)
    w.feed([b"Working on it\r\n\x1b[32mDelete the old files? [y/n]\x1b[0m "], 10.0)
    assert w.deadline() == 15.0 and w.check(14.0) is None
    waiting = w.check(15.0)
    assert (waiting.kind, waiting.line) == ("waiting", "Delete the old files? [y/n]")
    assert w.check(20.0) is None and w.deadline() is None  # shown once
    assert w.feed([b"y\r\ndeleting\r\n"], 21.0) == (RESUMED,)
    assert w.check(30.0) is None  # "deleting" asks nothing
    w.feed([b"Which branch should I use?\r\n"], 31.0)  # a question with its newline
    assert w.check(36.0).line == "Which branch should I use?"
    assert watch(question="").check(100.0) is None


def test_answers_stop_after_max_answers_so_a_loop_is_left_to_stall():
    from tinytown.supervisor import output_watch
    w = watch(agent_answers=(("again\\?", "y\r"),))
    sent = sum(len(w.feed([b"\r\nagain? "], float(i))) for i in range(output_watch.MAX_ANSWERS + 10))
    assert sent == output_watch.MAX_ANSWERS


# --- configuration ------------------------------------------------------------------------------

def test_presets_carry_outcome_rules_and_a_users_table_of_that_name_keeps_them(tmp_path):
    assert PRESETS["aider"].fail_patterns == (r"litellm\.\w*Error",)
    assert PRESETS["claude"].fail_patterns == (r"^API Error:",) and PRESETS["claude"].stall_timeout == 0
    assert (PRESETS["codex"].stall_timeout, PRESETS["codex"].stall_repeats) == (600.0, 10)
    (tmp_path / "tinytown.toml").write_text(
        'name = "t"\n[agent_clis.codex]\ncommand = "codex exec -"\nstall_repeats = 4\n'
        '[agent_clis.mine]\ncommand = "mine"\nfail_patterns = ["^boom"]\nstall_timeout = 60\n'
        'answers = [{ expect = "Continue\\\\?", send = "y\\r" }]\nquestion = ""\nquestion_after = 2\n')
    config = load(tmp_path)
    codex, mine = config.cli("codex"), config.cli("mine")
    assert (codex.stall_repeats, codex.stall_timeout) == (4, 600.0)  # its own, and the preset's
    assert mine.fail_patterns == ("^boom",) and mine.stall_timeout == 60.0 and mine.stall_repeats == 0
    assert mine.answers == (("Continue\\?", "y\r"),) and mine.question == "" and mine.question_after == 2.0


def test_the_documented_example_reads_as_it_says(tmp_path):
    from tinytown.supervisor.config import DEFAULT_QUESTION, documented_config
    example = documented_config()[documented_config().index("[agent_clis.mybot]"):]
    (tmp_path / "tinytown.toml").write_text('name = "t"\n' + example)
    mybot = load(tmp_path).cli("mybot")
    assert (mybot.fail_patterns, mybot.stall_timeout, mybot.stall_repeats) == (("^Error: ",), 600.0, 10)
    assert mybot.answers == (("Continue\\?", "y\r"),) and mybot.question == DEFAULT_QUESTION


@pytest.mark.parametrize("line, why", [
    ('fail_patterns = ["litellm("]', "fail_patterns: not a regex: 'litellm(': missing )"),
    ('fail_patterns = "x"', "fail_patterns: must be a list of regexes"),
    ("stall_timeout = -1", "stall_timeout: must be between 0 and"),
    ('stall_repeats = "many"', "stall_repeats: expected a number of lines"),
    ("question_after = 0", "question_after: must be between 0.1 and"),
    ('question = "[y/n"', "question: not a regex"),
    ('answers = [{ expect = "(", send = "y" }]', "answers: not a regex"),
    ('answers = [{ expect = "x" }]', "answers: must be a list of { expect"),
    ("stal_timeout = 3", "unknown key in [agent_clis.mine] (did you mean 'stall_timeout'?)"),
])
def test_a_bad_outcome_rule_is_one_line_naming_file_and_line(tmp_path, line, why):
    path = tmp_path / "tinytown.toml"
    path.write_text(f'name = "t"\n\n[agent_clis.mine]\ncommand = "mine"\n{line}\n')
    with pytest.raises(TinytownError) as caught:
        load(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{path}:5: ") and why in message and "\n" not in message


def test_an_answer_on_the_command_line():
    assert parse_answer(r"Proceed\?=y\r") == (r"Proceed\?", "y\r")
    assert parse_answer(r"a=b=\e\t\\n") == ("a=b", "\x1b\t\\n")  # the text is after the last "="
    for bad, why in (("y", "REGEX=TEXT"), ("=y", "REGEX=TEXT"), ("x=", "REGEX=TEXT"), ("(=y", "not a regex")):
        with pytest.raises(TinytownError, match=why):
            parse_answer(bad)


# --- real towns ---------------------------------------------------------------------------------

WATCHED = """
[agent_clis.watched]
command = ["claude", "--print"]
fail_patterns = ["^FATAL:"]
stall_timeout = 1.5
question_after = 0.3
"""


def _events(town, kind: str) -> list[dict]:
    lines = town.tt("events", "--json", "-n", "500").stdout.decode().splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == kind]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_an_error_line_fails_a_task_that_exits_0(make_town):
    town = make_town(extra=WATCHED)
    town.tt("spawn", "dev", "--model", "watched", "--shared")
    town.tt("spawn", "aid", "--model", "aider", "--shared")  # the preset's own pattern
    bad = town.assign("dev", "@echo working\n@red FATAL: no model answered\n@echo Tokens: 0 sent")
    aider = town.assign("aid", "@echo litellm.InternalServerError: OpenAIException - Connection error.")
    fine = town.assign("dev", "@echo only a line that starts with it fails: FATAL: x")
    exit3 = town.assign("dev", "@echo FATAL: disk full\n@exit 3")
    assert town.wait_task(bad)["state"] == "failed"
    task = town.task(bad)
    assert task["exit_code"] == 0 and task["reason"] == "FATAL: no model answered"
    task = town.wait_task(aider)
    assert (task["state"], task["exit_code"]) == ("failed", 0)
    assert task["reason"] == "litellm.InternalServerError: OpenAIException - Connection error."
    assert town.wait_task(fine)["state"] == "completed"
    task = town.wait_task(exit3)  # a failure's reason says why, besides the status
    assert (task["state"], task["exit_code"], task["reason"]) == ("failed", 3, "exit code 3: FATAL: disk full")
    assert any(e.get("reason") == "FATAL: no model answered" for e in _events(town, "task_failed"))


def test_a_silent_cli_and_a_reconnect_loop_are_stalled_and_stopped(make_town):
    town = make_town(extra=WATCHED)
    town.tt("spawn", "dev", "--model", "watched", "--shared")
    town.tt("spawn", "cx", "--model", "codex", "--shared")  # the preset: the same line 10 times
    silent = town.assign("dev", "@echo thinking\n@hang")
    looping = town.assign("cx", "@reconnect 0.02")
    task = town.wait_task(silent)
    assert (task["state"], task["reason"]) == ("failed", "stalled (no output for 1.5s)")
    task = town.wait_task(looping)
    assert task["state"] == "failed"
    assert task["reason"] == "stalled (the same line 10 times: ERROR: Reconnecting... waiting for network)"
    for task_id in (silent, looping):
        pid = town.recorded(task_id)[0]["pid"]
        wait_for(lambda: _gone(pid), message=f"the stalled CLI {pid} ended")
    log = (town.root / ".tt" / "logs" / "dev.log").read_text()
    assert f"task {silent} stalled: no output for 1.5s; stopping its CLI" in log
    assert town.wait_agent("dev")["state"] == "idle"


def test_a_prompt_is_answered_and_the_answer_logged(make_town):
    town = make_town(extra=WATCHED)
    bad = town.tt("spawn", "x", "--answer", "(=y", check=False)
    assert bad.returncode != 0 and "not a regex" in bad.err and "Traceback" not in bad.err
    assert len(bad.err.strip().splitlines()) == 1
    town.tt("spawn", "dev", "--model", "watched", "--shared", "--answer", r"Proceed\?=y\r")
    assert town.agent("dev")["answers"] == json.dumps([["Proceed\\?", "y\r"]])
    task = town.wait_task(town.assign("dev", "@question Proceed? [y/N]\n@echo after"))
    assert task["state"] == "completed" and "answer: y" in task["output"]
    log = (town.root / ".tt" / "logs" / "dev.log").read_text()
    assert "answered 'Proceed? [y/N]' with 'y\\r' (expect 'Proceed\\\\?')" in log
    answered = _events(town, "agent_answered")
    assert [(e["agent"], e["task"], e["sent"]) for e in answered] == [("dev", task["id"], "y\r")]

def test_a_program_asking_again_at_once_is_answered_again(make_town):
    """`rm -i a b c` prints nothing between its questions: the terminal's echo of the answer and
    its Enter puts the next one on a line of its own, so it is answered too (without echo, it
    waited for input for ever, on the line already answered)."""
    town = make_town(extra='\n[agent_clis.shell]\ncommand = "sh"\n')
    town.tt("spawn", "dev", "--model", "shell", "--shared", "--answer", r"Proceed\?=y\r")
    script = 'printf "Proceed? "; read a </dev/tty; printf "Proceed? "; read b </dev/tty; echo "got $a$b"\n'
    task = town.wait_task(town.assign("dev", script), timeout=20)
    assert task["state"] == "completed" and "got yy" in task["output"], task


def test_an_unanswered_question_shows_the_agent_waiting_for_input(make_town):
    town = make_town(extra=WATCHED.replace("stall_timeout = 1.5", "stall_timeout = 0"))
    town.tt("spawn", "dev", "--model", "watched", "--shared")
    task_id = town.assign("dev", "@ask-gate g1 \x1b[31mDelete [/]everything? [y/n]\x1b[0m \n@gate g2")
    agent = town.wait_agent("dev", states=("waiting",))
    assert agent["question"] == "Delete [/]everything? [y/n]" and agent["current_task"] == task_id
    listed = town.tt("list").out
    assert "Waiting for input" in listed and 'asks "Delete [/]everything? [y/n]": tt attach dev' in listed
    status = town.tt("status").out
    assert "waiting for input" in status and "Delete [/]everything? [y/n]" in status
    assert "\x1b" not in listed + status
    assert [e["question"] for e in _events(town, "agent_waiting")] == ["Delete [/]everything? [y/n]"]
    (town.record / "g1").touch()  # output again ("going on"): working, the question gone
    agent = town.wait_agent("dev", states=("working",))
    assert agent["question"] == "" and town.task(task_id)["state"] == "running"
    (town.record / "g2").touch()
    assert town.wait_task(task_id)["state"] == "completed"
    assert town.wait_agent("dev")["question"] == ""


def test_a_stop_while_waiting_for_input_puts_the_task_back_and_clears_the_question(make_town):
    town = make_town(extra=WATCHED.replace("stall_timeout = 1.5", "stall_timeout = 0"))
    town.tt("spawn", "dev", "--model", "watched", "--shared")
    task_id = town.assign("dev", "@ask-gate never Overwrite? [y/n]")
    town.wait_agent("dev", states=("waiting",))
    town.tt("stop", "--now")
    agent, task = town.agent("dev"), town.task(task_id)  # (read from the stopped town's files)
    assert (agent["state"], agent["question"], task["state"]) == ("stopped", "", "assigned")
    log = (town.root / ".tt" / "logs" / "dev.log").read_text()
    assert f"task {task_id} interrupted by stop; back in the inbox" in log and "Traceback" not in log
