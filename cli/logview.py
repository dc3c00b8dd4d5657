"""`tt logs`: choose where output comes from (this machine's log files, or the town's Redis), then
print it like `tail -f` for one agent and like `docker compose logs` (`agent | line`) for several.
"""
from __future__ import annotations

import os
import re
import sys
import time
from datetime import datetime

import click

from tinytown.supervisor.config import Config, validate_name
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.log_readers import LogFile, OutputStream, cut_lines

from tinytown.supervisor.terminal_text import clean_line

from tinytown.cli.entry import cannot_reach

POLL_SECONDS = 0.02          # how often followed files are checked: a new line shows within this
PARTIAL_SECONDS = 0.3        # a line without its newline yet (a prompt) is shown after this pause
RESCAN_SECONDS = 1.0         # how often "all agents" looks for agents spawned since
COLOURS = ("cyan", "yellow", "green", "magenta", "blue", "red")


class Printer:
    """Assembles each agent's bytes into lines and writes them, prefixed when there are several."""

    def __init__(self, out, prefix: bool, colour: bool, raw: bool):
        self.out = out
        self.prefix = prefix
        self.colour = colour
        self.raw = raw
        self.names: list[str] = []
        self.pending: dict[str, bytearray] = {}
        self.pending_since: dict[str, float] = {}

    def add(self, name: str) -> None:
        if name not in self.pending:
            self.names.append(name)
            self.pending[name] = bytearray()

    def feed(self, name: str, data: bytes) -> None:
        if not data:
            return
        if self.raw and not self.prefix:  # bytes as the CLI wrote them, as soon as they come
            self.out.write(data)
            return
        self.add(name)
        buf = self.pending[name]
        buf += data
        end = buf.rfind(b"\n")
        if end >= 0:
            for line in bytes(buf[:end]).split(b"\n"):
                self._line(name, line, True)
            del buf[:end + 1]
        if buf:
            self.pending_since.setdefault(name, time.monotonic())
        else:
            self.pending_since.pop(name, None)

    def flush_partial(self, force: bool = False) -> None:
        """Show lines still waiting for their newline after a pause (a prompt), or all of them."""
        now = time.monotonic()
        for name, since in list(self.pending_since.items()):
            if force or now - since >= PARTIAL_SECONDS:
                self._line(name, bytes(self.pending[name]), self.prefix)
                self.pending[name].clear()
                del self.pending_since[name]

    def next_partial(self) -> float | None:
        """Seconds until a waiting partial line is due, or None."""
        if not self.pending_since:
            return None
        return max(0.0, min(self.pending_since.values()) + PARTIAL_SECONDS - time.monotonic())

    def _line(self, name: str, line: bytes, newline: bool) -> None:
        if not self.raw:
            line = clean_line(line)
        head = b""
        if self.prefix:
            width = max(len(n) for n in self.names)
            text = f"{name:<{width}} | "
            if self.colour:
                text = click.style(text, fg=COLOURS[self.names.index(name) % len(COLOURS)])
            head = text.encode()
        self.out.write(head + line + (b"\n" if newline else b""))


