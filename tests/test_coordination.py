"""Work that flows between agents, on real towns: dependencies with context, cascades, cancel, wait,
the backlog with roles, notes, and agents using `tt` from inside their CLI."""
from __future__ import annotations

import json
import os

import psutil
from conftest import wait_for


def _spawn(town, *names, roles=()):
    for name in names:
        town.tt("spawn", name, *[x for r in roles for x in ("--role", r)])
    for name in names:
        town.wait_agent(name)


def test_the_tutorial_reviewer_starts_after_dev_and_tester_with_their_results(town):
    _spawn(town, "dev", "tester", "reviewer")
    dev = town.assign("dev", "@gate dev-go\n@echo dev: feature implemented in feature.py")
    tester = town.assign("tester", "@gate tester-go\n@echo tester: 12 tests written, all green")
    text = "Review the feature and its tests \x1b[31m when ready\n@echo reviewing"
    out = town.tt("assign", "reviewer", text, "--after", "dev", "--after", "tester")
    review = out.out.split()[2]
    assert "waits on 2 tasks" in out.out
    shown = town.task(review)
    assert shown["state"] == "pending" and shown["after"] == [dev, tester] and shown["blocked_by"] == [dev, tester]
    assert shown["created_by"] == "user"
    assert f"waits on {dev[:8]}, {tester[:8]}" in town.tt("tasks").out
    # `tt status` and `tt list` count the review as the reviewer's pending work, beside its queue
    reviewer = next(a for a in json.loads(town.tt("status", "--json").out)["agents"] if a["name"] == "reviewer")
    assert (reviewer["pending"], reviewer["queued"], reviewer["waiting"]) == (1, 0, 1)
    assert "reviewer (" in town.tt("list").out and ", 1 pending]" in town.tt("list").out.split("reviewer (")[1]
    (town.record / "dev-go").touch()
    town.wait_task(dev)
    assert town.task(review)["blocked_by"] == [tester] and town.task(review)["state"] == "pending"
    (town.record / "tester-go").touch()
    done = town.wait_task(review)
    assert done["state"] == "completed"
    started = town.recorded(review)[0]["started_at"]
    assert started >= town.task(dev)["finished_at"] and started >= town.task(tester)["finished_at"]
    prompt = town.recorded(review)[1]
    assert prompt.startswith(text.encode())  # the user's text byte for byte, first
    context = prompt[len(text):].decode()
    assert context.startswith("\n\n<<< tinytown context ") and context.rstrip().endswith(">>>")
    assert f"{dev} by dev, completed, exit code 0" in context and "dev: feature implemented" in context
    assert f"{tester} by tester, completed" in context and "12 tests written, all green" in context
    assert "reviewing" in done["output"]


def test_no_context_and_a_finished_dependency(town):
    _spawn(town, "dev")
    first = town.assign("dev", "@echo first")
    town.wait_task(first)
    second = town.json("assign", "dev", "plain text", "--after", first[:8], "--no-context")["id"]
    town.wait_task(second)
    assert town.recorded(second)[1] == b"plain text"
    assert town.task(second)["blocked_by"] == []
    gate = town.assign("dev", "@gate each")
    many = town.tt("assign", "dev", "--each", "-", "--after", gate, input="one\ntwo\n").out.split()
    assert len(many) == 2 and all(town.task(i)["state"] == "pending" for i in many)
    (town.record / "each").touch()
    assert all(town.wait_task(i)["state"] == "completed" for i in many)
    assert all(town.task(i)["after"] == [gate] for i in many)


def test_a_failure_cascades_and_wait_says_so(town):
    _spawn(town, "dev")
    a = town.assign("dev", "@gate fail\n@exit 3")
    b = town.json("assign", "dev", "b", "--after", a)["id"]
    c = town.json("assign", "dev", "c", "--after", b)["id"]
    (town.record / "fail").touch()
    waited = town.tt("wait", c, "--timeout", "30", check=False)
    assert waited.returncode == 1 and "cancelled" in waited.out
    assert town.task(b)["state"] == "cancelled" and a in town.task(b)["reason"]
    assert town.task(c)["state"] == "cancelled" and b in town.task(c)["reason"]
    late = town.tt("assign", "dev", "late", "--after", a, check=False)
    assert late.returncode == 1 and len(late.err.strip().splitlines()) == 1 and "cancelled at once" in late.err
    assert town.task(late.out.strip())["state"] == "cancelled"
    assert town.tt("wait", a, check=False).returncode == 1
    finished = town.tt("cancel", a, check=False)
    assert finished.returncode == 1 and "already" in finished.err


