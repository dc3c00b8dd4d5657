"""Host loss: two hosts (each a copy of the town folder and `tt start --host NAME`) share one
password-protected redis-server; the host running a task is SIGKILLed whole (supervisor, runner,
CLI), and the row is the time until that task's CLI runs again on the other host, as Redis records
it (the task `running`, one more attempt, the agent placed there). Measured with small leases
([cluster] lease_ttl = 1 s, lease_renew = 0.2 s): detection is bounded by lease_ttl + lease_renew,
the rest is the reaper's one script, a nudge, a fork and a CLI's start. The killed host is started
again for the next repetition, which kills the other one. No peer: nothing comparable is installed.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from tinytown.supervisor.config import init_town, load
from tinytown.supervisor.resp import RespClient
from tinytown.supervisor.town import Town

from .common import Row, clean_env, wait_until
from .town import tt_command

LEASE_TTL = 1.0
LEASE_RENEW = 0.2
PASSWORD = "bench-hosts-pw"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Host:
    def __init__(self, tmp: Path, name: str, url: str):
        self.name, self.root = name, tmp / f"host-{name}"
        init_town(self.root, "hostbench", "claude", 10)
        path = self.root / "tinytown.toml"
        text = path.read_text().replace('socket_path = "redis.sock"', f'socket_path = "redis.sock"\nurl = "{url}"', 1)
        path.write_text(text + f'\n[cluster]\nlease_ttl = {LEASE_TTL}\nlease_renew = {LEASE_RENEW}\n'
                        '[agent_clis.bench]\ncommand = ["sleep", "3600"]\nprompt = "stdin"\n')
        path.chmod(0o600)
        self.config = load(self.root)
        self.town = Town(self.config)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(tt_command("start", "--host", self.name), cwd=self.root, env=clean_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until(lambda: self.town.hosts.states().get(self.name) == "live", 30, 0.01, f"host {self.name} live")

    def kill(self) -> None:
        try:
            top = psutil.Process(self.proc.pid)
            tree = [top, *top.children(recursive=True)]
        except psutil.Error:
            tree = []
        for sig in (signal.SIGSTOP, signal.SIGKILL):  # all at once, as a machine dies
            for proc in tree:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def measure(reps: int, redis_binary: str) -> list[float]:
    """Seconds from SIGKILL of the host running a task to that task's CLI running on the other."""
    tmp = Path(tempfile.mkdtemp(prefix="ttb-hosts-"))
    port = _free_port()
    redis = subprocess.Popen([redis_binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=str(tmp))
    redis.stdin.write(f"port {port}\nbind 127.0.0.1\nrequirepass {PASSWORD}\nsave \"\"\nappendonly no\n"
                      f"dir {tmp}\n".encode())
    redis.stdin.close()
    hosts: list[_Host] = []
    samples = []
    try:
        wait_until(lambda: _answers(port), 20, 0.01, "the shared redis-server")
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}"
        hosts = [_Host(tmp, "a", url), _Host(tmp, "b", url)]
        for host in hosts:
            host.start()
        town = hosts[0].town
        town.spawn("w", "bench", host="")
        for _ in range(reps):
            where = town.agent("w").host
            doomed = next(h for h in hosts if h.name == where)
            other = next(h for h in hosts if h.name != where)
            task = town.assign("w", "hold").id
            wait_until(lambda: town.task(task).state == "running", 30, 0.005, "the task to run")
            doomed.kill()
            t0 = time.monotonic()
            wait_until(lambda: town.task(task).attempts == 2 and town.task(task).state == "running"
                       and town.agent("w").host == other.name, 60, 0.002, "the task to run on the other host")
            samples.append(time.monotonic() - t0)
            town.coordination.cancel(task)  # its CLI sleeps: let the agent be free for the next one
            town.nudge()
            wait_until(lambda: town.task(task).state == "cancelled", 30, 0.005, "the cancel")
            doomed.start()
    finally:
        for host in hosts:
            host.stop()
        redis.kill()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return samples


def _answers(port: int) -> bool:
    client = RespClient(host="127.0.0.1", port=port, password=PASSWORD, timeout=1)
    try:
        return client.ping()
    except Exception:  # noqa: BLE001 - not up yet
        return False
    finally:
        client.close()


def hostloss(size: dict, ctx) -> list[Row]:
    """Host SIGKILLed -> its running task's CLI running again on another host (lease_ttl 1 s)."""
    row = Row("hostloss", f"host killed -> its task running on another host (lease_ttl {LEASE_TTL:g} s)", "s",
              target="p50 <= lease_ttl + 2 s", latency=True)
    row.tt = measure(size.get("hostloss_reps", 1), ctx.redis_binary)
    return [row.judge(absolute=lambda v: v <= LEASE_TTL + 2.0)]
