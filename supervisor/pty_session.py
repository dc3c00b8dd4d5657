"""One model CLI run in a pseudo-terminal: spawn, prompt delivery, reap, group kill.

The CLI is started the way CPython's subprocess starts one: posix_spawn, which is vfork + exec, on
a new pty of our own. pexpect's spawn forks the runner, which copies a Python process's page
tables and runs Python in the child: ~2.4 ms a task here against ~0.3 ms, the largest part of the
time from a task's arrival to its CLI running. The session reaps its CLI itself (waitpid) and
reads its output with a thread (pty_reader); pexpect is there, through its public fdspawn on the
pty's master side, for what wants expect() (expecter()), and never reaches into a process it did
not start.

The CLI leads a new session (setsid comes first in the child, then the pty's slave is opened by
name, which makes it the controlling terminal), so a permission prompt asked on /dev/tty reaches
`tt attach`, and its pid is also its process group: killing the group takes its helpers with it.
For prompt = "stdin" the prompt is its standard input: an in-memory file, so any size and any bytes
arrive intact where a line typed into a tty would be cut at 4095 bytes.

No code runs in the child between fork and exec, so the CLI has no parent-death signal of its own.
If its runner dies, the pty's master side closes and the kernel hangs the terminal up (SIGHUP to
the CLI's session), and the supervisor, which adopts the orphan as the town's subreaper, kills the
CLI's group; a CLI outliving both is killed by the next supervisor (procutil.kill_leftovers).
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import signal
import struct
import termios
from pathlib import Path

from .config import CliSpec
from .errors import TinytownError
from .procutil import killpg
from .pty_reader import PtyReader

WRITE_CHUNK = 512  # keystrokes a write: within what a pty takes at once
# Signals the runner handles or ignores: the CLI starts with every one of them at its default.
_DEFAULT_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                                     signal.SIGUSR2, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP,
                                     signal.SIGXFSZ, signal.SIGALRM, signal.SIGWINCH))


# posix_spawn's errors that say the program cannot be run at all: not this task's fault (which()
# found the file, but it is not a program, or its #! interpreter is missing or not executable).
# The working folder is entered before, and its error is the task's (spawn_in_pty).
UNRUNNABLE = (errno.ENOEXEC, errno.ENOENT, errno.EACCES, errno.ENOTDIR, errno.ELOOP)


class CliUnusable(TinytownError):
    """The CLI's program cannot be run: every task would fail the same way, so the runner gives
    its task back and the agent fails until its [agent_clis] entry is fixed (runner.py)."""


class CliSession:
    def __init__(self, spec: CliSpec, prompt: bytes, prompt_file: Path, cwd: Path, env: dict[str, str],
                 dimensions: tuple[int, int] = (40, 160)):
        self.spec = spec
        self.prompt = prompt
        self.prompt_file = prompt_file
        self.cwd = cwd
        self.env = env
        self.dimensions = dimensions
        self.pid: int | None = None
        self.fd = -1                     # the pty's master side (blocking: see pty_reader)
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.wrote_file = False
        self.reader: PtyReader | None = None

    def start(self) -> None:
        """Hand over the prompt and exec the CLI; TinytownError if it cannot start.

        The prompt file (0600) is written only when the CLI is given its path; a prompt on stdin
        comes from an anonymous in-memory file (memfd): a regular, seekable file for the CLI, and
        no file to create and delete on a disk that may be busy.
        """
        try:
            self._write_prompt_and_spawn()
        except OSError as exc:  # the prompt could not be written (disk full, permissions...)
            raise TinytownError(f"cannot hand the prompt to the CLI: {exc.strerror or exc}") from None

    def _write_prompt_and_spawn(self) -> None:
        needs_file = self.spec.prompt == "file" or any("{prompt_file}" in part for part in self.spec.command)
        if needs_file:
            fd = os.open(self.prompt_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self.wrote_file = True
        elif self.spec.prompt == "stdin":
            fd = _memfd()
        else:  # the prompt is an argument
            self._spawn(-1)
            return
        try:
            view = memoryview(self.prompt)
            while view:
                view = view[os.write(fd, view):]
            if needs_file:
                os.close(fd)
                fd = -1
            self._spawn(fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _spawn(self, stdin_fd: int) -> None:
        text = self.prompt.decode("utf-8", "surrogateescape") if self.spec.prompt == "arg" else None
        argv = self.spec.argv(text, str(self.prompt_file))
        path = shutil.which(argv[0], path=self.env.get("PATH", os.defpath))
        if path is None:
            raise CliUnusable(f"cannot start {argv[0]!r}: command not found or not executable "
                              f"(PATH={self.env.get('PATH', '')})")
        if stdin_fd >= 0:
            os.lseek(stdin_fd, 0, os.SEEK_SET)
            stdin = (os.POSIX_SPAWN_DUP2, stdin_fd, 0)
        elif self.spec.prompt == "stdin":
            stdin = (os.POSIX_SPAWN_OPEN, 0, str(self.prompt_file), os.O_RDONLY, 0)
        else:
            stdin = None  # the terminal
        try:
            self.pid, self.fd = spawn_in_pty([path, *argv[1:]], self.env, str(self.cwd), stdin, self.dimensions)
        except OSError as exc:
            kind = CliUnusable if exc.errno in UNRUNNABLE else TinytownError  # (else: no fds, no memory...)
            raise kind(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None

    def expecter(self, timeout: float = 30, encoding: str | None = None):
        """pexpect on the CLI's terminal (its public fdspawn over the master side), for a caller
        that wants expect() rather than the reader thread; use one or the other. The session
        keeps the fd: close() closes it, the fdspawn must not."""
        from pexpect.fdpexpect import fdspawn  # (the runner's own path does not need pexpect)
        return fdspawn(self.fd, timeout=timeout, encoding=encoding)

    def start_reader(self) -> PtyReader:
        """Start reading the CLI's output on a thread (pty_reader); close() lets it go."""
        reader = PtyReader(self.fd)
        try:
            reader.start()
        except RuntimeError:  # no thread to be had
            reader.release()
            raise
        self.reader = reader
        return reader

    def write(self, data: bytes) -> None:
        """Keystrokes for the CLI (from an attached user). The pty is in blocking mode for its
        reader, so a write goes only as far as the terminal takes it now: a CLI that reads no
        input must not block the attach thread."""
        view = memoryview(data)
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        try:
            while view and poller.poll(0):
                view = view[os.write(self.fd, view[:WRITE_CHUNK]):]
        except OSError:  # closed, or hung up
            pass

    def resize(self, rows: int, cols: int) -> None:
        """The terminal's new size; the kernel sends SIGWINCH to the CLI."""
        try:
            fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError:
            pass

    @property
    def reaped(self) -> bool:
        """The CLI has exited and its status is known (exit_code or signal set)."""
        return self.exit_code is not None or self.signal is not None

    def poll(self) -> bool:
        """True once the CLI has exited (reaped; exit_code or signal set)."""
        if self.reaped:
            return True
        if self.pid is None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.exit_code = -1
            return True
        if pid == 0:
            return False
        self._set_status(status)
        return True

    def _set_status(self, status: int) -> None:
        if os.WIFSIGNALED(status):
            self.signal = os.WTERMSIG(status)
        else:
            self.exit_code = os.waitstatus_to_exitcode(status)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.pid is not None:
            killpg(self.pid, sig)

    def close(self) -> None:
        """Kill anything left in the CLI's group, release the pty, reap, remove the prompt file."""
        if self.pid is not None:
            self.kill_group(signal.SIGKILL)
            if self.reader is not None:
                self.reader.abandon()
                self.reader = None
            if self.fd >= 0:  # (the reader read a dup of its own, closed by now or at its next read)
                os.close(self.fd)
                self.fd = -1
            if not self.reaped:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self._set_status(status)
                except ChildProcessError:
                    pass
        if self.wrote_file:
            try:
                self.prompt_file.unlink()
            except FileNotFoundError:
                pass

    def outcome(self) -> str:
        if self.signal:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return f"exit code {self.exit_code}"


