"""Human output for `tt`: rich tables and coloured states. `--json` output never comes here.

Rich gets text a user or an agent wrote (task descriptions, output, reasons) only as `Text`
objects, never as markup, and only after supervisor/terminal_text.py has removed escape sequences and controls.
"""
from __future__ import annotations

import time

import click

from tinytown.supervisor.terminal_text import clean_text, clean_written

STATE_COLOURS = {
    "starting": "cyan", "idle": "green", "working": "yellow", "stopping": "magenta", "stopped": "bright_black",
    "backoff": "bright_red", "failed": "red", "pending": "cyan", "assigned": "blue", "running": "yellow",
    "completed": "green", "cancelled": "bright_black", "unresponsive": "red",
    "healthy": "green", "restarting": "bright_red", "paused": "bright_blue", "lost": "red", "live": "green",
    "lapsed": "bright_red", "waiting for input": "bright_yellow",
}
# A state as a user reads it, where the word stored says less.
STATE_WORDS = {"waiting": "waiting for input"}
# What `tt interrupt/close/kill` asked, while the agent's runner is still on its way out.
HOLD_NOTES = {"pause": "pausing after its current task", "close": "closing after its current task",
              "kill": "being killed"}


def agent_lines(agents, pending, roles=None, host_states=None) -> None:
    """The tutorial's format: `  dev (550e8400-...) - Idle`; plain click, no rich import, so it is quick.
    With more than one host, each agent's host (and `Lost` for one waiting on a lost host)."""
    if not agents:
        click.echo("No agents (add one with `tt spawn NAME`)")
        return
    click.echo("Agents:")
    host_states = host_states or {}
    many_hosts = len(host_states) > 1
    for a in agents:
        shown = "lost" if host_states.get(a.host) == "lost" else STATE_WORDS.get(a.state, a.state)
        state = click.style(shown.capitalize(), fg=STATE_COLOURS.get(shown))
        extra = f", host {a.host}" + (" (pinned)" if a.pinned else "") if many_hosts or a.pinned else ""
        extra += f", {pending.get(a.id, 0)} pending" if pending.get(a.id) else ""
        if a.state == "waiting" and a.question:
            extra += f", asks {_quoted(a.question)}: tt attach {a.name}"
        if a.hold and a.state not in ("paused", "stopped"):
            extra += f", {HOLD_NOTES.get(a.hold, a.hold)}"
        elif a.hold in ("close", "kill"):
            extra += ", closed"
        if a.workspace == "worktree":
            extra += f", agents/{a.name} on {a.branch}"
        held = (roles or {}).get(a.id)
        extra += f", roles {','.join(held)}" if held else ""
        click.echo(f"  {a.name} ({a.id}) - {state}  [{a.cli}{extra}]")


def _console():
    import os
    import sys

    from rich.console import Console
    # Piped into grep or a file: rows on one line each, not folded to 80 columns.
    wide = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(highlight=False, width=200 if wide else None)


def _state(text: str):
    """A state word, coloured (a Text: never read as markup)."""
    from rich.text import Text
    return Text(text, style=STATE_COLOURS.get(text) or "")


def _plain(text: str, style: str = "", output: bool = False):
    """Text someone else wrote (or, `output`, a CLI printed), as rich shows it: cleaned, and
    never markup."""
    from rich.text import Text
    return Text((clean_text if output else clean_written)(text or ""), style=style)


def _line(*parts):
    """One line from pieces: our own words (str, printed as they are) and Text pieces."""
    from rich.text import Text
    return Text.assemble(*parts)


def _pid(pid, gone: bool = False) -> str:
    """A pid column: "-" for none, and for one on a host that is gone (lost, stopped), where the
    number names no process of the town's any more (`--json` keeps what was recorded)."""
    return str(pid) if pid and not gone else "-"


def _ago(ts) -> str:
    if not ts:
        return "-"
    secs = max(0.0, time.time() - float(ts))
    return f"{secs:.0f}s ago" if secs < 120 else f"{secs / 60:.0f}m ago" if secs < 7200 else f"{secs / 3600:.0f}h ago"


