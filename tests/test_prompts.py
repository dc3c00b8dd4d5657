"""Prompt fidelity and task outcomes through real runners, ptys and the fake agent CLI."""
from __future__ import annotations

import hashlib
import os
import json

import pytest
from conftest import FAKE_AGENT as REPO_FAKE_AGENT
from conftest import wait_for

METACHARS = "echo $(touch /tmp/tt-pwned) `id` 'single' \"double\" ; rm -rf / && | > < * ? ~ \\ $HOME !!"


@pytest.fixture
def dev(town):
    town.tt("spawn", "dev", "--model", "claude")
    return town


def run(town, prompt: bytes, agent="dev", via_stdin=True):
    if via_stdin:
        task_id = json.loads(town.tt("assign", agent, "--file", "-", "--json", input=prompt).stdout)["id"]
    else:
        task_id = town.json("assign", agent, prompt.decode())["id"]
    task = town.wait_task(task_id)
    return task, town.recorded(task_id)


@pytest.mark.parametrize("prompt", [
    METACHARS.encode(),
    ("multi\nline\n\n  indented\ttabs\r\nwindows line\n" * 3).encode(),
    "unicode: héllo wörld ✓ 日本語".encode(),
])
def test_prompt_arrives_byte_exact_as_argument(dev, prompt):
    task, (info, got) = run(dev, prompt, via_stdin=False)
    assert task["state"] == "completed"
    assert got == prompt
    assert not info["stdin_isatty"] and info["stdout_isatty"]  # prompt file on stdin, pty for output


def test_one_megabyte_prompt(dev):
    prompt = (b"0123456789abcdef" * 65536)[:1024 * 1024]
    task, (info, got) = run(dev, prompt)
    assert task["state"] == "completed"
    assert info["size"] == len(prompt) and info["sha256"] == hashlib.sha256(prompt).hexdigest()
    assert got == prompt


def test_a_single_ten_thousand_character_line(dev):
    prompt = b"L" * 10_000  # a pty in canonical mode would cut this at 4095 bytes
    task, (_, got) = run(dev, prompt, via_stdin=False)
    assert task["state"] == "completed" and got == prompt


def test_binary_prompt(dev):
    prompt = bytes(range(256)) * 4 + b"\xff\xfe\x00tail"
    task, (_, got) = run(dev, prompt)
    assert task["state"] == "completed" and got == prompt


@pytest.mark.parametrize("model,argv_tail", [
    ("aider", ["--yes-always", "--no-auto-commits", "--no-gitignore", "--no-check-update", "--no-analytics",
               "--message-file"]),
    ("copilot", ["--allow-all-tools", "-p"]),
])
def test_file_and_argument_presets_deliver_too(town, model, argv_tail):
    town.tt("spawn", "bot", "--model", model)
    prompt = b"line one\n" + METACHARS.encode()
    task, (info, got) = run(town, prompt, agent="bot")
    assert task["state"] == "completed"
    assert got == prompt
    assert info["argv"][: len(argv_tail)] == argv_tail


def test_nonzero_exit_fails_the_task_and_the_agent_goes_back_to_idle(dev):
    task_id = dev.json("assign", "dev", "@echo about to fail\n@exit 3")["id"]
    task = dev.wait_task(task_id)
    assert (task["state"], task["exit_code"]) == ("failed", 3)
    assert "exit code 3" in task["reason"] and "about to fail" in task["output"]
    agent = dev.wait_agent("dev", ("idle",))
    assert agent["current_task"] == ""
    ok = dev.json("assign", "dev", "fine")["id"]
    assert dev.wait_task(ok)["state"] == "completed"


