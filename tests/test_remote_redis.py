"""A town on a Redis it does not run ([redis] url): a password-protected server on 127.0.0.1, the
same behind TLS, and a 3-master Redis Cluster, all real redis-server processes (the bundled one)."""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import point_at, town_processes, wait_for

from tinytown.supervisor.keys import Keys


def everything_stored(client) -> str:
    """Every key and value in a Redis, as one text (to look for what must not be there)."""
    out = []
    cursor = "0"
    while True:
        cursor, keys = client.execute_command("SCAN", cursor, "COUNT", 1000)
        for key in keys:
            kind = client.execute_command("TYPE", key)
            value = {"string": ("GET", key), "hash": ("HGETALL", key), "list": ("LRANGE", key, 0, -1),
                     "set": ("SMEMBERS", key), "zset": ("ZRANGE", key, 0, -1),
                     "stream": ("XRANGE", key, "-", "+")}[kind]
            out.append(f"{key} {client.execute_command(*value)!r}")
        if cursor == "0":
            return "\n".join(out)


def no_redis_server_of_the_town(town) -> bool:
    return not any("redis-server" in " ".join(p.cmdline()) for p in town_processes(town.root)) and \
        not (town.root / ".tt" / "redis").exists()


def dev_then_tester(town) -> tuple[str, str]:
    """Agents dev and tester up on the url's Redis (no redis-server of the town's own), and a task
    each, tester's --after dev's: their ids."""
    town.tt("spawn", "dev")
    town.tt("spawn", "tester")
    town.wait_agent("dev")
    town.wait_agent("tester")
    assert no_redis_server_of_the_town(town)
    first = town.assign("dev", "@echo feature implemented")
    return first, town.json("assign", "tester", "@echo tests written", "--after", first)["id"]


def run_a_small_town(town, where) -> None:
    """Two agents, a task --after another, `tt logs`, status: all through the Redis at `where`
    (a client to it), and none of the town's processes left after `tt stop`."""
    first, second = dev_then_tester(town)
    held = town.assign("dev", "@gate go\n@echo held")
    never = town.json("assign", "tester", "@echo never", "--after", held)["id"]
    town.tt("cancel", never)
    (town.record / "go").touch()
    town.tt("wait", second, timeout=60)  # a blocking read through the same Redis
    assert town.wait_task(first)["state"] == "completed"
    done = town.wait_task(second)
    assert done["state"] == "completed" and done["attempts"] == 1
    assert "feature implemented" in town.recorded(second)[1].decode()  # the context of the task before
    assert "tests written" in town.tt("logs", "tester").out
    status = town.json("status")
    assert town.wait_task(held)["state"] == "completed"
    assert town.json("status")["tasks"]["completed"] == 3 and {a["name"] for a in status["agents"]} == {"dev", "tester"}
    assert town.task(never)["state"] == "cancelled" and never[:8] in town.tt("tasks").out
    assert "spawned" in town.tt("events").out
    # every key of the town is in its Redis Cluster hash slot
    keys = where.execute_command("KEYS", "*")
    assert keys and all(k.startswith("tt:{testtown}:") for k in keys), keys
    town.tt("stop")
    wait_for(lambda: not town_processes(town.root), 20, "the town's processes to exit")
    assert where.ping()  # not ours: still running


def test_a_town_on_a_password_protected_redis(make_town, remote_redis):
    town = make_town()
    point_at(town, remote_redis.url)
    run_a_small_town(town, remote_redis.client())
    status = town.json("status")
    assert status["redis"] == f"redis://127.0.0.1:{remote_redis.port}"
    assert status["running"] is False or status["supervisor"]["state"] == "stopped"
    # the password is nowhere the town writes: Redis, its logs, status, events
    password = remote_redis.password
    assert password not in everything_stored(remote_redis.client())
    for path in (town.root / ".tt").rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path
    assert password not in town.tt("status").out + town.tt("events").out


def test_the_password_from_an_environment_variable(make_town, remote_redis):
    town = make_town()
    point_at(town, f"redis://127.0.0.1:{remote_redis.port}/3", 'password_env = "TT_TEST_REDIS_PW"', private=False)
    town.env["TT_TEST_REDIS_PW"] = remote_redis.password
    town.tt("spawn", "dev")
    task = town.assign("dev", "@echo on db 3")
    assert town.wait_task(task)["state"] == "completed"
    client = remote_redis.client(db=3)
    assert client.exists(Keys("testtown").supervisor) and not remote_redis.client().exists(Keys("testtown").supervisor)
    assert remote_redis.password not in everything_stored(client)
    del town.env["TT_TEST_REDIS_PW"]
    out = town.tt("status", check=False)
    assert out.returncode == 1 and out.err == ("tt: error: the town's Redis password: environment variable "
                                               "TT_TEST_REDIS_PW ([redis] password_env) is not set\n")


