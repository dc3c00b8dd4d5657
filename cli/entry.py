"""`tt`'s entry point. `tt stop` runs here without click: a user waits through the whole command,
and importing click and building every command's parser was a third of it. Any other command
line, and any `tt stop` line this does not read exactly (--help, a typo, an option twice), goes
to click (cli/main.py), so usage, help and errors behave one way. What `tt stop` does and prints
is `stop_command`, which the click command calls too; before it, `tt stop` tries the running
supervisor's own description of itself (supervisor/stopping.py), which spares it the config.
How a command that follows or waits ends on Ctrl+C (`end_on_ctrl_c`) is here too.
"""
from __future__ import annotations

import os
import sys

from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.procutil import exit_now


def main() -> None:
    stop_args = _read_stop(sys.argv[1:])
    if stop_args is None:
        try:
            from tinytown.cli.main import main as click_main
        except KeyboardInterrupt:  # Ctrl+C while Python loads click: an interrupted command, not a traceback
            os._exit(130)
        click_main()
        return
    config = None
    code = 0
    try:
        from tinytown.supervisor.stopping import ask_from_lock, finish
        from tinytown.supervisor.town_dir import find
        town_path, now, as_json = stop_args
        asked = ask_from_lock(find(town_path), now)   # (first: all that is imported later overlaps the stop)
        if asked is not None:
            print_stop(asked.card.name, finish(asked, now), as_json, print)
        else:
            from tinytown.supervisor.config import load
            config = load(town_path)
            stop_command(config, now, as_json, print)
    except TinytownError as exc:
        code = _error(str(exc))
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (as TinytownGroup does)
        code = _error(explain(exc, config))
    exit_now(code)  # (without the interpreter's teardown of every imported module: several ms)


def end_on_ctrl_c(code: int = 0) -> None:
    """Ctrl+C ends a follower (or a wait) at once with `code` (a follower: 0), what it printed
    flushed, whatever it was doing.
    Not through KeyboardInterrupt: raised while a finalizer runs (click's stream wrappers have
    one), Python prints it as "Exception ignored" and goes on, and the follow loop ran for ever
    (seen in CI, then here with the fault handler's stack). SIGINT ignored, as for a background
    job, stays ignored."""
    import signal

    def leave(_signum, _frame):
        snapshots = sys.modules.get("tinytown.supervisor.snapshot")  # (a stopped town's reader: not left behind)
        if snapshots is not None:
            snapshots.close_all()
        exit_now(code)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, leave)


def _read_stop(args: list[str]) -> tuple[str | None, bool, bool] | None:
    """(town path or None, --now, --json) for `[--town PATH] stop [--now] [--json] [--town PATH]`,
    each option at most once; None for anything else (click reads it)."""
    group_town, args = _take_town(args)
    if not args or args[0] != "stop":
        return None
    town = None
    flags: set[str] = set()
    rest = args[1:]
    while rest:
        if rest[0] in ("--now", "--json") and rest[0] not in flags:
            flags.add(rest.pop(0))
        elif town is None and (rest[0] == "--town" or rest[0].startswith("--town=")):
            town, rest = _take_town(rest)
            if town is None:
                return None
        else:
            return None
    # As click resolves it: the command's --town, else TT_TOWN_DIR (if not empty), else the group's.
    return town or os.environ.get("TT_TOWN_DIR") or group_town, "--now" in flags, "--json" in flags


def _take_town(args: list[str]) -> tuple[str | None, list[str]]:
    """A leading `--town PATH` or `--town=PATH`: (PATH, the rest); a PATH that looks like an option
    or is missing gives ("", args) so the caller hands the line to click."""
    if args and args[0] == "--town":
        if len(args) < 2 or not args[1] or args[1].startswith("-"):
            return "", args
        return args[1], args[2:]
    if args and args[0].startswith("--town="):
        value = args[0][len("--town="):]
        return (value, args[1:]) if value and not value.startswith("-") else ("", args)
    return None, args


def stop_command(config, now: bool, as_json: bool, echo) -> None:
    """`tt stop`: ask the supervisor to stop, wait for it, say what it stopped."""
    from tinytown.supervisor.lifecycle import stop as stop_town
    print_stop(config.name, stop_town(config, now=now), as_json, echo)


def print_stop(name: str, report: dict | None, as_json: bool, echo) -> None:
    """What `tt stop` says: the stop's report (None: the town was not running)."""
    if as_json:
        import json
        echo(json.dumps(report or {"running": False}, indent=2, default=str))
        return
    if report is None:
        echo(f"Town {name} is not running")
        return
    if "hosts" in report:  # (stopped from a folder without a supervisor: each host's report is in its own)
        echo(f"Stopped town {name} on {len(report['hosts'])} host(s): {', '.join(report['hosts'])}")
        _not_stopped(report, echo)
        return
    stopped = report.get("stopped", []) + report.get("killed", [])
    echo(f"Stopped town {name}: {len(stopped)} runner(s)" + (f" ({', '.join(stopped)})" if stopped else ""))
    if report.get("requeued"):
        echo(f"Re-queued {len(report['requeued'])} unfinished task(s): {', '.join(report['requeued'])}")
    if report.get("pending"):
        echo(f"{report['pending']} task(s) wait in inboxes for the next start")
    if report.get("waiting"):
        echo(f"{report['waiting']} task(s) wait on dependencies (they go on once those finish, after the next start)")
    others = report.get("other_hosts")
    if others:  # (the stop is the town's: its other hosts stopped too, each with its own report)
        if others["hosts"]:
            echo(f"Stopped on the town's other host(s) too: {', '.join(others['hosts'])}")
        _not_stopped(others, echo)


def _not_stopped(report: dict, echo) -> None:
    for host, state in report.get("not_stopped", {}).items():
        if state == "live":
            echo(f"Host {host} has not stopped yet: it still runs (`tt status` shows when it has)")
        else:
            echo(f"Host {host} did not stop: it is {state} (its runners' tasks go back to their inboxes once it is lost)")


def cannot_reach(config) -> TinytownError:
    """The town's Redis does not answer a command that reads it (a town sharing one says where)."""
    if config.redis_url:  # (not the town's own: `tt start` would not start it)
        return TinytownError(f"cannot reach the town's Redis at {config.redis_where} for {config.name!r}")
    return TinytownError(f"cannot reach the town's Redis for {config.name!r} (is the town running? `tt start`)")


def explain(exc: Exception, config=None) -> str:
    """One line for an unexpected error; the town's Redis errors by their class in resp.py."""
    resp = sys.modules.get("tinytown.supervisor.resp")  # not loaded: the error cannot be one of its
    if resp is not None and isinstance(exc, resp.RespError):
        if isinstance(exc, resp.NotAnswering):
            pid = _redis_pid(config)
            return f"the town's Redis does not answer ({f'pid {pid}, ' if pid else ''}stopped?)"
        if isinstance(exc, resp.PasswordRefused):
            return str(exc)
        if isinstance(exc, resp.RespConnectionError):
            if config is not None and config.redis_url:  # not ours to start: the reason is all there is
                return f"cannot reach the town's Redis: {exc}"
            return f"cannot reach the town's Redis: {exc} (is the town running? `tt start`)"
        return f"Redis error: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _redis_pid(config) -> int | None:
    """The pid redis-server wrote to .tt/redis.pid, if it did."""
    if config is None:
        return None
    try:
        return int(config.redis_pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _error(message: str) -> int:
    print(f"tt: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
