"""Tinytown's side of the benchmark: a real town in a temp folder, observed through its Redis.

"A runner waits on its inbox" is observed as Redis sees it: a client blocked in BLMOVE (CLIENT LIST
for counts, MONITOR for the exact moment a new runner issues its first BLMOVE).
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tinytown.supervisor import lifecycle
from tinytown.supervisor.config import Config, init_town, load
from tinytown.supervisor.town import Town

from .common import clean_env, run_timed, wait_exit, wait_until

TT = str(Path(sys.executable).with_name("tt"))  # (the bench's own install of the tree, once it has one)


def tt_command(*args: str) -> list[str]:
    """The installed `tt` (as a user runs it), else `python -m tinytown.cli.main`."""
    if os.access(TT, os.X_OK):
        return [TT, *args]
    return [sys.executable, "-m", "tinytown.cli.main", *args]


class BenchTown:
    """A town in a fresh temp folder with a `bench` CLI preset; stopped and removed by close()."""

    def __init__(self, cli: list[str], max_agents: int = 60, extra: str = "", name: str = "bench"):
        self.tmp = Path(tempfile.mkdtemp(prefix="ttb-"))
        self.root = self.tmp / "t"
        init_town(self.root, name, "claude", max_agents)
        command = ", ".join(f'"{part}"' for part in cli)
        with (self.root / "tinytown.toml").open("a") as fh:
            # start_seconds = 0: like supervisord's startsecs=0, any exit counts as a start, so a
            # killed runner comes back at once however often it is killed.
            fh.write(f'\n[supervisor]\nstart_seconds = 0\n{extra}\n'
                     f'[agent_clis.bench]\ncommand = [{command}]\nprompt = "stdin"\n')
        self.config: Config = load(self.root)
        self.town: Town | None = None
        self.fg: subprocess.Popen | None = None

    # --- life cycle --------------------------------------------------------------------------
    def start_background(self) -> None:
        lifecycle.ensure_running(self.config)
        self.town = Town(self.config)

    def spawn(self, n: int, prefix: str = "a") -> list[str]:
        names = [f"{prefix}{i}" for i in range(n)]
        for name in names:
            self.town.spawn(name, "bench")
        self.wait_blocked(n)
        return names

    def start_foreground(self) -> subprocess.Popen:
        """`tt start` as a user runs it (the supervisor in the foreground)."""
        self.fg = subprocess.Popen(tt_command("start", "--town", str(self.root)), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(),
                                   cwd=str(self.root))
        return self.fg

    def stop_cli(self) -> None:
        """`tt stop` as a user runs it: returns once the supervisor has exited."""
        run_timed(tt_command("stop", "--town", str(self.root)), 120, env=clean_env())
        if self.fg is not None:
            wait_exit(self.fg, 30)
            self.fg = None
        self.town = None

    def close(self) -> None:
        try:
            if lifecycle.running_pid(self.config):
                lifecycle.stop(self.config, now=True, timeout=30)
        except Exception:
            pass
        if self.fg is not None:
            try:
                self.fg.kill()
                self.fg.wait(5)
            except Exception:
                pass
        for proc in psutil.process_iter(["cwd", "cmdline"]):
            try:
                if str(self.root) in (proc.info["cwd"] or "") or str(self.root) in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
            except (psutil.Error, OSError):
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- observation -------------------------------------------------------------------------
    def connect(self) -> Town:
        self.town = Town(self.config)
        return self.town

    def blocked_count(self) -> int:
        """Clients blocked in BLMOVE right now: runners waiting on their inbox."""
        try:
            clients = self.town.r.client_list()
        except Exception:
            return -1
        return sum(1 for c in clients if c.get("cmd") == "blmove" and "b" in c.get("flags", ""))

    def wait_blocked(self, n: int, timeout: float = 60.0, interval: float = 0.002) -> None:
        wait_until(lambda: self.blocked_count() >= n, timeout, interval, f"{n} runners waiting on their inbox")

    def supervisor_pid(self) -> int:
        return int(self.town.r.hget(self.town.keys.supervisor, "pid"))

    def runner_pids(self) -> list[int]:
        return [a.pid for a in self.town.agents() if a.pid]


def wait_socket(path: Path, timeout: float) -> None:
    """Until redis-server accepts connections on `path`."""
    def up():
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False
        finally:
            s.close()
    wait_until(up, timeout, 0.002, f"redis on {path}")


class Monitor:
    """A raw MONITOR connection: tells the moment Redis runs a given command (no polling)."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.sendall(b"MONITOR\r\n")
        self.buf = b""
        self._read_until(lambda: b"+OK\r\n" in self.buf, 5.0)
        self.buf = self.buf.split(b"+OK\r\n", 1)[1]

    def _read_until(self, done, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("MONITOR connection closed")
                self.buf += data
        return True

    def clear(self) -> None:
        self.sock.setblocking(False)
        try:
            while self.sock.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        self.buf = b""

    def wait_command(self, needle: bytes, timeout: float) -> float:
        """Monotonic time at which a line containing `needle` (lower-cased match) arrived."""
        needle = needle.lower()

        def found():
            lines = self.buf.split(b"\n")
            for i, line in enumerate(lines[:-1]):
                if needle in line.lower():
                    self.buf = b"\n".join(lines[i + 1:])
                    return True
            self.buf = lines[-1]
            return False

        if not self._read_until(found, timeout):
            raise TimeoutError(f"no {needle!r} within {timeout}s")
        return time.monotonic()

    def close(self) -> None:
        self.sock.close()


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
