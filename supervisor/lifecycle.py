"""Starting and stopping a town's supervisor from a `tt` command."""
from __future__ import annotations

import functools
import os
import select
import sys
import time

from . import lock
from .config import Config, ensure_runtime_dir
from .errors import TinytownError
from .procutil import wait_until
from .stopping import Card, StopMode, ask, read_report, signal_to_stop, stop_wait, wait_stopped

START_TIMEOUT = 30.0
STOP_ELSEWHERE_SLACK = 10.0  # beyond the runners' grace: other hosts' supervisors ending, seen through Redis
STOP_ELSEWHERE_ROUNDS = 3    # stop requests at most, each for the hosts live at the time


def running_pid(config: Config) -> int | None:
    """The supervisor's pid if one holds this town's lock, else None."""
    if not config.runtime_dir.exists():
        return None
    if not config.runtime_dir.is_dir():
        raise TinytownError(f"{config.runtime_dir} is not a folder (the town keeps its runtime files there): "
                            "move it away")
    return lock.holder(config.runtime_dir)


def ensure_running(config: Config, say=None) -> bool:
    """Start a background supervisor unless one runs; True if this call started it.

    One that is stopping is neither waited out nor followed by a new one: what the command writes
    goes into the town's Redis, up until the stop ends, and waits there for the next `tt start`.
    (Started again, the town would undo the user's `tt stop`; and an agent's own `tt assign`
    while its town stops would hold the stop up for the whole grace, waiting for it.)
    """
    if running_pid(config):
        state = _wait_ready(config, stopping_too=True)
        if state == "stopping" and say:
            say(f"town {config.name!r} is stopping: this waits in it for the next `tt start`")
        if state:
            return False
    else:
        elsewhere = _hosts_elsewhere(config)
        if elsewhere is not None:
            if say and not any(state == "live" for state in elsewhere.values()):
                say(f"town {config.name!r} runs on host(s) {', '.join(sorted(elsewhere))}, none running now: this "
                    "waits for `tt start` in one of their folders (or here, to add this machine as a host)")
            return False
    return _start_background(config, say)


def _hosts_elsewhere(config: Config) -> dict[str, str] | None:
    """The town's hosts by state, when a command in this folder must not start a supervisor here:
    a town on a shared Redis that runs on other hosts, or whose hosts are other machines' (this
    folder never was one: a laptop with the town's config). Starting here would add this machine
    to the town as a host, which only `tt start` does. None when it may start here."""
    if not config.redis_url:
        return None
    from .resp import RespError, connect
    from .town import Town
    here = host_here(config)  # (its own lease may outlive a killed supervisor: that is not elsewhere)
    try:
        client = connect(config)
    except RespError:  # (unreachable: starting here says why, as before)
        return None
    try:
        states = Town(config, client).hosts.states()
    except RespError:
        return None
    finally:
        client.close()
    others = {name: state for name, state in states.items() if name != here}
    if any(state == "live" for state in others.values()) or (others and here not in states):
        return others
    return None


# What a runner puts in its CLI's environment. A supervisor started by an agent's own `tt` (an
# agent working on a project that runs a town of its own) must not carry them: they name the
# agent's town, whose supervisor kills processes that carry them when they are left over.
AGENT_MARKERS = ("TT_TOWN", "TT_TOWN_DIR", "TT_AGENT", "TT_AGENT_ID", "TT_TASK_ID")


def supervisor_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in AGENT_MARKERS}


def _start_background(config: Config, say) -> bool:
    import subprocess  # only when starting one: `tt list` and `tt stop` skip the import
    ensure_runtime_dir(config.runtime_dir)
    log_path = config.supervisor_log
    read_fd, write_fd = os.pipe()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            # -P (3.11+): the town folder must not shadow our packages on sys.path.
            [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "tinytown.supervisor.daemon",
             str(config.root), "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_fd,),
            start_new_session=True, cwd=str(config.root), env=supervisor_env(),
        )
    os.close(write_fd)
    line = _read_line(read_fd, START_TIMEOUT)
    os.close(read_fd)
    if line.startswith("ok"):
        if say:
            say(f"started the town's supervisor in the background (pid {proc.pid}; log {log_path})")
        return True
    if line.startswith("running"):  # another command started it a moment ago
        proc.wait()
        if not _wait_ready(config):
            raise TinytownError("the town's supervisor stopped while starting; see .tt/supervisor.log")
        return False
    if line.startswith("error"):
        proc.wait()
        raise TinytownError(f"the supervisor could not start: {line[6:].strip()}")
    code = proc.poll()
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
    raise TinytownError("the supervisor did not start" + (f" (exit {code})" if code is not None else "")
                        + (f": {tail[0]}" if tail else f"; see {log_path}"))


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def wait_serving(config: Config) -> None:
    """For a command that reads: a supervisor holding the lock whose redis-server has no socket yet is
    still starting (it may first be killing a dead supervisor's leftover runners): wait for it."""
    if config.use_socket and not config.redis_socket.exists():
        _wait_ready(config)


