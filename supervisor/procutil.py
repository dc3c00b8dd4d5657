"""Small process helpers: parent-death signals, process-group kills, waiting with a deadline."""
from __future__ import annotations

import errno
import os
import signal
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_libc = None


def libc():
    """The C library through ctypes, loaded once (None where it cannot be). ctypes is imported
    here, not at the top of a module: a `tt` command has no use for it (the supervisor loads it
    early, before any fork, so no child has to)."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover - no C library to load
            _libc = False
    return _libc or None


def _prctl(option: int, arg) -> bool:
    """prctl(2) through libc."""
    try:
        libc().prctl(option, arg, 0, 0, 0)
        return True
    except AttributeError:  # pragma: no cover - not Linux
        return False


def file_stamp(path) -> tuple | None:
    """What changes when a file is written or replaced (mtime, size, inode); None if it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def set_parent_death_signal(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (so nothing outlives it).

    If the parent already died before the call, act at once: the kernel would never send it.
    """
    if _prctl(_PR_SET_PDEATHSIG, int(sig)) and expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


def become_subreaper() -> None:
    """Adopt this process's orphaned descendants (Linux): a CLI whose runner died becomes our
    child rather than init's, so it can be killed and reaped, and its pid cannot be reused under
    us until we reap it."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def adopted(known: set[int], task_ids: set[str] | None = None, agent_ids: set[str] | None = None) -> list[int]:
    """This process's children that it did not start (`known`): orphans it adopted as subreaper
    that a runner started (TT_AGENT_ID in their environment) for one of `task_ids` (TT_TASK_ID),
    or for any task if None; only those of `agent_ids` if given."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children", "rb") as fh:
            children = [int(pid) for pid in fh.read().split()]
    except OSError:  # pragma: no cover - a kernel without CONFIG_PROC_CHILDREN
        return []
    found = []
    for pid in children:
        if pid in known:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = b"\0" + fh.read()
        except OSError:  # exited meanwhile
            continue
        if b"\0TT_AGENT_ID=" not in environ:
            continue
        if agent_ids is not None and not any(b"\0TT_AGENT_ID=%s\0" % a.encode() in environ for a in agent_ids):
            continue
        if task_ids is None or any(b"\0TT_TASK_ID=%s\0" % t.encode() in environ for t in task_ids):
            found.append(pid)
    return found


def kill_with_group(pids: list[int], sig: int) -> None:
    """Signal each process, and the whole group of those that lead one (a CLI and its helpers)."""
    for pid in pids:
        try:
            if os.getpgid(pid) == pid:
                killpg(pid, sig)
            os.kill(pid, sig)
        except OSError:  # exited meanwhile
            continue


def reap_adopted(known: set[int]) -> list[int]:
    """Reap exited children that are not in `known` (orphans adopted as subreaper); a known
    child's exit is left for its owner to collect. Returns the pids reaped."""
    reaped = []
    while True:
        try:  # WNOWAIT: look at who exited without collecting it
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid in known:
            return reaped
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            pass
        reaped.append(info.si_pid)


def close_on_exec_all() -> None:
    """Mark every fd from 3 up close-on-exec. What `tt start` inherited from its shell (an open
    file, a lock, a pipe's write end) must not reach the CLIs, which posix_spawn starts with every
    fd not so marked; Python marks its own fds, not inherited ones."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own fd, closed by now
                pass


def set_process_name(name: str) -> None:
    """The name `ps -o comm`, top and psutil show (15 bytes at most), so a forked runner is told
    apart from its supervisor, whose command line it shares."""
    _prctl(_PR_SET_NAME, os.fsencode(name)[:15])


def killpg(pgid: int | None, sig: int) -> bool:
    """Signal a whole process group; False if it is already gone."""
    if not pgid or pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(pid: int | None) -> bool:
    """alive(), and not a zombie: a process killed outright whose parent has not reaped it yet
    runs nothing (Linux's /proc; elsewhere, as alive())."""
    if not alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def wait_until(predicate, timeout: float, interval: float = 0.005, max_interval: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout` passes, backing off from `interval` to `max_interval`."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))
        interval = min(interval * 2, max_interval)


def describe_status(status: int) -> str:
    """'exit code 3' or 'killed by SIGKILL' from a waitpid status."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal_name(os.WTERMSIG(status))}"
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"status {status}"


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def reap(pid: int) -> int | None:
    """Non-blocking waitpid for one child; its status, or None if still running."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0
    except OSError as exc:  # pragma: no cover
        if exc.errno == errno.EINTR:
            return None
        raise
    return status if got == pid else None


def kill_leftovers(log_dir, town_dir, timeout: float = 5.0) -> list[int]:
    """SIGKILL what an earlier supervisor of this town left alive: its runners and their CLIs.

    A SIGKILLed supervisor's runners get their parent-death signal and take a moment (up to their
    CLI's SIGTERM grace) to exit; meanwhile they could write into a new town's Redis on the same
    socket, next to the new runners. They are found by their standard output, which is their
    agent's log in `log_dir`. A CLI whose runner and supervisor were killed together, and which
    ignored its terminal's hang-up, is found by what its runner put in its environment (the town's
    directory and a task id), even when it is what started this supervisor (its `tt assign`
    brought the town back): its task is delivered again, and must not run twice. All are frozen
    before anything is killed, so none reacts to another's death; this process and its own
    process group (a foreground `tt start` typed by such a CLI) are spared. Returns the pids killed.
    """
    prefix = os.path.join(os.fspath(log_dir), "")
    town_marker = b"\0TT_TOWN_DIR=" + os.fsencode(os.fspath(town_dir)) + b"\0"
    me, uid = os.getpid(), os.getuid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            # Only ours: anyone can put the town's folder in their own process's environment, and
            # a root supervisor would otherwise stop and kill it, and its children's groups.
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            if os.readlink(f"/proc/{entry}/fd/1").startswith(prefix):
                found.append(int(entry))
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = b"\0" + fh.read()
            if town_marker in environ and b"\0TT_TASK_ID=" in environ:
                found.append(int(entry))
        except OSError:  # gone, or not ours to look at
            continue
    if not found:
        return []
    import psutil
    procs = []
    for pid in found:
        try:
            proc = psutil.Process(pid)
            proc.suspend()
            procs.append(proc)
        except psutil.Error:
            continue
    own_group = os.getpgid(0)
    for proc in procs:
        try:
            for child in proc.children(recursive=True):  # a runner's CLI: kill the CLI's whole group
                if child.pid == me:
                    continue
                try:
                    group = os.getpgid(child.pid)
                    if group != own_group:
                        killpg(group, signal.SIGKILL)
                    else:
                        os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
        except psutil.Error:
            continue

    def all_gone() -> bool:
        for proc in procs:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.Error:
                continue
        return True

    wait_until(all_gone, timeout)
    return [p.pid for p in procs]


def pidfd_wait(pid: int, timeout: float) -> bool | None:
    """Wait for process `pid` to exit, woken that moment by a pidfd rather than by polling with
    growing sleeps (which added up to 30 ms to every `tt stop`). True once it has exited (a
    zombie counts), False if `timeout` passed first, None where there are no pidfds (Python < 3.9,
    Linux < 5.3)."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        return None
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def wait_exit(proc, timeout: float) -> int:
    """Popen.wait(timeout), woken the moment the process exits (pidfd_wait)."""
    import subprocess
    exited = pidfd_wait(proc.pid, timeout)
    if exited is None:
        return proc.wait(timeout)
    if not exited:
        raise subprocess.TimeoutExpired(proc.args, timeout)
    return proc.wait(1.0)


def signal_wakeup_pipe() -> tuple[int, int]:
    """A non-blocking pipe that signal handlers write to (set_wakeup_fd), so select() wakes on a
    signal instead of sleeping through it; returns (read end, write end)."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    return read_fd, write_fd


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown, which takes tens of ms with all that is imported
    (a supervisor whose town is stopped, a runner that is done); what was printed still goes out."""
    import sys
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or full stream must not keep the process alive
        pass
    finally:
        os._exit(code)


def drain(fd: int) -> None:
    """Read a non-blocking fd until it is empty (the wakeup bytes themselves mean nothing)."""
    try:
        while os.read(fd, 512):
            pass
    except OSError:  # BlockingIOError included: empty
        pass


def capture(procs: list, timeout: float) -> list[tuple[bytes, bytes]]:
    """Each Popen's (stdout, stderr), read to the end, every process waited for, all within
    `timeout` (subprocess.TimeoutExpired after it; the caller kills). Unlike
    Popen.communicate(timeout=...), an exit is seen the moment it happens: after the pipes close
    the stdlib polls for the exit with sleeps from 1 ms, and a short git command is caught there
    one time in five (1 ms or more on a task's ~25 ms of git work)."""
    import select
    import subprocess
    deadline = time.monotonic() + timeout
    chunks: dict[int, list[bytes]] = {}
    poller = select.poll()
    for proc in procs:
        for stream in (proc.stdout, proc.stderr):
            chunks[stream.fileno()] = []
            poller.register(stream.fileno(), select.POLLIN)
    reading = len(chunks)
    while reading:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(procs[0].args, timeout)
        for fd, _ in poller.poll(remaining * 1000):
            data = os.read(fd, 65536)
            if data:
                chunks[fd].append(data)
            else:
                poller.unregister(fd)
                reading -= 1
    outputs = [(b"".join(chunks[p.stdout.fileno()]), b"".join(chunks[p.stderr.fileno()])) for p in procs]
    for proc in procs:
        wait_exit(proc, max(0.0, deadline - time.monotonic()))
        proc.stdout.close()
        proc.stderr.close()
    return outputs
