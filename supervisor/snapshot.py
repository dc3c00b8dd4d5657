"""Reading a stopped town: its records as redis-server last wrote them, without starting it.

A stopped town's state lives only in redis-server's append-only file under .tt/redis/. To read it,
a throwaway redis-server loads a *copy* of that file from a private temp folder (owner-only) and
answers on a unix socket there: redis-server writes to the append-only file it loads (it truncates
a torn tail at start, appends expired keys' deletions, a Redis 7 upgrades the file's layout), so
the town's own files are never opened by it. Its only user may read (an ACL refuses writes,
CONFIG, DEBUG, SHUTDOWN...), so a bug in a command cannot pass a write off as done. The reader
never takes the town's lock and never touches its socket: a supervisor starting meanwhile wins
(the copy is thrown away and the live town is read instead). Whatever happens (an error, Ctrl+C,
SIGTERM or SIGHUP to `tt`), the server is killed and the folder removed before the command ends;
a `tt` killed outright takes its server with it (parent-death signal) and the next reader removes
the folder it left.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .config import MAX_UNIX_SOCKET_PATH, Config
from .errors import TinytownError
from .procutil import alive, set_parent_death_signal

FOLDER_PREFIX = "tt-snapshot-"
_OPEN: set["Snapshot"] = set()   # this process's open readers: close_all() removes them
LOAD_TIMEOUT = 60.0   # loading a big append-only file; each PING says LOADING until it is done
# The reader's only user: every read, none of the commands that write, administer or publish.
READ_ONLY_USER = "user default on nopass ~* &* +@all -@write -@admin -@pubsub -@dangerous +info\n"


def recorded_files(config: Config) -> list[Path]:
    """The town's append-only file(s) in .tt/redis/ (Redis 6's appendonly.aof, Redis 7's
    appendonlydir/), or [] if its Redis never ran here."""
    try:
        return sorted(p for p in config.redis_dir.iterdir() if p.name.startswith("appendonly"))
    except OSError:
        return []


class Snapshot:
    """A private, read-only redis-server over a copy of a stopped town's append-only file.

    `config` is the town's, pointed at the private socket: Town(snapshot.config) and
    resp.connect(snapshot.config) read the snapshot. Close it (or use `with`) when done.
    """

    def __init__(self, town: Config):
        self.town = town
        self.folder: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.config: Config | None = None
        self._handlers: dict[int, object] = {}

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> bool:
        """Copy the town's files and start the reader on them. False (nothing left running) if the
        town has no recorded state, or a supervisor holds its lock by the time the copy is made."""
        from .lifecycle import running_pid
        sources = recorded_files(self.town)
        if not sources or running_pid(self.town):
            return False
        self._catch_signals()
        _OPEN.add(self)
        try:
            remove_leftovers()
            self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=_temp_root()))
            data = self.folder / "data"
            data.mkdir(mode=0o700)
            for source in sources:
                if source.is_dir():
                    shutil.copytree(source, data / source.name)
                else:
                    shutil.copyfile(source, data / source.name)
            # A supervisor that took the lock while we copied may have been writing: its town wins.
            if running_pid(self.town):
                self.close()
                return False
            self._start(data)
        except BaseException:
            self.close()
            raise
        return True

    def client(self, decode: bool = True):
        from .resp import connect
        return connect(self.config, decode=decode)

    def close(self) -> None:
        """Kill the reader (its data is a throwaway copy: nothing to save) and remove the folder."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers.clear()
        _OPEN.discard(self)

    # --- internals -------------------------------------------------------------------------
    def _start(self, data: Path) -> None:
        from .redis_server import find_binary, wait_answering
        socket = self.folder / "redis.sock"
        self.config = dataclasses.replace(self.town, use_socket=True, socket_path=str(socket), redis_url=None)
        parent = os.getpid()
        self.proc = subprocess.Popen(
            [find_binary(self.town), "--daemonize", "no", "--port", "0", "--unixsocket", str(socket),
             "--unixsocketperm", "700", "--dir", str(data), "--appendonly", "yes", "--appendfsync", "no",
             "--auto-aof-rewrite-percentage", "0", "--save", "", "--databases", "1", "--loglevel", "warning",
             "--logfile", str(self.folder / "redis.log"), "-"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(data),
            # Its own process group (the terminal's Ctrl+C is ours to handle), killed if we die.
            preexec_fn=lambda: (os.setpgid(0, 0), set_parent_death_signal(signal.SIGKILL, parent)),
        )
        try:
            self.proc.stdin.write(READ_ONLY_USER.encode())
            self.proc.stdin.close()
        except OSError:  # it exited at once: said below
            pass
        up = wait_answering(self.proc, self.config, LOAD_TIMEOUT)
        if self.proc.poll() is not None or not up:
            log = self.folder / "redis.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise TinytownError("cannot read the stopped town's recorded state"
                                + (f": {tail[0]}" if tail else " (its redis-server did not start)"))

    def _catch_signals(self) -> None:
        """SIGTERM and SIGHUP end `tt` through Python (so close() runs) instead of at once."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return

        def leave(signum, _frame):
            raise SystemExit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            self._handlers[signum] = signal.signal(signum, leave)


def close_all() -> None:
    """Every reader this process has open, closed: for a `tt` leaving at once (its Ctrl+C
    handler, cli/logview.py), which no `with` or `finally` would see."""
    for snapshot in list(_OPEN):
        snapshot.close()


def _temp_root() -> str | None:
    """The temp folder, unless its path is too long for the socket in it (then /tmp)."""
    root = tempfile.gettempdir()
    room = len(os.fsencode(root)) + len(FOLDER_PREFIX) + 20 + len("/redis.sock") + 10
    return root if room <= MAX_UNIX_SOCKET_PATH else "/tmp"


def remove_leftovers() -> None:
    """Folders of readers whose `tt` was killed outright (its server died with it): the copies
    of a town's records they hold are removed."""
    for root in {_temp_root() or tempfile.gettempdir(), "/tmp"}:
        try:
            names = [n for n in os.listdir(root) if n.startswith(FOLDER_PREFIX)]
        except OSError:
            continue
        for name in names:
            pid = name[len(FOLDER_PREFIX):].split("-", 1)[0]
            path = os.path.join(root, name)
            try:
                if not pid.isdigit() or alive(int(pid)) or os.lstat(path).st_uid != os.getuid():
                    continue
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)


def open_snapshot(config: Config) -> Snapshot | None:
    """A started Snapshot of a stopped town, or None (running, starting, or nothing recorded)."""
    snapshot = Snapshot(config)
    if snapshot.open():
        return snapshot
    return None