def wait_recorded(config: Config, town) -> None:
    """Redis answers, but a supervisor that just started may not have written its record yet (what
    is there is its predecessor's `stopped`): wait for it, so a read shows this supervisor."""
    if town.r.hget(town.keys.supervisor, "state") not in ("running", "stopping") and running_pid(config):
        _wait_ready(config)


def _wait_ready(config: Config, timeout: float = START_TIMEOUT, stopping_too: bool = False) -> str:
    """Wait until a running supervisor reports `running` in Redis (or, stopping_too, `stopping`):
    that state, "" if it exits instead."""
    from .keys import Keys
    from .resp import connect  # (not redis-py: a command that only reads must stay quick)

    keys = Keys(config.name)
    client = connect(config)
    seen = [""]
    here = functools.cache(lambda: host_here(config))  # (asked once, and only where the record is another's)

    def ready() -> bool:
        holder = running_pid(config)
        if not holder:
            return True  # it went away (it was stopping)
        try:
            state, pid = client.execute_command("HMGET", keys.supervisor, "state", "pid")
            if pid != str(holder) and _host_live(client, keys, here(), holder):
                # The town's record is another host's (a town on a shared Redis: the last to
                # start or stop wrote it); this folder's supervisor holds a live lease of its own.
                state = "running"
        except Exception:
            return False
        seen[0] = state = state or ""
        if not state:
            _refuse_a_rename(config)
        return state == "running" or (stopping_too and state == "stopping")

    try:
        if not wait_until(ready, timeout):
            raise TinytownError("the town's supervisor is running but not ready; see .tt/supervisor.log")
    finally:
        client.close()
    return seen[0] if running_pid(config) else ""


def _host_live(client, keys, host: str, pid: int) -> bool:
    """Whether this folder's host (host_here: the name its supervisor runs as) holds a live
    lease under supervisor `pid` (supervisor/hosts.py)."""
    state, found = client.execute_command("HMGET", keys.host(host), "state", "pid")
    return state == "live" and found == str(pid)


def _refuse_a_rename(config: Config) -> None:
    """The supervisor holding this folder's lock has no record under tinytown.toml's name: if its
    lock card names another town (the name was edited while it ran), say so now, not after a wait."""
    card = _card(config)
    if card is not None and card.name != config.name:
        raise TinytownError(f"this town runs as {card.name!r}, but tinytown.toml now names it {config.name!r}: "
                            f"put the name back while it runs (its records are kept under {card.name!r}), then "
                            "`tt stop` before renaming")


def stop(config: Config, now: bool = False, timeout: float | None = None) -> dict | None:
    """Ask the supervisor to stop and wait until it has; the stop report, or None if not running.
    (`tt stop` itself first tries stopping.ask_from_lock, which needs no config.)"""
    pid = running_pid(config)
    if not pid:
        return _stop_elsewhere(config, now, timeout) if config.redis_url else None
    from .keys import Keys
    from .resp import connect
    card = _card(config)  # (the supervisor's own: its runners' grace may outlast an edited file's)
    grace = max(config.supervisor.stop_grace, card.stop_grace if card else 0.0)
    wait = timeout if timeout is not None else stop_wait(grace, now)
    town, others = None, []
    try:
        if config.redis_url:  # (the request is the town's: the other hosts stop too, and are said)
            from .town import Town
            town = Town(config, connect(config))
            me = host_here(config)
            others = [h["name"] for h in town.hosts.listing() if h["state"] == "live" and h["name"] != me]
        ask(town.r if town else connect(config), Keys(config.name), StopMode.NOW if now else StopMode.GRACEFUL)
    except Exception:  # noqa: BLE001 - Redis is unreachable: a signal still reaches a local supervisor
        others = []  # (nor did the request reach the other hosts)
        signal_to_stop(pid)
    wait_stopped(config.runtime_dir, pid, wait)
    report = read_report(config.last_stop_file)
    if others:
        report["other_hosts"] = _stopped_hosts(town, others, wait + STOP_ELSEWHERE_SLACK)
    return report


