"""`tt backlog`, `tt send`, `tt inbox`, `tt cancel`, `tt wait`: work that flows between agents.

Each is a thin call into supervisor/coordination.py, whose Lua scripts make every step atomic.
Whoever runs them from inside an agent's CLI is recorded (TT_AGENT, when TT_TOWN is this town):
`created_by` on a task, `from` on a note.
"""
from __future__ import annotations

import sys

import click

from tinytown.cli.main import (_config, _print_json, _read_input, _running_town, _started_town, _tasks_json,
                               complete_agent, complete_task, json_option, town_option)
from tinytown.supervisor.errors import TinytownError

WAIT_EXIT = {"completed": 0, "failed": 1, "cancelled": 1}


def _caller(config) -> str:
    from tinytown.supervisor.coordination import caller
    return caller(config.name)


def _text(text, from_file) -> str:
    if text == "-" and not from_file:
        text, from_file = None, "-"
    if from_file:
        if text is not None:
            raise TinytownError("give the text either as an argument or with --file, not both")
        text = _read_input(from_file).decode("utf-8", "surrogateescape")
    if text is None:
        raise TinytownError("no text given (or --file PATH)")
    return text


# --- the shared backlog -----------------------------------------------------------------------
@click.group(invoke_without_command=True)
@json_option
@town_option
@click.pass_context
def backlog(ctx, as_json, town_path):
    """Work for whichever matching agent is free first: `tt backlog` lists it."""
    if ctx.invoked_subcommand is not None:
        return
    town = _running_town(_config(town_path))
    found = town.coordination.backlog()
    if as_json:
        _print_json(_tasks_json(town, found))
        return
    if not found:
        click.echo("The backlog is empty")
        return
    from tinytown.cli import render
    render.tasks(found, town.coordination.blocked_by(found))
    unserved = town.coordination.unserved_roles()
    if unserved:
        click.echo(f"No agent has role(s) {', '.join(unserved)}: nobody can take that work "
                   "(tt spawn NAME --role ROLE)")


@backlog.command(name="add")
@click.argument("text", required=False)
@click.option("--role", metavar="ROLE", help="Only an agent with this role takes it (default: any agent).")
@click.option("--after", multiple=True, metavar="REF", shell_complete=complete_task,
              help="Queue it only once these tasks (or agents' unfinished tasks) have completed.")
@click.option("--file", "-f", "from_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the task text from a file ('-' for stdin).")
@click.option("--no-context", is_flag=True, help="Do not append the --after tasks' output to the prompt.")
@json_option
@town_option
def backlog_add(text, role, after, from_file, no_context, as_json, town_path):
    """Queue TEXT for the first free agent (with ROLE, if given)."""
    text = _text(text, from_file)
    config = _config(town_path)
    town = _started_town(config)
    created = town.coordination.backlog_add(text, role=role, after=after, context=not no_context,
                                            created_by=_caller(config))
    task = created.task
    if as_json:
        _print_json(_tasks_json(town, [task])[0])
    elif created.taken_by:
        click.echo(f"Queued task {task.id}; {created.taken_by} took it")
    elif task.state == "pending" and task.deps_left:
        click.echo(f"Queued task {task.id}; it waits on {task.deps_left} task(s)")
    else:
        click.echo(f"Queued task {task.id} for {'an agent with role ' + role if role else 'any agent'}")
    if task.state == "cancelled":
        raise TinytownError(f"task {task.id} cancelled at once: {task.reason}")


@backlog.command(name="remove")
@click.argument("task_ref", shell_complete=complete_task)
@town_option
def backlog_remove(task_ref, town_path):
    """Drop a backlog task nobody has taken yet (it becomes cancelled)."""
    config = _config(town_path)
    town = _running_town(config)
    task_id = town.coordination.resolve_task(task_ref)
    cascaded = town.coordination.backlog_remove(task_id, by=_caller(config))
    click.echo(f"Removed task {task_id} from the backlog" + (f" ({cascaded} dependent(s) cancelled)" if cascaded else ""))


