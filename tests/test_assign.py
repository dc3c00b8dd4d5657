"""`tt assign`: one task, and many at once (--each) for scripts."""
from __future__ import annotations

import json


def test_each_line_is_a_task_in_order_and_empty_lines_are_skipped(town, tmp_path):
    town.tt("spawn", "dev")
    tasks = tmp_path / "tasks.txt"
    tasks.write_bytes(b"first\n\n  \nsecond with \xff byte\r\nthird")
    out = town.tt("assign", "dev", "--each", str(tasks))
    ids = out.out.split()
    assert len(ids) == 3 and out.err == ""
    found = [town.task(i) for i in ids]
    assert [t["description"] for t in found] == ["first", "second with \udcff byte", "third"]
    assert all(t["agent"] == "dev" for t in found)
    for task_id in ids:
        assert town.wait_task(task_id)["state"] == "completed"


def test_each_with_nul_records_from_stdin_and_json(town):
    town.tt("spawn", "dev")
    records = b"line one\nline two\0\0second\0"
    found = json.loads(town.tt("assign", "dev", "--each", "-", "-0", "--json", input=records).out)
    assert [t["description"] for t in found] == ["line one\nline two", "second"]
    assert [t["id"] for t in town.json("tasks")] == [t["id"] for t in found]


def test_each_is_all_or_nothing_and_refuses_what_it_cannot_do(town, tmp_path):
    town.tt("spawn", "dev")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("a\nb\n")
    cases = [
        (["assign", "nobody", "--each", str(tasks)], "no agent named 'nobody'"),
        (["assign", "dev", "--each", str(tmp_path / "missing.txt")], f"no such file: {tmp_path / 'missing.txt'}"),
        (["assign", "dev", "text", "--each", str(tasks)], "--each reads every task from its file"),
        (["assign", "dev", "text", "--null"], "--null goes with --each"),
        (["assign", "dev", "--file", str(tmp_path / "missing.txt")], "no such file"),
    ]
    for args, message in cases:
        out = town.tt(*args, check=False)
        assert out.returncode == 1 and message in out.err and len(out.err.strip().splitlines()) == 1, (args, out.err)
    empty = town.tt("assign", "dev", "--each", "-", input=b"\n \n", check=False)
    assert empty.returncode == 1 and "no tasks in stdin" in empty.err
    assert town.json("tasks") == []  # nothing was written by any of them
