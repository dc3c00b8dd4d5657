"""Shared test helpers: a real town in a temp folder, driven through the real `tt` command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
FAKE_BIN = REPO / "fixtures" / "bin"
FAKE_AGENT = REPO / "fixtures" / "fake_agent.py"

FAST_POLICY = """
[supervisor]
backoff_first = 0.05
backoff_factor = 2.0
backoff_max = 1.0
start_seconds = 1.0
max_fast_failures = 4
max_attempts = 3
stop_grace = 10.0
heartbeat_interval = 0.5
heartbeat_stale = 5.0
"""


def wait_for(predicate, timeout: float = 20.0, message: str = "condition"):
    """Poll until `predicate()` is truthy; return its value or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def town_processes(root: Path) -> list[psutil.Process]:
    """Every live process that belongs to the town: cwd inside it, or its path on the command line."""
    root_s = str(root)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cwd = proc.info["cwd"] or ""
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, OSError):
            continue
        if cwd == root_s or cwd.startswith(root_s + "/") or root_s in cmd:
            found.append(proc)
    return found


def _wait_state(fetch, states, timeout: float, what: str) -> dict:
    """Fetch a record (a task's, an agent's) until its state is one of `states`; return it."""
    latest = {}

    def reached():
        latest["record"] = fetch()
        return latest["record"]["state"] in states

    wait_for(reached, timeout, f"{what} to reach {states}")
    return latest["record"]


class TownHarness:
    def __init__(self, root: Path):
        self.root = root
        self.record = root / "record"
        self.record.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        # The venv's bin next: the fake CLIs' `#!/usr/bin/env python3` then finds a real interpreter,
        # not a version-manager shim (pyenv's costs ~150 ms a task).
        self.env["PATH"] = os.pathsep.join([str(FAKE_BIN), str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.env["FAKE_AGENT_RECORD"] = str(self.record)
        self.env.pop("TT_TOWN_DIR", None)

    def tt(self, *args, input: bytes | str | None = None, check: bool = True, timeout: float = 60,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
        if isinstance(input, str):
            input = input.encode()
        proc = subprocess.run([sys.executable, "-m", "tinytown.cli.main", *args], cwd=cwd or self.root, env=self.env,
                              input=input, capture_output=True, timeout=timeout)
        proc.out = proc.stdout.decode(errors="replace")
        proc.err = proc.stderr.decode(errors="replace")
        if check and proc.returncode != 0:
            pytest.fail(f"tt {' '.join(map(str, args))[:200]} exited {proc.returncode}:\n{proc.err}\n{proc.out}")
        return proc

    def assign(self, agent: str, text: str) -> str:
        """`tt assign AGENT TEXT`; the new task's id."""
        return self.json("assign", agent, text)["id"]

    def json(self, *args):
        """`tt ARGS --json`, parsed (--json goes before a "--" among ARGS)."""
        args = list(args)
        at = args.index("--") if "--" in args else len(args)
        return json.loads(self.tt(*args[:at], "--json", *args[at:]).stdout)

    def append_config(self, text: str) -> None:
        with (self.root / "tinytown.toml").open("a") as fh:
            fh.write(text)

    def config(self):
        from tinytown.supervisor.config import load
        return load(self.root)

    def town(self):
        from tinytown.supervisor.town import Town
        return Town(self.config())

    def task(self, task_id: str) -> dict:
        return self.json("task", task_id)

    def wait_task(self, task_id: str, states=("completed", "failed"), timeout: float = 30.0) -> dict:
        return _wait_state(lambda: self.task(task_id), states, timeout, f"task {task_id}")

    def agent(self, name: str) -> dict:
        return next(a for a in self.json("list") if a["name"] == name)

    def wait_agent(self, name: str, states=("idle",), timeout: float = 30.0) -> dict:
        return _wait_state(lambda: self.agent(name), states, timeout, f"agent {name}")

    def supervisor_pid(self) -> int | None:
        from tinytown.supervisor import lock
        return lock.holder(self.root / ".tt")

    def recorded(self, task_id: str) -> tuple[dict, bytes]:
        info = json.loads((self.record / f"{task_id}.json").read_text())
        return info, (self.record / f"{task_id}.prompt").read_bytes()

    def cleanup(self) -> None:
        if (self.root / ".tt" / "supervisor.lock").exists() and self.supervisor_pid():
            self.tt("stop", "--now", check=False, timeout=60)
        for proc in town_processes(self.root):
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass


@pytest.fixture
def make_town(tmp_path):
    """Factory: an initialised town (fast restart policy) in a temp folder, stopped afterwards."""
    made = []

    def make(name: str = "testtown", extra: str = "", policy: str = FAST_POLICY, folder: str = "town"):
        root = tmp_path / folder
        root.mkdir(parents=True)
        harness = TownHarness(root)
        harness.tt("init", "--name", name)
        harness.append_config(policy + extra)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.cleanup()


@pytest.fixture
def town(make_town):
    return make_town()


class BareRedis:
    """A redis-server of its own on a unix socket (no town, no supervisor): for the store logic and
    the client itself. `args`: more of its options (e.g. --requirepass)."""

    def __init__(self, folder: Path, *args: str):
        from tinytown.supervisor.config import Config
        from tinytown.supervisor.redis_server import find_binary
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = str(folder / "redis.sock")
        self.proc = subprocess.Popen(
            [find_binary(Config(root=folder, name="bare")), "--port", "0", "--unixsocket", self.path,
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--dir", str(folder), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Until it answers: the socket file appears at bind(), a moment before listen() (a
        # connection in between is refused). One that never does is not left running.
        try:
            wait_for(lambda: self._answers() or self.proc.poll() is not None, 20, "redis-server to answer")
            assert self.proc.poll() is None, "redis-server exited at start"
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        from tinytown.supervisor.resp import ReplyError, RespClient, RespError
        client = RespClient(path=self.path, timeout=1)
        try:
            return client.ping()
        except ReplyError:  # (NOAUTH: it answers, it wants a password)
            return True
        except (RespError, OSError):
            return False
        finally:
            client.close()

    def client(self, **kwargs):
        from tinytown.supervisor.resp import RespClient
        return RespClient(path=self.path, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def bare_redis(tmp_path):
    """Factory: BareRedis(*args) in the test's temp folder, killed afterwards."""
    started = []

    def start(*args: str) -> BareRedis:
        server = BareRedis(tmp_path / f"redis{len(started)}", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
