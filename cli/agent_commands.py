"""`tt interrupt`, `resume`, `close`, `kill`, `prune` (supervisor/agent_control.py) and `tt events`."""
from __future__ import annotations

import json
import sys
import time

import click

from tinytown.cli.main import (_config, _live_town, _print_json, _recorded_town, complete_agent,
                               json_option, town_option)
from tinytown.supervisor.errors import TinytownError

KILL_WAIT = 15.0       # `tt kill` waits this long for the runner to be gone (its CLI gets 2 s after SIGTERM)
FOLLOW_BLOCK_MS = 5000  # one XREAD BLOCK while following (a Redis restart is noticed within it)
VALUE_MAX = 300         # characters of one event field shown on its line


to_backlog_option = click.option("--to-backlog", is_flag=True,
                                 help="Its queued tasks go to the shared backlog, for any agent.")


def _control(town):
    from tinytown.supervisor.agent_control import AgentControl
    return AgentControl(town)


def _hold(agent, hold_name, to_backlog, town_path):
    from tinytown.supervisor.models import Hold
    config = _config(town_path)
    town = _live_town(config, f"{hold_name} an agent")
    _, promise = _control(town).hold(agent, Hold(hold_name), to_backlog=to_backlog)
    return promise


@click.command()
@click.argument("agent", shell_complete=complete_agent)
@town_option
def interrupt(agent, town_path):
    """Pause AGENT: its current task finishes, it takes nothing new until `tt resume`."""
    promise = _hold(agent, "pause", False, town_path)
    click.echo(promise)


@click.command()
@click.argument("agent", shell_complete=complete_agent)
@town_option
def resume(agent, town_path):
    """Let a paused AGENT take tasks again."""
    config = _config(town_path)
    click.echo(_control(_live_town(config, "resume an agent")).resume(agent))


@click.command()
@click.argument("agent", shell_complete=complete_agent)
@to_backlog_option
@town_option
def close(agent, to_backlog, town_path):
    """Stop AGENT for good once its current task is done (queued tasks stay, or --to-backlog)."""
    promise = _hold(agent, "close", to_backlog, town_path)
    click.echo(promise)


@click.command()
@click.argument("agent", shell_complete=complete_agent)
@to_backlog_option
@town_option
def kill(agent, to_backlog, town_path):
    """Stop AGENT now: its running task goes back to the front of its queue, its CLI is killed."""
    stop_now(_live_town(_config(town_path), "kill an agent"), agent, to_backlog)
    click.echo(f"{agent} stopped")


def stop_now(town, agent: str, to_backlog: bool = False) -> None:
    """`tt kill AGENT` (also `tt restart` of a hung runner): asked (what it does is said at once),
    then waited for."""
    from tinytown.supervisor.models import Hold
    _, promise = _control(town).hold(agent, Hold.KILL, to_backlog=to_backlog)
    click.echo(promise)
    if not _wait_stopped(town, town.agent_id(agent), KILL_WAIT):
        raise TinytownError(f"{agent} is not stopped yet after {KILL_WAIT:g}s (see `tt status`)")


def _wait_stopped(town, agent_id: str, timeout: float) -> bool:
    """Until the agent is recorded stopped with no runner: woken by the town's events (XREAD
    BLOCK), its record read again on each, so a missed event costs nothing."""
    key = town.keys.agent(agent_id)
    last = town.r.xrevrange(town.keys.events, "+", "-", count=1)
    last = last[0][0] if last else "0-0"
    deadline = time.monotonic() + timeout
    while True:
        state, pid, to_backlog = town.r.execute_command("HMGET", key, "state", "pid", "to_backlog")
        if state == "stopped" and not pid and to_backlog in (None, "", "0"):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        reply = town.r.xread({town.keys.events: last}, count=100, block=max(1, int(min(left, 1.0) * 1000)))
        for _stream, entries in reply:
            if entries:
                last = entries[-1][0]


