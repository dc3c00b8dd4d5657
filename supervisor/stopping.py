"""Asking a running town to stop and waiting until it has: the one path every `tt stop` takes.

A user times `tt stop` end to end, and reading tinytown.toml is most of what the command itself
costs (the parser, the settings, dataclasses, pathlib: ~25 ms of ~70). So a supervisor, once it
serves, writes what a stop needs into its lock file (`card`: the town's name, its Redis socket,
how long a stop may take, where the report goes), and `tt stop` asks from that alone
(`ask_from_lock`), importing neither the config nor the models, and not even json before the
request is out: what it imports after that overlaps with the supervisor's own work. The card dies
with the lock: it never describes a supervisor that is gone. Where it cannot be used (no card yet,
a town on TCP or on a [redis] url, whose password or TLS only the config knows), lifecycle.stop
asks the same way with the config.
"""
from __future__ import annotations

import os
from collections import namedtuple
from enum import Enum

from . import lock
from .errors import TinytownError
from .town_dir import runtime_dir

GONE_WAIT = 10.0         # after the lock goes, the process itself is gone within a moment


class StopMode(str, Enum):
    """How a stop treats a running task: let it finish within stop_grace, put it back now, or (one
    agent's runner only: `tt interrupt`, `tt close`) let it finish however long it takes."""

    GRACEFUL = "graceful"
    NOW = "now"
    FINISH = "finish"


def stop_wait(stop_grace: float, now: bool) -> float:
    """How long `tt stop` waits for the supervisor: its own deadlines, and then some."""
    return (0.0 if now else stop_grace) + 30.0


class Card(namedtuple("Card", "name socket stop_grace report")):
    """What the supervisor writes into its lock file (lock.describe) for `tt stop`: the town's
    name, its Redis socket ("" for a Redis reached over TCP: `tt stop` then reads the config), its
    stop_grace, the stop report's path. Each field ends in a NUL: no path holds one, reading needs
    no json, and what a rewrite that shortened the card (a reload) has not yet cut off is ignored.
    (namedtuple, not typing.NamedTuple: importing typing costs `tt stop` ~2 ms.)"""

    __slots__ = ()

    def encode(self) -> bytes:
        return b"".join(os.fsencode(str(part)) + b"\0" for part in self)

    @classmethod
    def decode(cls, raw: bytes) -> "Card | None":
        parts = raw.split(b"\0")[:len(cls._fields) + 1]
        if len(parts) != len(cls._fields) + 1:     # (the last field's NUL missing: not all written)
            return None
        try:
            return cls(parts[0].decode(), os.fsdecode(parts[1]), float(parts[2]), os.fsdecode(parts[3]))
        except (UnicodeDecodeError, ValueError):
            return None


Asked = namedtuple("Asked", "runtime pid card")   # a stop asked of supervisor `pid` of the town `card` describes


def ask(client, keys, mode: StopMode) -> None:
    """The stop request: its mode and its number recorded in the supervisor's hash, then announced
    on the control channel. A number, which no supervisor clears: on a town of several hosts each
    stops once it sees the count pass what it read at its start (a host that stopped first, or
    one that started meanwhile, cannot take the request back from the others)."""
    pipe = client.pipeline()
    pipe.hset(keys.supervisor, "stop", mode.value)
    pipe.hincrby(keys.supervisor, "stops_asked", 1)
    pipe.publish(keys.control, "stop")
    pipe.execute()


def ask_from_lock(town: str, now: bool) -> Asked | None:
    """Ask the supervisor of the town in folder `town` to stop, from its card; None where the card
    cannot do it (the caller then goes through the config). `finish` waits for it."""
    runtime = runtime_dir(town)
    try:
        pid, raw = lock.holder_and_card(runtime)
    except OSError:  # .tt not a folder, another user's: the config's path says what is wrong
        return None
    described = Card.decode(raw) if pid and pid > 0 and raw else None
    if described is None or not described.socket:
        return None
    from .keys import Keys
    from .resp import RespClient
    try:
        client = RespClient(path=described.socket, timeout=5.0)
        try:
            ask(client, Keys(described.name), StopMode.NOW if now else StopMode.GRACEFUL)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - Redis does not answer: a signal still reaches the supervisor
        signal_to_stop(pid)
    return Asked(runtime, pid, described)


def signal_to_stop(pid: int) -> None:
    """The stop asked by SIGTERM, for a supervisor whose Redis does not answer (a second SIGTERM,
    like a second Ctrl+C, is `--now`)."""
    from .procutil import alive
    if pid > 0 and alive(pid):
        os.kill(pid, 15)


def finish(asked: Asked, now: bool) -> dict:
    """Wait for a stop asked by ask_from_lock; the stop's report."""
    wait_stopped(asked.runtime, asked.pid, stop_wait(asked.card.stop_grace, now))
    return read_report(asked.card.report)


def wait_stopped(runtime: str | os.PathLike, pid: int, wait: float) -> None:
    """Until the supervisor has let go of its lock and exited (the lock goes a moment before)."""
    if not lock.wait_released(runtime, wait):
        raise TinytownError(f"the supervisor (pid {pid}) did not stop within {wait:.0f}s")
    if pid > 0:
        wait_gone(pid, GONE_WAIT)


def read_report(path: str | os.PathLike) -> dict:
    """The report the supervisor left (last-stop.json); {} if it left none."""
    import json
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def wait_gone(pid: int, timeout: float) -> None:
    """Until process `pid` (not our child) has exited: a pidfd wakes us that moment; else poll."""
    from .procutil import pidfd_wait, wait_until
    if pidfd_wait(pid, timeout) is None:
        wait_until(lambda: not _running(pid), timeout)


def _running(pid: int) -> bool:
    try:  # /proc first: importing psutil costs more than the whole check
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