def test_an_unknown_reference_creates_nothing(town):
    _spawn(town, "dev")
    before = town.json("tasks")
    out = town.tt("assign", "dev", "x", "--after", "nosuchthing", check=False)
    assert out.returncode == 1 and "no task or agent of that name" in out.err and "Traceback" not in out.err
    assert town.json("tasks") == before
    # tt wait's 1 and 2 say how work ended: that it could not wait at all is 3, a bad option too
    unknown = town.tt("wait", "nosuchthing", check=False)
    assert unknown.returncode == 3 and unknown.err.startswith("tt: error: tt wait 'nosuchthing': no task")
    bad_option = town.tt("wait", "dev", "--timeout", "abc", check=False)
    assert bad_option.returncode == 3 and "--timeout" in bad_option.err and "Traceback" not in bad_option.err


def test_after_an_agent_with_no_task_yet_says_there_is_nothing_to_wait_for(town):
    """`--after fresh` for an agent that has never had a task waits on nothing (by design), and
    said nothing: the task ran at once, where the user meant it to wait."""
    _spawn(town, "fresh")
    _spawn(town, "reviewer")
    made = town.tt("assign", "reviewer", "@echo review", "--after", "fresh", "--json")
    assert made.err == "tt: note: --after fresh: fresh has no task yet, so there is nothing of it to wait for\n"
    assert town.wait_task(json.loads(made.out)["id"])["state"] == "completed"
    done = town.assign("fresh", "@echo first")
    town.wait_task(done)
    assert town.tt("assign", "reviewer", "@echo again", "--after", "fresh").err == ""


def test_wait_times_out_with_exit_2_and_completes_with_0(town):
    _spawn(town, "dev")
    slow = town.assign("dev", "@gate open")
    out = town.tt("wait", slow, "--timeout", "0.3", check=False)
    assert out.returncode == 2 and "still" in out.out
    import subprocess
    import sys
    waiter = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "wait", "dev", "--timeout", "60"],
                              cwd=town.root, env=town.env, stdout=subprocess.PIPE)
    client = town.town().r
    wait_for(lambda: any(c.get("cmd") == "xread" for c in client.client_list()), message="tt wait blocks on events")
    (town.record / "open").touch()
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and slow in out.decode()


