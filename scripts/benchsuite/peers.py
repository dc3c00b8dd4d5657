"""The peers, each in the benchmark's own throwaway virtual environment (.bench-venv/).

supervisord (PyPI `supervisor`, whose package name clashes with ours: one more reason it never
goes into the project's environment), RQ, and matplotlib for the plot are installed there once and
reused while the requirements below stay the same.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from .common import BENCH_DIR, REPO, clean_env, run_timed, wait_exit, wait_until

VENV = Path(os.environ.get("TT_BENCH_VENV", REPO / ".bench-venv"))
REQUIREMENTS = ["supervisor>=4.2,<5", "rq>=2,<4", "matplotlib>=3.5"]


class PeersUnavailable(Exception):
    pass


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(log=print) -> Path:
    """Create .bench-venv/ with the peers (once; a lock keeps parallel runs from racing)."""
    marker = VENV / ".bench-installed"
    wanted = "\n".join(REQUIREMENTS)
    if marker.exists() and marker.read_text() == wanted and venv_python().exists():
        return VENV
    VENV.parent.mkdir(parents=True, exist_ok=True)
    VENV.mkdir(parents=True, exist_ok=True)
    with open(VENV / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == wanted and venv_python().exists():
            return VENV
        log(f"bench: installing the peers into {VENV} (once): {', '.join(REQUIREMENTS)}")
        base = os.environ.get("TT_BENCH_PYTHON") or _base_python()
        try:
            if not venv_python().exists():
                subprocess.run([base, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
            subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            *REQUIREMENTS], check=True, capture_output=True, timeout=900, env=clean_env())
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            err = getattr(exc, "stderr", b"") or b""
            tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
            raise PeersUnavailable(f"cannot install the peers: {exc}" + (f": {tail[0]}" if tail else "")) from None
        marker.write_text(wanted)
    return VENV


def install_tinytown(log=print) -> Path:
    """This tree, installed into the benchmark's venv as a user installs it (`pip install .`), for
    the rows that time `tt` commands: the project's .venv holds an editable install, whose import
    finder costs every `tt` ~8 ms that no user pays. Its dependencies go in once; the package is
    reinstalled on every run (a few seconds), so what is timed is the tree as it is. The `tt` path."""
    marker = VENV / ".tinytown-deps"
    pip = [str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    args = [*pip, str(REPO)] if not marker.exists() else [*pip, "--no-deps", "--force-reinstall", str(REPO)]
    try:
        subprocess.run(args, check=True, capture_output=True, timeout=900, env=clean_env(), cwd="/")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        raise PeersUnavailable(f"cannot install Tinytown into {VENV}: {exc}") from None
    marker.touch()
    return VENV / "bin" / "tt"


def _base_python() -> str:
    """The interpreter the project's venv was made from (so the peers run on the same Python)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if os.path.exists(base) else sys.executable


def versions() -> dict:
    out = subprocess.run([str(venv_python()), "-c",
                          "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in "
                          "('supervisor', 'rq', 'redis', 'matplotlib')} | {'python': sys.version.split()[0]}))"],
                         capture_output=True, text=True, env=clean_env(), cwd="/")
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


# --- supervisord -------------------------------------------------------------------------------

class Supervisord:
    """supervisord 4 running `sleep` programs with startsecs=0, autorestart=true."""

    def __init__(self, n: int):
        self.n = n
        self.dir = Path(tempfile.mkdtemp(prefix="sdb-"))
        self.conf = self.dir / "supervisord.conf"
        self.conf.write_text(f"""\
[unix_http_server]
file={self.dir}/supervisor.sock

[supervisord]
nodaemon=true
logfile={self.dir}/supervisord.log
pidfile={self.dir}/supervisord.pid
loglevel=warn
childlogdir={self.dir}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{self.dir}/supervisor.sock

[program:s]
command=sleep 100000
process_name=%(program_name)s_%(process_num)02d
numprocs={n}
startsecs=0
autorestart=true
stopsignal=TERM
stdout_logfile=NONE
stderr_logfile=NONE
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen([str(VENV / "bin" / "supervisord"), "-c", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=clean_env(), cwd=str(self.dir))
        return self.proc

    def children(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []
        out = []
        for k in kids:
            try:
                if k.status() != psutil.STATUS_ZOMBIE and k.name() == "sleep":
                    out.append(k)
            except psutil.Error:
                pass
        return out

    def wait_up(self, timeout: float = 60.0, interval: float = 0.002) -> None:
        wait_until(lambda: len(self.children()) >= self.n, timeout, interval, f"supervisord's {self.n} programs")

    def shutdown(self) -> None:
        """`supervisorctl shutdown` and wait for supervisord to exit (it stops its programs first)."""
        run_timed([str(VENV / "bin" / "supervisorctl"), "-c", str(self.conf), "shutdown"], 60, check=False,
                  env=clean_env(), cwd=str(self.dir))
        wait_exit(self.proc, 60)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for k in self.children():
                try:
                    k.kill()
                except psutil.Error:
                    pass
            self.proc.kill()
            self.proc.wait(10)
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- RQ ------------------------------------------------------------------------------------------

def run_rq(mode: str, redis_binary: str, **params) -> dict:
    """Run rq_side/rq_peer.py in the bench venv; it starts its own redis-server and workers."""
    work = Path(tempfile.mkdtemp(prefix="rqb-"))
    args = [str(venv_python()), str(BENCH_DIR / "rq_side" / "rq_peer.py"), mode, "--redis-server", redis_binary,
            "--dir", str(work)]
    for key, value in params.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    try:
        out = subprocess.run(args, capture_output=True, text=True, env=clean_env(), cwd=str(work), timeout=600)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(f"rq_peer {mode} failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def uss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_full_info().uss / 1e6


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


