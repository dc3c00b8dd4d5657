"""supervisor/resp.py, the small RESP client of the supervisor, the runners and the quick `tt` commands."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tinytown.supervisor import resp
from tinytown.supervisor.town import Town


@pytest.fixture
def running(town):
    town.tt("spawn", "dev")
    town.tt("spawn", "qa")
    return town


def test_reads_the_town_exactly_as_redis_py_does(running):
    config = running.config()
    full, light = Town(config), Town(config, client=resp.connect(config))
    task = full.assign("dev", "caf\u00e9 \udcff bytes")  # a lone surrogate: a non-UTF-8 byte of a prompt
    running.wait_task(task.id)
    stable = ("id", "name", "cli", "created_at", "restarts", "pid")  # runners move on between two reads
    assert ([{k: a.to_json()[k] for k in stable} for a in light.agents()]
            == [{k: a.to_json()[k] for k in stable} for a in full.agents()])
    assert light.pending_counts(light.agents()) == full.pending_counts(full.agents())
    assert light.task(task.id).to_json() == full.task(task.id).to_json()
    assert light.task(task.id).description == "caf\u00e9 \udcff bytes"
    assert light.task(task.id[:8]).id == task.id
    assert [t.to_json() for t in light.tasks()] == [t.to_json() for t in full.tasks()]
    assert light.task_counts() == full.task_counts()
    assert light.supervisor_info() == full.supervisor_info()
    assert [a["name"] for a in light.status()["agents"]] == ["dev", "qa"]


def test_commands_pipelines_and_errors(running):
    config = running.config()
    c = resp.connect(config)
    assert c.ping() is True
    assert c.hset("tt:test:h", mapping={"a": "1", "b": "x\r\ny"}) == 2
    assert c.hset("tt:test:h", "c", 3) == 1
    assert c.hgetall("tt:test:h") == {"a": "1", "b": "x\r\ny", "c": "3"}
    assert c.hget("tt:test:h", "missing") is None and c.hgetall("tt:test:nothing") == {}
    assert c.exists("tt:test:h", "tt:test:nothing") == 1
    pipe = c.pipeline()
    pipe.hset("tt:test:h", "a", "2").hget("tt:test:h", "a").llen("tt:test:list")
    assert pipe.execute() == [0, "2", 0]
    assert c.pipeline(transaction=False).hvals("tt:test:h").execute() == [["2", "x\r\ny", "3"]]
    with pytest.raises(resp.RespError, match="WRONGTYPE"):
        c.llen("tt:test:h")
    with pytest.raises(resp.RespError):
        c.pipeline().llen("tt:test:h").execute()
    assert c.hget("tt:test:h", "c") == "3"  # the connection is still in step after the errors
    assert c.execute_command("DEL", "tt:test:h") == 1


def test_no_redis_is_a_connection_error(tmp_path):
    c = resp.RespClient(path=str(tmp_path / "nothing.sock"))
    with pytest.raises(resp.RespConnectionError, match="cannot connect"):
        c.ping()


def test_the_reading_commands_never_import_redis_py(running):
    code = ("import sys\nfrom tinytown.cli.main import cli\n"
            "try:\n    cli(sys.argv[1:], prog_name='tt')\n"
            "except SystemExit:\n    pass\n"
            "print('REDIS-PY' if 'redis' in sys.modules else 'NO-REDIS-PY')")
    for args in (["list"], ["list", "--json"], ["status"], ["tasks"]):
        out = subprocess.run([sys.executable, "-c", code, *args], cwd=running.root, env=running.env,
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip().endswith("NO-REDIS-PY"), (args, out.stdout, out.stderr)


def test_sender_writes_in_order_without_waiting_and_collects_errors(running):
    config = running.config()
    sender = resp.Sender(resp.connect(config), window=4)
    for i in range(10):
        sender.send("RPUSH", "tt:test:sent", f"item {i}".encode())
    sender.send("LLEN", "tt:test:hash-not-list")  # fine: 0
    sender.send("HSET", "tt:test:sent", "a", "b")  # WRONGTYPE: reported, not raised
    sender.send("RPUSH", "tt:test:sent", "last")
    assert sender.outstanding <= 4 + 1
    sender.flush()
    assert sender.outstanding == 0 and len(sender.errors) == 1 and "WRONGTYPE" in sender.errors[0]
    c = resp.connect(config)
    assert c.lrange("tt:test:sent", 0, -1) == [f"item {i}" for i in range(10)] + ["last"]
    sender.close()


def test_writes_give_what_redis_py_gives(running):
    """The commands the supervisor and runners write with, against the same calls through redis-py."""
    config = running.config()
    full, light = Town(config).r, resp.connect(config)
    for client, tag in ((full, "a"), (light, "b")):
        assert client.rpush(f"t:{tag}:l", "x", "y") == 2 and client.lpush(f"t:{tag}:l", "w") == 3
        assert client.lrem(f"t:{tag}:l", 1, "x") == 1
        assert client.hincrby(f"t:{tag}:h", "n", 5) == 5 and client.hincrby(f"t:{tag}:h", "n", -2) == 3
        assert client.hlen(f"t:{tag}:h") == 1 and client.zadd(f"t:{tag}:z", {"m": 1.5}) == 1
        first = client.xadd(f"t:{tag}:s", {"k": "v1"}, maxlen=10, approximate=True)
        client.xadd(f"t:{tag}:s", {"k": "v2"})
        assert [f for _id, f in client.xrange(f"t:{tag}:s", min=first)] == [{"k": "v1"}, {"k": "v2"}]
        assert client.xrange(f"t:{tag}:s", min=first, count=1)[0][0] == first
        assert client.blmove(f"t:{tag}:l", f"t:{tag}:m", 0.05, "LEFT", "RIGHT") == "w"
        assert client.blmove(f"t:{tag}:none", f"t:{tag}:m", 0.05, "LEFT", "RIGHT") is None
    assert full.lrange("t:a:l", 0, -1) == light.lrange("t:b:l", 0, -1) == ["y"]