@pytest.mark.parametrize("url, lines, message", [
    ("redis://127.0.0.1:6379", (), "no password (in the url, or password_env"),
    ("http://x:y@127.0.0.1", (), "must start with redis://, rediss:// (TLS) or unix://"),
    ("redis://:pw@127.0.0.1:99999", (), "bad port"),
    ("redis://:pw@127.0.0.1:6379/x", (), "the db after the host must be a number"),
    ("redis://:pw@127.0.0.1", ('password_env = "X"',), "password_env: the url holds a password already"),
    ("redis://:pw@127.0.0.1", ('tls_ca_cert = "ca.pem"',), "tls_ca_cert: goes with a rediss:// url"),
    (None, ('password_env = "X"',), "password_env: goes with [redis] url"),
])
def test_a_url_that_cannot_work_is_one_line_without_the_password(make_town, url, lines, message):
    town = make_town()
    point_at(town, url, *lines)
    out = town.tt("status", check=False)
    assert out.returncode == 1 and out.err.startswith("tt: error: ") and out.err.count("\n") == 1, out.err
    assert message in out.err and ":pw@" not in out.err and "Traceback" not in out.err, out.err


def test_a_password_in_a_file_others_can_read_is_refused(make_town, remote_redis):
    town = make_town()
    point_at(town, remote_redis.url, private=False)
    (town.root / "tinytown.toml").chmod(0o644)
    out = town.tt("status", check=False)
    assert out.returncode == 1 and "holds a password, and others can read tinytown.toml: chmod 600" in out.err
    assert remote_redis.password not in out.err


def test_refused_and_bad_password_are_one_line(make_town, remote_redis):
    town = make_town()
    point_at(town, remote_redis.url.replace(remote_redis.password, "wrong-one"))
    for args in (("status",), ("start",), ("spawn", "dev"), ("attach", "dev", "--read-only")):
        out = town.tt(*args, check=False)
        assert out.returncode == 1 and out.err.count("\n") == 1 and "Traceback" not in out.err, (args, out.err)
        assert "refused the password" in out.err and "wrong-one" not in out.err, (args, out.err)
    remote_redis.stop()
    point_at(town, None)
    for args in (("status",), ("start",)):
        out = town.tt(*args, check=False, timeout=60)
        assert out.returncode == 1 and out.err.count("\n") == 1 and "Traceback" not in out.err, (args, out.err)
        assert f"cannot connect to Redis at 127.0.0.1:{remote_redis.port}: Connection refused" in out.err, out.err
    for args in (("logs", "dev"), ("logs", "dev", "--redis"), ("logs", "dev", "--since", "10m"),  # (no log here)
                 ("attach", "dev", "--read-only")):
        out = town.tt(*args, check=False, timeout=60)  # (they said "no agent named 'dev'", or to `tt start` it)
        assert (out.returncode, out.err) == (1, f"tt: error: cannot reach the town's Redis at "
                                                f"redis://127.0.0.1:{remote_redis.port} for 'testtown'\n"), (args, out.err)
    assert not town_processes(town.root)


def test_a_town_from_before_the_hash_tag_keeps_its_data(make_town):
    """An append-only file written with `tt:<town>:` keys: the embedded Redis renames them at start."""
    town = make_town()
    town.tt("spawn", "dev")
    task = town.assign("dev", "@echo before")
    town.wait_task(task)
    town.tt("stop")
    config = town.config()
    from tinytown.supervisor.redis_server import RedisServer
    from tinytown.supervisor.resp import connect
    server = RedisServer(config)
    server._start(10)  # (no rename): left as an older version wrote it, every key under the old prefix
    try:
        client = connect(config)
        new = Keys("testtown").prefix
        for key in client.execute_command("KEYS", new + "*"):
            client.execute_command("RENAME", key, "tt:testtown:" + key[len(new):])
        assert not client.execute_command("KEYS", new + "*")
        client.close()
    finally:
        server.stop()
    town.tt("spawn", "tester")  # starts the supervisor: the keys come back under the new prefix
    assert town.task(task)["state"] == "completed"
    assert {a["name"] for a in town.json("list")} == {"dev", "tester"}
    from tinytown.supervisor.redis_server import rename_old_keys
    assert not connect(config).execute_command("KEYS", "tt:testtown:*") and rename_old_keys(config) == 0


