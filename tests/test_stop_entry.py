"""`tt`'s entry point (cli/entry.py): `tt stop` without click, everything else through click, and
the two ways give the same output, errors and exit status."""
from __future__ import annotations

import os
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
    assert "tinytown.supervisor.stopping" in imported  # (the check itself works)
    assert not [name for name in imported if name.split(".")[0] in ("click", "rich")], imported
    # Asked from what the supervisor wrote into its lock file: no config, no models (stopping.py).
    assert not {"tinytown.supervisor.config", "tinytown.supervisor.models", "tomllib"} & set(imported)
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


def card_of(town) -> dict:
    """What the supervisor wrote for `tt stop` into its lock file (supervisor/stopping.py)."""
    from tinytown.supervisor import lock
    from tinytown.supervisor.stopping import Card
    pid, raw = lock.holder_and_card(town.root / ".tt")
    assert pid == town.supervisor_pid()
    return Card.decode(raw)._asdict()


def test_a_town_whose_config_was_changed_or_broken_while_running_still_stops(town):
    """`tt stop` asks the supervisor that runs, as it described itself, not whatever tinytown.toml
    says now: renamed (its keys would be another town's) or broken, the town still stops."""
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    name = town.config().name
    assert card_of(town) == {"name": name, "socket": str(town.config().redis_socket),
                             "stop_grace": town.config().supervisor.stop_grace,
                             "report": str(town.root / ".tt" / "last-stop.json")}
    toml = town.root / "tinytown.toml"
    toml.write_text(toml.read_text().replace(f'name = "{name}"', 'name = "renamed"', 1) + "\n[oops\n")
    proc = entry(town, "stop")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"Stopped town {name}: 1 runner(s) (dev)\n", "")
    assert town.supervisor_pid() is None
    assert (town.root / ".tt" / "supervisor.lock").read_bytes() == b""    # the card went with the lock
    wait_for(lambda: not town_processes(town.root), 10, "nothing left running")
    # Not running: the config's path, which says what is wrong with the file.
    proc = entry(town, "stop")
    assert proc.returncode == 1 and "tinytown.toml" in proc.stderr and "Traceback" not in proc.stderr


def test_the_card_follows_a_reload(town):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    toml = town.root / "tinytown.toml"
    text = toml.read_text()
    toml.write_text(text.replace("\nstop_grace = 10.0\n", "\nstop_grace = 20.0\n", 1))
    town.tt("reload")
    assert card_of(town)["stop_grace"] == 20.0
    toml.write_text(text.replace("\nstop_grace = 10.0\n", "\nstop_grace = 3.5\n", 1))
    town.tt("reload")
    assert card_of(town)["stop_grace"] == 10.0  # (dev's runner keeps the 10 s it was forked with)
    assert town.tt("stop").returncode == 0


def test_the_card_round_trips_through_the_lock_file_whatever_the_paths(tmp_path):
    from tinytown.supervisor import lock
    from tinytown.supervisor.stopping import Card
    odd = os.fsdecode(b"/tmp/a\nb\tc caf\xe9/.tt/redis.sock")
    fd = lock.acquire(tmp_path)
    try:
        assert lock.holder_and_card(tmp_path) == (os.getpid(), b"")        # serving not yet: no card
        for card in (Card("town-1", odd, 2.5, odd + ".json"), Card("t", "", 0.0, "r")):
            lock.describe(fd, card.encode())
            pid, raw = lock.holder_and_card(tmp_path)
            assert pid == lock.holder(tmp_path) == os.getpid() and Card.decode(raw) == card
    finally:
        lock.release(fd)
    assert lock.holder_and_card(tmp_path) == (None, b"")
    assert Card.decode(b"too\0few\0") is None and Card.decode(b"a\0b\0not-a-number\0d\0") is None
    # A reload's shorter card, read between its write and the cut: the old card's tail is ignored.
    longer, shorter = Card("t", "/s", 10.0, "/a/long/report.json"), Card("t", "/s", 3.5, "/r.json")
    torn = shorter.encode() + longer.encode()[len(shorter.encode()):]
    assert Card.decode(torn) == shorter and Card.decode(shorter.encode()[:-1]) is None


def test_the_fast_path_answers_json_and_now_as_the_config_path_does(town):
    import json
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    proc = entry(town, "stop", "--now", "--json")
    assert proc.returncode == 0 and proc.stderr == ""
    report = json.loads(proc.stdout)
    assert report["stopped"] == ["dev"] and report["killed"] == [] and "at" in report
    assert json.loads(entry(town, "stop", "--json").stdout) == {"running": False}


def test_stop_says_what_waits_on_dependencies_beside_what_waits_in_inboxes(town):
    """A stop with work waiting on a running task said nothing of that work: it is kept, and said."""
    town.tt("spawn", "dev")
    running = town.assign("dev", "@gate never")
    town.assign("dev", "@echo queued")
    town.tt("assign", "dev", "@echo after it", "--after", running)
    town.tt("backlog", "add", "@echo backlog after it", "--after", running)
    town.wait_task(running, states=("running",))
    proc = entry(town, "stop", "--now")
    assert proc.returncode == 0, proc.stderr
    assert "2 task(s) wait in inboxes for the next start" in proc.stdout  # (the running one, put back)
    assert "2 task(s) wait on dependencies" in proc.stdout, proc.stdout


def test_a_runtime_folder_that_is_not_a_folder_is_said_as_the_config_path_says_it(town):
    (town.root / ".tt").rename(town.root / "tt-moved")
    (town.root / ".tt").write_text("not a folder\n")
    fast, slow = entry(town, "stop"), click_path(town, "stop")
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
    assert fast.returncode == 1 and fast.stderr.endswith(".tt is not a folder (the town keeps its runtime files "
                                                         "there): move it away\n")


def test_ctrl_c_while_python_loads_click_ends_quietly(tmp_path):
    """Ctrl+C in the first tenth of a second of `tt list` (Python still importing) used to print
    the traceback of whichever import it landed in. The import hook below sends the SIGINT at the
    moment click is imported, so it lands there every time."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "class InterruptAtClick:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'click':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, InterruptAtClick())\n")
    env = dict(os.environ, PYTHONPATH=str(hook))
    proc = subprocess.run([sys.executable, "-m", "tinytown.cli.entry", "list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "", "")
