"""`tt` commands for work that flows between agents: dependencies (`assign --after`), the shared
backlog, notes (`send`, `inbox`), `cancel` and `wait`. Each is a thin call into
supervisor/coordination.py; the who (`created_by`, a note's `from`) is the calling agent when an
agent's CLI runs `tt` (its runner sets TT_AGENT and TT_TOWN), else "user".
"""
from __future__ import annotations

import sys
import time

import click

from tinytown.cli.main import (Seconds, _config, _live_town, _print_json, _read_input, _recorded_town, _running_town,
                               _started_town, complete_agent, complete_backlog_task, complete_task, json_option,
                               town_option)
from tinytown.supervisor.errors import TinytownError

STOP_SETTLE_SECONDS = 10.0   # `tt wait` whose town stops under it: how long its supervisor may take to let go

def _caller(config) -> str:
    from tinytown.supervisor.coordination import caller
    return caller(config.name)


def tasks_json(town, tasks) -> list[dict]:
    """Tasks as --json shows them: `after` and `blocked_by` as lists of ids (one round trip)."""
    deps = town.coordination.dependency_json(tasks)
    return [{**t.to_json(), **deps[t.id]} for t in tasks]


def create_tasks(config, agent, texts, after, no_context, as_json, single: bool) -> None:
    """`tt assign` (and --each) through the coordination store: the references are resolved before
    anything is written. A task cancelled at once (a dependency already failed) is printed, then
    said on stderr, and the exit status is 1."""
    def check(recorded) -> None:
        recorded.agent_id(agent)
        recorded.coordination.resolve_refs(after)
    town = _started_town(config, check=check)
    coord = town.coordination
    idle: list[str] = []
    deps = coord.resolve_refs(after, idle=idle)  # once for all of them, before any is written
    for name in idle:  # (by design: an agent with nothing to wait for; said, not silent)
        click.echo(f"tt: note: --after {name}: {name} has no task yet, so there is nothing of it to wait for",
                   err=True)
    if deps:
        _say_if_work_stays_on_branches(town, agent, deps)
    by = _caller(config)
    made = [coord.create_task(text, agent=agent, after=deps, context=not no_context, created_by=by).task
            for text in texts]
    _report(town, made, as_json, f"to {agent}" if single else None)
    _say_if_held(town, agent)


def _say_if_work_stays_on_branches(town, name: str, deps: list[str]) -> None:
    """A shared agent (the town's folder) waiting on worktree agents' tasks runs after them but
    without their work, which stays on their branches until merged: said on stderr (a trial's
    task completed without the upstream file, saying nothing)."""
    if town.agent(name).workspace == "worktree":  # (most agents of a git town: one read, and done)
        return
    for owner in sorted(set(town.task_field(deps, "agent")) - {name}):
        try:
            upstream = town.agent(owner)
        except TinytownError:  # (pruned since)
            continue
        if upstream.workspace == "worktree":
            click.echo(f"tt: note: {name} works in the town's folder: {owner}'s work stays on branch "
                       f"{upstream.branch} until merged (`tt merge {owner}`), so it runs after it but without it",
                       err=True)


def _say_if_held(town, name: str) -> None:
    """Work for an agent that will not take it until someone acts: said on stderr (it is queued
    all the same, and goes on once the agent does)."""
    from tinytown.supervisor.hosts import fencing
    agent = town.agent(name)
    why = ""
    host_state = town.hosts.state(agent.host) if agent.host and fencing(town.config) else ""
    if host_state == "lost":
        from tinytown.cli.render import lost_host_note
        why = lost_host_note(name, agent.host, agent.pinned) + ", and this with it"
    elif host_state == "stopped":
        why = f"{name}'s host {agent.host} is stopped: this waits until `tt start` runs there again"
    elif agent.state == "failed":
        why = f"{name} has failed: this waits for `tt restart {name}`"
    elif agent.hold in ("close", "kill"):
        why = f"{name} is closed: this waits for `tt restart {name}`"
    elif agent.hold == "pause":
        why = f"{name} is paused: this waits for `tt resume {name}`"
    if why:
        click.echo(f"tt: note: {why}", err=True)


def _report(town, made, as_json, to: str | None) -> None:
    if as_json:
        data = tasks_json(town, made)
        _print_json(data[0] if to is not None and len(data) == 1 else data)
    for task in made:
        if not as_json:
            if to is None:
                click.echo(task.id)
            elif task.state == "pending" and task.deps_left:
                n = task.deps_left
                click.echo(f"Assigned task {task.id} {to} (waits on {n} task{'s' if n != 1 else ''})")
            elif task.state == "pending":
                click.echo(f"Queued task {task.id} {to}")
            elif task.state != "cancelled":
                click.echo(f"Assigned task {task.id} {to}")
            else:
                click.echo(task.id)
    cancelled = [t for t in made if t.state == "cancelled"]
    for task in cancelled:
        click.echo(f"tt: error: task {task.id} cancelled at once: {task.reason}", err=True)
    if cancelled:
        sys.exit(1)