def test_every_key_and_channel_is_in_the_towns_slot():
    """Keys are only ever made in keys.py; each one carries the town's hash tag."""
    keys = Keys("ft")
    names = [name for name in dir(Keys) if not name.startswith("_")]
    assert len(names) > 15
    for name in names:
        value = getattr(keys, name)
        made = value("x") if callable(value) else value
        assert made.startswith("tt:{ft}:"), (name, made)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = subprocess.run(["grep", "-rnE", r"[\"']tt:[^ ]", "supervisor", "cli"], cwd=here,
                           capture_output=True, text=True).stdout
    assert [line for line in found.splitlines() if "keys.py" not in line] == [], found


# --- TLS ----------------------------------------------------------------------------------------
def test_a_town_on_redis_behind_tls(make_town, tls_redis):
    town = make_town()
    point_at(town, tls_redis.url, f'tls_ca_cert = "{tls_redis.ca}"')
    run_a_small_town(town, tls_redis.redis.client())
    assert town.json("status")["redis"] == f"rediss://localhost:{tls_redis.port}"


def test_tls_failures_are_one_line(make_town, tls_redis, tmp_path):
    from conftest import make_certificates
    other = make_certificates(tmp_path / "other-ca", name="other")
    town = make_town()
    cases = [
        # a CA that did not sign the server's certificate
        ((tls_redis.url, f'tls_ca_cert = "{other["ca"]}"'),
         f"TLS with Redis at localhost:{tls_redis.port} refused: its certificate is not trusted ("),
        # no CA given: the system's do not know the test's
        ((tls_redis.url,), "its certificate is not trusted ("),
        # rediss:// to a Redis that does not speak TLS
        ((f"rediss://:{tls_redis.redis.password}@127.0.0.1:{tls_redis.redis.port}", f'tls_ca_cert = "{tls_redis.ca}"'),
         f"TLS with Redis at 127.0.0.1:{tls_redis.redis.port} failed: no handshake within 5 s (is it serving TLS?)"),
        # a CA file that is not there
        ((tls_redis.url, 'tls_ca_cert = "missing-ca.pem"'),
         f"cannot load [redis] TLS file {town.root / 'missing-ca.pem'}: No such file or directory"),
    ]
    path = town.root / "tinytown.toml"
    original = path.read_text()
    for (url, *lines), message in cases:
        path.write_text(original)
        point_at(town, url, *lines)
        for args in (("status",), ("start",)):
            out = town.tt(*args, check=False)
            assert out.returncode == 1 and out.err.count("\n") == 1 and "Traceback" not in out.err, (args, out.err)
            assert message in out.err and tls_redis.redis.password not in out.err, (args, out.err)
    assert not town_processes(town.root)


# --- Redis Cluster ----------------------------------------------------------------------------------
def test_a_town_on_a_redis_cluster(make_town, redis_cluster):
    """The url names a node that does not serve the town's slot: every client finds the one that
    does; then the slot moves to a third node under the running town, which follows it."""
    town = make_town()
    owner = redis_cluster.node_for(Keys("testtown").supervisor)
    seed, third = [node for node in redis_cluster.nodes if node is not owner]
    point_at(town, seed.url)
    first, second = dev_then_tester(town)
    assert town.wait_task(second)["state"] == "completed"
    assert "feature implemented" in town.recorded(second)[1].decode()
    assert "tests written" in town.tt("logs", "tester").out
    keys = owner.client().execute_command("KEYS", "*")
    assert keys and all(k.startswith("tt:{testtown}:") for k in keys)
    assert not seed.client().execute_command("KEYS", "*") and not third.client().execute_command("KEYS", "*")

    assert redis_cluster.move_slot(Keys("testtown").supervisor, third) == len(keys)
    # the supervisor, the runners (blocked on their inbox on the old node) and new commands follow
    third_task = town.json("assign", "dev", "@echo after the move", "--after", second)["id"]
    fourth = town.assign("tester", "@echo on the new node")
    assert town.wait_task(third_task)["state"] == "completed" and town.wait_task(fourth)["state"] == "completed"
    assert "after the move" in town.tt("logs", "dev").out
    assert town.json("status")["tasks"]["completed"] == 4
    assert not owner.client().execute_command("KEYS", "*")
    town.tt("stop")
    wait_for(lambda: not town_processes(town.root), 20, "the town's processes to exit")


