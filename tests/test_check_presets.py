"""scripts/check-presets, the check of the presets against the real CLIs, so the check cannot rot.

With no real CLI installed (CI) it runs against the fake CLIs of fixtures/bin, which answer --help
and, with FAKE_AGENT_MIMIC=1, say what each real CLI says with no credentials: the whole path (flags
in --help, a run through tinytown's CliSession on a pty, the CLI's own error found in its output) is
exercised, and the presets that were wrong before are shown to fail. Where real CLIs are installed
(in the checker's cache or on PATH) they are checked too. Nothing is installed here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import FAKE_AGENT, FAKE_BIN, REPO

SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import check_presets  # noqa: E402
from check_presets import CHECKS, Probe, check_one  # noqa: E402

from tinytown.supervisor.config import PRESETS, CliSpec  # noqa: E402

MIMIC = {"FAKE_AGENT_MIMIC": "1"}


def run_checker(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPTS / "check_presets.py"), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def check_fake(tmp_path, name, command, prompt="stdin", timeout=20.0):
    """One preset variant checked against the fake CLI of its name."""
    spec = replace(PRESETS[name], command=tuple(command), prompt=prompt)
    return check_one(CHECKS[name], spec, tmp_path / "cache", [str(FAKE_BIN)], MIMIC, timeout)


def test_every_preset_passes_against_the_fake_clis(tmp_path):
    out = run_checker("--no-install", "--path", str(FAKE_BIN), "--cache", str(tmp_path / "cache"),
                      "--env", "FAKE_AGENT_MIMIC=1", "--timeout", "30")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(CHECKS)  # one line per CLI
    assert set(CHECKS) == set(PRESETS)  # every preset has its check
    for line in lines:
        name, version, verdict = line.split()[:3]
        assert (version, verdict) == ("1.0.0-fake", "PASS"), line
        assert "reached its own error" in line
    assert not (tmp_path / "cache").exists()  # --no-install: nothing installed, no cache made


def test_the_presets_that_were_wrong_fail(tmp_path):
    gemini = check_fake(tmp_path, "gemini", ["gemini"])
    assert gemini.verdict == "FAIL"
    assert "exit code 55" in " ".join(gemini.reasons) and "not running in a trusted directory" in " ".join(gemini.reasons)

    aider = check_fake(tmp_path, "aider", ["aider", "--yes", "--no-auto-commits", "--message-file", "{prompt_file}"],
                       prompt="file")
    assert aider.verdict == "FAIL"
    assert "--yes not in `--help`" in aider.reasons
    assert any("changed the work folder's .gitignore" in reason for reason in aider.reasons)


def test_a_flag_the_cli_does_not_know_fails_in_help_and_in_the_run(tmp_path):
    result = check_fake(tmp_path, "claude", ["claude", "--print", "--no-such-flag"])
    assert result.verdict == "FAIL"
    assert "--no-such-flag not in `--help`" in result.reasons
    assert any("usage error: error: unknown option '--no-such-flag'" in reason for reason in result.reasons)


def test_a_subcommand_flag_is_looked_for_in_the_subcommand_help(tmp_path):
    result = check_fake(tmp_path, "codex", ["codex", "exec", "--dangerously-bypass-approvals-and-sandbox", "-"])
    assert result.verdict == "PASS", result.reasons
    assert check_presets.flags_of(PRESETS["codex"]) == (["exec"], ["--dangerously-bypass-approvals-and-sandbox"])
    assert check_presets.flags_of(PRESETS["aider"])[1][-1] == "--message-file"  # not its {prompt_file}


def test_a_cli_that_never_says_the_expected_line_fails_at_the_deadline(tmp_path):
    check = replace(CHECKS["codex"], probes=(Probe("network", "hello", r"a line codex never prints"),))
    result = check_one(check, PRESETS["codex"], tmp_path / "cache", [str(FAKE_BIN)], MIMIC, 1.0)
    assert result.verdict == "FAIL"
    assert result.reasons[0].startswith("network: still running after 1s without /a line codex never prints/: ")
    assert "Reconnecting" in result.reasons[0]  # the CLI's last line, to tell why


def test_a_missing_cli_is_skipped_and_a_failed_install_fails(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = replace(PRESETS["cursor"], command=("no-such-agent-cli", "--print"))
    skipped = check_one(CHECKS["cursor"], spec, tmp_path / "cache", [str(empty)], MIMIC, 5.0)
    assert (skipped.verdict, skipped.version) == ("SKIP", "-")
    failed = check_one(CHECKS["cursor"], spec, tmp_path / "cache", [str(empty)], MIMIC, 5.0, "npm install failed")
    assert (failed.verdict, failed.reasons) == ("FAIL", ["npm install failed"])


def test_hostile_output_is_shown_as_plain_text():
    shown = check_presets.clean(b"\x1b[31mred\x1b[0m \x1b]0;title\x07ok\r\nnext\x07\x1b[2J")
    assert shown == "red ok\nnext"


def test_bad_options_say_one_line(tmp_path):
    out = run_checker("--only", "nosuch", "--no-install")
    assert out.returncode == 2 and "invalid choice" in out.stderr and "Traceback" not in out.stderr
    out = run_checker("--env", "NOEQUALS", "--no-install")
    assert out.returncode == 2 and "--env wants NAME=VALUE" in out.stderr


def installed_real_clis() -> list[str]:
    """Presets whose real CLI is in the checker's cache or on PATH (not the fakes)."""
    cache = check_presets.DEFAULT_CACHE
    found = []
    for name, check in CHECKS.items():
        exe = check_presets.find_cli(check, PRESETS[name], cache, [])
        if exe and os.path.realpath(exe) != str(FAKE_AGENT.resolve()):
            found.append(name)
    return found


def test_the_installed_real_clis_pass():
    names = installed_real_clis()
    if not names:
        pytest.skip("no real CLI installed (scripts/check-presets installs them)")
    out = run_checker("--no-install", "--only", *names)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line.split()[2] for line in out.stdout.splitlines()] == ["PASS"] * len(names), out.stdout