# --- backlog ------------------------------------------------------------------------------------
@click.group(invoke_without_command=True)
@json_option
@town_option
@click.pass_context
def backlog(ctx, as_json, town_path):
    """Work for whichever matching agent is idle first: list it (or `add`, `remove`)."""
    if ctx.invoked_subcommand is not None:
        return
    config = _config(town_path, use_started=True)
    town = _running_town(config)
    found = town.coordination.backlog()
    town.explained([t for t in found if t.deps_left])  # "waits on <ids>" (the others: in the backlog)
    if as_json:
        _print_json(tasks_json(town, found))
    elif not found:
        click.echo("The backlog is empty")
    else:
        from tinytown.cli import render
        for task in found:
            task.agent = f"[{task.role or 'any'}]"
        render.tasks(found)


@backlog.command(name="add")
@click.argument("description", required=False)
@click.option("--role", metavar="ROLE", help="Only an agent with this role takes it (default: any agent).")
@click.option("--after", "after", multiple=True, metavar="REF", help="Only once these completed (as tt assign).")
@click.option("--file", "-f", "from_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the task text from a file ('-' for stdin).")
@click.option("--no-context", is_flag=True, help="Do not append the --after tasks' outcomes to the prompt.")
@json_option
@town_option
def backlog_add(description, role, after, from_file, no_context, as_json, town_path):
    """Queue a task for whichever agent (with ROLE) is idle first."""
    description = text_argument(description, from_file, "tt backlog add \"what to do\"")
    config = _config(town_path)
    town = _started_town(config, check=lambda recorded: recorded.coordination.resolve_refs(after))
    created = town.coordination.backlog_add(description, role=role, after=after, context=not no_context,
                                            created_by=_caller(config))
    task = created.task
    where = (f"taken by {created.taken_by}" if created.taken_by else
             "waits on its dependencies" if task.state == "pending" and task.deps_left else
             f"waits for an agent with role {role}" if role else "waits for an idle agent")
    if task.state == "cancelled":
        return _report(town, [task], as_json, "to the backlog")
    if as_json:
        _print_json(tasks_json(town, [task])[0])
    else:
        click.echo(f"Backlog task {task.id}: {where}")


@backlog.command(name="remove")
@click.argument("task_id", shell_complete=complete_backlog_task)
@town_option
def backlog_remove(task_id, town_path):
    """Drop a backlog task no agent has taken yet (it becomes cancelled, with its dependents)."""
    config = _config(town_path)
    coord = _live_town(config, "remove a task from the backlog").coordination
    task_id = coord.resolve_task(task_id)
    cascaded = coord.backlog_remove(task_id, by=_caller(config))
    click.echo(f"Removed task {task_id} from the backlog" + (f" ({cascaded} dependents cancelled)" if cascaded else ""))


# --- notes --------------------------------------------------------------------------------------
@click.command()
@click.argument("agent", shell_complete=complete_agent)
@click.argument("text", required=False)
@click.option("--urgent", is_flag=True, help="Put it first among the notes delivered with the next task.")
@click.option("--task", "as_task", is_flag=True, help="TEXT is a task for AGENT (an assign recording the sender).")
@click.option("--file", "-f", "from_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the text from a file ('-' for stdin).")
@json_option
@town_option
def send(agent, text, urgent, as_task, from_file, as_json, town_path):
    """Leave a note for AGENT, delivered with its next task (or, with --task, give it a task)."""
    text = text_argument(text, from_file, "tt send AGENT \"text\"", what="text")
    config = _config(town_path)
    town = _started_town(config, check=lambda recorded: recorded.agent_id(agent))
    sender = _caller(config)
    if as_task:
        if urgent:
            raise TinytownError("--urgent is for notes; a task waits its turn in the inbox")
        task = town.coordination.create_task(text, agent=agent, created_by=sender).task
        _report(town, [task], as_json, f"to {agent}")
        return _say_if_held(town, agent)
    note = town.coordination.send(agent, text, urgent=urgent, sender=sender)
    if as_json:
        _print_json(note.to_json())
    else:
        click.echo(f"Note {note.id} for {agent}: delivered with its next task")
    _say_if_held(town, agent)


@click.command()
@click.argument("agent", required=False, shell_complete=complete_agent)
@click.option("--all", "show_all", is_flag=True, help="Also the notes already delivered.")
@json_option
@town_option
def inbox(agent, show_all, as_json, town_path):
    """Notes waiting for AGENT's next task (every agent's without AGENT)."""
    config = _config(town_path, use_started=True)
    town = _running_town(config)
    names = [agent] if agent else [a.name for a in town.agents()]
    notes = [n for name in names for n in town.coordination.inbox(name, delivered=show_all)]
    if as_json:
        _print_json([n.to_json() for n in notes])
        return
    if not notes:
        click.echo("No notes waiting" if not show_all else "No notes")
        return
    from tinytown.supervisor.terminal_text import clean_written
    for n in notes:
        state = f"delivered with task {n.task[:8]}" if n.delivered_at else "waiting"
        click.echo(f"{n.id[:8]}  to {n.to}  from {clean_written(n.sender)}{'  URGENT' if n.urgent else ''}  ({state})")
        for line in clean_written(n.text).splitlines() or [""]:
            click.echo(f"    {line}")


