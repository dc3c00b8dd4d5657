"""What a hostile neighbour, a full disk and a stuck agent do to a town (issue 12), against real
processes: each test failed before its fix."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import town_processes

LONG_FOLDER = "d" * 70 + "/" + "e" * 60  # .tt/redis.sock is then too long for a unix socket


def tt_in_namespace(town, mounts: list[tuple[Path, Path]], *args) -> subprocess.CompletedProcess:
    """`tt ARGS` in a mount namespace of its own where each (source, target) is bind-mounted: what
    the test does to /tmp/tt-<uid> there, the other towns on this machine do not see."""
    script = "".join(f'mount --bind "{src}" "{dst}" && ' for src, dst in mounts) + 'exec "$@"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                           sys.executable, "-m", "tinytown.cli.main", *args],
                          cwd=town.root, env=town.env, capture_output=True, timeout=60)
    proc.out, proc.err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1) for a private /tmp/tt-<uid>")


# --- 1. the Redis socket's folder, when the town's path is too long -----------------------------
@needs_mount_namespace
@pytest.mark.parametrize("hostile", ["open to all", "another user's"])
def test_a_socket_folder_another_user_could_reach_is_refused(make_town, tmp_path, hostile):
    town = make_town(folder=LONG_FOLDER)
    shared = Path(f"/tmp/tt-{os.getuid()}")
    shared.mkdir(mode=0o700, exist_ok=True)  # (the mount point; in the namespace it is the folder below)
    made_first = tmp_path / "made-by-a-neighbour"
    made_first.mkdir()
    if hostile == "open to all":
        os.chmod(made_first, 0o777)
    else:
        os.chown(made_first, 4242, 4242)
        os.chmod(made_first, 0o700)
    proc = tt_in_namespace(town, [(made_first, shared)], "spawn", "dev")
    assert proc.returncode == 1
    assert proc.err.count("\n") == 1 and "Traceback" not in proc.err
    assert f"{shared} must be a folder only you own" in proc.err and "Redis socket" in proc.err
    assert list(made_first.iterdir()) == []  # no socket put where the neighbour could reach it
    assert town_processes(town.root) == []