def parse_since(text: str) -> float:
    """Epoch seconds from "90s", "10m", "2h", "1d", a bare number of seconds, or an ISO date/time;
    anything before 1970 is 0 (all of it), since Redis's stream ids start there."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if found:
        ago = float(found[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found[2]]
        return max(0.0, time.time() - ago)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        try:  # a time of day today, "14:30" or "14:30:05"
            clock = datetime.strptime(text.strip(), "%H:%M:%S" if text.count(":") == 2 else "%H:%M")
        except ValueError:
            raise TinytownError(f"--since {text!r}: use a duration (90s, 10m, 2h, 1d) or a time "
                                "(14:30, 2026-11-24T14:30)") from None
        when = datetime.now().replace(hour=clock.hour, minute=clock.minute, second=clock.second, microsecond=0)
    try:
        return max(0.0, when.timestamp())
    except (ValueError, OverflowError, OSError):  # year 1: out of the platform's range, long before 1970
        return 0.0


# --- sources ------------------------------------------------------------------------------------
def _redis(config: Config):
    """A client for the town's Redis with bytes replies (output is the CLI's bytes), or None when
    it cannot be reached. Asked once, without retries: the follow loop retries on its own."""
    from tinytown.supervisor.resp import RespConnectionError, connect
    client = connect(config, timeout=2, decode=False)
    try:
        client.ping()
    except RespConnectionError:
        return None
    return client


def _registry(config: Config, client) -> dict[str, str]:
    from tinytown.supervisor.keys import Keys
    return {k.decode(): v.decode() for k, v in client.hgetall(Keys(config.name).agent_index).items()}


def _local_names(config: Config) -> list[str]:
    try:
        return sorted(p.name[:-4] for p in config.log_dir.iterdir() if p.name.endswith(".log"))
    except OSError:
        return []


def show(config: Config, names: list[str], *, lines: int | None, follow: bool, task: str | None,
         since: str | None, raw: bool, colour: bool, from_redis: bool, out=None) -> None:
    """The whole `tt logs` command (see cli/main.py for the options)."""
    out = out or sys.stdout.buffer
    for name in names:
        validate_name("agent", name)
    since_at = parse_since(since) if since else None
    if lines is None:
        lines = None if (since or task) else 100
    client = _redis(config)
    local = _local_names(config)
    snapshot = None
    if client is None and (task or from_redis or since_at is not None or not local):
        from tinytown.supervisor.snapshot import open_snapshot
        snapshot = open_snapshot(config)  # a stopped town: its output as Redis last recorded it
        if snapshot is not None:
            config, client = snapshot.config, snapshot.client(decode=False)
            click.echo(f"tt logs: town {config.name!r} is stopped: its output as last recorded"
                       + (" (nothing more to follow)" if follow else ""), err=True)
            follow = False
    if follow and client is None and snapshot is None:
        from tinytown.supervisor.lifecycle import running_pid
        if not running_pid(config):  # no runner here will write another byte: as with the copy above
            click.echo(f"tt logs: town {config.name!r} is stopped: nothing more to follow", err=True)
            follow = False
    try:
        _show(config, client, names, local, lines, follow, task, since_at, raw, colour, from_redis, out)
    finally:
        if snapshot is not None:
            snapshot.close()


def _show(config, client, names, local, lines, follow, task, since_at, raw, colour, from_redis, out) -> None:
    if task:
        if client is None:
            raise cannot_reach(config)
        return _show_task(config, client, task, lines, since_at, follow, raw, out)
    registry = _registry(config, client) if client is not None else {}
    all_agents = not names
    if all_agents:
        names = sorted(set(registry) | set(local))
    for name in names:
        if name not in registry and name not in local:  # (a shared Redis out of reach: no registry to ask)
            if client is None and config.redis_url:
                raise cannot_reach(config)
            raise TinytownError(f"no agent named {name!r} (see `tt list`)")
    printer = Printer(out, prefix=all_agents or len(names) > 1, colour=colour, raw=raw)
    for name in names:
        printer.add(name)
    # The files hold what this machine's runners wrote: enough when every agent followed has one
    # here. An agent served by another host (or not started yet) has only its Redis stream, which
    # holds every agent's output, so then all of them are read from there.
    if client is not None and local:  # (a log left by a runner that ran here before: not where it runs now)
        from tinytown.supervisor.hosts import placed_elsewhere
        moved = placed_elsewhere(config, client, [registry[n] for n in names if n in registry and n in local])
        local = [n for n in local if registry.get(n) not in moved]
    here = set(names) <= set(local)
    use_redis = from_redis or since_at is not None or (client is not None and not here)
    try:
        if use_redis:
            if client is None:
                raise cannot_reach(config)
            _from_stream(config, client, registry, names, all_agents, printer, lines, since_at, follow)
        else:
            _from_files(config, names, all_agents, printer, lines, follow)
    finally:
        printer.flush_partial(force=True)
        out.flush()


def _from_files(config, names, all_agents, printer, lines, follow) -> None:
    files = {name: LogFile(config.log_file(name)) for name in names}

    def age(name):
        try:
            return config.log_file(name).stat().st_mtime
        except OSError:
            return 0.0

    for name in sorted(names, key=age):  # no times in the files: the least recently active first
        printer.feed(name, files[name].start(lines))
    printer.out.flush()
    rescan = time.monotonic() + RESCAN_SECONDS
    while follow:
        for name, log in files.items():
            printer.feed(name, log.read())
        printer.flush_partial()
        printer.out.flush()
        if all_agents and time.monotonic() >= rescan:
            rescan = time.monotonic() + RESCAN_SECONDS
            for name in _local_names(config):
                if name not in files:  # spawned since we started: all of its output is new
                    files[name] = LogFile(config.log_file(name))
                    printer.add(name)
        time.sleep(POLL_SECONDS)


def _from_stream(config, client, registry, names, all_agents, printer, lines, since_at, follow) -> None:
    from tinytown.supervisor.keys import Keys
    from tinytown.supervisor.resp import RespConnectionError
    keys = Keys(config.name)
    stream = OutputStream(client, keys, {n: registry[n] for n in names if n in registry})
    for name, data in stream.history(lines, since_at):
        printer.feed(name, data)
    printer.out.flush()
    rescan = time.monotonic() + RESCAN_SECONDS
    link = RedisLink("tt logs")
    while follow:
        wait = printer.next_partial()
        try:
            batch = stream.read(block_ms=int(1000 if wait is None else max(1, wait * 1000)))
            if all_agents and time.monotonic() >= rescan:
                rescan = time.monotonic() + RESCAN_SECONDS
                for name, agent_id in _registry(config, client).items():
                    if keys.output(agent_id) not in stream.names:
                        stream.add(name, agent_id)
                        printer.add(name)
        except (RespConnectionError, OSError):  # (Redis restarting, or loading its data again)
            link.lost()
            continue
        link.back()
        for name, data in batch:
            printer.feed(name, data)
        printer.flush_partial()
        printer.out.flush()


def _show_task(config, client, task_ref, lines, since_at, follow, raw, out) -> None:
    """One task's output from the Redis stream; until it finishes with --follow."""
    from tinytown.supervisor.keys import Keys
    from tinytown.supervisor.models import TaskState
    from tinytown.supervisor.town import Town
    town = Town(config)
    task = town.task(task_ref)
    stream = OutputStream(client, Keys(config.name), {task.agent: task.agent_id}, task=task.id)
    printer = Printer(out, prefix=False, colour=False, raw=raw)
    data = b"".join(d for _, d in stream.history(lines, since_at))
    kept = task.output.encode("utf-8", "surrogateescape")
    if TaskState(task.state).terminal and len(kept) > len(data) and since_at is None:
        data = cut_lines(kept, lines)  # the stream was trimmed; the task keeps a tail
    printer.feed(task.agent, data)
    while follow and not TaskState(town.task(task.id).state).terminal:
        for name, chunk in stream.read(block_ms=200):
            printer.feed(name, chunk)
        printer.flush_partial()
        out.flush()
    for name, chunk in (stream.read(block_ms=1) if follow else []):  # what came with the finish
        printer.feed(name, chunk)
    printer.flush_partial(force=True)
    out.flush()


