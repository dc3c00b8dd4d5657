"""One model CLI run in a pseudo-terminal: spawn, prompt delivery, reap, group kill.

The CLI is started with posix_spawn (vfork + exec: no copy of the runner's page tables and no Python
code between fork and exec), as the leader of a new session whose controlling terminal is the pty:
setsid comes first, then the slave is opened by name, which makes it the session's terminal. This
costs about what a bare `fork + exec` of /bin/true costs; pexpect.spawn, with its default delays
zeroed, cost 3 to 5 times as much per task. Its pid is also its process group, so killing the group
takes its helpers with it.

posix_spawn runs no code in the child, so the CLI has no parent-death signal. If the runner dies,
the pty's master side closes and the kernel hangs the terminal up (SIGHUP to the CLI's session),
and the supervisor kills the CLI's process group (its pid is in the agent's record) as well.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import struct
import termios
from pathlib import Path

from .config import CliSpec
from .errors import TinytownError
from .procutil import killpg

READ_CHUNK = 65536
# Signals the runner handles or ignores: the CLI starts with every one of them at its default.
_DEFAULT_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                                     signal.SIGUSR2, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP,
                                     signal.SIGXFSZ, signal.SIGALRM, signal.SIGWINCH))


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
        self.fd = -1                     # the pty's master side (non-blocking)
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.wrote_file = False

    def start(self) -> None:
        """Hand over the prompt and exec the CLI; TinytownError if it cannot start.

        The prompt file (0600) is written only when the CLI is given its path; a prompt on stdin
        comes from an anonymous in-memory file (memfd): a regular, seekable file for the CLI, and
        no file to create and delete on a disk that may be busy.
        """
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
        # posix_spawn has no chdir: the CLI inherits the runner's working directory, so that is the town's.
        cwd = str(self.cwd)
        if os.getcwd() != cwd:
            os.chdir(cwd)
        path = shutil.which(argv[0], path=self.env.get("PATH", os.defpath))
        if path is None:
            raise TinytownError(f"cannot start {argv[0]!r}: command not found or not executable "
                                f"(PATH={self.env.get('PATH', '')})")
        master, slave = os.openpty()  # both close-on-exec
        try:
            rows, cols = self.dimensions
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            attrs = termios.tcgetattr(slave)
            attrs[3] &= ~termios.ECHO  # keystrokes from an attached user are not echoed twice
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            tty = os.ttyname(slave)
            actions = [(os.POSIX_SPAWN_OPEN, 1, tty, os.O_RDWR, 0), (os.POSIX_SPAWN_DUP2, 1, 2)]
            if self.spec.prompt == "stdin":
                # The prompt is the CLI's stdin: a plain file, so any size and any bytes arrive
                # intact (a tty line is cut at 4095 bytes); the pty stays its controlling terminal.
                if stdin_fd >= 0:
                    os.lseek(stdin_fd, 0, os.SEEK_SET)
                    actions.append((os.POSIX_SPAWN_DUP2, stdin_fd, 0))
                else:
                    actions.append((os.POSIX_SPAWN_OPEN, 0, str(self.prompt_file), os.O_RDONLY, 0))
            else:
                actions.append((os.POSIX_SPAWN_DUP2, 1, 0))
            self.pid = os.posix_spawn(path, argv, self.env, file_actions=actions, setsid=True,
                                      setsigdef=_DEFAULT_SIGNALS, setsigmask=())
        except OSError as exc:
            os.close(master)
            raise TinytownError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            os.close(slave)  # only the CLI holds the slave now: its exit is our end of file
        os.set_blocking(master, False)
        self.fd = master

    def read(self) -> bytes | None:
        """Whatever the CLI printed and is ready now: b"" if nothing yet, None at end of output."""
        try:
            data = os.read(self.fd, READ_CHUNK)
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
            os.write(self.fd, data)
        except (BlockingIOError, OSError):
            pass

    def resize(self, rows: int, cols: int) -> None:
        """The terminal's new size; the kernel sends SIGWINCH to the CLI."""
        try:
            fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError:
            pass

    def poll(self) -> bool:
        """True once the CLI has exited (reaped; exit_code or signal set)."""
        if self.exit_code is not None or self.signal is not None:
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
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if self.exit_code is None and self.signal is None:
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


def _memfd() -> int:
    """An anonymous in-memory file for the prompt (close-on-exec; dup2 to stdin clears that)."""
    try:
        return os.memfd_create("tt-prompt", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or an old kernel
        import tempfile
        fd, path = tempfile.mkstemp(prefix="tt-prompt-")
        os.unlink(path)
        return fd
