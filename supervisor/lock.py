"""The one-supervisor-per-town lock: an flock on .tt/supervisor.lock, held for the supervisor's life.

flock is released by the kernel when the holder dies, so a stale pid in the file never blocks a
new start, and two supervisors starting at the same instant cannot both win.
"""
from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None):
        super().__init__(f"a supervisor is already running for this town (pid {pid or '?'})")
        self.pid = pid


def lock_path(runtime_dir: Path) -> Path:
    return runtime_dir / "supervisor.lock"


def acquire(runtime_dir: Path) -> int:
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


def holder(runtime_dir: Path) -> int | None:
    """The running supervisor's pid, or None when no supervisor holds the lock."""
    path = lock_path(runtime_dir)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def wait_released(runtime_dir: Path, timeout: float) -> bool:
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
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
