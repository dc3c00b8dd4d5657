"""supervisor/resp.py, the town's one Redis client, against a real redis-server."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import BareRedis, wait_for
from tinytown.supervisor import resp
from tinytown.supervisor.town import Town


@pytest.fixture
def running(town):
    town.tt("spawn", "dev")
    town.tt("spawn", "qa")
    return town


@pytest.fixture
def server(bare_redis):
    return bare_redis()


def test_reads_and_writes_the_town(running):
    config = running.config()
    town = Town(config)
    task = town.assign("dev", "caf\u00e9 \udcff bytes")  # a lone surrogate: a non-UTF-8 byte of a prompt
    running.wait_task(task.id)
    assert [a.name for a in town.agents()] == ["dev", "qa"]
    assert town.task(task.id).description == "caf\u00e9 \udcff bytes"
    assert town.task(task.id[:8]).id == task.id
    shown = {**town.task(task.id).to_json(), "after": [], "blocked_by": []}  # --json: dependencies as lists
    assert shown == running.task(task.id)  # what `tt task --json` shows
    assert [t.id for t in town.tasks()] == [task.id] and town.task_counts()["completed"] == 1
    assert town.supervisor_info()["state"] == "running"
    assert [a["name"] for a in town.status()["agents"]] == ["dev", "qa"]


def test_commands_pipelines_and_errors(server):
    c = server.client()
    assert c.ping() is True
    assert c.hset("h", mapping={"a": "1", "b": "x\r\ny"}) == 2
    assert c.hset("h", "c", 3) == 1
    assert c.hgetall("h") == {"a": "1", "b": "x\r\ny", "c": "3"}
    assert c.hget("h", "missing") is None and c.hgetall("nothing") == {}
    assert c.exists("h", "nothing") == 1 and c.hexists("h", "a") is True and c.hlen("h") == 3
    pipe = c.pipeline()
    pipe.hset("h", "a", "2").hget("h", "a").llen("list")
    assert pipe.execute() == [0, "2", 0]
    assert c.pipeline(transaction=False).hvals("h").execute() == [["2", "x\r\ny", "3"]]
    with pytest.raises(resp.ReplyError, match="WRONGTYPE"):
        c.llen("h")
    with pytest.raises(resp.ReplyError):
        c.pipeline().llen("h").execute()
    assert c.hget("h", "c") == "3"  # the connection is still in step after the errors
    assert c.execute_command("DEL", "h") == 1
    with pytest.raises(TypeError):
        c.hset("h", "a", None)  # nothing that is not text or a number goes to Redis
    assert c.ping()


def test_the_writes_the_supervisor_and_runners_use(server):
    c = server.client()
    assert c.rpush("l", "x", "y") == 2 and c.lpush("l", "w") == 3
    assert c.lrem("l", 1, "x") == 1 and c.lrange("l", 0, -1) == ["w", "y"]
    assert c.hincrby("h", "n", 5) == 5 and c.hincrby("h", "n", -2) == 3
    assert c.zadd("z", {"m": 1.5, "n": 1765000000.123456}) == 2 and c.zrange("z", 0, -1) == ["m", "n"]
    first = c.xadd("s", {"k": "v1"}, maxlen=10, approximate=True)
    second = c.xadd("s", {"k": "v2"})
    assert c.xrange("s", min=first) == [(first, {"k": "v1"}), (second, {"k": "v2"})]
    assert c.xrange("s", min=first, count=1) == [(first, {"k": "v1"})]
    assert c.xrevrange("s", count=1) == [(second, {"k": "v2"})]
    assert c.blmove("l", "m", 0.05, "LEFT", "RIGHT") == "w"
    assert c.blmove("none", "m", 0.05, "LEFT", "RIGHT") is None
    assert c.publish("nobody-listens", "x") == 0 and c.delete("l", "m") == 2
    assert any(client.get("cmd") == "client|list" or client.get("cmd") == "client" for client in c.client_list())


def test_bytes_replies_for_output(server):
    text, raw = server.client(), server.client(decode=False)
    entry = text.xadd("out", {"data": b"\xff\x1b[31mred\r\n", "task": "t1"})
    assert raw.xrevrange("out", "+", "-", count=1) == [(entry.encode(), {b"data": b"\xff\x1b[31mred\r\n",
                                                                         b"task": b"t1"})]
    assert raw.hgetall("nothing") == {} and raw.ping() is True
    assert text.xrevrange("out")[0][1]["data"] == "\udcff\x1b[31mred\r\n"  # text: surrogateescape


def test_xread_blocks_past_the_reply_timeout_and_wakes_on_new_entries(server):
    c = server.client(read_timeout=0.2)
    writer = server.client()
    assert c.xread({"s": "0-0"}, block=400) == []  # a wait longer than the reply timeout is not a timeout
    first = writer.xadd("s", {"k": "1"})
    assert c.xread({"s": "0-0"}, block=400) == [["s", [(first, {"k": "1"})]]]
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("r", c.xread({"s": first}, block=0)))
    reader.start()  # block=0: until an entry comes
    wait_for(lambda: any(cl.get("cmd") == "xread" for cl in writer.client_list()), 10, "the reader to block")
    second = writer.xadd("s", {"k": "2"})
    reader.join(10)
    assert got["r"] == [["s", [(second, {"k": "2"})]]]


def test_transaction_runs_again_when_a_watched_key_changes(server):
    c, other = server.client(), server.client()
    c.hset("h", "n", 1)
    runs = []

    def bump(pipe):
        value = int(c.hget("h", "n"))
        runs.append(value)
        if len(runs) == 1:
            other.hset("h", "n", 10)  # changed between the read and EXEC: this run must not count
        pipe.hset("h", "n", value + 1)
        return value + 1

    assert c.transaction(bump, "h") == 11
    assert runs == [1, 10] and c.hget("h", "n") == "11"


def test_a_transaction_whose_check_fails_writes_nothing_and_leaves_no_watch(server):
    c, other = server.client(), server.client()

    def refuse(pipe):
        pipe.hset("h", "written", "yes")
        raise ValueError("no")

    with pytest.raises(ValueError):
        c.transaction(refuse, "h")
    assert c.hgetall("h") == {}
    other.hset("h", "n", 1)  # would abort the next MULTI/EXEC on `c` if the WATCH were still on
    assert c.pipeline().hset("h", "m", 2).execute() == [1]


def test_script_runs_by_sha_and_falls_back_to_the_source(server):
    c = server.client()
    script = resp.Script("return redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])")
    assert script(c, ["h"], [2]) == 2  # unknown to Redis: sent whole
    assert script(c, ["h"], [3]) == 5  # now by sha
    c.execute_command("SCRIPT", "FLUSH")
    assert script(c, ["h"], [1]) == 6
    assert script(c.pipeline(), ["h"], [1]).hget("h", "n").execute() == [7, "7"]
    with pytest.raises(resp.ReplyError):
        resp.Script("return redis.call('LLEN', KEYS[1])")(c, ["h"])


def _script_loads(client) -> int:
    stats = client.execute_command("INFO", "commandstats")
    found = [line for line in stats.splitlines() if line.startswith(("cmdstat_script|load:", "cmdstat_script:"))]
    return int(found[0].split("calls=")[1].split(",")[0]) if found else 0


def test_a_transaction_names_a_script_by_sha_once_this_connection_loaded_it(server, tmp_path):
    """The finishing path's scripts (6-9 KB each) go to Redis once per connection, not in every
    MULTI; a SCRIPT FLUSH or a restarted redis-server between two transactions costs neither."""
    c = server.client()
    script = resp.Script("redis.call('RPUSH', KEYS[1], ARGV[1]) return redis.call('LLEN', KEYS[1])")

    def finish(item: str) -> list:
        return script(c.pipeline(), ["done"], [item]).rpush("log", item).execute()

    assert finish("a") == [1, 1] and _script_loads(c) == 1
    assert finish("b") == [2, 2] and _script_loads(c) == 1  # by sha alone
    server.client().execute_command("SCRIPT", "FLUSH")
    assert finish("c") == [3, 3]  # NOSCRIPT failed that command alone: it ran after the others
    assert c.lrange("done", 0, -1) == c.lrange("log", 0, -1) == ["a", "b", "c"]
    assert finish("d") == [4, 4]

    server.stop()  # a new redis-server where the old one was: it has no script
    restarted = BareRedis(Path(server.path).parent)
    try:
        assert finish("e") == [1, 1] and _script_loads(c) == 1
        assert c.lrange("done", 0, -1) == c.lrange("log", 0, -1) == ["e"]
        assert script(c.pipeline(transaction=False), ["done"], ["f"]).execute() == [2]
    finally:
        restarted.stop()


def test_subscription_gets_messages_and_notices_the_server_going(server):
    sub = server.client().subscribe("ctl")
    other = server.client()
    wait_for(lambda: other.execute_command("PUBSUB", "NUMSUB", "ctl")[1] == 1, 10, "the subscription")
    assert sub.messages() == []
    other.publish("ctl", "reconcile")
    other.publish("ctl", "stop")
    found = []
    wait_for(lambda: found.extend(sub.messages()) or len(found) == 2, 10, "two messages")
    assert found == [("ctl", "reconcile"), ("ctl", "stop")]
    server.stop()
    assert select.select([sub], [], [], 10)[0]

    def gone():
        try:
            sub.messages()
            return False
        except resp.RespConnectionError:
            return True

    wait_for(gone, 10, "the subscription to see the connection closed")


def test_password(bare_redis):
    server = bare_redis("--requirepass", "s3cret")
    assert server.client(password="s3cret").hset("h", "a", 1) == 1
    with pytest.raises(resp.PasswordRefused, match="^the town's Redis refused the password$"):
        server.client(password="wrong").ping()
    with pytest.raises(resp.PasswordRefused):
        server.client().ping()
    # connect(config) sends the config's password; so does a subscription, and a Sender
    config = SimpleNamespace(use_socket=True, redis_socket=server.path, redis_password="s3cret", remote=None)
    assert resp.connect(config).hget("h", "a") == "1"
    sender = resp.Sender(resp.connect(config))
    sender.send("RPUSH", "l", "x")
    sender.flush()
    assert sender.errors == [] and resp.connect(config).llen("l") == 1
    wrong = SimpleNamespace(use_socket=True, redis_socket=server.path, redis_password="nope", remote=None)
    with pytest.raises(resp.PasswordRefused):
        resp.connect(wrong).ping()


def test_no_redis_is_a_connection_error(tmp_path):
    c = resp.RespClient(path=str(tmp_path / "nothing.sock"))
    with pytest.raises(resp.RespConnectionError, match="cannot connect"):
        c.ping()


def test_a_stopped_redis_is_not_answering_and_the_client_recovers(server):
    c = server.client(timeout=0.3)
    assert c.ping()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(resp.NotAnswering, match="did not answer"):
            c.hget("h", "a")
        with pytest.raises(resp.NotAnswering):
            server.client(timeout=0.3).ping()  # a new connection too: the kernel accepts it for Redis
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert c.ping()  # the timed-out connection was dropped; a new one works


def test_errors_are_one_hierarchy_and_tt_explains_them_by_class(tmp_path):
    from tinytown.cli.main import _explain
    for cls in (resp.ReplyError, resp.NoScriptError, resp.PasswordRefused, resp.WatchError,
                resp.RespConnectionError, resp.NotAnswering, resp.Loading):
        assert issubclass(cls, resp.RespError)
    assert issubclass(resp.RespConnectionError, OSError)  # callers that catch OSError still do
    assert _explain(resp.RespConnectionError("cannot connect")).startswith("cannot reach the town's Redis")
    assert _explain(resp.ReplyError("WRONGTYPE x")) == "Redis error: WRONGTYPE x"
    assert _explain(resp.PasswordRefused("the town's Redis refused the password")) == \
        "the town's Redis refused the password"
    config = SimpleNamespace(redis_pid_file=tmp_path / "redis.pid")
    assert _explain(resp.NotAnswering("x"), config) == "the town's Redis does not answer (stopped?)"
    (tmp_path / "redis.pid").write_text("4242\n")
    assert _explain(resp.NotAnswering("x"), config) == "the town's Redis does not answer (pid 4242, stopped?)"
    assert _explain(ConnectionError("x")) == "ConnectionError: x"  # not ours: named as it is


def test_no_tt_command_imports_redis_py(running, tmp_path):
    """Every command, reading or writing, the logs too: redis-py is not imported (it cannot be)."""
    code = ("import sys; sys.modules['redis'] = None  # any `import redis` now raises ImportError\n"
            "from tinytown.cli.main import main; main()")
    task = running.assign("dev", "@echo hello")
    running.wait_task(task)
    each = tmp_path / "tasks.txt"
    each.write_text("one\ntwo\n")
    for args in (["list"], ["list", "--json"], ["status"], ["tasks"], ["task", task], ["spawn", "third"],
                 ["assign", "dev", "x"], ["assign", "dev", "--each", str(each)], ["restart", "qa"],
                 ["logs", "dev"], ["logs", "--redis", "dev"], ["logs", "--task", task], ["stop"]):
        out = subprocess.run([sys.executable, "-c", code, *args], cwd=running.root, env=running.env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "redis" not in out.stderr.replace("redis-server", ""), (args, out.stderr)


def test_status_says_when_the_towns_redis_is_stopped(running):
    pid = int((running.root / ".tt" / "redis.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        for args in (["status"], ["list"], ["tasks"]):
            out = running.tt(*args, check=False, timeout=60)  # bounded: a reply timeout, not a hang
            assert out.returncode != 0 and out.out == ""
            assert out.err.strip() == f"tt: error: the town's Redis does not answer (pid {pid}, stopped?)", args
    finally:
        os.kill(pid, signal.SIGCONT)
    assert running.json("status")["running"] is True


def test_sender_writes_in_order_without_waiting_and_collects_errors(server):
    sender = resp.Sender(server.client(), window=4)
    for i in range(10):
        sender.send("RPUSH", "sent", f"item {i}".encode())
    sender.send("LLEN", "hash-not-list")  # fine: 0
    sender.send("HSET", "sent", "a", "b")  # WRONGTYPE: reported, not raised
    sender.send("RPUSH", "sent", "last")
    assert sender.outstanding <= 4 + 1
    sender.flush()
    assert sender.outstanding == 0 and len(sender.errors) == 1 and "WRONGTYPE" in sender.errors[0]
    assert server.client().lrange("sent", 0, -1) == [f"item {i}" for i in range(10)] + ["last"]
    sender.close()


def test_a_full_disk_is_known_in_a_scripts_error_too():
    """Redis refuses writes while it cannot write its file (MISCONF); a script's refused write comes
    wrapped in the script's error, which the supervisor took for a bug and died of."""
    from tinytown.supervisor.resp import ReplyError, disk_full
    assert disk_full(ReplyError("MISCONF Errors writing to the AOF file: No space left on device"))
    assert disk_full(ReplyError("ERR Error running script (call to f_d20c): @user_script:58: @user_script: 58: "
                                "-MISCONF Errors writing to the AOF file: No space left on device"))
    assert not disk_full(ReplyError("ERR wrong number of arguments for 'hset' command"))
    assert not disk_full(ReplyError("WRONGTYPE Operation against a key holding the wrong kind of value: MISCONF"))
