"""Attach and logs from any host: `tt attach` through the town's Redis (keys in through a list, output
out of the agent's output stream, window size, detach key, --read-only) driven through a real pty
against real runners, and `tt logs -f` for an agent whose log file is not on this machine."""
from __future__ import annotations

import os

import pytest

import test_attach as local_tests
from conftest import wait_for
from test_attach import expect_clean_exit
from test_logs import Follower


@pytest.fixture
def attach():
    """`tt attach ARGS --via-redis` in its own pty (test_attach.py's factory)."""
    yield from local_tests.attach_factory("--via-redis")


@pytest.fixture
def attach_here():
    """`tt attach ARGS` as a user types it: the route is the command's own choice."""
    yield from local_tests.attach_factory()


# The local attach's own tests, each run again with its `tt attach` going through Redis: the same
# keys reach the CLI, the same output, states, detach keys and window sizes come back.
def test_through_redis_replay_prompt_answer_and_detach(town, attach):
    local_tests.test_replay_prompt_answer_and_detach(town, attach)


def test_through_redis_idle_agent_stays_attached_until_a_task(town, attach):
    local_tests.test_idle_agent_stays_attached_until_a_task(town, attach)


def test_through_redis_read_only_sends_nothing(town, attach):
    local_tests.test_read_only_sends_nothing(town, attach)


def test_through_redis_window_size_follows_the_terminal(town, attach):
    local_tests.test_window_size_follows_the_terminal(town, attach)


def test_socket_not_on_this_machine_goes_through_redis(town, attach_here):
    """An agent whose attach socket is not here (its runner on another host) is reached through
    Redis without being asked; one whose socket is here, through the socket."""
    from tinytown.supervisor.remote_attach import attach_route
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    config = town.config()
    assert attach_route(config, "dev") == "local"
    os.unlink(config.attach_socket("dev"))          # as on a host that does not run dev's runner
    assert attach_route(config, "dev") == "redis"
    viewer = attach_here(town, "dev")
    viewer.expect_exact("dev is idle")
    task = town.assign("dev", "@ask")
    viewer.expect_exact(f"dev is working on task {task}")
    viewer.expect_exact("Proceed? [y/N]")
    viewer.send("y\r")
    viewer.expect_exact("proceeding")
    assert town.wait_task(task)["exit_code"] == 0
    town.tt("close", "dev")                         # its runner stops: the viewer is told, and ends
    viewer.expect_exact("dev's runner stopped")
    expect_clean_exit(viewer)


def test_through_redis_errors(town):
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    for args, message in ((("nosuch",), "no agent named 'nosuch'"),
                          (("dev",), "needs a terminal")):
        proc = town.tt("attach", "--via-redis", *args, check=False)
        assert proc.returncode == 1 and proc.err.startswith("tt: error: ") and message in proc.err, proc.err
        assert len(proc.err.strip().splitlines()) == 1
    town.tt("stop")
    proc = town.tt("attach", "dev", "--via-redis", "--read-only", check=False)
    assert proc.returncode == 1 and "not running" in proc.err and len(proc.err.strip().splitlines()) == 1


# --- tt logs -f from another host ------------------------------------------------------------------

def test_logs_follow_an_agent_whose_log_is_not_here(town):
    """On another host the agent's log file is absent though a supervisor runs there: `tt logs -f`
    follows the output stream, for that agent alone and among all agents."""
    town.tt("spawn", "dev")
    town.tt("spawn", "ops")
    town.wait_task(town.assign("dev", "@echo before-the-move"))
    town.wait_task(town.assign("ops", "@echo ops-was-here"))
    os.unlink(town.config().log_file("dev"))        # its runner writes on, to a file not here
    one = Follower(town, "dev")
    every = Follower(town)
    try:
        one.wait_for("before-the-move")
        every.wait_for("dev | before-the-move")
        every.wait_for("ops | ops-was-here")
        town.wait_task(town.assign("dev", "@echo after-the-move"))
        one.wait_for("after-the-move")
        every.wait_for("dev | after-the-move")
        assert one.stop() == 0 and every.stop() == 0
    finally:
        for follower in (one, every):
            if follower.proc.poll() is None:
                follower.proc.kill()
                follower.proc.wait()


def test_keys_still_reach_the_cli_after_redis_server_restarted(town, attach):
    """The runner's blocked read on the attach_in list rides out a redis-server restart."""
    from test_supervision import redis_servers
    town.tt("spawn", "dev")
    town.wait_agent("dev")
    runner = town.agent("dev")["pid"]
    [server] = redis_servers(town)
    server.kill()
    wait_for(lambda: [p.pid for p in redis_servers(town)] not in ([], [server.pid]), 30, "a new redis-server")
    task = town.assign("dev", "@ask")
    viewer = attach(town, "dev")
    viewer.expect_exact("Proceed? [y/N]")
    viewer.send("y\r")
    viewer.expect_exact("proceeding")
    assert town.wait_task(task)["exit_code"] == 0 and town.agent("dev")["pid"] == runner
    local_tests.detach(viewer)