def test_missing_cli_binary_fails_the_agent_and_its_task_waits_for_the_fix(town):
    """Every task would fail alike: the agent fails at once, saying what to fix; the task waits in
    its queue, and runs once the config is fixed and the agent restarted."""
    town.append_config('\n[agent_clis.ghost]\ncommand = "no-such-cli-binary --print"\n')
    town.tt("spawn", "ghost", "--model", "ghost")
    town.wait_agent("ghost", ("idle",))
    task_id = town.json("assign", "ghost", "@echo at last")["id"]
    failed = town.wait_agent("ghost", ("failed",))
    assert "no-such-cli-binary" in failed["reason"] and "not found" in failed["reason"], failed
    assert failed["restarts"] == 0 and not failed["pid"]
    waiting = town.task(task_id)
    assert waiting["state"] == "assigned" and waiting["reason"].startswith("waiting: agent ghost failed"), waiting
    config = town.root / "tinytown.toml"
    config.write_text(config.read_text().replace('"no-such-cli-binary --print"', '"claude"'))
    town.tt("restart", "ghost")
    assert town.wait_task(task_id)["state"] == "completed"


def test_cli_environment_and_working_directory(dev):
    task, (info, _) = run(dev, b"env check", via_stdin=False)
    env = info["env"]
    assert env["TT_TOWN"] == "testtown" and env["TT_AGENT"] == "dev" and env["TT_TASK_ID"] == task["id"]
    assert info["cwd"] == str(dev.root)


def test_cli_path_with_spaces_and_no_arguments(town):
    folder = town.root / "my tools"
    folder.mkdir()
    cli = folder / "it's bot"
    cli.symlink_to(REPO_FAKE_AGENT)
    town.append_config(f'\n[agent_clis.spaced]\ncommand = [{json.dumps(str(cli))}]\n')
    town.tt("spawn", "bot", "--model", "spaced")
    task, (info, got) = run(town, b"hello from a spaced path", agent="bot")
    assert task["state"] == "completed", task
    assert got == b"hello from a spaced path" and info["argv"] == []


def test_cli_that_cannot_be_executed_leaves_no_zombie(town):
    import psutil
    bad = town.root / "not-a-program"
    bad.write_text("this is text, not a program\n")
    bad.chmod(0o755)
    town.append_config(f'\n[agent_clis.bad]\ncommand = [{json.dumps(str(bad))}, "--x"]\n')
    town.tt("spawn", "bad", "--model", "bad")
    runner = town.wait_agent("bad", ("idle",))["pid"]
    town.assign("bad", "hello")
    failed = town.wait_agent("bad", ("failed",))
    assert "Exec format error" in failed["reason"], failed
    wait_for(lambda: not psutil.pid_exists(runner) or psutil.Process(runner).status() == psutil.STATUS_ZOMBIE,
             30, "the runner to exit")
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(bad) in " ".join(p.info["cmdline"] or [])]


def test_a_script_whose_interpreter_is_gone_fails_its_agent_too(town):
    """which() finds the script; posix_spawn's ENOENT is its #! interpreter (after an upgrade):
    every task would fail alike, so the agent fails rather than take the backlog's tasks."""
    script = town.root / "old-cli"
    script.write_text("#!/no/such/python3.9\nprint('hi')\n")
    script.chmod(0o755)
    town.append_config(f'\n[agent_clis.old]\ncommand = [{json.dumps(str(script))}]\n')
    town.tt("spawn", "old", "--model", "old")
    town.assign("old", "hello")
    assert "No such file or directory" in town.wait_agent("old", ("failed",))["reason"]


def test_a_prompt_starting_with_a_dash_never_reaches_an_argument_cli_as_an_option(town):
    """`cursor-agent --print --force --version` ran, with no prompt. A positional prompt now goes
    after "--" where the preset says its CLI takes it; elsewhere the task fails saying why, and
    the CLI never runs."""
    town.append_config('\n[agent_clis.flagged]\ncommand = "claude -p {prompt}"\nprompt = "arg"\n'
                       '\n[agent_clis.other]\ncommand = "claude"\nprompt = "stdin"\n')
    town.tt("spawn", "bot", "--model", "flagged")
    refused = town.tt("assign", "bot", "--", "--version", check=False)
    assert refused.returncode == 1 and "starts with '-', which 'flagged' would read as an option" in refused.err
    assert town.json("tasks") == []  # refused before anything was written
    town.tt("spawn", "bot2", "--model", "other")
    task_id = town.json("assign", "bot2", "--", "--version")["id"]
    assert town.wait_task(task_id)["state"] == "completed"  # stdin prompts are data: fine