def status(data: dict) -> None:
    console = _console()
    sup = data["supervisor"]
    console.print(_line((f"Town {data['town']}", "bold"), f"  {data['root']}"))
    if data.get("running") is False:
        console.print(_line("  ", ("stopped", "bold"), ": not running; below is what it last recorded "
                            "(`tt start` runs it)"))
    if sup.get("state") == "none here":  # (a folder that is no host's: the hosts table says where it runs)
        console.print(_line("  supervisor: none in this folder (`tt start` here adds a host)",
                            f"   redis: {data['redis']}"))
    else:
        console.print(_line("  supervisor: ", _state(sup.get("state") or "unknown"),
                            f" (pid {sup.get('pid') or '-'}{', host ' + sup['host'] if sup.get('host') else ''})"
                            f"   redis: {data['redis']}"))
    if sup.get("disk_error"):
        console.print(_line("  ", _plain(sup["disk_error"], style="red")))
    if sup.get("config_error"):
        console.print(_line("  config: ", ("not applied", "red"), ": ", _plain(sup["config_error"]),
                            " (the town runs on its previous config)"))
    counts = data["tasks"]
    console.print(_counts("  tasks: ", counts) if any(counts.values()) else "  tasks: none yet")
    agents = data["agents"]
    hosts = data.get("hosts") or []
    if agents:
        _agents(console, agents)
    if len(hosts) > 1:  # (max_agents is each host's: the town's room is the live hosts')
        live = [h for h in hosts if h["state"] == "live"]
        on_live = sum(len(h["agents"]) for h in live)
        line = (f"  {on_live}/{sum(h['max_agents'] for h in live)} agents on {len(live)} live "
                f"host{'s' if len(live) != 1 else ''}" if live else f"  no live host of {len(hosts)}")
        if len(agents) > on_live:
            line += f", {len(agents) - on_live} on hosts not live"
        console.print(line + ("; add one with `tt spawn NAME`" if not agents else ""), markup=False)
        _table(("HOST", "STATE", "AGENTS", "CAPACITY", "PID", "RENEWED"),
               [(h["name"], h["state"], ",".join(h["agents"]) or "-", f"{len(h['agents'])}/{h['max_agents']}",
                 _pid(h["pid"], gone=h["state"] not in ("live", "lapsed")), _ago(h["renewed_at"]))
                for h in hosts], state_col=1, console=console)
    elif agents:
        console.print(f"  {len(agents)}/{data['max_agents']} agents", markup=False)
    else:
        console.print(f"  no agents (max {data['max_agents']}); add one with `tt spawn NAME`", markup=False)
    for role in data.get("unserved_roles", []):
        holders = ", ".join(a["name"] for a in agents if role in a.get("roles", []))
        hint = (f"only {holders} {'has' if ', ' not in holders else 'have'} it: closed, paused or failed"
                if holders else "tt spawn NAME --role " + role)
        console.print(_line("  backlog: ", ("work for role ", "yellow"), _plain(role),
                            (": nobody can take it (", "yellow"), _plain(hint), (")", "yellow")))


def _agents(console, agents: list[dict]) -> None:
    """`tt status`'s agents: the count of each health, and a row each."""
    health: dict[str, int] = {}
    for a in agents:
        health[a["health"]] = health.get(a["health"], 0) + 1
    order = ("healthy", "unresponsive", "restarting", "failed", "lost", "starting", "stopping", "stopped", "paused")
    console.print(_counts("  agents: ", {h: health[h] for h in order if h in health}))
    # STATE is the agent's state, except that a stale heartbeat shows as unresponsive and backoff
    # as restarting: what a user needs to know first. NOTE says why and what happens next.
    rows = [(a["name"], STATE_WORDS.get(a["state"], a["state"]) if a["health"] == "healthy" else a["health"],
             a["cli"], _pid(a["pid"], gone=a["health"] == "lost"),
             (a["current_task"] or "-")[:8], str(a["pending"]), str(a["restarts"]), _ago(a["heartbeat_at"]),
             "; ".join(t for t in (_note(a), "roles " + ",".join(a["roles"]) if a.get("roles") else "") if t))
            for a in agents]
    headers = ("AGENT", "STATE", "CLI", "PID", "TASK", "PENDING", "RESTARTS", "HEARTBEAT", "NOTE")
    fixed = sum(width + 2 for width in _widths(headers[:-1], rows))  # (columns two spaces apart)
    if console.width - fixed >= NOTE_MIN_WIDTH:
        _table(headers, rows, state_col=1, console=console)
    else:  # a narrow terminal: the notes (a question, why it failed) on lines of their own, never dropped
        _table(headers[:-1], [row[:-1] for row in rows], state_col=1, console=console)
        for row in rows:
            if row[-1]:
                console.print(_line(f"  {row[0]}: ", _plain(row[-1])))


NOTE_MIN_WIDTH = 24   # narrower than this, `tt status` puts each agent's note on a line of its own


def _counts(label: str, counts: dict):
    """`label state N, state N` with each state coloured."""
    parts: list = [label]
    for i, (state, n) in enumerate((k, v) for k, v in counts.items() if v):
        parts += [", " if i else "", _state(state), f" {n}"]
    return _line(*parts)


def lost_host_note(name: str, host: str, pinned: bool) -> str:
    """What waits for an agent whose host is lost: a pinned one, the host; any other moves to a
    live host once one has room (each supervisor's lease renewal looks again)."""
    if pinned:
        return f"{name}'s host {host} is lost: pinned there, it waits until that host is back"
    return f"{name}'s host {host} is lost: it moves to a live host once one has room (max_agents), or {host} is back"


def _quoted(question: str) -> str:
    """An agent's question as it asked it, in quotes (repr() doubled its backslashes and switched
    quotes on an apostrophe), cleaned of what a terminal would act on."""
    return '"' + " ".join(clean_text(question).split("\n")) + '"'


