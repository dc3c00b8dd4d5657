"""Tinytown installs as one import package, `tinytown`, beside supervisord and testing-cabal's
`fixtures` in one environment, and uninstalling either leaves the other two working.

The top-level folders `supervisor/` and `cli/` used to be installed as top-level packages of the
same names: supervisord's `supervisor` and Tinytown's merged into one folder, and uninstalling
either deleted the other's files.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO


def run(*args, cwd="/", **kwargs) -> subprocess.CompletedProcess:
    """Run outside the repository: its folders must not be what `import supervisor` finds."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=cwd, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def check_all_three(bin_dir: Path, present: set[str]) -> None:
    py = bin_dir / "python"
    if "tinytown" in present:
        assert run(bin_dir / "tt", "--version").stdout.startswith("tt, version ")
        assert "spawn" in run(bin_dir / "tt", "--help").stdout
        run(py, "-c", "import tinytown.supervisor.daemon, tinytown.supervisor.runner, tinytown.cli.main")
    if "supervisor" in present:
        assert run(bin_dir / "supervisord", "--version").stdout.strip()[:1].isdigit()
        run(py, "-c", "import supervisor.supervisord, supervisor.options")
    if "fixtures" in present:
        run(py, "-c", "import fixtures; fixtures.Fixture; fixtures.TempDir; fixtures.MonkeyPatch")


def test_tinytown_supervisord_and_fixtures_share_one_environment(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    pip = [bin_dir / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run(*pip, str(REPO), "supervisor", "fixtures", env=env)
    site = Path(run(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    assert (site / "tinytown" / "supervisor" / "daemon.py").is_file()
    assert not (site / "cli").exists() and not (site / "supervisor" / "daemon.py").exists()
    assert not (site / "fixtures" / "fake_agent.py").exists()  # test fixtures are not installed
    check_all_three(bin_dir, {"tinytown", "supervisor", "fixtures"})

    run(bin_dir / "python", "-m", "pip", "uninstall", "-y", "-q", "supervisor", env=env)
    check_all_three(bin_dir, {"tinytown", "fixtures"})
    run(*pip, "supervisor", env=env)
    run(bin_dir / "python", "-m", "pip", "uninstall", "-y", "-q", "fixtures", env=env)
    check_all_three(bin_dir, {"tinytown", "supervisor"})
    run(bin_dir / "python", "-m", "pip", "uninstall", "-y", "-q", "tinytown", env=env)
    check_all_three(bin_dir, {"supervisor"})
    assert sys.version_info >= (3, 11)  # what pyproject's requires-python promises is what runs here