def test_wait_ends_on_ctrl_c_even_inside_a_finalizer(town, tmp_path):
    """As `tt events -f`: a KeyboardInterrupt swallowed in a gc callback (or a finalizer) left
    `tt wait` waiting on after Ctrl+C."""
    import subprocess
    import sys

    from conftest import interrupt_inside_gc
    _spawn(town, "dev")
    slow = town.assign("dev", "@gate open")
    extra, marker = interrupt_inside_gc(tmp_path)
    waiter = subprocess.Popen([sys.executable, "-m", "tinytown.cli.main", "wait", slow], cwd=town.root,
                              env={**town.env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client = town.town().r
        wait_for(lambda: any(c.get("cmd") == "xread" for c in client.client_list()), message="tt wait blocks on events")
        marker.touch()
        town.tt("send", "dev", "an event that wakes the wait")
        assert waiter.wait(20) == 130 and not marker.exists()
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
        (town.record / "open").touch()


def test_wait_on_an_agent_that_already_finished_reports_its_latest_task(town):
    """`tt wait reviewer && tt merge reviewer` must not depend on whether the reviewer finished
    before the wait began: with nothing unfinished, the agent's latest task is reported."""
    _spawn(town, "dev")
    _spawn(town, "idle")
    town.wait_task(town.assign("dev", "@exit 3"))
    done = town.assign("dev", "@echo done")
    town.wait_task(done)
    out = town.tt("wait", "dev", "--timeout", "30", check=False)
    assert out.returncode == 0 and done in out.out, out
    failed = town.assign("dev", "@exit 3")
    town.wait_task(failed)
    assert town.tt("wait", "dev", check=False).returncode == 1
    as_json = json.loads(town.tt("wait", "dev", "--json", check=False).out)
    assert [(w["id"], w["agent"], w["state"], w["exit_code"]) for w in as_json] == [(failed, "dev", "failed", 3)]
    sent = [e for e in map(json.loads, town.tt("events", "-n", "50", "--json").out.splitlines())
            if e["type"] == "task_failed" and e["task"] == failed]
    assert sent and sent[0]["exit_code"] == 3  # (an event's numbers are numbers in --json)
    never = town.tt("wait", "idle", check=False)
    assert never.returncode == 3 and "idle has no task yet" in never.err and "Traceback" not in never.err


def test_cancel_of_a_running_task_stops_its_group_and_keeps_the_output(town):
    _spawn(town, "dev")
    running = town.assign("dev", "@echo started work\n@child\n@gate never")
    queued = town.assign("dev", "queued behind it")
    dependent = town.json("assign", "dev", "after it", "--after", running)["id"]
    town.wait_task(running, states=("running",))
    wait_for(lambda: (town.record / f"{running}.children").exists())
    helper = int((town.record / f"{running}.children").read_text().split()[0])
    cli_pid = town.task(running)  # (pid is on the agent)
    del cli_pid
    out = town.tt("cancel", queued)
    assert "Cancelled task" in out.out and town.task(queued)["state"] == "cancelled"
    out = town.tt("cancel", running)
    assert "Cancel requested" in out.out
    done = town.wait_task(running, states=("cancelled",))
    assert "cancelled by user" in done["reason"] and "started work" in done["output"]
    wait_for(lambda: not psutil.pid_exists(helper) or psutil.Process(helper).status() == psutil.STATUS_ZOMBIE,
             message="the CLI's group is gone")
    assert town.task(dependent)["state"] == "cancelled"
    town.wait_agent("dev")
    after = town.assign("dev", "@echo still works")
    assert town.wait_task(after)["state"] == "completed"


def test_an_agent_whose_cli_cannot_start_fails_instead_of_draining_the_backlog(town):
    """A CLI that is not there fails every task alike: the agent fails at its first (saying what
    to fix), gives back the backlog work it took, and its own queue waits; nothing is failed."""
    town.append_config('\n[agent_clis.broken]\ncommand = "no-such-cli-here"\n')
    town.tt("spawn", "bad", "--model", "broken", "--role", "docs")
    town.wait_agent("bad")
    docs = [town.json("backlog", "add", f"@echo doc {i}", "--role", "docs")["id"] for i in range(3)]
    town.wait_agent("bad", ("failed",))          # (it took the first, and gave it back)
    agent = town.agent("bad")
    assert agent["reason"].startswith("its CLI cannot start: cannot start 'no-such-cli-here'"), agent
    assert "tt restart bad" in agent["reason"]
    # (the reason says it: not told twice; words, since a long PATH in the reason wraps the note)
    assert " ".join(town.tt("status").out.split()).count("tt restart bad") == 1
    mine = town.assign("bad", "@echo for bad itself")
    waiting = town.task(mine)
    assert waiting["state"] == "assigned", waiting
    assert waiting["reason"].startswith("waiting: agent bad failed: its CLI cannot start")
    assert [(town.task(t)["state"], town.task(t)["attempts"]) for t in docs] == [("pending", 0)] * 3  # none failed
    _spawn(town, "writer", roles=("docs",))
    assert [town.wait_task(t)["agent"] for t in docs] == ["writer"] * 3


def test_backlog_goes_to_the_idle_agent_with_the_role(town):
    _spawn(town, "alice", roles=("dev",))
    _spawn(town, "bob", roles=("test",))
    assert "roles test" in town.tt("list").out
    out = town.tt("backlog", "add", "@echo testing", "--role", "test")
    task_id = out.out.split()[2].rstrip(":")
    done = town.wait_task(task_id)
    assert done["agent"] == "bob" and done["state"] == "completed"
    stuck = town.tt("backlog", "add", "nobody has this", "--role", "docs").out.split()[2].rstrip(":")
    assert [t["id"] for t in town.json("backlog")] == [stuck]
    assert "nobody can take it" in town.tt("status").out
    assert town.json("status")["unserved_roles"] == ["docs"]
    assert "in the backlog" in town.task(stuck)["reason"]
    town.tt("backlog", "remove", stuck)
    assert town.json("backlog") == [] and town.task(stuck)["state"] == "cancelled"
    anyone = town.tt("backlog", "add", "@echo any").out.split()[2].rstrip(":")
    assert town.wait_task(anyone)["agent"] in ("alice", "bob")
    # the only agent with the role closed: it takes nothing, and `tt status` says why
    town.tt("close", "bob")
    town.wait_agent("bob", ("stopped",))
    town.tt("backlog", "add", "@echo for a closed role", "--role", "test")
    assert "nobody can take it (only bob has it: closed, paused or failed)" in town.tt("status").out


def test_status_says_who_could_take_a_roles_backlog_work_with_no_agent_yet(town):
    """With no agent at all, `tt status` stopped at "no agents" and never said the backlog's
    work for a role waits for an agent with it."""
    town.tt("backlog", "add", "write the docs", "--role", "docs")
    assert "nobody can take it (tt spawn NAME --role docs)" in town.tt("status").out


def test_notes_arrive_with_the_next_task_urgent_first_exactly_once(town):
    _spawn(town, "dev")
    town.tt("send", "dev", "first, not urgent")
    town.tt("send", "dev", "second, URGENT", "--urgent")
    assert [(n["text"], n["urgent"]) for n in town.json("inbox", "dev")] == [
        ("first, not urgent", False), ("second, URGENT", True)]  # (booleans, as every flag in --json)
    task_id = town.assign("dev", "the task")
    town.wait_task(task_id)
    prompt = town.recorded(task_id)[1].decode()
    head, _, rest = prompt.partition("<<< end of notes ")
    assert head.startswith("<<< tinytown notes ") and head.index("second, URGENT") < head.index("first, not urgent")
    assert rest.split(">>>\n\n", 1)[1] == "the task"
    assert town.json("inbox", "dev") == []
    delivered = town.json("inbox", "dev", "--all")
    assert [n["task"] for n in delivered] == [task_id, task_id] and all(n["from"] == "user" for n in delivered)
    again = town.assign("dev", "next task")
    town.wait_task(again)
    assert town.recorded(again)[1] == b"next task"


def test_an_agent_uses_tt_from_inside_and_is_recorded_as_the_sender(town):
    _spawn(town, "dev", "reviewer")
    task_id = town.assign("dev", '@tt send reviewer "please look at feature.py"\n'
                                 '@tt assign reviewer "@echo reviewed" --json')
    done = town.wait_task(task_id)
    assert "tt exit 0" in done["output"], done["output"]
    notes = town.json("inbox", "reviewer", "--all")
    assert [(n["from"], n["text"]) for n in notes] == [("dev", "please look at feature.py")]
    made = [t for t in town.json("tasks", "--agent", "reviewer")]
    assert len(made) == 1 and made[0]["created_by"] == "dev"
    info, _ = town.recorded(task_id)
    assert info["env"]["TT_TOWN_DIR"] == str(town.root)
    other = town.root.parent / "elsewhere"
    other.mkdir()
    env = dict(town.env, TT_TOWN_DIR=str(town.root), TT_AGENT="dev", TT_TOWN=town.config().name)
    saved, town.env = town.env, env
    try:
        sent = json.loads(town.tt("send", "reviewer", "from another folder", "--json", cwd=other).out)
    finally:
        town.env = saved
    assert sent["from"] == "dev"
    assert os.path.isdir(other)
