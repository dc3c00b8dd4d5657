"""The town's one Redis client: the supervisor, the runners and every `tt` command talk through it.

Why not redis-py: importing it costs 70-170 ms and ~10 MB of a process's private memory (mostly
redis.asyncio). A `tt` command paid more for that than for everything else it does, and every
runner is a fork of the supervisor, so the supervisor's size is what each runner's fork and exit
cost. The protocol is hiredis's (its C parser and packer, ~1 ms to import); this module adds only
what the town needs: connections that come back after a redis-server restart, MULTI/EXEC
pipelines and WATCH transactions, blocking reads, pub/sub, Lua scripts, AUTH, and one hierarchy of
errors (RespError) that says whether Redis refused, could not be reached, or does not answer.

Replies are text (UTF-8, surrogateescape: any bytes a user gave round-trip intact) unless the
client is made with decode=False, which the readers of agents' output streams use. Key names come
from supervisor/keys.py: this module knows commands, not keys.
"""
from __future__ import annotations

import os
import select
import socket
import sys
import time

import hiredis


# --- errors ---------------------------------------------------------------------------------------
class RespError(Exception):
    """Anything this client raises: Redis refused, could not be reached, or did not answer."""


class ReplyError(RespError):
    """An error reply from Redis (WRONGTYPE, a script's error...)."""


class NoScriptError(ReplyError):
    """EVALSHA of a script this Redis does not have (never loaded, or the server restarted)."""


class PasswordRefused(ReplyError):
    """AUTH failed, or Redis wants a password and none was given."""


class WatchError(RespError):
    """A watched key changed before EXEC: nothing of the transaction was carried out."""


class RespConnectionError(RespError, ConnectionError):
    """Redis cannot be reached, or the connection broke: a command may or may not have run."""


class NotOurServer(RespConnectionError):
    """What listens where the town's Redis should is another user's: nothing is sent to it."""


class NotAnswering(RespConnectionError):
    """Connected, but no reply came in time: a redis-server that is stopped (SIGSTOP) or wedged."""


class Loading(RespConnectionError):
    """Redis is up but still loading its data (just restarted): ask again in a moment."""


class TlsRefused(RespConnectionError):
    """The TLS handshake failed: a certificate not trusted, not for this host, or no TLS there."""


class Redirected(ReplyError):
    """A Redis Cluster node does not serve the town's slot: MOVED (for good) or ASK (mid-migration)."""

    @property
    def target(self) -> tuple[str, int]:
        host, _, port = str(self).split(" ")[2].rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def moved(self) -> bool:
        return str(self).startswith("MOVED")


_REPLY_ERRORS = {"NOSCRIPT": NoScriptError, "NOAUTH": PasswordRefused, "WRONGPASS": PasswordRefused,
                 "LOADING": Loading, "MOVED": Redirected, "ASK": Redirected}


def _reply_error(message: str) -> RespError:
    """hiredis calls this for each error reply: the class says what kind of refusal it is."""
    return _REPLY_ERRORS.get(message.split(" ", 1)[0], ReplyError)(message)


_MORE = object()   # hiredis's "no whole reply buffered yet"


def _reader(decode: bool) -> hiredis.Reader:
    if decode:
        return hiredis.Reader(replyError=_reply_error, protocolError=RespConnectionError, notEnoughData=_MORE,
                              encoding="utf-8", errors="surrogateescape")
    return hiredis.Reader(replyError=_reply_error, protocolError=RespConnectionError, notEnoughData=_MORE)


def pack(args) -> bytes:
    """One command as RESP. hiredis packs str as strict UTF-8, so a user's text holding a byte that
    is not UTF-8 (a lone surrogate after surrogateescape) is encoded here first."""
    args = tuple(args)
    try:
        return hiredis.pack_command(args)
    except UnicodeEncodeError:
        return hiredis.pack_command(tuple(a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a
                                          for a in args))


