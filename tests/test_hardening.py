"""What a hostile neighbour, a full disk and a stuck agent do to a town (issue 12), against real
processes: each test failed before its fix."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import town_processes

LONG_FOLDER = "d" * 70 + "/" + "e" * 60  # .tt/redis.sock is then too long for a unix socket


def tt_in_namespace(town, mounts: list[tuple[Path, Path]], *args) -> subprocess.CompletedProcess:
    """`tt ARGS` in a mount namespace of its own where each (source, target) is bind-mounted: what
    the test does to /tmp/tt-<uid> there, the other towns on this machine do not see."""
    script = "".join(f'mount --bind "{src}" "{dst}" && ' for src, dst in mounts) + 'exec "$@"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                           sys.executable, "-m", "tinytown.cli.main", *args],
                          cwd=town.root, env=town.env, capture_output=True, timeout=60)
    proc.out, proc.err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1) for a private /tmp/tt-<uid>")


# --- 1. the Redis socket's folder, when the town's path is too long -----------------------------
@needs_mount_namespace
@pytest.mark.parametrize("hostile", ["open to all", "another user's"])
def test_a_socket_folder_another_user_could_reach_is_refused(make_town, tmp_path, hostile):
    town = make_town(folder=LONG_FOLDER)
    shared = Path(f"/tmp/tt-{os.getuid()}")
    shared.mkdir(mode=0o700, exist_ok=True)  # (the mount point; in the namespace it is the folder below)
    made_first = tmp_path / "made-by-a-neighbour"
    made_first.mkdir()
    if hostile == "open to all":
        os.chmod(made_first, 0o777)
    else:
        os.chown(made_first, 4242, 4242)
        os.chmod(made_first, 0o700)
    proc = tt_in_namespace(town, [(made_first, shared)], "spawn", "dev")
    assert proc.returncode == 1
    assert proc.err.count("\n") == 1 and "Traceback" not in proc.err
    assert f"{shared} must be a folder only you own" in proc.err and "Redis socket" in proc.err
    assert list(made_first.iterdir()) == []  # no socket put where the neighbour could reach it
    assert town_processes(town.root) == []


# --- 2. with TCP, the town's Redis is not open to every local user --------------------------------
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_reply(port: int, *commands: bytes) -> list[bytes]:
    """Each command's first reply line, on one connection that never authenticated (or did, if a
    command is AUTH)."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        replies = []
        for command in commands:
            sock.sendall(command + b"\r\n")
            replies.append(reader.readline().strip())
        return replies


def test_with_tcp_redis_wants_a_password_and_has_no_config_command(make_town):
    town = make_town()
    port = free_port()
    path = town.root / "tinytown.toml"
    path.write_text(path.read_text().replace('use_socket = true\nsocket_path = "redis.sock"',
                                             f'use_socket = false\nport = {port}'))
    town.tt("spawn", "dev")
    task = town.wait_task(town.json("assign", "dev", "@echo over tcp")["id"])
    assert task["state"] == "completed" and "over tcp" in task["output"]

    secret_file = town.root / ".tt" / "redis.password"
    assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
    password = secret_file.read_text().strip().encode()
    assert len(password) >= 32
    # anyone on this machine can connect to the port, but without the password Redis says no
    ping, keys, config = redis_reply(port, b"PING", b"KEYS *", b"CONFIG SET dir /tmp")
    assert ping.startswith(b"-NOAUTH") and keys.startswith(b"-NOAUTH")
    assert config.startswith((b"-NOAUTH", b"-ERR unknown command"))
    # and with it, CONFIG, DEBUG and MODULE do not exist
    replies = redis_reply(port, b"AUTH " + password, b"CONFIG GET dir", b"DEBUG SLEEP 0", b"MODULE LIST")
    assert replies[0] == b"+OK" and all(r.startswith(b"-ERR unknown command") for r in replies[1:])
    # it listens on the loopback only
    [server] = [p for p in town_processes(town.root) if "redis-server" in p.name()]
    assert {c.laddr.ip for c in server.net_connections("inet") if c.status == "LISTEN"} == {"127.0.0.1"}

    # the password is in no log, no status, no Redis key or value, no command line
    status = town.tt("status").out + town.tt("status", "--json").out
    texts = [status, *(p.read_text(errors="replace") for p in (town.root / ".tt").rglob("*.log"))]
    t = town.town()
    for key in t.r.execute_command("KEYS", "*"):
        kind = t.r.execute_command("TYPE", key)
        texts.append(key)
        if kind == "hash":
            texts.append(repr(t.r.hgetall(key)))
        elif kind == "list":
            texts.append(repr(t.r.lrange(key, 0, -1)))
        elif kind == "stream":
            texts.append(repr(t.r.xrange(key)))
        elif kind == "string":
            texts.append(t.r.get(key))
    t.r.close()
    texts += [" ".join(p.cmdline()) for p in town_processes(town.root) if p.is_running()]
    assert not [text for text in texts if password.decode() in text]
    town.tt("stop")
    assert town_processes(town.root) == []


