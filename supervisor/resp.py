"""A small Redis client: RESP2 over a socket, for the supervisor, the runners and the quick `tt` commands.

Why it exists: `import redis` (redis-py) costs 100-170 ms and ~10 MB of a process's private memory,
mostly redis.asyncio. `tt list`, status, tasks, task and stop pay more for it than for everything
else they do; and every runner is a fork of the supervisor, so the supervisor's size is what each
runner's fork and exit cost (50 runners stopping is 50 address spaces torn down). The commands
that write with WATCH (spawn) and the log follower keep redis-py.

It speaks what `Town` uses on those paths: the commands below, plain and MULTI/EXEC pipelines.
Replies are decoded like Town's redis-py client (UTF-8, surrogateescape), so the same code runs on
both. Key names still come from supervisor/keys.py: this module knows commands, not keys.
"""
from __future__ import annotations

import select
import socket
import time


class RespError(Exception):
    """An error reply from Redis."""


class RespConnectionError(ConnectionError):
    """Redis cannot be reached, or the connection broke."""


def connect(config, timeout: float = 5.0, long_lived: bool = False, retry_for: float = 0.0) -> "RespClient":
    """A client for the town's Redis (its unix socket, or host and port).

    long_lived: for the supervisor and the runners: no time limit on a reply (a Redis that is slow
    for a while, an fsync on a busy disk, is not a reason to give up; `timeout` still bounds
    connecting). retry_for: keep trying to connect for that long (a runner riding out the moment
    its supervisor restarts redis-server).
    """
    read_timeout = None if long_lived else timeout
    if config.use_socket:
        return RespClient(path=str(config.redis_socket), timeout=timeout, read_timeout=read_timeout,
                          retry_for=retry_for)
    return RespClient(host=config.redis_host, port=config.redis_port, timeout=timeout, read_timeout=read_timeout,
                      retry_for=retry_for, password=config.redis_password)


def encode_command(args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8", "surrogateescape")
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _pairs(reply):
    if reply is None:
        return {}
    return dict(zip(reply[::2], reply[1::2]))


def _int(reply):
    return int(reply)


def _entries(reply):
    """A stream's entries as redis-py gives them: [(id, {field: value}), ...]."""
    return [(entry_id, _pairs(fields)) for entry_id, fields in reply or []]


class _Commands:
    """The commands, each as (args, how to shape the reply); shared by the client and pipelines."""

    def _call(self, args, shape=None):
        raise NotImplementedError

    def execute_command(self, *args):
        """Any command, its reply as it comes (queued, in a pipeline)."""
        return self._call(args)

    def ping(self):
        return self._call(("PING",), lambda r: r == "PONG")

    def exists(self, *names):
        return self._call(("EXISTS", *names), _int)

    def hget(self, name, key):
        return self._call(("HGET", name, key))

    def hgetall(self, name):
        return self._call(("HGETALL", name), _pairs)

    def hvals(self, name):
        return self._call(("HVALS", name))

    def hexists(self, name, key):
        return self._call(("HEXISTS", name, key), lambda r: bool(r))

    def hset(self, name, key=None, value=None, mapping=None):
        args = ["HSET", name]
        if key is not None:
            args += [key, value]
        for k, v in (mapping or {}).items():
            args += [k, v]
        return self._call(args, _int)

    def llen(self, name):
        return self._call(("LLEN", name), _int)

    def lrange(self, name, start, end):
        return self._call(("LRANGE", name, start, end))

    def zrange(self, name, start, end):
        return self._call(("ZRANGE", name, start, end))

    def publish(self, channel, message):
        return self._call(("PUBLISH", channel, message), _int)

    # --- what the supervisor and the runners write -------------------------------------------
    def hincrby(self, name, key, amount=1):
        return self._call(("HINCRBY", name, key, amount), _int)

    def hlen(self, name):
        return self._call(("HLEN", name), _int)

    def lpush(self, name, *values):
        return self._call(("LPUSH", name, *values), _int)

    def rpush(self, name, *values):
        return self._call(("RPUSH", name, *values), _int)

    def lrem(self, name, count, value):
        return self._call(("LREM", name, count, value), _int)

    def zadd(self, name, mapping):
        args = ["ZADD", name]
        for member, score in mapping.items():
            args += [score, member]
        return self._call(args, _int)

    def xadd(self, name, fields, id="*", maxlen=None, approximate=True):
        args = ["XADD", name]
        if maxlen is not None:
            args += ["MAXLEN", "~" if approximate else "=", maxlen]
        args.append(id)
        for key, value in fields.items():
            args += [key, value]
        return self._call(args)

    def xrange(self, name, min="-", max="+", count=None):
        args = ["XRANGE", name, min, max] + (["COUNT", count] if count is not None else [])
        return self._call(args, _entries)


class RespClient(_Commands):
    """One connection, opened on first use and again when found closed; every call is one round trip.

    A connection Redis closed while it sat idle (redis-server restarted) is noticed before a
    command is sent on it, and replaced. One that breaks during a command raises
    RespConnectionError: the command may or may not have been carried out, which only the caller
    can judge.
    """

    _UNSET = object()

    def __init__(self, path: str | None = None, host: str = "127.0.0.1", port: int = 6379, timeout: float = 5.0,
                 read_timeout=_UNSET, retry_for: float = 0.0, password: str | None = None):
        self.path, self.host, self.port, self.timeout = path, host, port, timeout
        self.password = password
        self.read_timeout = timeout if read_timeout is RespClient._UNSET else read_timeout
        self.retry_for = retry_for
        self.sock: socket.socket | None = None
        self.reader = None

    def _connect(self) -> None:
        deadline = time.monotonic() + self.retry_for
        pause = 0.01
        while True:
            try:
                if self.path:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.timeout)
                    sock.connect(self.path)
                else:
                    sock = socket.create_connection((self.host, self.port), self.timeout)
                break
            except OSError as exc:
                if time.monotonic() + pause > deadline:
                    where = self.path or f"{self.host}:{self.port}"
                    raise RespConnectionError(f"cannot connect to Redis at {where}: {exc.strerror or exc}") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
        sock.settimeout(self.read_timeout)
        self.sock, self.reader = sock, sock.makefile("rb")
        if self.password is not None:  # first thing on every new connection
            try:
                sock.sendall(encode_command(("AUTH", self.password)))
                reply = self._read()
            except OSError as exc:
                raise self._lost(exc) from None
            if isinstance(reply, RespError):
                self.close()
                raise reply

    def _usable(self) -> bool:
        """False if Redis closed this idle connection (or sent what nobody asked for)."""
        try:
            return not select.select([self.sock], [], [], 0)[0]
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.reader.close()
            self.sock.close()
            self.sock = self.reader = None

    def _call(self, args, shape=None):
        reply = self._roundtrip([args], 1)[0]
        if isinstance(reply, RespError):
            raise reply
        return shape(reply) if shape else reply

    def _ensure(self, idle: bool = True) -> None:
        """A connection to send on: a new one if there is none, or if Redis closed this one while
        it sat `idle` (no reply outstanding)."""
        if self.sock is not None and idle and not self._usable():
            self.close()
        if self.sock is None:
            self._connect()

    def _lost(self, exc: OSError) -> RespConnectionError:
        """Drop a connection that broke mid-command; the error to raise."""
        self.close()
        return RespConnectionError(f"Redis connection lost: {exc}")

    def _roundtrip(self, commands, replies: int, wait: float | None = None) -> list:
        """Send, and read the replies; `wait`: seconds the first reply may take beyond read_timeout."""
        self._ensure()
        try:
            if wait is not None and self.read_timeout is not None:
                self.sock.settimeout(wait + self.read_timeout)
            self.sock.sendall(b"".join(encode_command(c) for c in commands))
            return [self._read() for _ in range(replies)]
        except OSError as exc:
            raise self._lost(exc) from None
        finally:
            if wait is not None and self.read_timeout is not None and self.sock is not None:
                self.sock.settimeout(self.read_timeout)

    def _read(self):
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise RespConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.reader.read(size + 2)
            if len(data) != size + 2:
                raise RespConnectionError("Redis closed the connection")
            return data[:-2].decode("utf-8", "surrogateescape")
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        raise RespConnectionError(f"unexpected reply from Redis: {line[:40]!r}")

    def pipeline(self, transaction: bool = True) -> "Pipeline":
        return Pipeline(self, transaction)

    def blmove(self, source, destination, timeout, src="LEFT", dest="RIGHT"):
        """Block up to `timeout` seconds for an element (the socket waits that much longer)."""
        reply = self._roundtrip([("BLMOVE", source, destination, src, dest, timeout)], 1, wait=timeout)[0]
        if isinstance(reply, RespError):
            raise reply
        return reply


