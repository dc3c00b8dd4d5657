"""`tt attach` through the town's Redis, for an agent whose runner's attach socket is not on this
machine (its runner is on another host): keystrokes, window size and presence go in through a list
(Keys.attach_in), output comes out of the agent's output stream (Keys.output), which the runner
writes anyway for `tt logs`.

Both ends speak what a local attach speaks, so the rules are the same ones:
- The client side (RedisBridge) serves attach_protocol's frames on a socketpair to the very
  terminal loop a local attach uses (cli/attach.py): the detach key, --read-only, raw mode and
  what reaches the user's terminal (the CLI's output, as the local replay and live output would
  be, and `[tt]` lines whose text from Redis is cleaned) are decided there, once.
- The runner's side (RemoteInput) hands each message to its AttachServer (far_message), which
  types keys into the CLI's pty and applies window sizes exactly as for a local viewer: a
  read-only viewer's keys are dropped, the viewer that attached or resized last sets the size.

Costs when nobody attaches from afar: one connection per runner, blocked in BLPOP on the list
(no polling, nothing on the output path). While a viewer is attached from afar (it says so every
KEEPALIVE_SECONDS; the runner forgets it FAR_TTL_SECONDS after it last heard of it) the runner's
pump sends output to the stream at once rather than after STREAM_FLUSH_SECONDS: a keystroke's
echo then takes a Redis round trip or two, not 20 ms more.

A list message is `<viewer id: 16 hex><kind: 1 byte><payload>`; kinds: H hello and K still here
(JSON: mode, rows, cols), I keystrokes, W window size (JSON), B bye.
"""
from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import sys
import threading
import time

from .attach_protocol import FrameReader, frame, parse_json
from .attach_server import REPLAY_BYTES
from .keys import Keys
from .resp import RespConnectionError, RespError, connect
from .terminal_text import clean_written

KEEPALIVE_SECONDS = 1.0      # a viewer on another host says it is still there this often
FAR_TTL_SECONDS = 3.0        # the runner forgets a viewer not heard of for this long
LIST_TTL_MS = 5000           # keys nobody took within this are gone, never typed later
VIEWER_ID_LEN = 16
STATE_POLL_SECONDS = 0.3     # how often the client reads the agent's state (idle, working, stopped)
ENDED_STATES = ("stopped", "paused", "failed")   # no runner, none coming back by itself
NOT_RUNNING = (*ENDED_STATES, "backoff")         # no runner to attach to now


def attach_route(config, name: str) -> str:
    """How `tt attach NAME` reaches the agent: "local" (its runner's unix socket is on this machine)
    or "redis" (it is not: the runner is on another host). A socket left here by a runner of the
    agent's that ran here before (a host killed, the agent moved) does not count."""
    if not os.path.exists(config.attach_socket(name)):
        return "redis"
    from .hosts import fencing, placed_elsewhere
    if not fencing(config):
        return "local"
    from .town import Town
    town = Town(config)
    agent_id = town.r.hget(town.keys.agent_index, name)
    return "redis" if agent_id and placed_elsewhere(config, town.r, [agent_id]) else "local"


def encode(viewer: str, kind: bytes, payload: bytes = b"") -> bytes:
    return viewer.encode() + kind + payload


def decode(message: bytes) -> tuple[str, bytes, bytes] | None:
    """(viewer id, kind, payload), or None for what no viewer sent."""
    if len(message) < VIEWER_ID_LEN + 1:
        return None
    try:
        viewer = message[:VIEWER_ID_LEN].decode("ascii")
    except UnicodeDecodeError:
        return None
    return viewer, message[VIEWER_ID_LEN:VIEWER_ID_LEN + 1], message[VIEWER_ID_LEN + 1:]


# --- the runner's side ----------------------------------------------------------------------------

