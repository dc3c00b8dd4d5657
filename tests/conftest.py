"""Shared test helpers: a real town in a temp folder, driven through the real `tt` command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent

# The tests Ctrl+C a `tt` they start (SIGINT). Started in the background by a shell without job
# control (`pytest &` in a script, some CI runners), this process inherits SIGINT ignored, and so
# would every `tt` it starts: a handler here is reset to the default in them at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
FAKE_BIN = REPO / "fixtures" / "bin"
FAKE_AGENT = REPO / "fixtures" / "fake_agent.py"

FAST_POLICY = """
[supervisor]
backoff_first = 0.05
backoff_factor = 2.0
backoff_max = 1.0
start_seconds = 1.0
max_fast_failures = 4
max_attempts = 3
stop_grace = 10.0
heartbeat_interval = 0.5
heartbeat_stale = 5.0
"""


@pytest.fixture
def git_identity(monkeypatch, tmp_path_factory):
    """The user's identity for their own commits and `tt merge`; no global config of the machine's."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for kind in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{kind}_NAME", "Una User")
        monkeypatch.setenv(f"GIT_{kind}_EMAIL", "una@example.com")


def race(target, count: int, timeout: float = 60.0) -> None:
    """Run target(0) .. target(count - 1) in threads started together, and wait for them all."""
    import threading
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def wait_for(predicate, timeout: float = 20.0, message: str = "condition"):
    """Poll until `predicate()` is truthy; return its value or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def interrupt_inside_gc(folder: Path) -> tuple[dict, Path]:
    """(env additions, marker): a Python started with them, once the marker exists, sends itself
    SIGINT from inside a garbage-collector callback, so its KeyboardInterrupt is raised there and
    Python swallows it ("Exception ignored"), as one landing in a finalizer (click's stream
    wrappers have one) was. That is how `tt events -f` once kept following after Ctrl+C in CI."""
    hook = folder / "interrupt-inside-gc"
    hook.mkdir(exist_ok=True)
    marker = hook / "now"
    (hook / "sitecustomize.py").write_text(
        "import gc, os, signal\n"
        f"MARKER = {str(marker)!r}\n"
        "gc.set_threshold(1)  # (a collection at almost every allocation: any loop makes some)\n"
        "def interrupt_here(phase, info):\n"
        "    if phase == 'start' and os.path.exists(MARKER):\n"
        "        os.unlink(MARKER)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        sum(range(10))  # (bytecodes: the handler runs here, in the callback)\n"
        "gc.callbacks.append(interrupt_here)\n")
    return {"PYTHONPATH": str(hook)}, marker


def town_processes(root: Path) -> list[psutil.Process]:
    """Every live process that belongs to the town: cwd inside it, or its path on the command line."""
    root_s = str(root)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cwd = proc.info["cwd"] or ""
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, OSError):
            continue
        if cwd == root_s or cwd.startswith(root_s + "/") or root_s in cmd:
            found.append(proc)
    return found


def _wait_state(fetch, states, timeout: float, what: str) -> dict:
    """Fetch a record (a task's, an agent's) until its state is one of `states`; return it."""
    latest = {}

    def reached():
        latest["record"] = fetch()
        return latest["record"]["state"] in states

    wait_for(reached, timeout, f"{what} to reach {states}")
    return latest["record"]


class TownHarness:
    def __init__(self, root: Path):
        self.root = root
        self.record = root / "record"
        self.record.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        # The venv's bin next: the fake CLIs' `#!/usr/bin/env python3` then finds a real interpreter,
        # not a version-manager shim (pyenv's costs ~150 ms a task).
        self.env["PATH"] = os.pathsep.join([str(FAKE_BIN), str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.env["FAKE_AGENT_RECORD"] = str(self.record)
        self.env.pop("TT_TOWN_DIR", None)

    def tt(self, *args, input: bytes | str | None = None, check: bool = True, timeout: float = 60,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
        if isinstance(input, str):
            input = input.encode()
        proc = subprocess.run([sys.executable, "-m", "tinytown.cli.main", *args], cwd=cwd or self.root, env=self.env,
                              input=input, capture_output=True, timeout=timeout)
        proc.out = proc.stdout.decode(errors="replace")
        proc.err = proc.stderr.decode(errors="replace")
        if check and proc.returncode != 0:
            pytest.fail(f"tt {' '.join(map(str, args))[:200]} exited {proc.returncode}:\n{proc.err}\n{proc.out}")
        return proc

    def assign(self, agent: str, text: str) -> str:
        """`tt assign AGENT TEXT`; the new task's id."""
        return self.json("assign", agent, text)["id"]

    def json(self, *args):
        """`tt ARGS --json`, parsed (--json goes before a "--" among ARGS)."""
        args = list(args)
        at = args.index("--") if "--" in args else len(args)
        return json.loads(self.tt(*args[:at], "--json", *args[at:]).stdout)

    def append_config(self, text: str) -> None:
        with (self.root / "tinytown.toml").open("a") as fh:
            fh.write(text)

    def config(self):
        from tinytown.supervisor.config import load
        return load(self.root)

    def town(self):
        from tinytown.supervisor.town import Town
        return Town(self.config())

    def task(self, task_id: str) -> dict:
        return self.json("task", task_id)

    def wait_task(self, task_id: str, states=("completed", "failed"), timeout: float = 30.0) -> dict:
        return _wait_state(lambda: self.task(task_id), states, timeout, f"task {task_id}")

    def agent(self, name: str) -> dict:
        return next(a for a in self.json("list") if a["name"] == name)

    def wait_agent(self, name: str, states=("idle",), timeout: float = 30.0) -> dict:
        return _wait_state(lambda: self.agent(name), states, timeout, f"agent {name}")

    def supervisor_pid(self) -> int | None:
        from tinytown.supervisor import lock
        return lock.holder(self.root / ".tt")

    def recorded(self, task_id: str) -> tuple[dict, bytes]:
        info = json.loads((self.record / f"{task_id}.json").read_text())
        return info, (self.record / f"{task_id}.prompt").read_bytes()

    def cleanup(self) -> None:
        if (self.root / ".tt" / "supervisor.lock").exists() and self.supervisor_pid():
            self.tt("stop", "--now", check=False, timeout=60)
        for proc in town_processes(self.root):
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass


@pytest.fixture
def make_town(tmp_path):
    """Factory: an initialised town (fast restart policy) in a temp folder, stopped afterwards."""
    made = []

    def make(name: str = "testtown", extra: str = "", policy: str = FAST_POLICY, folder: str = "town"):
        root = tmp_path / folder
        root.mkdir(parents=True)
        harness = TownHarness(root)
        harness.tt("init", "--name", name)
        harness.append_config(policy + extra)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.cleanup()


@pytest.fixture
def town(make_town):
    return make_town()


class BareRedis:
    """A redis-server of its own on a unix socket (no town, no supervisor): for the store logic and
    the client itself. `args`: more of its options (e.g. --requirepass)."""

    def __init__(self, folder: Path, *args: str):
        from tinytown.supervisor.config import Config
        from tinytown.supervisor.redis_server import find_binary
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = str(folder / "redis.sock")
        self.proc = subprocess.Popen(
            [find_binary(Config(root=folder, name="bare")), "--port", "0", "--unixsocket", self.path,
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--dir", str(folder), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Until it answers: the socket file appears at bind(), a moment before listen() (a
        # connection in between is refused). One that never does is not left running.
        try:
            wait_for(lambda: self._answers() or self.proc.poll() is not None, 20, "redis-server to answer")
            assert self.proc.poll() is None, "redis-server exited at start"
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        from tinytown.supervisor.resp import ReplyError, RespClient, RespError
        client = RespClient(path=self.path, timeout=1)
        try:
            return client.ping()
        except ReplyError:  # (NOAUTH: it answers, it wants a password)
            return True
        except (RespError, OSError):
            return False
        finally:
            client.close()

    def client(self, **kwargs):
        from tinytown.supervisor.resp import RespClient
        return RespClient(path=self.path, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def bare_redis(tmp_path):
    """Factory: BareRedis(*args) in the test's temp folder, killed afterwards."""
    started = []

    def start(*args: str) -> BareRedis:
        server = BareRedis(tmp_path / f"redis{len(started)}", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- Redis elsewhere: a password-protected TCP server, a TLS proxy in front of it, a Redis Cluster ----
# (reused by the multi-host tests: several supervisors, each with its own copy of a town folder,
# sharing one of these through [redis] url)
def point_at(town: TownHarness, url: str | None = None, *lines: str, private: bool = True) -> None:
    """Put `url = ...` (and more `lines`, e.g. 'tls_ca_cert = "..."') in the town's [redis] table;
    chmod 600 unless not `private` (a url holding a password is refused in a file others can read)."""
    path = town.root / "tinytown.toml"
    extra = "".join(f"\n{line}" for line in ((f"url = {json.dumps(url)}",) if url else ()) + lines)
    path.write_text(path.read_text().replace('socket_path = "redis.sock"', 'socket_path = "redis.sock"' + extra, 1))
    if private:
        path.chmod(0o600)


def free_port(pairs_with_bus: bool = False) -> int:
    """A TCP port on 127.0.0.1 nobody listens on (with pairs_with_bus: port + 10000 too, a Redis
    Cluster node's bus port)."""
    import socket
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not pairs_with_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


class PasswordRedis:
    """A redis-server on 127.0.0.1:PORT requiring a password, as a team's shared Redis would be
    (its options on stdin: the password stays off the command line). `url` is what goes into
    [redis] url; `stop()`/`start()` take it away and bring it back (its data kept in memory only
    while it runs, unless appendonly)."""

    def __init__(self, folder: Path, password: str = "s3cret-pw", extra: str = ""):
        self.folder, self.password, self.extra = folder, password, extra
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.port = free_port(pairs_with_bus="cluster-enabled yes" in extra)
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        from urllib.parse import quote
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}"

    def settings(self) -> str:
        return (f"port {self.port}\nbind 127.0.0.1\nrequirepass {self.password}\nmasterauth {self.password}\n"
                f"save \"\"\nappendonly yes\ndir {self.folder}\nlogfile {self.folder / 'redis.log'}\n{self.extra}")

    def start(self) -> None:
        from tinytown.supervisor.config import Config
        from tinytown.supervisor.redis_server import find_binary
        self.proc = subprocess.Popen([find_binary(Config(root=self.folder, name="shared")), "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=str(self.folder))
        self.proc.stdin.write(self.settings().encode())
        self.proc.stdin.close()
        try:
            wait_for(lambda: self._answers() or self.proc.poll() is not None, 20, "redis-server to answer")
            assert self.proc.poll() is None, "redis-server exited at start: " + (self.folder / "redis.log").read_text()[-500:]
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        from tinytown.supervisor.resp import RespError
        try:
            with_client = self.client(timeout=1)
            try:
                return with_client.ping()
            finally:
                with_client.close()
        except (RespError, OSError):
            return False

    def client(self, **kwargs):
        from tinytown.supervisor.resp import RespClient
        return RespClient(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


@pytest.fixture
def remote_redis(tmp_path):
    """A password-protected redis-server on 127.0.0.1 (PasswordRedis): .url, .password, .port, .client()."""
    server = PasswordRedis(tmp_path / "shared-redis")
    yield server
    server.stop()


def make_certificates(folder: Path, hosts=("localhost", "127.0.0.1"), name: str = "ca") -> dict:
    """A CA and a server certificate it signs for `hosts`, made by openssl into `folder`:
    {"ca": path, "cert": path, "key": path} (PEM)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, ca_key = folder / f"{name}.pem", folder / f"{name}.key"
    cert, key, csr = folder / f"{name}-server.pem", folder / f"{name}-server.key", folder / f"{name}-server.csr"
    ext = folder / f"{name}-ext.cnf"
    alt = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    ext.write_text(f"subjectAltName={alt}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", f"/CN=tinytown test {name}")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hosts[0]}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "cert": cert, "key": key}


class TlsProxy:
    """TLS in front of a plain TCP server, as stunnel (or a managed Redis's TLS endpoint) does:
    listens on 127.0.0.1:port, completes the TLS handshake with `cert`/`key`, and copies bytes
    both ways to `upstream`. Threads: one to accept, two per connection."""

    def __init__(self, upstream_port: int, cert: Path, key: Path):
        import socket
        import ssl
        import threading
        self.upstream_port = upstream_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.conns: list = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        import socket
        import ssl
        import threading
        while not self.closed:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                raw.settimeout(10)
                tls = self.context.wrap_socket(raw, server_side=True)
                tls.settimeout(None)
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            self.conns += [tls, upstream]
            threading.Thread(target=self._pump, args=(tls, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, tls), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        import socket
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for sock in self.conns:
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture
def tls_redis(tmp_path, remote_redis):
    """remote_redis behind a TLS proxy with certificates made for the test: .url (rediss://, the
    password in it), .ca (the CA's PEM for [redis] tls_ca_cert), .redis (the PasswordRedis), .proxy."""
    certs = make_certificates(tmp_path / "certs")
    proxy = TlsProxy(remote_redis.port, certs["cert"], certs["key"])
    from types import SimpleNamespace
    from urllib.parse import quote
    yield SimpleNamespace(url=f"rediss://:{quote(remote_redis.password, safe='')}@localhost:{proxy.port}",
                          ca=certs["ca"], certs=certs, redis=remote_redis, proxy=proxy, port=proxy.port)
    proxy.close()


class LocalCluster:
    """A Redis Cluster of `masters` password-protected redis-server nodes on 127.0.0.1, slots spread
    evenly, made with our own client (CLUSTER ADDSLOTS / MEET): .url names the first node."""

    def __init__(self, folder: Path, masters: int = 3, password: str = "cluster-pw"):
        self.password = password
        self.nodes: list[PasswordRedis] = []
        self.owners: dict[int, PasswordRedis] = {}  # slots moved by move_slot
        try:
            for i in range(masters):
                sub = folder / f"node{i}"
                sub.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.nodes.append(PasswordRedis(sub, password, extra=(
                    f"cluster-enabled yes\ncluster-config-file {sub / 'nodes.conf'}\ncluster-node-timeout 5000\n")))
            per = 16384 // masters
            for i, node in enumerate(self.nodes):
                high = 16383 if i == masters - 1 else (i + 1) * per - 1
                node.client().execute_command("CLUSTER", "ADDSLOTS", *range(i * per, high + 1))
            for node in self.nodes[1:]:
                self.nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            wait_for(self._ok, 30, "the cluster to agree (cluster_state:ok on every node)")
        except BaseException:
            self.stop()
            raise

    def _ok(self) -> bool:
        for node in self.nodes:
            info = node.client().execute_command("CLUSTER", "INFO")
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                return False
        return True

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def node_for(self, key: str) -> PasswordRedis:
        """The node that serves `key`'s slot."""
        slot = self.nodes[0].client().execute_command("CLUSTER", "KEYSLOT", key)
        if slot in self.owners:
            return self.owners[slot]
        per = 16384 // len(self.nodes)
        return self.nodes[min(slot // per, len(self.nodes) - 1)]

    def move_slot(self, key: str, to: PasswordRedis) -> int:
        """Move `key`'s slot, with its keys, to node `to` (as redis-cli --cluster reshard does):
        the number of keys moved. Clients then get MOVED."""
        source = self.node_for(key)
        slot = source.client().execute_command("CLUSTER", "KEYSLOT", key)
        ids = {node.port: node.client().execute_command("CLUSTER", "MYID") for node in self.nodes}
        to.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to.port])
        moved = 0
        while keys := source.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            source.client().execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "AUTH", self.password,
                                            "KEYS", *keys)
            moved += len(keys)
        for node in (to, source, *self.nodes):
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to.port])
        self.owners[slot] = to
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def redis_cluster(tmp_path):
    """A 3-master LocalCluster (password on every node): .url, .nodes, .node_for(key)."""
    cluster = LocalCluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()