class Pipeline(_Commands):
    """Commands queued and sent in one round trip (inside MULTI/EXEC when `transaction`)."""

    def __init__(self, client: RespClient, transaction: bool):
        self.client = client
        self.transaction = transaction
        self.queued: list[tuple] = []

    def _call(self, args, shape=None):
        self.queued.append((tuple(args), shape))
        return self

    def execute(self) -> list:
        queued, self.queued = self.queued, []
        if not queued:
            return []
        commands = [args for args, _ in queued]
        if self.transaction:
            replies = self.client._roundtrip([("MULTI",), *commands, ("EXEC",)], len(commands) + 2)
            for reply in replies[:-1]:
                if isinstance(reply, RespError):
                    raise reply
            replies = replies[-1]
            if replies is None:
                raise RespError("transaction aborted")
        else:
            replies = self.client._roundtrip(commands, len(commands))
        out = []
        for reply, (_, shape) in zip(replies, queued):
            if isinstance(reply, RespError):
                raise reply
            out.append(shape(reply) if shape else reply)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.queued = []


class Sender:
    """Writes sent without waiting for each reply: the replies are read later, in order, a batch at
    a time. For the runner's copy of a CLI's output into its Redis stream: waiting for each XADD's
    reply stopped the runner reading the pty, and a pty holds only a few KiB, so the CLI stalled.
    A failed write is reported (`errors`), not raised: the log file is the record, the stream a copy.
    """

    def __init__(self, client: RespClient, window: int = 32):
        self.client = client
        self.window = window
        self.outstanding = 0
        self.errors: list[str] = []

    def send(self, *args) -> None:
        if self.outstanding >= self.window:
            self._read(self.outstanding - self.window // 2)
        self.client._ensure(idle=not self.outstanding)
        try:
            self.client.sock.sendall(encode_command(args))
        except OSError as exc:
            self.outstanding = 0
            raise self.client._lost(exc) from None
        self.outstanding += 1

    def flush(self) -> None:
        """Read every outstanding reply (call before anything must be known written)."""
        self._read(self.outstanding)

    def _read(self, count: int) -> None:
        try:
            for _ in range(count):
                reply = self.client._read()
                self.outstanding -= 1
                if isinstance(reply, RespError):
                    self.errors.append(str(reply))
        except OSError as exc:
            self.outstanding = 0
            raise self.client._lost(exc) from None

    def close(self) -> None:
        self.client.close()
        self.outstanding = 0