def connect(config, timeout: float = 5.0, long_lived: bool = False, retry_for: float = 0.0,
            decode: bool = True) -> "RespClient":
    """A client for the town's Redis: its own (unix socket, or host and port, with its password)
    or the one [redis] url names (TLS, a db, a Redis Cluster node serving the town's slot).

    timeout: for connecting, and for each reply of a `tt` command: a Redis that does not answer
    within it raises NotAnswering. long_lived: for the supervisor and the runners: no time limit on
    a reply (a Redis slow for a while, an fsync on a busy disk, is not a reason to give up).
    retry_for: keep trying to connect for that long (a runner riding out a redis-server restart).
    decode=False: replies as bytes (agents' output).
    """
    remote = config.remote
    if remote is None:
        where = {"path": str(config.redis_socket)} if config.use_socket else \
            {"host": config.redis_host, "port": config.redis_port}
    else:
        from .keys import Keys
        where = {"path": remote.path, "host": remote.host, "port": remote.port, "db": remote.db,
                 "username": remote.username, "route_key": Keys(config.name).supervisor,
                 "tls": tls_context(config.tls_file(config.tls_ca_cert), config.tls_file(config.tls_cert),
                                    config.tls_file(config.tls_key)) if remote.tls else None}
    return RespClient(**where, timeout=timeout, read_timeout=None if long_lived else timeout,
                      retry_for=retry_for, password=config.redis_password, decode=decode)


_TLS_CONTEXTS: dict = {}


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None):
    """An ssl context that verifies the server (its certificate and host name) against `ca_file`,
    else the system's CAs; with a client certificate if given. Made once per process."""
    made = _TLS_CONTEXTS.get((ca_file, cert_file, key_file))
    if made is not None:
        return made
    import ssl  # here: only a town on a rediss:// url pays for it
    loading = ca_file
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            loading = f"{cert_file}{', ' + key_file if key_file else ''}"
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise TlsRefused(f"cannot load [redis] TLS file {loading}: {reason}") from None
    _TLS_CONTEXTS[(ca_file, cert_file, key_file)] = context
    return context


# Which Redis Cluster node serves a slot, as learnt by this process: (seed host, port, route key) ->
# (host, port). A runner, forked from the supervisor, starts out knowing it.
_NODES: dict = {}


# --- reply shapes (as redis-py gives them, so call sites read naturally) ------------------------
def _pairs(reply):
    if reply is None:
        return {}
    return dict(zip(reply[::2], reply[1::2]))


def _int(reply):
    return int(reply)


def _entries(reply):
    """A stream's entries: [(id, {field: value}), ...]."""
    return [(entry_id, _pairs(fields)) for entry_id, fields in reply or []]


def _streams(reply):
    """XREAD's reply: [[stream, [(id, {field: value}), ...]], ...]; [] when the wait ran out."""
    return [[name, _entries(entries)] for name, entries in reply or []]


def _ok(reply):
    return reply in ("OK", b"OK")


def _client_list(reply):
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return [dict(item.partition("=")[::2] for item in line.split(" ")) for line in text.splitlines() if line]


class _Commands:
    """The commands, each as (args, how to shape the reply); shared by the client and pipelines."""

    def _call(self, args, shape=None):
        raise NotImplementedError

    def execute_command(self, *args):
        return self._call(args)

    def ping(self):
        return self._call(("PING",), lambda r: r in ("PONG", b"PONG"))

    def exists(self, *names):
        return self._call(("EXISTS", *names), _int)

    def delete(self, *names):
        return self._call(("DEL", *names), _int)

    def get(self, name):
        return self._call(("GET", name))

    def hget(self, name, key):
        return self._call(("HGET", name, key))

    def hgetall(self, name):
        return self._call(("HGETALL", name), _pairs)

    def hvals(self, name):
        return self._call(("HVALS", name))

    def hexists(self, name, key):
        return self._call(("HEXISTS", name, key), bool)

    def hlen(self, name):
        return self._call(("HLEN", name), _int)

    def hset(self, name, key=None, value=None, mapping=None):
        args = ["HSET", name]
        if key is not None:
            args += [key, value]
        for k, v in (mapping or {}).items():
            args += [k, v]
        return self._call(args, _int)

    def hincrby(self, name, key, amount=1):
        return self._call(("HINCRBY", name, key, amount), _int)

    def llen(self, name):
        return self._call(("LLEN", name), _int)

    def lrange(self, name, start, end):
        return self._call(("LRANGE", name, start, end))

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

    def zrange(self, name, start, end):
        return self._call(("ZRANGE", name, start, end))

    def publish(self, channel, message):
        return self._call(("PUBLISH", channel, message), _int)

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

    def xrevrange(self, name, max="+", min="-", count=None):
        args = ["XREVRANGE", name, max, min] + (["COUNT", count] if count is not None else [])
        return self._call(args, _entries)

    def evalsha(self, sha, keys=(), args=()):
        return self._call(("EVALSHA", sha, len(keys), *keys, *args))

    def eval(self, source, keys=(), args=()):
        return self._call(("EVAL", source, len(keys), *keys, *args))

    def client_list(self):
        return self._call(("CLIENT", "LIST"), _client_list)