# --- 7. a task whose agent cannot run it says why ------------------------------------------------
def test_tasks_waiting_for_a_failed_agent_say_why_and_count_as_blocked(make_town):
    town = make_town(policy="\n[supervisor]\nstart_seconds = 60\nmax_fast_failures = 2\nmax_attempts = 2\n"
                            "backoff_first = 0.05\n")
    town.tt("spawn", "d")
    crash = town.json("assign", "d", "@kill-runner")["id"]
    town.wait_agent("d", ("failed",))
    later = town.json("assign", "d", "@echo later")["id"]

    for task_id in (crash, later):
        task = town.task(task_id)
        assert task["state"] == "assigned"
        assert task["reason"].startswith("waiting: agent d failed: runner killed by SIGKILL")
        assert "waiting: agent d failed: runner killed by SIGKILL" in " ".join(town.tt("task", task_id).out.split())
    listing = " ".join(town.tt("tasks", "--agent", "d").out.split())
    assert listing.count("waiting: agent d failed") == 2
    status = town.json("status")
    assert status["tasks"]["blocked"] == 2 and status["tasks"]["assigned"] == 2
    assert "blocked 2" in town.tt("status").out

    # `tt restart`: the agent runs again, and the tasks no longer say they wait for a failed one
    town.tt("restart", "d")
    assert town.wait_task(later)["state"] == "completed"
    assert town.json("status")["tasks"]["blocked"] == 0
    assert not town.task(later)["reason"]


