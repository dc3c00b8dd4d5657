"""Context kept across tasks (`tt spawn --keep-context`) and the claude-as-root caveat (issue 14,
items 4 and 5): real towns, real ptys, the fake CLI keeping conversations as the real ones do."""
from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import replace

import pytest

from conftest import wait_for
from tinytown.supervisor.config import PRESETS, CliSpec, root_caveat
from tinytown.supervisor.errors import TinytownError

USER = ("-c", "user.name=User", "-c", "user.email=user@example.invalid")


def lines_of(output: str, prefix: str) -> list[str]:
    from tinytown.supervisor.terminal_text import clean_text
    return [line.strip()[len(prefix):] for line in clean_text(output).splitlines() if line.strip().startswith(prefix)]


# --- the argv of a continued task ---------------------------------------------------------------

def test_continued_argv_puts_the_continue_flags_after_the_program_and_its_subcommands():
    claude, codex = PRESETS["claude"], PRESETS["codex"]
    assert claude.continued().argv(None, "/p") == ["claude", "--continue", "--print", "--dangerously-skip-permissions"]
    assert claude.continued("S1").argv(None, "/p")[:3] == ["claude", "--resume", "S1"]
    assert codex.continued().argv(None, "/p") == [
        "codex", "exec", "resume", "--last", "--dangerously-bypass-approvals-and-sandbox", "-"]
    assert codex.continued("S1").argv(None, "/p") == [
        "codex", "exec", "resume", "S1", "--dangerously-bypass-approvals-and-sandbox", "-"]
    # An id is used only where the CLI takes one; the prompt still goes where the preset puts it.
    assert PRESETS["gemini"].continued("S1").argv(None, "/p") == ["gemini", "--resume", "latest", "--skip-trust",
                                                                    "--yolo"]
    assert PRESETS["aider"].continued().argv(None, "/p")[:2] == ["aider", "--restore-chat-history"]
    assert PRESETS["aider"].continued().argv(None, "/p")[-2:] == ["--message-file", "/p"]
    for name in ("auggie", "copilot", "cursor"):
        assert not PRESETS[name].can_continue and PRESETS[name].continued("S1") == PRESETS[name]


def test_session_id_is_the_last_one_the_output_shows():
    codex = PRESETS["codex"]
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert codex.session_in(f"session id: {first}\n...\nsession id: {second}\n".encode()) == second
    assert codex.session_in(b"no id here") == ""
    assert PRESETS["claude"].session_in(f'{{"type":"result","session_id": "{first}"}}'.encode()) == first
    assert PRESETS["gemini"].session_in(f"session id: {first}".encode()) == ""  # no pattern: none read
    assert codex.session_in(b"session id: ------------------------------------\n") == ""
    assert codex.session_in(f"\x1b[1msession id:\x1b[0m {first}\r\n".encode()) == first  # as codex prints it
    # The id goes on the next command line: nothing that could pass for an option or carry controls.
    loose = CliSpec("mine", ("mine",), resume_args=("--session", "{session}"), session_pattern=r"sid=(\S+)")
    assert loose.session_in(b"sid=abc-1") == "abc-1"
    assert loose.session_in(b"sid=--exec=rm") == ""
    assert loose.session_in(b"sid=ab\x07cd") == ""
    assert loose.session_in(b"sid=ab\x1b]0;title\x07") == "ab"  # escape sequences go before the match


def write_config(tmp_path, text: str):
    from tinytown.supervisor.config import load
    (tmp_path / "tinytown.toml").write_text('name = "t"\n' + text)
    return load(tmp_path)


