"""The one-supervisor-per-town lock: an flock on .tt/supervisor.lock, held for the supervisor's life.

flock is released by the kernel when the holder dies, so a stale pid in the file never blocks a
new start, and two supervisors starting at the same instant cannot both win.

The file holds the holder's pid on its first line and, once the supervisor serves, after it what
`tt stop` needs to ask it to stop (`describe`; stopping.py). It lives and dies with the lock,
so it can never describe a supervisor that is gone. No pathlib here: `tt stop` imports this.
"""
from __future__ import annotations

import fcntl
import os
import signal
import time


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None):
        super().__init__(f"a supervisor is already running for this town (pid {pid or '?'})")
        self.pid = pid


def lock_path(runtime_dir: str | os.PathLike) -> str:
    return os.path.join(runtime_dir, "supervisor.lock")


def acquire(runtime_dir: str | os.PathLike) -> int:
    """Take the lock and write our pid into it; raise AlreadyRunning with the holder's pid."""
    fd = os.open(lock_path(runtime_dir), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + 0.5
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pid = _read_pid(fd)
            # No pid yet: a `tt` command probing with holder(), or a supervisor a moment from
            # writing it. Both resolve within milliseconds.
            if pid is None and time.monotonic() < deadline:
                time.sleep(0.005)
                continue
            os.close(fd)
            raise AlreadyRunning(pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.set_inheritable(fd, False)
    return fd


def release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def holder(runtime_dir: str | os.PathLike) -> int | None:
    """The running supervisor's pid, or None when no supervisor holds the lock."""
    return holder_and_card(runtime_dir)[0]


def holder_and_card(runtime_dir: str | os.PathLike) -> tuple[int | None, bytes]:
    """(the running supervisor's pid or None, what it wrote with `describe`, b"" if nothing yet);
    the pid is -1 for a holder that has not written it yet."""
    try:
        fd = os.open(lock_path(runtime_dir), os.O_RDONLY)
    except FileNotFoundError:
        return None, b""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, card = _read(fd)
            return pid or -1, card
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None, b""
    finally:
        os.close(fd)


def describe(fd: int, card: bytes) -> None:
    """The holder writes `card` after its pid line (replacing what was there): the pid line is
    never absent meanwhile, so holder() always reads it. `card` is read back as it is."""
    content = f"{os.getpid()}\n".encode() + card
    os.pwrite(fd, content, 0)
    os.ftruncate(fd, len(content))


def wait_released(runtime_dir: str | os.PathLike, timeout: float) -> bool:
    """Block until the supervisor lets go of the lock (it has exited), or `timeout` passes."""
    fd = os.open(lock_path(runtime_dir), os.O_RDONLY)

    def on_alarm(*_):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except TimeoutError:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    return _read(fd)[0]


def _read(fd: int) -> tuple[int | None, bytes]:
    try:
        first, _, rest = os.pread(fd, 65536, 0).partition(b"\n")
        return int(first.strip() or 0) or None, rest
    except (OSError, ValueError):
        return None, b""
