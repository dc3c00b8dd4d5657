"""One model CLI run in a pseudo-terminal through pexpect: spawn, prompt delivery, reap, group kill.

The CLI is a session leader (pexpect/ptyprocess call setsid), so its pid is also its process group
and killing the group takes its helpers with it. It gets SIGKILL if the runner dies first.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
from pathlib import Path

import pexpect

from .config import CliSpec
from .errors import TinytownError
from .procutil import killpg, set_parent_death_signal

READ_CHUNK = 65536


class CliSession:
    def __init__(self, spec: CliSpec, prompt: bytes, prompt_file: Path, cwd: Path, env: dict[str, str],
                 dimensions: tuple[int, int] = (40, 160)):
        self.spec = spec
        self.prompt = prompt
        self.prompt_file = prompt_file
        self.cwd = cwd
        self.env = env
        self.dimensions = dimensions
        self.child: pexpect.spawn | None = None
        self.exit_code: int | None = None
        self.signal: int | None = None

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def fd(self) -> int:
        return self.child.child_fd

    def start(self) -> None:
        """Write the prompt file (0600) and exec the CLI; TinytownError if it cannot start."""
        fd = os.open(self.prompt_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(self.prompt)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        text = self.prompt.decode("utf-8", "surrogateescape") if self.spec.prompt == "arg" else None
        argv = self.spec.argv(text, str(self.prompt_file))
        runner_pid = os.getpid()
        stdin_file = str(self.prompt_file) if self.spec.prompt == "stdin" else None

        def in_child() -> None:
            set_parent_death_signal(signal.SIGKILL, runner_pid)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGCHLD, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            if stdin_file is not None:
                # The prompt is the CLI's stdin: a plain file, so any size and any bytes arrive
                # intact (a tty line is cut at 4095 bytes); the pty stays its controlling terminal.
                prompt_fd = os.open(stdin_file, os.O_RDONLY)
                os.dup2(prompt_fd, 0)
                os.close(prompt_fd)

        try:
            child = pexpect.spawn(argv[0], argv[1:], cwd=str(self.cwd), env=self.env, echo=False,
                                  preexec_fn=in_child, dimensions=self.dimensions)
        except pexpect.ExceptionPexpect as exc:
            raise TinytownError(f"cannot start {argv[0]!r}: {_first_line(exc)}") from None
        except OSError as exc:
            raise TinytownError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        # pexpect's default pauses (0.05 s before send, 0.1 s after close) cost ~100 ms a task.
        child.delaybeforesend = None
        child.delayafterclose = 0
        child.delayafterterminate = 0
        child.ptyproc.delayafterclose = 0
        child.ptyproc.delayafterterminate = 0
        flags = fcntl.fcntl(child.child_fd, fcntl.F_GETFL)
        fcntl.fcntl(child.child_fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.child = child

    def read(self) -> bytes | None:
        """Whatever the CLI printed and is ready now: b"" if nothing yet, None at end of output."""
        try:
            data = os.read(self.child.child_fd, READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:  # Linux: the slave side is closed
                return None
            raise
        return data if data else None

    def write(self, data: bytes) -> None:
        """Keystrokes for the CLI (from an attached user)."""
        try:
            os.write(self.child.child_fd, data)
        except (BlockingIOError, OSError):
            pass

    def resize(self, rows: int, cols: int) -> None:
        try:
            self.child.setwinsize(rows, cols)
        except OSError:
            pass

    def poll(self) -> bool:
        """True once the CLI has exited (reaped; exit_code or signal set)."""
        if self.exit_code is not None or self.signal is not None:
            return True
        try:
            alive = self.child.isalive()
        except pexpect.ExceptionPexpect:
            alive = False
        if alive:
            return False
        self.exit_code = self.child.exitstatus
        self.signal = self.child.signalstatus
        return True

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.child is not None:
            killpg(self.child.pid, sig)

    def close(self) -> None:
        """Kill anything left in the CLI's group, release the pty, remove the prompt file."""
        if self.child is not None:
            self.kill_group(signal.SIGKILL)
            try:
                self.child.close(force=True)
            except (pexpect.ExceptionPexpect, OSError):
                pass
            if self.exit_code is None and self.signal is None:
                self.exit_code, self.signal = self.child.exitstatus, self.child.signalstatus
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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