def test_a_users_cli_sets_its_own_continuation_and_a_preset_override_keeps_the_presets(tmp_path):
    config = write_config(tmp_path, '[agent_clis.claude]\ncommand = "claude --print --model opus"\n'
                                    '[agent_clis.mine]\ncommand = "mine run"\ncontinue_args = ["--again"]\n'
                                    'resume_args = ["--session", "{session}"]\nsession_pattern = "sid=(\\\\w+)"\n')
    claude = config.cli("claude")
    assert claude.continue_args == ("--continue",) and claude.resume_args == ("--resume", "{session}")
    assert claude.continued().command == ("claude", "--continue", "--print", "--model", "opus")
    mine = config.cli("mine")
    assert mine.continued().command == ("mine", "run", "--again")
    assert mine.continued(mine.session_in(b"sid=abc1 ok")).command == ("mine", "run", "--session", "abc1")


def test_a_presets_table_without_a_command_keeps_the_presets_command_prompt_and_continuation(tmp_path):
    config = write_config(tmp_path, '[agent_clis.claude]\nenv = { IS_SANDBOX = "1" }\n'
                                    '[agent_clis.copilot]\ncontinue_args = ["--continue"]\n')
    claude = config.cli("claude")
    assert claude == replace(PRESETS["claude"], env=(("IS_SANDBOX", "1"),))
    assert config.cli("copilot").continued().argv("hi", "/f") == ["copilot", "--continue", "--allow-all-tools", "-p", "hi"]
    with pytest.raises(TinytownError, match=r"needs command"):
        write_config(tmp_path, '[agent_clis.mine]\nenv = { X = "1" }\n')


@pytest.mark.parametrize("body, error", [
    ('continue_args = "--continue"', r":4: continue_args: must be a list of non-empty strings"),
    ('resume_args = ["--resume"]', r":4: resume_args: must hold \{session\}"),
    ('session_pattern = "("', r":4: session_pattern: not a regular expression"),
    ('session_pattern = "session \\\\S+"', r":4: session_pattern: needs a group"),
])
def test_bad_continuation_keys_are_refused_with_their_line(tmp_path, body, error):
    with pytest.raises(TinytownError, match=error):
        write_config(tmp_path, f'[agent_clis.x]\ncommand = "x"\n{body}\n')


# --- a running town -----------------------------------------------------------------------------

def test_each_task_continues_the_session_the_last_one_printed(town):
    """codex's way: it prints its session id; the next task resumes that id."""
    town.tt("spawn", "dev", "--model", "codex", "--keep-context", "--shared")
    assert town.agent("dev")["keep_context"] is True and town.agent("dev")["session_task"] == ""

    first = town.wait_task(town.assign("dev", "@session\n@remember alpha"))
    assert first["state"] == "completed"
    [session] = lines_of(first["output"], "session id: ")
    assert lines_of(first["output"], "remembers: ") == ["nothing"]
    agent = town.wait_agent("dev")
    assert (agent["session"], agent["session_task"]) == (session, first["id"])

    second = town.wait_task(town.assign("dev", "@session\n@remember beta"))
    assert second["state"] == "completed"
    assert lines_of(second["output"], "session id: ") == [session]
    assert lines_of(second["output"], "remembers: ") == ["alpha"]
    argv = town.recorded(second["id"])[0]["argv"]
    assert argv[:3] == ["exec", "resume", session]
    assert town.recorded(first["id"])[0]["argv"][:2] == ["exec", "--dangerously-bypass-approvals-and-sandbox"]

    # A runner restarted later reads the session from the agent's record.
    town.tt("stop")
    town.tt("spawn", "other", "--shared")  # starts the town again, and dev's runner
    town.wait_agent("dev")
    third = town.wait_task(town.assign("dev", "@session"))
    assert lines_of(third["output"], "remembers: ") == ["alpha, beta"]
    assert town.wait_agent("dev")["session_task"] == third["id"]