# --- one connection ---------------------------------------------------------------------------
def _refuse_another_users_server(sock: socket.socket, where: str) -> None:
    """Close `sock` and raise NotOurServer if the end it reached is on this machine and belongs to
    another user. Anyone can bind the town's TCP port while the town is stopped (or before its
    redis-server does): that server would get the password first (AUTH goes out with the
    connection), and with it the running town. The server's end of this very connection is found
    in /proc/net/tcp by its address pair; its uid is the listener's. Not found: a Redis on another
    host, which only the password guards."""
    import struct
    family = sock.family
    server, client = sock.getpeername()[:2], sock.getsockname()[:2]

    def hexaddr(host: str, port: int) -> str:  # as the kernel prints them: words in host order
        if family == socket.AF_INET:
            words = struct.unpack("=I", socket.inet_aton(host))
        else:
            words = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, host))
        return "".join("%08X" % w for w in words) + ":%04X" % port

    wanted = (hexaddr(*server), hexaddr(*client))
    uid = None
    try:
        with open("/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6") as table:
            next(table)
            for line in table:
                fields = line.split()
                if (fields[1], fields[2]) == wanted:
                    uid = int(fields[7])
                    break
    except (OSError, StopIteration, ValueError, IndexError):  # pragma: no cover - no procfs
        return
    if uid is not None and uid != os.geteuid():
        sock.close()
        raise NotOurServer(f"{where} is served by another user (uid {uid}), not by this town: "
                           "nothing was sent to it (choose another [redis] port)")


# MOVED is followed at once; ASK (the slot moving key by key) is waited out 0.05 s a time: ~1 s in all.
MAX_REDIRECTS = 20