# --- notes -------------------------------------------------------------------------------------
@click.command()
@click.argument("agent", shell_complete=complete_agent)
@click.argument("text", required=False)
@click.option("--urgent", is_flag=True, help="Delivered before the other notes.")
@click.option("--task", "as_task", is_flag=True, help="Not a note: a task for AGENT, recording who sent it.")
@click.option("--file", "-f", "from_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the text from a file ('-' for stdin).")
@json_option
@town_option
def send(agent, text, urgent, as_task, from_file, as_json, town_path):
    """Leave AGENT a note, delivered with its next task (before the task's text)."""
    text = _text(text, from_file)
    config = _config(town_path)
    town = _started_town(config)
    sender = _caller(config)
    if as_task:
        if urgent:
            raise TinytownError("--urgent is for notes; a task goes to the end of the agent's queue")
        town.check_prompts(agent, [text])
        task = town.coordination.create_task(text, agent=agent, created_by=sender).task
        if as_json:
            _print_json(_tasks_json(town, [task])[0])
        else:
            click.echo(f"Assigned task {task.id} to {agent} (from {sender})")
        return
    note = town.coordination.send(agent, text, urgent=urgent, sender=sender)
    if as_json:
        _print_json(note.to_json())
    else:
        click.echo(f"Left {'an urgent' if urgent else 'a'} note for {agent} ({note.id}); it goes with its next task")


@click.command()
@click.argument("agent", required=False, shell_complete=complete_agent)
@click.option("--all", "everything", is_flag=True, help="Also the notes already delivered.")
@json_option
@town_option
def inbox(agent, everything, as_json, town_path):
    """Notes not yet delivered (to AGENT, or to every agent); --all adds the delivered ones."""
    town = _running_town(_config(town_path))
    names = [agent] if agent else [a.name for a in town.agents()]
    notes = []
    for name in names:
        notes += town.coordination.inbox(name)
        if everything:
            notes += town.coordination.inbox(name, delivered=True)
    if as_json:
        _print_json([n.to_json() for n in notes])
        return
    if not notes:
        click.echo("No notes" + ("" if everything else " waiting"))
        return
    from tinytown.supervisor.terminal_text import clean_text
    for n in notes:
        state = f"delivered with task {n.task[:8]}" if n.delivered_at else "waiting"
        head = f"{n.to} <- {clean_text(n.sender)}{' (urgent)' if n.urgent else ''}, {state}: "
        click.echo(head + clean_text(n.text).replace("\n", " ")[:200])


# --- cancel and wait ---------------------------------------------------------------------------
@click.command()
@click.argument("task_refs", nargs=-1, required=True, shell_complete=complete_task)
@town_option
def cancel(task_refs, town_path):
    """Cancel tasks: a waiting one ends at once; a running one has its CLI stopped (output kept).
    Tasks that run after a cancelled one are cancelled too."""
    config = _config(town_path)
    town = _running_town(config)
    by = _caller(config)
    failed = False
    for ref in task_refs:
        try:
            task_id = town.coordination.resolve_task(ref)
            how, cascaded = town.coordination.cancel(task_id, by=by)
        except TinytownError as exc:
            click.echo(f"tt: error: {exc}", err=True)
            failed = True
            continue
        if how == "cancelled":
            click.echo(f"Cancelled task {task_id}" + (f" and {cascaded} task(s) after it" if cascaded else ""))
        else:
            click.echo(f"Cancelling task {task_id}: its CLI is being stopped")
    if failed:
        sys.exit(1)


@click.command(name="wait")
@click.argument("refs", nargs=-1, required=True, shell_complete=complete_task)
@click.option("--timeout", type=click.FloatRange(min=0), metavar="S", help="Give up after S seconds (exit 2).")
@town_option
def wait_(refs, timeout, town_path):
    """Until every task named (or every unfinished task of a named agent) has finished: one line
    each; exit 0 if all completed, 1 if any failed or was cancelled, 2 on timeout."""
    config = _config(town_path)
    town = _running_town(config)
    coord = town.coordination
    ids = coord.resolve_refs(refs)
    if not ids:
        raise TinytownError("nothing to wait for: the agents named have no unfinished task")
    from tinytown.supervisor.resp import connect
    from tinytown.supervisor.town import Town
    waiter = Town(config, connect(config, long_lived=True)).coordination  # a reply may take the whole wait
    states = waiter.wait(ids, timeout)
    code = 0
    for task_id in ids:
        state = states.get(task_id, "")
        click.echo(f"{task_id} {state or 'not finished'}")
        code = max(code, WAIT_EXIT.get(state, 2))
    sys.exit(code)


COMMANDS = (backlog, send, inbox, cancel, wait_)