def host_here(config: Config) -> str:
    """This folder's host in the town: while its supervisor runs, the name that one took (`tt start
    --host` wins over [cluster] host, and it writes the name down at its start); else the name its
    next start takes (config.host_name). Commands ask this, never config.host_name() alone: a
    supervisor started with --host was taken for another host by its own folder's commands."""
    if running_pid(config):
        try:
            return config.host_file.read_text(encoding="utf-8").strip() or config.host_name()
        except (OSError, UnicodeDecodeError):
            pass
    return config.host_name()


def _stopped_hosts(town, names: list[str], wait: float) -> dict:
    """Wait (up to `wait`) for hosts asked to stop to be live no more: {"hosts": those stopped,
    "not_stopped": {name: state}} (a host that died meanwhile lapses: it did not stop; one that
    still runs is `live`). A Redis gone meanwhile: what was known, each host `unknown`."""
    from .resp import RespError
    try:
        wait_until(lambda: not any(town.hosts.states().get(name) == "live" for name in names), wait)
        states = town.hosts.states()
    except RespError:
        states = {}
    return {"hosts": [name for name in names if states.get(name) == "stopped"],
            "not_stopped": {name: states.get(name, "unknown") for name in names if states.get(name) != "stopped"}}


def _stop_elsewhere(config: Config, now: bool, timeout: float | None) -> dict | None:
    """`tt stop` in a folder whose town runs on other hosts only (a shared Redis, no supervisor
    here): the town's one stop request, as from any host's folder, then a wait until no host is
    live. {"hosts": [the names stopped]}, or None if none was live. Each host's own report stays
    in its folder."""
    from .resp import connect
    from .town import Town
    town = Town(config, connect(config))
    asked: list[str] = []
    # (a host that became live as the request was made took it as older than its start: asked again)
    for _ in range(STOP_ELSEWHERE_ROUNDS):
        live = town.hosts.live()
        if not live:
            break
        asked += [name for name in live if name not in asked]
        ask(town.r, town.keys, StopMode.NOW if now else StopMode.GRACEFUL)
        # (a host stops once its runners have: their grace, then its own redis-free shutdown)
        wait = (timeout if timeout is not None else stop_wait(config.supervisor.stop_grace, now)) + STOP_ELSEWHERE_SLACK
        if not wait_until(lambda: not any(town.hosts.states().get(name) == "live" for name in live), wait):
            still = [name for name in live if town.hosts.states().get(name) == "live"]
            raise TinytownError(f"asked the town to stop, but host(s) {', '.join(still)} still run after {wait:g}s "
                                "(`tt status` shows them; each stops with Ctrl+C or SIGTERM to its `tt start`)")
    if not asked:
        return None
    return _stopped_hosts(town, asked, 0)


def reload(config: Config, timeout: float = 10.0) -> tuple[str, str] | None:
    """Ask the running supervisor to read tinytown.toml again and wait for its answer:
    (error, note) as it recorded them, or None if the town is not running."""
    if not running_pid(config):
        return None
    from .resp import connect
    from .town import Town

    town = Town(config, connect(config))
    wait_recorded(config, town)
    asked = town.ask_reload()
    answered = {}

    def done() -> bool:
        info = town.supervisor_info()
        if int(info.get("reloads_done") or 0) >= asked:
            answered.update(info)
            return True
        return not running_pid(config)

    if not wait_until(done, timeout) or not answered:
        raise TinytownError("the town's supervisor did not answer the reload; see .tt/supervisor.log")
    return answered.get("config_error", ""), answered.get("config_note", "")


def _card(config: Config) -> Card | None:
    """What the running supervisor wrote into its lock for `tt stop` (stopping.Card), if any."""
    try:
        pid, raw = lock.holder_and_card(config.runtime_dir)
    except OSError:
        return None
    return Card.decode(raw) if pid and raw else None