class RemoteInput:
    """A thread of the runner blocked on BLPOP of its agent's attach_in list; each message goes to
    the AttachServer (far_message), which owns what a viewer may do. Every signal is blocked in the
    thread, as in the attach server's: stop signals still interrupt the main thread's waits."""

    def __init__(self, config, agent_id: str, attach):
        self.config = config
        self.key = Keys(config.name).attach_in(agent_id)
        self.attach = attach
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name="tt-remote-attach", daemon=True)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self.thread.start()
        except RuntimeError as exc:  # no thread to be had: the agent works on without it
            print(f"tt runner: cannot serve attach from other hosts: {exc}", file=sys.stderr)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _serve(self) -> None:
        client = None
        pause = 0.05
        try:
            while True:
                try:
                    if client is None:
                        client = connect(self.config, long_lived=True, decode=False)
                    popped = client.execute_command("BLPOP", self.key, 0)
                    pause = 0.05
                except RespConnectionError:  # Redis restarting: come back when it is
                    if client is not None:
                        client.close()
                    client = None
                    time.sleep(pause)  # (the pace of the retries)
                    pause = min(pause * 2, 1.0)
                    continue
                message = decode(popped[1]) if popped else None
                if message is not None:
                    self.attach.far_message(*message)
        except Exception as exc:  # noqa: BLE001 - attach must never take the runner down
            print(f"tt runner: attach from other hosts stopped: {type(exc).__name__}: {exc}",
                  file=sys.stderr)


# --- the client's side ----------------------------------------------------------------------------