# --- cancel and wait ----------------------------------------------------------------------------
@click.command()
@click.argument("task_ids", nargs=-1, required=True, shell_complete=complete_task)
@town_option
def cancel(task_ids, town_path):
    """Cancel tasks: waiting ones at once (with their dependents), running ones by stopping the CLI."""
    config = _config(town_path)
    coord = _live_town(config, "cancel tasks").coordination
    by = _caller(config)
    failed = False
    for ref in task_ids:
        try:
            task_id = coord.resolve_task(ref)
            outcome, cascaded = coord.cancel(task_id, by=by)
        except TinytownError as exc:
            click.echo(f"tt: error: {exc}", err=True)
            failed = True
            continue
        if outcome == "cancelled":
            click.echo(f"Cancelled task {task_id}" + (f" and {cascaded} dependents" if cascaded else ""))
        else:
            click.echo(f"Cancel requested for task {task_id}: its agent stops the CLI (output kept)")
    if failed:
        sys.exit(1)


WAIT_ERROR_EXIT = 3  # `tt wait` could not wait (a bad reference, a bad option...): 0, 1 and 2 are outcomes


@click.command()
@click.argument("refs", nargs=-1, required=True, shell_complete=complete_task)
@click.option("--timeout", type=Seconds(), metavar="S", help="Give up after S seconds (exit 2).")
@json_option
@town_option
def wait(refs, timeout, as_json, town_path):
    """Until every task named (an agent: its unfinished tasks, or with none the one it finished last)
    is finished; exit 0 if all completed, 1 if any failed or was cancelled, 2 on timeout (or when
    the town is stopped and some cannot finish), 3 if it could not wait (an unknown task, a bad option)."""
    from tinytown.cli.entry import end_on_ctrl_c
    from tinytown.supervisor.resp import RespConnectionError, connect
    from tinytown.supervisor.town import Town
    end_on_ctrl_c(130)  # (as an interrupted command exits)
    config = _config(town_path, use_started=True)

    def recorded():
        town, running = _recorded_town(config)
        if running:
            town = Town(config, connect(config, long_lived=True))  # a reply may take as long as the wait
        return town, running

    town, running = recorded()
    coord = town.coordination
    ids = coord.resolve_refs(refs, what="tt wait")
    if not ids:
        raise TinytownError("nothing to wait for: " + ", ".join(refs) + " has no task yet")
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        done = coord.wait(ids, timeout if running else 0)  # (a stopped town: how its tasks ended)
    except RespConnectionError:
        # Its Redis went away mid-wait: if that was the town stopping, how its tasks ended is in
        # its copy (exit 2 below for those that cannot finish now), as for a town stopped before;
        # a town started again meanwhile is waited on for what is left of the timeout.
        from tinytown.supervisor import lock
        if not (running and config.use_socket and lock.wait_released(config.runtime_dir, STOP_SETTLE_SECONDS)):
            raise
        town, running = recorded()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done = town.coordination.wait(ids, left if running else 0)
    if not running and len(done) < len(ids):  # as at a timeout (exit 2), saying why
        click.echo(f"tt: town {config.name!r} is not running: {len(ids) - len(done)} of these task(s) cannot "
                   "finish until it starts (`tt start`)", err=True)
    tasks = {t.id: t for t in (town.task(i) for i in ids)}
    if as_json:
        _print_json([{"id": i, "agent": tasks[i].agent, "state": done.get(i, tasks[i].state), "finished": i in done,
                      "exit_code": tasks[i].exit_code, "reason": tasks[i].reason} for i in ids])
    else:
        from tinytown.supervisor.terminal_text import clean_written
        for i in ids:
            t = tasks[i]
            state = done.get(i) or f"{t.state} (still, {'at the timeout' if running else 'the town is stopped'})"
            # (an unfinished task's reason says what it waits for: "waiting: agent dev is closed...")
            click.echo(f"{i}  {t.agent or '-'}  {state}" + (f": {clean_written(t.reason)}" if t.reason else ""))
    if len(done) < len(ids):
        sys.exit(2)
    if any(state != "completed" for state in done.values()):
        sys.exit(1)


def text_argument(text, from_file, usage: str, what: str = "task text") -> str:
    """The text given as an argument, or read from --file ('-' for stdin; also a '-' argument)."""
    if text == "-" and not from_file:
        text, from_file = None, "-"
    if from_file:
        if text is not None:
            raise TinytownError("give the text either as an argument or with --file, not both")
        text = _read_input(from_file).decode("utf-8", "surrogateescape")
    if text is None:
        raise TinytownError(f"no {what}: {usage} (or --file PATH)")
    return text


wait.error_exit = WAIT_ERROR_EXIT  # (read by TinytownGroup, which turns every command's errors into one line)


def register(group: click.Group) -> None:
    for command in (backlog, send, inbox, cancel, wait):
        group.add_command(command)