# --- 5. a full disk under .tt/: the town keeps what it has ---------------------------------------
def fill(folder):
    """A file taking every byte left on `folder`'s file system, to the last; its path."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (65536, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return filler


def writes_refused(client) -> bool:
    """Whether Redis refuses writes for want of room for its file (MISCONF)."""
    from tinytown.supervisor.resp import RespError
    try:
        client.hset("tt:probe", "x", "y")
        return False
    except RespError as exc:
        return str(exc).startswith("MISCONF")


@needs_mount_namespace
def test_a_full_disk_under_the_town_keeps_the_supervisor_up_and_says_so(make_town):
    from conftest import wait_for
    from tinytown.supervisor.resp import connect
    town = make_town(policy="\n[supervisor]\nheartbeat_interval = 0.2\nstart_seconds = 0.1\n")
    runtime = town.root / ".tt"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(runtime)], check=True)
    try:
        town.tt("spawn", "dev")
        assert town.wait_task(town.json("assign", "dev", "@echo before")["id"])["state"] == "completed"
        supervisor = town.supervisor_pid()
        filler = fill(runtime)
        client = connect(town.config())
        refused = lambda: writes_refused(client)  # noqa: E731
        wait_for(refused, 30, "Redis to refuse writes")
        # the runner's heartbeats fail, it exits; the supervisor cannot record anything either
        status = wait_for(lambda: (lambda s: s if s["supervisor"]["disk_error"] else None)(town.json("status")),
                          20, "tt status to say the disk is full")
        assert status["supervisor"]["disk_error"].startswith("disk full:")
        assert "disk full:" in town.tt("status").out
        wait_for(lambda: "disk full" in town.tt("status").out and town.supervisor_pid() == supervisor, 10,
                 "the supervisor to stay")
        assert town.supervisor_pid() == supervisor

        filler.unlink()  # space again: Redis writes its file, and the town goes on by itself
        wait_for(lambda: not refused(), 30, "Redis to write again")
        task = town.wait_task(town.json("assign", "dev", "@echo after")["id"])
        assert task["state"] == "completed" and "after" in task["output"]
        assert town.supervisor_pid() == supervisor and not town.json("status")["supervisor"]["disk_error"]
        client.close()
        town.tt("stop")
    finally:
        town.cleanup()
        subprocess.run(["umount", "-l", str(runtime)], check=False)


@needs_mount_namespace
def test_a_running_task_outlives_a_full_disk_and_is_recorded_once_there_is_space(make_town):
    """Redis refusing writes mid-task (MISCONF): the runner's next heartbeat raised out of the pump,
    whose cleanup SIGKILLed the CLI, and the task ran again as a crash. The CLI works on; its
    outcome waits until Redis writes again."""
    from conftest import wait_for
    from tinytown.supervisor.resp import connect
    town = make_town(policy="\n[supervisor]\nheartbeat_interval = 0.2\nstart_seconds = 0.1\n")
    runtime = town.root / ".tt"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(runtime)], check=True)
    try:
        town.tt("spawn", "dev")
        task = town.json("assign", "dev", "@gate go\n@seq 3000\n@echo done after the gate")["id"]
        wait_for(lambda: town.agent("dev")["cli_pid"], 30, "the CLI to start")
        filler = fill(runtime)
        client = connect(town.config())
        wait_for(lambda: writes_refused(client), 30, "Redis to refuse writes")
        log = runtime / "logs" / "dev.log"
        wait_for(lambda: "Redis refuses writes" in log.read_text(errors="replace"), 20, "the runner to say so")
        cli = town.agent("dev")["cli_pid"]
        (town.record / "go").touch()  # the CLI prints ~30 KB (the log cannot take it either) and finishes
        wait_for(lambda: not psutil.pid_exists(cli) or psutil.Process(cli).status() == psutil.STATUS_ZOMBIE, 30,
                 "the CLI to finish")
        assert town.task(task)["state"] == "running"  # its outcome waits for Redis
        filler.unlink()
        done = town.wait_task(task)
        assert (done["state"], done["attempts"]) == ("completed", 1) and "done after the gate" in done["output"]
        client.close()
        town.tt("stop")
    finally:
        town.cleanup()
        subprocess.run(["umount", "-l", str(runtime)], check=False)


# --- a second look as another local user -----------------------------------------------------------
NEIGHBOUR_UID = 4242  # no such user needs to exist: a socket is owned by the uid that made it


def listen_as_neighbour(make_socket, bind_as_root: bool = False):
    """A listener served by another uid (a forked child that drops to NEIGHBOUR_UID, so no
    interpreter has to be runnable by that user); it records every byte a client sends it and
    answers each command +OK. make_socket() gives (socket, address), bound, not listening: a TCP
    socket belongs to the uid that made it, a unix one to the uid that calls listen() (so it can be
    bound as root in a private folder). Returns (pid, address, read the bytes received so far)."""
    import socket
    import tempfile
    received = Path(tempfile.mkdtemp()) / "received"
    received.touch()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            out = open(received, "ab", buffering=0)  # opened before the uid drops
            if bind_as_root:
                listener, address = make_socket()
            os.setgroups([])
            os.setgid(NEIGHBOUR_UID)
            os.setuid(NEIGHBOUR_UID)
            if not bind_as_root:
                listener, address = make_socket()
            listener.listen(8)
            os.write(ready_w, repr(address).encode())
            while True:
                conn, _ = listener.accept()
                conn.settimeout(2)
                try:
                    while data := conn.recv(65536):
                        out.write(data)
                        conn.sendall(b"+OK\r\n" * max(data.count(b"*"), 1))
                except OSError:
                    pass
                conn.close()
        finally:
            os._exit(0)
    os.close(ready_w)
    import ast
    address = ast.literal_eval(os.read(ready_r, 4096).decode())
    os.close(ready_r)
    return pid, address, received.read_bytes


def stop_neighbour(pid: int) -> None:
    import signal
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as another uid")


@needs_root
def test_a_port_another_user_holds_gets_neither_the_password_nor_a_prompt(make_town):
    """With TCP, a neighbour who binds the town's port first (the town stopped, or not yet up) must
    not be taken for the town's Redis: it would get the password, and with it the running town
    (every prompt, and tasks pushed to agents that run as you)."""
    import socket
    port = free_port()

    def make_socket():
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        return listener, port

    town = make_town()
    path = town.root / "tinytown.toml"
    path.write_text(path.read_text().replace('use_socket = true\nsocket_path = "redis.sock"',
                                             f'use_socket = false\nport = {port}'))
    secret_file = town.root / ".tt" / "redis.password"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600)  # as an earlier start left it
    os.write(fd, b"the-towns-password-0123456789abcdef\n")
    os.close(fd)
    pid, _, received = listen_as_neighbour(make_socket)
    try:
        proc = town.tt("tasks", check=False)  # reads from whatever serves the port
        assert proc.returncode == 1 and proc.err.count("\n") == 1
        assert f"127.0.0.1:{port} is served by another user" in proc.err
        # starts a supervisor, whose redis-server cannot listen; its wait for Redis sends nothing either
        proc = town.tt("assign", "dev", "a secret prompt", check=False)
        assert proc.returncode == 1 and proc.err.count("\n") == 1 and "Traceback" not in proc.err
        assert b"the-towns-password" not in received() and b"secret prompt" not in received()
        assert b"AUTH" not in received()
    finally:
        stop_neighbour(pid)
    assert town_processes(town.root) == []


@needs_root
def test_tt_attach_talks_only_to_a_runner_of_its_own_user(make_town):
    """An attach socket another user serves (one in a /tmp/tt-<uid> they made first, for a long
    town path) would get your keystrokes and write what it likes to your terminal."""
    import socket
    town = make_town()
    path = town.town().config.attach_socket("dev")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def make_socket():
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        return listener, str(path)

    import stat
    pid, _, received = listen_as_neighbour(make_socket, bind_as_root=True)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        proc = town.tt("attach", "dev", "--read-only", check=False)
        assert proc.returncode == 1 and proc.err.count("\n") == 1 and "Traceback" not in proc.err
        assert "another user" in proc.err, proc.err
        assert received() == b""
    finally:
        stop_neighbour(pid)


@needs_root
def test_the_supervisor_leaves_another_users_processes_alone(make_town):
    """A neighbour's process that names the town and a task in its environment was taken for a
    CLI left by a killed supervisor: the root supervisor stopped it and killed it, and the process
    groups of its children."""
    import subprocess
    town = make_town()
    env = {"PATH": "/usr/bin:/bin", "TT_TOWN_DIR": str(town.root), "TT_TASK_ID": "x", "TT_AGENT_ID": "x"}
    neighbour = subprocess.Popen(["sleep", "300"], env=env, user=NEIGHBOUR_UID, group=NEIGHBOUR_UID,
                                 extra_groups=[])
    try:
        town.tt("spawn", "dev")
        assert neighbour.poll() is None
        town.tt("stop")
        assert neighbour.poll() is None
    finally:
        neighbour.kill()
        neighbour.wait()