def test_a_session_that_is_gone_is_dropped_after_one_failed_task(town):
    """Resuming a session that no longer exists fails (codex: "No conversation found"); kept, the
    id would fail every task after it, `tt restart` or not. The next task starts a new one."""
    town.tt("spawn", "dev", "--model", "codex", "--keep-context", "--shared")
    first = town.wait_task(town.assign("dev", "@session\n@remember alpha"))
    [session] = lines_of(first["output"], "session id: ")
    for path in (town.record / "sessions").iterdir():
        path.unlink()                                   # expired, deleted, another HOME
    failed = town.wait_task(town.assign("dev", "@session"))
    assert failed["state"] == "failed" and "No conversation found" in failed["output"]
    assert town.wait_agent("dev")["session"] == ""
    fresh = town.wait_task(town.assign("dev", "@session"))
    assert fresh["state"] == "completed", fresh
    assert lines_of(fresh["output"], "session id: ") != [session]
    assert "could not continue session" in town.tt("logs", "dev").out


def test_without_keep_context_every_task_starts_a_new_session(town):
    town.tt("spawn", "dev", "--model", "codex", "--shared")
    first = town.wait_task(town.assign("dev", "@session\n@remember alpha"))
    second = town.wait_task(town.assign("dev", "@session"))
    assert lines_of(second["output"], "remembers: ") == ["nothing"]
    assert lines_of(first["output"], "session id: ") != lines_of(second["output"], "session id: ")
    assert "resume" not in town.recorded(second["id"])[0]["argv"]
    assert town.agent("dev")["keep_context"] is False and town.agent("dev")["session_task"] == ""


def test_the_folders_last_session_is_each_worktree_agents_own(make_town):
    """claude's way in text mode: no id printed, `--continue` takes the last session of the folder,
    and each agent's folder is its worktree, so two agents never continue each other's."""
    town = make_town(folder="gittown")
    (town.root / "app.py").write_text("print('hello')\n")
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-q", "-m", "first")):
        subprocess.run(["git", *USER, *args], cwd=town.root, check=True, capture_output=True)
    for name in ("dev", "tester"):
        spawned = town.tt("spawn", name, "--model", "claude", "--keep-context")
        assert "--keep-context" not in spawned.err
    dev1 = town.wait_task(town.assign("dev", "@session\n@remember dev-one"))
    tester1 = town.wait_task(town.assign("tester", "@session\n@remember tester-one"))
    dev2 = town.wait_task(town.assign("dev", "@session"))
    tester2 = town.wait_task(town.assign("tester", "@session"))
    assert lines_of(dev2["output"], "remembers: ") == ["dev-one"]
    assert lines_of(tester2["output"], "remembers: ") == ["tester-one"]
    assert lines_of(dev2["output"], "session id: ") == lines_of(dev1["output"], "session id: ")
    assert lines_of(tester2["output"], "session id: ") == lines_of(tester1["output"], "session id: ")
    assert town.recorded(dev2["id"])[0]["argv"][:1] == ["--continue"]
    assert town.agent("dev")["session"] == ""  # claude printed no id (text output)


def test_a_cli_that_cannot_continue_says_so_at_spawn_and_runs_as_before(town):
    spawned = town.tt("spawn", "dev", "--model", "auggie", "--keep-context")
    warnings = [line for line in spawned.err.splitlines() if "--keep-context" in line]
    assert len(warnings) == 1 and "'auggie' has no way to continue a session" in warnings[0]
    assert town.agent("dev")["keep_context"] is True  # kept: continue_args in tinytown.toml later make it work
    first = town.wait_task(town.assign("dev", "@session\n@remember alpha"))
    second = town.wait_task(town.assign("dev", "@session"))
    assert first["state"] == second["state"] == "completed"
    assert lines_of(second["output"], "remembers: ") == ["nothing"]
    assert town.recorded(second["id"])[0]["argv"] == ["--print"]


def test_keep_context_in_the_shared_folder_warns_that_the_folders_last_session_is_shared(town):
    spawned = town.tt("spawn", "dev", "--model", "gemini", "--keep-context", "--shared")
    assert "may be another agent's" in spawned.err and spawned.returncode == 0


# --- claude as root ----------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="claude's refusal is for root")