def spawn_in_pty(argv: list[str], env: dict[str, str], cwd: str, stdin: tuple | None,
                 dimensions: tuple[int, int] = (40, 160)) -> tuple[int, int]:
    """Start argv (argv[0] a path) as the leader of a new session on a new pty: (pid, master fd).

    stdin: a posix_spawn file action that sets fd 0 (the prompt), or None for the terminal. The
    terminal echoes, as any does (a CLI that draws its own input turns that off itself): `tt
    attach` puts the user's terminal in raw mode, so this echo is the only one a typed key gets.
    The master fd is blocking and close-on-exec.
    """
    try:
        here = os.getcwd()
    except OSError:  # the folder it stood in was deleted (an agent's worktree, since made again)
        here = None
    if here != cwd:
        try:
            os.chdir(cwd)  # posix_spawn cannot chdir; the runner's only relative path is the CLI's
        except OSError as exc:  # (the task's problem, not the CLI's: CliSession._spawn)
            raise TinytownError(f"cannot enter {cwd}: {exc.strerror or exc}") from None
    master, slave = os.openpty()  # both close-on-exec: the child opens the slave by name
    try:
        rows, cols = dimensions
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        # setsid comes first in the child: the slave, opened by name after it, becomes the
        # session's controlling terminal.
        actions = [(os.POSIX_SPAWN_OPEN, 1, os.ttyname(slave), os.O_RDWR, 0), (os.POSIX_SPAWN_DUP2, 1, 2),
                   stdin or (os.POSIX_SPAWN_DUP2, 1, 0)]
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True,
                             setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # only the CLI holds the slave now: its exit is the master's end of file
    return pid, master


def _memfd() -> int:
    """An anonymous in-memory file for the prompt (close-on-exec; dup2 to stdin clears that)."""
    try:
        return os.memfd_create("tt-prompt", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or an old kernel
        import tempfile
        fd, path = tempfile.mkstemp(prefix="tt-prompt-")
        os.unlink(path)
        return fd
