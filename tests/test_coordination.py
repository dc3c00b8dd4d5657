"""Work that flows between agents, through the real `tt` against a real town: dependencies with their
upstream context, the shared backlog, notes, cancel and wait, agents using `tt` from inside."""
from __future__ import annotations

from conftest import wait_for

REVIEW = "Review the implementation and tests when ready:\n- Check for security issues"


def open_gate(town, name: str) -> None:
    (town.record / name).write_text("open")


def test_the_reviewer_runs_after_dev_and_tester_with_their_results_in_its_prompt(town):
    for name in ("dev", "tester", "reviewer"):
        town.tt("spawn", name)
    dev = town.assign("dev", "@gate dev\n@echo wrote src/users.py")
    tester = town.assign("tester", "@gate tester\n@echo wrote tests/test_users.py")
    review = town.json("assign", "reviewer", REVIEW, "--after", "dev", "--after", "tester")
    assert review["state"] == "pending" and set(review["after"]) == {dev, tester}
    assert set(review["blocked_by"]) == {dev, tester}
    assert "waits on" in town.tt("tasks").out

    open_gate(town, "dev")
    assert town.wait_task(dev)["state"] == "completed"
    shown = town.json("task", review["id"])
    assert shown["state"] == "pending" and shown["blocked_by"] == [tester]  # still waits on the tester
    open_gate(town, "tester")
    finished = town.wait_task(review["id"])
    assert finished["state"] == "completed"

    _, prompt = town.recorded(review["id"])
    assert prompt.startswith(REVIEW.encode())  # the user's text first, byte for byte
    context = prompt[len(REVIEW):].decode()
    for task_id, output in ((dev, "wrote src/users.py"), (tester, "wrote tests/test_users.py")):
        assert task_id in context and output in context
    assert "<<< tinytown context" in context and "<<< end of context" in context
    # it started only once both had finished
    assert finished["started_at"] >= max(town.task(dev)["finished_at"], town.task(tester)["finished_at"])


def test_a_failed_dependency_cancels_the_chain_and_an_unknown_ref_creates_nothing(town):
    town.tt("spawn", "dev")
    first = town.assign("dev", "@gate first\n@exit 3")
    second = town.json("assign", "dev", "next", "--after", first)["id"]
    third = town.json("assign", "dev", "last", "--after", second[:10])["id"]
    open_gate(town, "first")
    assert town.wait_task(first)["state"] == "failed"
    assert town.wait_task(second, ("cancelled",))["reason"] == f"dependency {first} (dev) failed"
    assert town.wait_task(third, ("cancelled",))["reason"] == f"dependency {second} (dev) cancelled"
    before = len(town.json("tasks"))
    refused = town.tt("assign", "dev", "x", "--after", "no-such-thing", check=False)
    assert refused.returncode == 1 and "no task or agent" in refused.err
    assert len(town.json("tasks")) == before
    late = town.tt("assign", "dev", "after a failure", "--after", first, check=False)
    assert late.returncode == 1 and "cancelled at once" in late.err  # created, ended with the reason


def test_backlog_roles_notes_and_an_agent_using_tt_from_inside(town):
    town.tt("spawn", "dev", "--role", "code")
    town.tt("spawn", "writer", "--role", "docs")
    docs = town.json("backlog", "add", "@echo documented", "--role", "docs")
    wait_for(lambda: town.task(docs["id"])["state"] == "completed", 30, "the docs task")
    assert town.task(docs["id"])["agent"] == "writer"
    orphan = town.json("backlog", "add", "nobody has this role", "--role", "ops")
    listing = town.tt("backlog").out
    assert orphan["id"][:8] in listing and "nobody can take" in listing

    town.tt("send", "dev", "remember the style guide")
    town.tt("send", "dev", "the build is broken", "--urgent")
    assert len(town.json("inbox", "dev")) == 2
    # dev's CLI leaves the writer a note and gives it a task, from its own working folder
    task = town.assign("dev", "@tt send writer 'from inside'\n@tt send writer --task '@echo asked by dev'")
    assert town.wait_task(task)["state"] == "completed"
    _, prompt = town.recorded(task)
    text = prompt.decode()
    assert text.index("the build is broken") < text.index("remember the style guide") < text.index("@tt send")
    assert town.json("inbox", "dev") == []  # delivered, once
    delivered = town.json("inbox", "dev", "--all")
    assert len(delivered) == 2 and all(n["task"] == task for n in delivered)
    asked = wait_for(lambda: [t for t in town.json("tasks", "--agent", "writer") if t["created_by"] == "dev"],
                     30, "the task dev gave the writer")
    assert asked[0]["description"] == "@echo asked by dev"
    assert [n["from"] for n in town.json("inbox", "writer", "--all")] == ["dev"]


def test_cancel_and_wait(town):
    town.tt("spawn", "dev")
    running = town.assign("dev", "@child\n@sleep 60")
    queued = town.assign("dev", "@echo queued")
    after = town.json("assign", "dev", "after it", "--after", running)["id"]
    town.wait_task(running, ("running",))
    timed_out = town.tt("wait", queued, "--timeout", "0.5", check=False)
    assert timed_out.returncode == 2 and "not finished" in timed_out.out
    assert "Cancelled task" in town.tt("cancel", queued).out
    out = town.tt("cancel", running).out
    assert "being stopped" in out
    stopped = town.wait_task(running, ("cancelled",))
    assert stopped["reason"] == "cancelled by user" and "received" in stopped["output"]  # output kept
    assert town.task(after)["state"] == "cancelled"
    waited = town.tt("wait", running, queued, check=False)
    assert waited.returncode == 1 and waited.out.count("cancelled") == 2
    again = town.tt("cancel", running, check=False)
    assert again.returncode == 1 and "already cancelled" in again.err
    done = town.assign("dev", "@echo fine")
    assert town.tt("wait", done).returncode == 0
    nothing = town.tt("wait", "dev", check=False)  # every task of dev has finished: says so
    assert nothing.returncode == 1 and "nothing to wait for" in nothing.err