@needs_root
def test_claude_as_root_without_is_sandbox_is_warned_at_spawn_and_its_refusal_says_what_to_do(town):
    town.env.pop("IS_SANDBOX", None)
    town.env["FAKE_AGENT_MIMIC"] = "1"  # the fake refuses as the real claude does (never IS_SANDBOX by itself)
    spawned = town.tt("spawn", "dev", "--model", "claude")
    [warning] = [line for line in spawned.err.splitlines() if "IS_SANDBOX" in line]
    assert "[agent_clis.claude]" in warning and "normal user" in warning and "sandbox" in warning
    task = town.wait_task(town.assign("dev", "Say hello."))
    assert task["state"] == "failed"
    assert "cannot be used with root/sudo privileges" in task["output"]
    assert 'IS_SANDBOX = "1"' in task["reason"] and "run the town as a normal user" in task["reason"]


@needs_root
def test_claude_with_is_sandbox_in_its_env_gets_no_warning_and_runs(make_town):
    town = make_town(extra='\n[agent_clis.claude]\nenv = { IS_SANDBOX = "1" }\n')  # the preset's command kept
    town.env.pop("IS_SANDBOX", None)
    town.env["FAKE_AGENT_MIMIC"] = "1"
    spawned = town.tt("spawn", "dev", "--model", "claude")
    assert "IS_SANDBOX" not in spawned.err
    task = town.wait_task(town.assign("dev", "Say hello."))
    # Past the root check: the mimic now fails as claude does with no credentials.
    assert "Not logged in" in task["output"] and "root/sudo" not in task["output"]
    assert "IS_SANDBOX" not in task["reason"]


def test_root_caveat_is_only_for_claude_skipping_permissions_as_root(monkeypatch):
    claude = PRESETS["claude"]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "IS_SANDBOX" in root_caveat(claude, {})
    assert root_caveat(claude, {"IS_SANDBOX": "1"}) == ""
    assert "IS_SANDBOX" in root_caveat(claude, {"IS_SANDBOX": "true"})  # claude wants exactly "1"
    assert root_caveat(CliSpec("claude", ("claude", "--print")), {}) == ""
    assert "[agent_clis.opus]" in root_caveat(CliSpec("opus", ("/opt/bin/claude", "--dangerously-skip-permissions")), {})
    assert root_caveat(PRESETS["codex"], {}) == ""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert root_caveat(claude, {}) == ""


# --- scripts/check-presets looks for the continue flags too --------------------------------------

def test_check_presets_looks_for_the_continue_flags_in_the_clis_help(tmp_path):
    import sys
    from dataclasses import replace

    from conftest import FAKE_BIN, REPO
    sys.path.insert(0, str(REPO / "scripts"))
    from check_presets import CHECKS, check_one
    mimic = {"FAKE_AGENT_MIMIC": "1"}
    codex = check_one(CHECKS["codex"], PRESETS["codex"], tmp_path / "cache", [str(FAKE_BIN)], mimic, 20.0)
    assert codex.verdict == "PASS", codex.reasons
    assert "continue: resume --last; resume: resume {session}" in codex.reasons[0]
    wrong = replace(PRESETS["claude"], continue_args=("--keep-going",), resume_args=("--session", "{session}"))
    claude = check_one(CHECKS["claude"], wrong, tmp_path / "cache", [str(FAKE_BIN)], mimic, 20.0)
    assert claude.verdict == "FAIL"
    assert "--keep-going not in `--help` (continue)" in claude.reasons
    assert "--session not in `--help` (resume)" in claude.reasons


def test_the_readme_says_what_each_preset_runs_and_continues_with():
    from conftest import REPO
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using real CLIs"):readme.index("## How it works")]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    for name, spec in PRESETS.items():
        shown = " ".join(part.replace("{prompt_file}", "FILE").replace("{prompt}", "PROMPT") for part in spec.command)
        assert f"`{shown}`" in rows[name], name
        continues = rows[name].split("|")[4]
        for part in spec.continue_args + spec.resume_args:
            assert part.replace("{session}", "ID") in continues, (name, part)
        assert continues.strip().startswith("no") is not spec.can_continue, name