@click.command()
@click.argument("agents", nargs=-1, shell_complete=complete_agent)
@click.option("--to-backlog", is_flag=True, help="Give their queued tasks to the shared backlog (else refused).")
@click.option("--delete-branches", is_flag=True, help="Also delete their git branches, only where all work is merged.")
@json_option
@town_option
def prune(agents, to_backlog, delete_branches, as_json, town_path):
    """Remove closed agents (or those named, once stopped) from the town; their tasks stay."""
    config = _config(town_path)
    control = _control(_live_town(config, "prune agents"))
    found = control.prunable(list(agents))
    done, failed = [], []
    for agent in found:
        try:
            done.append(control.prune(agent, to_backlog=to_backlog, delete_branches=delete_branches))
        except TinytownError as exc:
            failed.append((agent.name, str(exc)))
    if as_json:
        _print_json({"pruned": [vars(d) for d in done], "refused": [{"agent": n, "reason": r} for n, r in failed]})
    else:
        if not found:
            click.echo("No closed agents to prune (`tt close AGENT` first, or name a stopped one)")
        for d in done:
            extra = [f"{d.returned} queued task(s) to the backlog"] if d.returned else []
            extra += [f"{d.notes_dropped} undelivered note(s) dropped"] if d.notes_dropped else []
            click.echo(f"Pruned {d.name}" + (f": {', '.join(extra)}" if extra else ""))
            for line in d.workspace:
                click.echo(f"  {line}")
        for name, reason in failed:
            click.echo(f"tt: error: not pruned: {reason}", err=True)
    if failed:
        raise SystemExit(1)


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until Ctrl+C.")
@click.option("--agent", help="Only this agent's events.", shell_complete=complete_agent)
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=20, show_default=True, metavar="N",
              help="How many past events to show first.")
@json_option
@town_option
def events(follow, agent, count, as_json, town_path):
    """The town's events (spawned, assigned, started, finished, restarted, ...) with local times."""
    import signal

    from tinytown.supervisor.event_stream import EventStream
    from tinytown.supervisor.resp import RespConnectionError
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tt events -f | head` ends quietly
    config = _config(town_path, use_started=True)
    town, running = _recorded_town(config)
    if not running:  # its read-only copy: nothing more will come
        click.echo(f"tt events: town {config.name!r} is stopped: its events as last recorded"
                   + (" (nothing more to follow)" if follow else ""), err=True)
        follow = False
    if agent is not None:
        town.agent_id(agent)  # an unknown name: one clear line, not an empty stream forever
    stream = EventStream(town.r, town.keys, agent)
    show = _json_line if as_json else _event_line
    for event in stream.last_events(count):
        show(event)
    from tinytown.cli.entry import end_on_ctrl_c
    from tinytown.cli.logview import RedisLink
    link = RedisLink("tt events")
    if follow:
        end_on_ctrl_c()  # (the way out of --follow, not an error)
    while follow:
        try:
            batch = stream.follow(FOLLOW_BLOCK_MS)
        except (RespConnectionError, OSError):  # Redis restarting: the stream is in its file
            link.lost()
            continue
        link.back()
        for event in batch:
            show(event)


def _clean(value) -> str:
    """A field as one line of plain text: written by agents and users, so hostile."""
    from tinytown.supervisor.terminal_text import clean_written
    text = " ".join(clean_written(str(value)).split())
    return text if len(text) <= VALUE_MAX else text[:VALUE_MAX - 1] + "…"


def _event_line(event) -> None:
    """`2026-11-30 17:42:01.123  dev  task_started  task=3f2a…`: plain click, never rich markup."""
    from datetime import datetime
    when = datetime.fromtimestamp(event.at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if event.at else "-"
    fields = " ".join(f"{_clean(k)}={_clean(v)}" for k, v in event.fields.items() if v not in ("", "None"))
    click.echo(f"{when}  {_clean(event.agent) or '-'}  {_clean(event.type)}" + (f"  {fields}" if fields else ""),
               color=False)
    sys.stdout.flush()


def _json_line(event) -> None:
    """One JSON object per line (JSON Lines), so `-f --json` can be read as it comes."""
    click.echo(json.dumps(event.to_json(), ensure_ascii=True))
    sys.stdout.flush()


COMMANDS = (interrupt, resume, close, kill, prune, events)