def _note(a: dict) -> str:
    """Why an agent is not healthy, and what happens next."""
    health, reason = a["health"], a["reason"] or ""
    if health == "lost":
        return lost_host_note(a["name"], a["host"], a.get("pinned", False))
    asks = (f"asks {_quoted(a['question'])}: tt attach {a['name']} to answer"
            if a["state"] == "waiting" and a.get("question") else "")
    if a.get("hold") and a["state"] not in ("paused", "stopped"):  # (a question still waits for its answer)
        return "; ".join(t for t in (HOLD_NOTES.get(a["hold"], ""), asks) if t)
    if a.get("hold") in ("close", "kill"):
        return f"closed; `tt restart {a['name']}` opens it again, `tt prune` removes it"
    if a.get("hold") == "pause":
        return f"`tt resume {a['name']}` lets it take tasks again"
    if a.get("host_stopped") and health != "failed":
        return f"its host {a['host']} is stopped: it runs once `tt start` runs there"
    if health == "restarting":
        left = max(0.0, float(a["restart_at"]) - time.time()) if a.get("restart_at") else 0.0
        return f"restarting in {left:.0f}s (`tt restart {a['name']}`: now) after {reason}"
    if health == "failed":  # (a reason that says how to go on already is not told twice)
        return reason if f"tt restart {a['name']}" in reason else f"{reason}; `tt restart {a['name']}` to try again"
    if health == "unresponsive":
        return (f"{a['state']}, but no heartbeat for {_ago(a['heartbeat_at']).replace(' ago', '')}: the runner may be "
                f"hung (`tt restart {a['name']}` replaces it)")
    if asks:
        reason = asks
    return "; ".join(text for text in (reason, a.get("warning"), a.get("workspace_problem")) if text)


def _widths(headers, rows) -> list[int]:
    """Each column's width as shown: its header or its widest cell, cleaned."""
    return [max([len(header)] + [len(clean_written(row[i])) for row in rows]) for i, header in enumerate(headers)]


def _table(headers, rows, state_col: int, console=None) -> None:
    """A borderless table whose columns keep their full width; only the last one is cut or folded."""
    from rich.table import Table
    table = Table(box=None, pad_edge=False, header_style="bold")
    for header, width in zip(headers[:-1], _widths(headers[:-1], rows)):
        table.add_column(header, no_wrap=True, min_width=width)
    table.add_column(headers[-1], overflow="fold", ratio=1)
    for row in rows:  # every cell a Text: a `[/]` in a task's text is text, not markup
        table.add_row(*(_state(cell) if i == state_col else _plain(cell) for i, cell in enumerate(row)))
    (console or _console()).print(table)


def tasks(found) -> None:
    if not found:
        click.echo("No tasks")
        return
    # a task that waits for a failed agent says so before its text (Town.explained)
    rows = [(t.id[:8], t.agent, t.state, "" if t.exit_code is None else str(t.exit_code), str(t.attempts),
             _ago(t.created_at), (t.reason + " | " if t.state in ("assigned", "pending") and t.reason else "")
             + (t.description.strip().splitlines() or [""])[0][:80]) for t in found]
    _table(("ID", "AGENT", "STATE", "EXIT", "TRIES", "CREATED", "DESCRIPTION"), rows, state_col=2)


def task(t, so_far: bool = False) -> None:
    console = _console()
    console.print(_line((f"Task {t.id}", "bold"), f"  agent {t.agent}  ", _state(t.state),
                        (f"  exit {t.exit_code}" if t.exit_code is not None else "") + f"  attempts {t.attempts}"))
    console.print(f"  created {_ago(t.created_at)}, started {_ago(t.started_at)}, finished {_ago(t.finished_at)}",
                  markup=False)
    if t.reason:
        console.print(_line("  reason: ", _plain(t.reason)))
    if t.after:
        console.print(_line("  after: ", _plain(t.after.replace(",", ", "))))
    if t.created_by and t.created_by != "user":
        console.print(_line("  created by: ", _plain(t.created_by)))
    if t.head:
        from tinytown.cli.workspace_commands import file_lines
        files = t.changed_files()
        console.print(_line(f"  commits: {t.base[:12]}..{t.head[:12]}", " on ", _plain(t.branch or "a detached HEAD"),
                            f"  ({len(files)} file{'s' if len(files) != 1 else ''} changed)"))
        for line in file_lines(files):
            console.print(_line("  ", _plain(line)))
        if t.workspace_note:
            console.print(_line("  workspace: ", _plain(t.workspace_note)))
    console.rule("description")
    console.print(_plain(t.description))
    if t.output:
        console.rule("output so far (running; last 64 KiB)" if so_far else "output (last 64 KiB)")
        console.print(_plain(t.output, output=True))


def task_raw(t, out, so_far: bool = False) -> None:
    """`tt task ID --raw`: the description and output bytes exactly as they were written."""
    out.write(t.description.encode("utf-8", "surrogateescape"))
    if t.output:
        label = b"output so far (running; last 64 KiB)" if so_far else b"output (last 64 KiB)"
        out.write(b"\n--- " + label + b" ---\n" + t.output.encode("utf-8", "surrogateescape"))
    out.flush()
