"""`tt`'s entry point (cli/entry.py): `tt stop` without click, everything else through click, and
the two ways give the same output, errors and exit status."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import town_processes, wait_for


def entry(town, *args, env=None, importtime=False):
    """`tt ARGS` as the installed console script runs it (cli/entry.py's main)."""
    flags = ["-X", "importtime"] if importtime else []
    proc = subprocess.run([sys.executable, *flags, "-m", "tinytown.cli.entry", *args], cwd=town.root,
                          env=env or town.env, capture_output=True, text=True, timeout=60)
    return proc


def click_path(town, *args, env=None):
    return subprocess.run([sys.executable, "-m", "tinytown.cli.main", *args], cwd=town.root, env=env or town.env,
                          capture_output=True, text=True, timeout=60)


def test_tt_stop_stops_the_town_without_importing_click(town):
    town.tt("spawn", "dev")
    town.tt("spawn", "qa")
    town.wait_agent("qa")
    proc = entry(town, "stop", importtime=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Stopped town {}: 2 runner(s) (dev, qa)\n".format(town.config().name) or \
        proc.stdout == "Stopped town {}: 2 runner(s) (qa, dev)\n".format(town.config().name)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "tinytown.supervisor.lifecycle" in imported  # (the check itself works)
    assert not [name for name in imported if name.split(".")[0] in ("click", "rich")], imported
    assert town.supervisor_pid() is None
    wait_for(lambda: not town_processes(town.root), 10, "nothing left running")


@pytest.mark.parametrize("args", [
    ["stop"], ["stop", "--json"], ["stop", "--now", "--json"], ["--town", "{root}", "stop"],
    ["stop", "--town={root}"], ["stop", "--town", "{root}/nowhere"], ["stop", "--bogus"], ["stop", "--help"],
    ["stop", "--town"], ["stop", "--json", "--json"], ["stop", "extra"], ["--town", "--now", "stop"],
])
def test_stop_lines_give_what_click_gives(town, args):
    args = [a.format(root=town.root) for a in args]
    fast, slow = entry(town, *args), click_path(town, *args)
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
    assert "Traceback" not in fast.stderr


def test_tt_town_dir_and_the_command_option_win_as_in_click(town, tmp_path):
    env = {**town.env, "TT_TOWN_DIR": str(tmp_path)}  # no town there
    for args in (["stop"], ["--town", str(town.root), "stop"], ["stop", "--town", str(town.root)]):
        fast, slow = entry(town, *args, env=env), click_path(town, *args, env=env)
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
    assert "no tinytown.toml" in entry(town, "stop", env=env).stderr
    assert "is not running" in entry(town, "stop", "--town", str(town.root), env=env).stdout


@pytest.mark.parametrize("args", [["list"], ["--version"], ["--help"], [], ["stopp"], ["spawn", "--help"]])
def test_other_commands_go_through_click(town, args):
    fast, slow = entry(town, *args), click_path(town, *args)
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