def task_output_so_far(config: Config, task) -> str:
    """A running task's output until now (its last 64 KiB, whole lines), from its agent's stream:
    the task itself keeps its output only once it ends."""
    from tinytown.supervisor.keys import Keys
    from tinytown.supervisor.resp import connect
    from tinytown.supervisor.town import OUTPUT_TAIL_BYTES
    client = connect(config, decode=False)
    try:
        stream = OutputStream(client, Keys(config.name), {task.agent: task.agent_id}, task=task.id)
        data = b"".join(d for _, d in stream.history(None))
    finally:
        client.close()
    if len(data) > OUTPUT_TAIL_BYTES:
        data = data[-OUTPUT_TAIL_BYTES:]
        data = data[data.find(b"\n") + 1:]
    return data.decode("utf-8", "surrogateescape")


class RedisLink:
    """A follower's word on its connection: once when the town's Redis goes away (it then waits
    a moment before trying again), once when it is back; `tt logs -f` and `tt events -f` share it."""

    def __init__(self, command: str):
        self.command = command
        self.down = False

    def lost(self) -> None:
        if not self.down:
            click.echo(f"{self.command}: lost the town's Redis; retrying", err=True)
        self.down = True
        time.sleep(0.5)  # (the pace of the retries, not a synchronisation)

    def back(self) -> None:
        if self.down:
            click.echo(f"{self.command}: reconnected", err=True)
            self.down = False


def colour_wanted(no_color: bool) -> bool:
    return not no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()