def test_a_transaction_follows_a_moved_slot(redis_cluster):
    """The client: WATCH/MULTI/EXEC and scripts on the node serving the slot, again after it moved."""
    from tinytown.supervisor.resp import RespClient, Script
    key = "tt:{t}:counter"
    owner = redis_cluster.node_for(key)
    seed = next(node for node in redis_cluster.nodes if node is not owner)
    client = RespClient(host="127.0.0.1", port=seed.port, password=redis_cluster.password, route_key=key)

    def bump(pipe):
        value = int(client.execute_command("GET", key) or 0)
        pipe.execute_command("SET", key, value + 1)
        return value + 1

    assert client.transaction(bump, key) == 1 and client.port == owner.port
    script = Script("return redis.call('INCR', KEYS[1])")
    assert script(client, [key]) == 2
    other = next(node for node in redis_cluster.nodes if node is not owner and node is not seed)
    redis_cluster.move_slot(key, other)
    assert client.transaction(bump, key) == 3 and client.port == other.port
    assert script(client, [key]) == 4 and other.client().execute_command("GET", key) == "4"
    # a new client in this process goes straight to the node it learnt
    assert RespClient(host="127.0.0.1", port=seed.port, password=redis_cluster.password, route_key=key).port == other.port


def test_a_unix_socket_url_needs_no_password(make_town, bare_redis):
    server = bare_redis()
    town = make_town()
    point_at(town, f"unix://{server.path}?db=2", private=False)
    town.tt("spawn", "dev")
    task = town.assign("dev", "@echo over a socket")
    assert town.wait_task(task)["state"] == "completed"
    assert server.client(db=2).exists(Keys("testtown").task(task))
    assert town.json("status")["redis"] == f"unix://{server.path}?db=2"
    assert no_redis_server_of_the_town(town)


def test_the_town_rides_out_a_restart_of_its_redis(make_town, remote_redis):
    """The url's Redis goes away and comes back (a restart, a failover): the supervisor and the
    runners reconnect, and work goes on; the supervisor starts no redis-server of its own."""
    town = make_town()
    point_at(town, remote_redis.url)
    town.tt("spawn", "dev")
    first = town.assign("dev", "@echo before")
    assert town.wait_task(first)["state"] == "completed"
    supervisor = town.supervisor_pid()
    remote_redis.proc.terminate()  # SIGTERM: it writes its append-only file and exits
    remote_redis.proc.wait()
    remote_redis.start()
    second = town.assign("dev", "@echo after the restart")
    assert town.wait_task(second)["state"] == "completed"
    assert town.json("status")["supervisor"]["state"] == "running" and no_redis_server_of_the_town(town)
    assert town.supervisor_pid() == supervisor  # the same one, reconnected


def test_a_node_gone_after_its_slot_moved_sends_the_client_back_to_the_url(redis_cluster):
    """A failover: the node a process learnt serves the slot no more and is gone; a new connection
    asks the url's node again instead of knocking on the dead one."""
    from tinytown.supervisor.resp import RespClient
    key = "tt:{gone}:x"
    owner = redis_cluster.node_for(key)
    seed, third = [node for node in redis_cluster.nodes if node is not owner]
    redis_cluster.move_slot(key, third)
    client = RespClient(host="127.0.0.1", port=seed.port, password=redis_cluster.password, route_key=key, retry_for=30)
    client.execute_command("SET", key, "v")
    assert client.port == third.port
    redis_cluster.move_slot(key, owner)
    third.stop()
    wait_for(lambda: "cluster_state:ok" in owner.client().execute_command("CLUSTER", "INFO"), 30, "a cluster still up")
    again = RespClient(host="127.0.0.1", port=seed.port, password=redis_cluster.password, route_key=key, retry_for=30)
    assert again.port == third.port  # what this process learnt
    assert again.execute_command("GET", key) == "v" and again.port == owner.port


def test_urls_taken_apart(tmp_path):
    from tinytown.supervisor.config import init_town, load, parse_redis_url
    url = parse_redis_url("rediss://ops:p%40ss%3Aw%2Frd@[::1]:6380/2")
    assert (url.scheme, url.host, url.port, url.db, url.username, url.password, url.tls) == \
        ("rediss", "::1", 6380, 2, "ops", "p@ss:w/rd", True)
    assert url.shown == "rediss://[::1]:6380/2" and "p@ss" not in repr(url)
    assert parse_redis_url("redis://:pw@redis.example").port == 6379
    sock = parse_redis_url("unix:///run/redis/redis.sock?db=4")
    assert (sock.path, sock.db, sock.password) == ("/run/redis/redis.sock", 4, None)
    init_town(tmp_path, "t")
    path = tmp_path / "tinytown.toml"
    path.write_text(path.read_text().replace("[redis]", '[redis]\nurl = "redis://:hunter2@10.0.0.5:7000"', 1))
    path.chmod(0o600)
    config = load(tmp_path)
    assert config.redis_password == "hunter2" and config.redis_where == "redis://10.0.0.5:7000"
    assert "hunter2" not in repr(config) and not config.use_socket