def _tls_wants_more(exc: OSError) -> bool:
    """A non-blocking TLS read that found no whole record: nothing to read yet, not an error."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, ssl.SSLWantReadError)


class RespClient(_Commands):
    """One connection, opened on first use and again when found closed; every call is one round trip.

    A connection Redis closed while it sat idle (redis-server restarted) is noticed before a
    command is sent on it, and replaced. One that breaks during a command raises
    RespConnectionError: the command may or may not have been carried out, which only the caller
    can judge. A reply that does not come within read_timeout raises NotAnswering.

    On a Redis Cluster (route_key given: a key in the town's one hash slot) a new connection asks
    for that key once per process, and moves to the node a MOVED reply names; a MOVED later (the
    slot moved) is followed the same way and the commands sent again, which is safe because a
    node that answers MOVED carried out none of them.
    """

    _UNSET = object()

    def __init__(self, path: str | None = None, host: str = "127.0.0.1", port: int = 6379, timeout: float = 5.0,
                 read_timeout=_UNSET, retry_for: float = 0.0, password: str | None = None, decode: bool = True,
                 db: int = 0, username: str | None = None, tls=None, route_key: str | None = None):
        self.path, self.host, self.port, self.timeout = path, host, port, timeout
        self.read_timeout = timeout if read_timeout is RespClient._UNSET else read_timeout
        self.retry_for = retry_for
        self.password, self.username, self.db = password, username, db
        self.tls, self.route_key = tls, route_key
        self.decode = decode
        self.sock: socket.socket | None = None
        self.reader: hiredis.Reader | None = None
        # AUTH and SELECT went out with the connection; their replies come first ("auth", "select")
        self.setup_unread: list[str] = []
        self.watching = False      # inside transaction(): a redirect must not lose the WATCH
        self.seed = (host, port)
        node = _NODES.get((host, port, route_key)) if route_key and not path else None
        if node:
            self.host, self.port = node
        self.probed = path is not None or route_key is None or node is not None
        # SHA1s of the Scripts this connection has seen Redis run or load: a pipeline sends those
        # by SHA1 alone. Forgotten with the connection (a new one may be to a restarted server).
        self.scripts: set[str] = set()

    @property
    def where(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    def _connect(self) -> None:
        fell_back = False
        for _ in range(MAX_REDIRECTS):
            learnt = self.path is None and self.route_key is not None and (self.host, self.port) != self.seed
            try:
                self._open(0.0 if learnt and not fell_back else self.retry_for)
            except TlsRefused:
                raise
            except RespConnectionError:
                if not learnt or fell_back:
                    raise
                # The node learnt earlier is gone (a failover): ask the url's node where the slot is now.
                fell_back = True
                _NODES.pop((*self.seed, self.route_key), None)
                self.host, self.port = self.seed
                self.probed = False
                continue
            if self.probed:
                return
            try:
                self._send(pack(("EXISTS", self.route_key)))
                reply = self._read()
            except RespError:
                raise
            except BaseException as exc:
                raise self._broken(exc) from None
            if not isinstance(reply, Redirected):
                if isinstance(reply, RespError):
                    self.close()
                    raise reply
                _NODES[(*self.seed, self.route_key)] = (self.host, self.port)
                self.probed = True
                return
            self.close()
            if reply.moved:
                self.host, self.port = reply.target
            else:
                time.sleep(0.05)  # ASK: the slot is moving key by key; its new node answers MOVED soon
        raise RespConnectionError(f"Redis Cluster at {self.seed[0]}:{self.seed[1]} kept redirecting the town's "
                                  "keys: its slot is moving; try again")

    def _open(self, retry_for: float) -> None:
        deadline = time.monotonic() + retry_for
        pause = 0.01
        while True:
            try:
                if self.path:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.timeout)
                    try:
                        sock.connect(self.path)
                    except BaseException:
                        sock.close()
                        raise
                else:
                    sock = socket.create_connection((self.host, self.port), self.timeout)
                    _refuse_another_users_server(sock, self.where)
                if self.tls is not None:
                    sock = self._tls_handshake(sock)
                break
            except TlsRefused:
                raise
            except OSError as exc:
                if time.monotonic() + pause > deadline:
                    raise RespConnectionError(f"cannot connect to Redis at {self.where}: "
                                              f"{exc.strerror or exc}") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
        sock.settimeout(self.read_timeout)
        self.sock, self.reader = sock, _reader(self.decode)
        # Sent now, their replies read before the first command's: no round trip of their own.
        setup = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
            self.setup_unread.append("auth")
        if self.db:
            setup.append(("SELECT", self.db))
            self.setup_unread.append("select")
        if setup:
            self._send(b"".join(pack(c) for c in setup))

    def _tls_handshake(self, sock: socket.socket):
        """`sock` wrapped in TLS, the server's certificate checked; TlsRefused in one line if not."""
        import ssl
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise TlsRefused(f"TLS with Redis at {self.where} refused: its certificate is not trusted "
                             f"({exc.verify_message}); [redis] tls_ca_cert names the CA that signed it") from None
        except TimeoutError:
            sock.close()
            raise TlsRefused(f"TLS with Redis at {self.where} failed: no handshake within {self.timeout:g} s "
                             "(is it serving TLS?)") from None
        except ssl.SSLError as exc:
            sock.close()
            reason = exc.reason or str(exc)
            hint = " (is it serving TLS?)" if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE") else ""
            raise TlsRefused(f"TLS with Redis at {self.where} failed: {reason.lower().replace('_', ' ')}{hint}") from None
        except OSError as exc:
            sock.close()
            raise TlsRefused(f"TLS with Redis at {self.where} failed: {exc.strerror or exc or 'no answer'}") from None

    def _usable(self) -> bool:
        """False if Redis closed this idle connection (or sent what nobody asked for)."""
        if self.setup_unread:
            return True  # AUTH's reply may be waiting: it was asked for
        try:
            if not select.select([self.sock], [], [], 0)[0]:
                return True
        except (OSError, ValueError):
            return False
        if self.tls is None:
            return False
        # With TLS, what arrived may be TLS's own (a session ticket), not data.
        try:
            self.sock.setblocking(False)
            try:
                self.sock.recv(1)
            finally:
                self.sock.settimeout(self.read_timeout)
        except OSError as exc:
            return _tls_wants_more(exc)
        return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = self.reader = None
            self.setup_unread = []
        self.watching = False
        self.scripts = set()

    def _ensure(self, idle: bool = True) -> None:
        """A connection to send on: a new one if there is none, or if Redis closed this one while
        it sat `idle` (no reply outstanding)."""
        if self.sock is not None and idle and not self._usable():
            self.close()
        if self.sock is None:
            self._connect()

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BaseException as exc:
            raise self._broken(exc) from None

    def _broken(self, exc: BaseException) -> BaseException:
        """Drop a connection a command failed on (the replies left on it would answer the next
        command); the exception to raise in its place."""
        self.close()
        if isinstance(exc, RespError):
            return exc
        if isinstance(exc, TimeoutError):
            return NotAnswering(f"Redis at {self.where} did not answer within {self.read_timeout or self.timeout:g} s")
        if isinstance(exc, OSError):
            return RespConnectionError(f"Redis connection lost: {exc}")
        return exc  # a signal handler's exception, KeyboardInterrupt: as it is

    def _read(self, block: bool = True):
        """The next reply (an error reply as a RespError instance, not raised); _MORE if not `block`
        and no whole reply has arrived."""
        while self.setup_unread:
            reply = self._next(block)
            if reply is _MORE:
                return _MORE
            kind = self.setup_unread.pop(0)
            if isinstance(reply, RespError):
                self.close()
                if kind == "select":
                    raise ReplyError(f"Redis at {self.where} refused db {self.db} ({reply})")
                if "without any password configured" in str(reply):
                    raise PasswordRefused(f"Redis at {self.where} has no password set, but the town gives one")
                raise PasswordRefused("the town's Redis refused the password")
        return self._next(block)

    def _next(self, block: bool):
        reply = self.reader.gets()
        while reply is _MORE and block:
            data = self.sock.recv(65536)
            if not data:
                raise RespConnectionError("Redis closed the connection")
            self.reader.feed(data)
            reply = self.reader.gets()
        return reply

    def _roundtrip(self, commands, replies: int, wait: float | None = None) -> list:
        """Send, and read the replies (on a Redis Cluster, from the node serving the town's slot)."""
        for _ in range(MAX_REDIRECTS):
            out = self._exchange(commands, replies, wait)
            if self.route_key is None:
                return out  # the town's own Redis: never a cluster
            redirect = next((r for r in out if isinstance(r, Redirected)), None)
            if redirect is None:
                return out
            self._follow(redirect)
        raise RespConnectionError(f"Redis Cluster at {self.seed[0]}:{self.seed[1]} kept redirecting the town's "
                                  "keys: its slot is moving; try again")

    def _follow(self, redirect: Redirected) -> None:
        """Go where a Redis Cluster node said the town's slot is (MOVED), or wait a moment for a
        slot being migrated (ASK). A transaction's WATCH stays behind on the old connection: the
        transaction is tried again from the start (WatchError)."""
        watching = self.watching
        self.close()
        if redirect.moved:
            self.host, self.port = redirect.target
            _NODES[(*self.seed, self.route_key)] = redirect.target
        else:
            time.sleep(0.05)
        if watching:
            raise WatchError("the town's slot moved to another node: the transaction starts again there")

    def _exchange(self, commands, replies: int, wait: float | None = None) -> list:
        """Send, and read the replies; `wait`: seconds the first reply may take beyond the
        read timeout (a blocking command's own wait; float('inf'): no limit)."""
        self._ensure()
        stretched = wait is not None and self.read_timeout is not None
        try:
            if stretched:
                self.sock.settimeout(None if wait == float("inf") else wait + self.read_timeout)
            self.sock.sendall(b"".join(pack(c) for c in commands))
            out = [self._read() for _ in range(replies)]
            if stretched:
                self.sock.settimeout(self.read_timeout)
            return out
        except BaseException as exc:
            raise self._broken(exc) from None

    def _call(self, args, shape=None, wait: float | None = None):
        reply = self._roundtrip([args], 1, wait)[0]
        if isinstance(reply, RespError):
            raise reply
        return shape(reply) if shape else reply

    # --- what needs more than one request and one reply ---------------------------------------
    def pipeline(self, transaction: bool = True) -> "Pipeline":
        return Pipeline(self, transaction)

    def transaction(self, body, *watch, attempts: int = 100):
        """An optimistic transaction: WATCH `watch`, then `body(pipe)` reads through this client
        and queues its writes on `pipe`, which run in one MULTI/EXEC only if no watched key
        changed in between; else all of it again. body's return value is returned; an exception
        in body (a check that failed) writes nothing."""
        for _ in range(attempts):
            try:
                self._call(("WATCH", *watch))
            except WatchError:
                continue
            self.watching = True
            pipe = Pipeline(self, transaction=True)
            try:
                result = body(pipe)
                if not pipe.queued:
                    self._call(("UNWATCH",))
                    return result
                pipe.execute()
                return result
            except WatchError:
                continue
            except BaseException:
                self.watching = False
                if self.sock is not None:  # still connected: drop the watch for the next command
                    try:
                        self._call(("UNWATCH",))
                    except RespError:
                        pass
                raise
            finally:
                self.watching = False
        raise WatchError(f"gave up after {attempts} attempts: {', '.join(watch)} kept changing")

    def blmove(self, source, destination, timeout, src="LEFT", dest="RIGHT"):
        """Block up to `timeout` seconds for an element (the socket waits that much longer)."""
        return self._call(("BLMOVE", source, destination, src, dest, timeout), wait=timeout)

    def xread(self, streams: dict, count=None, block=None):
        """New entries after each stream's id; with `block` (ms), wait that long for the first
        (0: until one comes). [[stream, [(id, {field: value}), ...]], ...], [] if none came."""
        args = ["XREAD"] + (["COUNT", count] if count is not None else [])
        if block is not None:
            args += ["BLOCK", block]
        args += ["STREAMS", *streams.keys(), *streams.values()]
        wait = None if block is None else (float("inf") if block == 0 else block / 1000)
        return self._call(args, _streams, wait=wait)

    def subscribe(self, *channels) -> "Subscription":
        """This connection, from now on listening on `channels` and good for nothing else.
        Returns without waiting for Redis's confirmation (a stalled Redis must not stall the
        caller); what arrives is read with Subscription.messages()."""
        self._ensure()
        self._send(pack(("SUBSCRIBE", *channels)))
        self.sock.setblocking(False)
        return Subscription(self)


class Pipeline(_Commands):
    """Commands queued and sent in one round trip (inside MULTI/EXEC when `transaction`)."""

    def __init__(self, client: RespClient, transaction: bool):
        self.client = client
        self.transaction = transaction
        self.queued: list[tuple] = []      # (args, shape, the Script if it is one)

    def _call(self, args, shape=None):
        self.queued.append((tuple(args), shape, None))
        return self

    def _script(self, script: "Script", keys, args):
        self.queued.append((("EVALSHA", script.sha, len(keys), *keys, *args), None, script))
        return self

    def execute(self) -> list:
        queued, self.queued = self.queued, []
        if not queued:
            return []
        client = self.client
        client._ensure()  # (before looking at client.scripts: a new connection knows none)
        # A script this connection has not seen yet is loaded in the same round trip, ahead of
        # the transaction, so the transaction itself always names scripts by SHA1 (their text is
        # 6-9 KB each); SCRIPT LOAD, unlike EVAL, puts it where Redis never evicts it.
        loads = list({script.sha: script for _, _, script in queued
                      if script is not None and script.sha not in client.scripts}.values())
        commands = [("SCRIPT", "LOAD", script.source) for script in loads]
        commands += [args for args, _, _ in queued]
        if self.transaction:
            replies = client._roundtrip(commands[:len(loads)] + [("MULTI",), *commands[len(loads):], ("EXEC",)],
                                        len(commands) + 2)
            for reply in replies[:-1]:
                if isinstance(reply, RespError):
                    raise reply
            replies = replies[-1]
            if replies is None:
                raise WatchError("a watched key changed: the transaction was not carried out")
        else:
            replies = client._roundtrip(commands, len(commands))
            for reply in replies[:len(loads)]:
                if isinstance(reply, RespError):
                    raise reply
            replies = replies[len(loads):]
        client.scripts.update(script.sha for script in loads)
        out = []
        for reply, (args, shape, script) in zip(replies, queued):
            if isinstance(reply, NoScriptError):
                # Only a SCRIPT FLUSH since the load can do this (a restarted server is a new
                # connection): NOSCRIPT fails that one command, not the transaction, so the script
                # runs now, after the others. The scripts queued in transactions are written to
                # be correct run on their own (releases and claims are idempotent).
                client.scripts.clear()
                reply = script(client, args[3:3 + args[2]], args[3 + args[2]:])
            elif isinstance(reply, RespError):
                raise reply
            out.append(shape(reply) if shape else reply)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.queued = []


class Subscription:
    """A connection in SUBSCRIBE mode: fileno() for select(), messages() for what has arrived."""

    def __init__(self, client: RespClient):
        self.client = client

    def fileno(self) -> int:
        return self.client.sock.fileno()

    def messages(self) -> list[tuple]:
        """The (channel, data) of every message that has arrived, without waiting.
        RespConnectionError once Redis has closed the connection."""
        client = self.client
        while True:
            try:
                data = client.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if _tls_wants_more(exc):
                    break
                raise client._broken(exc) from None
            if not data:
                client.close()
                raise RespConnectionError("Redis closed the connection")
            client.reader.feed(data)
        found = []
        while (reply := client._read(block=False)) is not _MORE:
            if isinstance(reply, RespError):
                raise reply
            if reply[0] in ("message", b"message"):
                found.append((reply[1], reply[2]))
        return found

    def close(self) -> None:
        self.client.close()


class Script:
    """A Lua script run by its SHA1 (EVALSHA), sent whole only when Redis does not have it yet.

    Alone: EVALSHA, and EVAL on NOSCRIPT. In a pipeline: loaded once per connection (SCRIPT LOAD,
    in the pipeline's round trip), then by SHA1 only; see Pipeline.execute for a NOSCRIPT there.
    """

    def __init__(self, source: str):
        self.source = source
        self._sha = ""

    @property
    def sha(self) -> str:
        if not self._sha:
            import hashlib  # here: only the processes that run scripts pay for it
            self._sha = hashlib.sha1(self.source.encode()).hexdigest()
        return self._sha

    def __call__(self, client, keys=(), args=()):
        if isinstance(client, Pipeline):
            return client._script(self, keys, args)
        try:
            reply = client.evalsha(self.sha, keys, args)
        except NoScriptError:
            reply = client.eval(self.source, keys, args)
        client.scripts.add(self.sha)
        return reply


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
            self.client._send(pack(args))
        except BaseException:
            self.outstanding = 0
            raise
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
        except BaseException as exc:
            self.outstanding = 0
            raise self.client._broken(exc) from None

    def close(self) -> None:
        self.client.close()
        self.outstanding = 0


def disk_full(exc: RespError) -> bool:
    """Redis's answer when it cannot write its append-only file (a full disk, most often): it
    refuses every write until it can. A script's write refused comes wrapped ("ERR Error running
    script ...: -MISCONF ..."): missed, it took the supervisor down at its next lease renewal."""
    message = str(exc)
    return message.startswith("MISCONF") or "-MISCONF " in message