class RedisBridge:
    """The far end of a socketpair that cli/attach.py's terminal loop talks to as it would to a
    runner's attach socket, backed by Redis: frames from the terminal go into the attach_in list,
    the output stream and the agent's state come back as O and S frames.

    Two threads, each with its own connection: one forwards what the terminal sends (and says
    "still here" every KEEPALIVE_SECONDS), one blocks in XREAD on the output stream. Either ending
    ends the session: the terminal sees its socket close (after an S "stopped" frame when the
    agent stopped, so it exits 0; without one it says the connection was lost)."""

    def __init__(self, config, agent):
        self.config = config
        self.agent = agent
        keys = Keys(config.name)
        self.in_key = keys.attach_in(agent.id)
        self.out_key = keys.output(agent.id)
        self.agent_key = keys.agent(agent.id)
        self.viewer = secrets.token_hex(VIEWER_ID_LEN // 2)
        self.done = threading.Event()
        self.here: socket.socket | None = None
        self.last = b"0-0"                  # the newest output stream entry sent on
        self.shown = ("", "")               # the (state, task) the terminal was last told
        self.threads: list[threading.Thread] = []

    def open(self) -> socket.socket:
        """Start the bridge; the socket the terminal loop reads and writes frames on."""
        terminal, self.here = socket.socketpair()
        for target, name in ((self._forward_input, "tt-attach-in"), (self._forward_output, "tt-attach-out")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        return terminal

    def close(self) -> None:
        """After the terminal loop ended: say bye (so the runner forgets this viewer now) and stop."""
        self.done.set()
        for thread in self.threads:
            thread.join(2.0)

    # --- terminal -> Redis ---
    def _forward_input(self) -> None:
        client = connect(self.config, timeout=5.0, decode=False)
        reader = FrameReader()
        hello: dict = {}
        try:
            while not self.done.is_set():
                ready, _, _ = select.select([self.here], [], [], KEEPALIVE_SECONDS)
                if not ready:
                    if hello:
                        self._push(client, b"K", json.dumps(hello).encode())
                    continue
                data = self.here.recv(65536)
                if not data:
                    break
                for kind, payload in reader.feed(data):
                    if kind == b"H":
                        hello = parse_json(payload)
                    elif kind == b"W":
                        hello.update(parse_json(payload))
                    self._push(client, kind, payload)
            self._push(client, b"B")
        except (RespError, OSError, ValueError):
            pass
        finally:
            self._end()
            client.close()

    def _push(self, client, kind: bytes, payload: bytes = b"") -> None:
        """One message in the list, and the list's expiry pushed back: one round trip."""
        pipe = client.pipeline(transaction=False)
        pipe.rpush(self.in_key, encode(self.viewer, kind, payload))
        pipe.execute_command("PEXPIRE", self.in_key, LIST_TTL_MS)
        pipe.execute()

    # --- Redis -> terminal ---
    def _forward_output(self) -> None:
        client = connect(self.config, timeout=5.0, decode=False)
        try:
            replay = self._replay(client)
            if replay:
                self._send(b"O", replay)
            polled = float("-inf")
            while not self.done.is_set():
                if time.monotonic() - polled >= STATE_POLL_SECONDS:
                    polled = time.monotonic()
                    state = self._agent_state(client)
                    if state["state"] == "lost":
                        return
                    if state["state"] in ("idle", "working", "stopped") and \
                            (state["state"], state.get("task", "")) != self.shown:
                        self._drain(client, None)  # what it printed before the change comes first
                        self._state(state)
                        if state["state"] == "stopped":
                            return
                self._drain(client, int(STATE_POLL_SECONDS * 1000))
        except (RespError, OSError):
            pass
        finally:
            self._end()
            client.close()

    def _drain(self, client, block_ms: int | None) -> None:
        """The output stream's new entries as O frames (waiting up to block_ms for the first), each
        task's output after a "working on task T" line, as a local attach shows them."""
        for _, entries in client.xread({self.out_key: self.last}, block=block_ms) or []:
            for entry_id, fields in entries:
                self.last = entry_id
                task = clean_written(fields.get(b"task", b"").decode("utf-8", "replace"))
                if task and self.shown != ("working", task):
                    self._state({"state": "working", "task": task})
                if b"data" in fields:
                    self._send(b"O", fields[b"data"])

    def _replay(self, client) -> bytes:
        """The recent output a new viewer sees first (REPLAY_BYTES at most); reading on starts after
        it. It starts at a line, not inside an escape sequence, unless it is the stream's whole
        content, as a local attach's replay does."""
        chunks: list[bytes] = []   # newest first
        size, whole, top = 0, False, "+"
        while size < REPLAY_BYTES:
            batch = client.xrevrange(self.out_key, top, "-", count=100)
            if top == "+":          # the newest entry: reading on starts after it
                if not batch:
                    return b""
                self.last = batch[0][0]
            for _, fields in batch:
                chunks.append(fields.get(b"data", b""))
                size += len(chunks[-1])
            if len(batch) < 100:    # the stream's beginning: all of its output, unless it was trimmed
                whole = size <= REPLAY_BYTES and \
                    client.execute_command("XLEN", self.out_key) < self.config.logs.stream_maxlen
                break
            top = b"(" + batch[-1][0]
        data = b"".join(reversed(chunks))
        if not whole:
            data = data[-REPLAY_BYTES:]
            data = data[data.find(b"\n") + 1:]
        return data

    def _agent_state(self, client) -> dict:
        """The agent's state as an S frame would say it; "lost" when its runner went away (crashed:
        a local viewer's connection would have been cut)."""
        fields = client.hgetall(self.agent_key)
        if not fields:
            return {"state": "stopped", "reason": "the agent was removed"}
        state = fields.get(b"state", b"").decode("utf-8", "replace")
        if state in ENDED_STATES:
            reason = clean_written(fields.get(b"reason", b"").decode("utf-8", "replace"))[:200]
            return {"state": "stopped", "reason": reason or f"the agent is {state}"}
        if state == "backoff":
            return {"state": "lost"}
        task = clean_written(fields.get(b"current_task", b"").decode("utf-8", "replace"))
        return {"state": state, "task": task}

    def _state(self, state: dict) -> None:
        """An S frame (its text already cleaned: it came from Redis)."""
        msg = {"state": state["state"]}
        if state.get("task"):
            msg["task"] = state["task"]
        if state.get("reason"):
            msg["reason"] = state["reason"]
        self._send(b"S", json.dumps(msg).encode())
        self.shown = (state["state"], msg.get("task", ""))

    def _send(self, kind: bytes, payload: bytes) -> None:
        self.here.sendall(frame(kind, payload))

    def _end(self) -> None:
        """The session is over from this side: the terminal loop reads the end of its socket."""
        self.done.set()
        try:
            self.here.shutdown(socket.SHUT_WR)
        except OSError:
            pass
