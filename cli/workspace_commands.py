"""The agents' git worktrees on the command line: what `tt spawn` makes, `tt diff`, `tt merge`.

The git work itself is supervisor/workspace.py; here only what a user types and reads. Paths and
git's messages can hold anything a file name can: they are cleaned before they reach a terminal.
Imported by every `tt` (main registers these commands): the rest is imported where it is used.
"""
from __future__ import annotations

import sys

import click

from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.terminal_text import clean_text, clean_written, quoted_name


def prepare_workspace(config, town, name: str, from_ref: str | None, quiet: bool = False,
                      elsewhere: str = "") -> dict:
    """`tt spawn` in a git town, before the agent is registered: agents/NAME made a worktree on its
    branch. {"mode": "worktree", "branch", "label", "path", "notes"}, or {"mode": "shared", "why"}
    when no worktree can be made here (said once: at the town's first spawn, or always when the
    repository only lacks a first commit, which the user is expected to make). A WorkspaceError
    (branch checked out elsewhere, agents/NAME not a worktree...) refuses the spawn.
    `elsewhere`: the host the agent is pinned to, not this one: its runner there makes the worktree
    at its first task (from that checkout's HEAD), so nothing is made here."""
    from tinytown.supervisor.workspace import Unavailable, Workspace
    workspace = Workspace(config.root, name, config.workspace.branch_prefix)
    if elsewhere and from_ref:
        raise TinytownError(f"--from with --host {elsewhere}: the branch is made on the host the agent runs on; "
                            f"run this tt spawn in host {elsewhere}'s folder")
    made = {}  # what this spawn made here: the worktree, and the branch at which commit
    try:
        if elsewhere:
            workspace.possible()
            notes = [f"{workspace.label} is made on host {elsewhere} at its first task"]
        else:
            new_worktree = not workspace.exists()
            notes = workspace.ensure(from_ref)
            if new_worktree:
                made = {"made_worktree": True, "made_branch_at": workspace.made_branch_at}
    except Unavailable as exc:
        if from_ref:
            raise TinytownError(f"--from {from_ref}: {exc}") from None
        first = not town.r.hlen(town.keys.agent_index)
        if not quiet and (first or exc.kind == "no-commit"):
            click.echo(f"tt: {clean_written(str(exc))}", err=True)
        return {"mode": "shared", "why": str(exc)}
    if not quiet:
        for note in notes:
            click.echo(f"tt: {clean_written(note)}", err=True)
    return {"mode": "worktree", "branch": workspace.branch, "label": workspace.label,
            "path": "" if elsewhere else str(workspace.path), "notes": notes, **made}


def leave_to_host(config, name: str, made: dict, host: str, quiet: bool = False) -> list[str]:
    """An agent placed on another host than this folder's (an unpinned spawn on a town of several
    hosts): a worktree prepare_workspace made here is removed again (it was just made: nothing
    in it; one that was here before is left as it is), and its branch too if it made that (else
    `tt diff`/`tt merge` here would read a branch the agent never works on). Its runner there
    makes its own at its first task."""
    from tinytown.supervisor.workspace import Workspace
    workspace = Workspace(config.root, name, config.workspace.branch_prefix)
    notes = workspace.unmake(made.get("made_branch_at", "")) if made.get("made_worktree") else []
    notes.append(f"{workspace.label} is made on host {host} at its first task")
    if not quiet:
        for note in notes:
            click.echo(f"tt: {clean_written(note)}", err=True)
    return notes


def file_lines(files: list[dict]) -> list[str]:
    """A task's changed files as `tt task` shows them: `+A -D path`, `bin path`, `old -> new`."""
    lines = []
    for change in files:
        counts = "bin" if change.get("added") is None else f"+{change['added']} -{change['deleted']}"
        path = quoted_name(str(change.get("path", "")))
        if change.get("old_path"):
            path = f"{quoted_name(str(change['old_path']))} -> {path}"
        lines.append(f"{counts:>12}  {path}")
    return lines


def _no_commits(town, task) -> TinytownError:
    """Why a task has no commits to show or merge, from its record and its agent's. (A run put
    back clears started_at, so attempts says whether it ran; a worktree agent's task that failed
    before its CLI, on a conflict, has no branch recorded but did not run in the town's folder.)"""
    try:
        shared = town.agent(task.agent).workspace != "worktree"
    except TinytownError:  # pruned: its workspace is not known
        shared = None
    if task.state in ("pending", "assigned", "running"):
        why = f"it has not ended: it is {task.state}"
    elif not (task.attempts or task.base):  # (a stop's put-back gives its attempt back; base stays)
        why = f"it was {task.state} before it ran"
    elif shared:
        why = "it ran in the shared town folder"
    elif task.reason:
        why = f"it ended {task.state} without one: {' '.join(clean_text(task.reason).split())[:200]}"
    else:
        why = "none was recorded"
    return TinytownError(f"task {task.id} has no commits ({why})")


def _agent_or_task(town, ref: str):
    """(agent, None) when `ref` names an agent, else (None, task): names first, as `tt logs` does."""
    if town.r.hget(town.keys.agent_index, ref):
        return town.agent(ref), None
    try:
        return None, town.task(ref)
    except TinytownError as exc:
        if str(exc).startswith("no task"):
            raise TinytownError(f"no agent or task {ref!r} in town {town.config.name!r}") from None
        raise


def _worktree_of(config, agent):
    from tinytown.supervisor.town import agent_workspace
    workspace = agent_workspace(config.root, agent)
    if workspace is None:
        raise TinytownError(f"agent {agent.name} works in the shared town folder: it has no branch of its own "
                            "(tt diff/merge TASK work on a worktree agent's task)")
    return workspace


def _branch_here(config, agent) -> str:
    """The agent's branch, if this checkout has it: an agent that works on another host has its
    branch there (its tasks' heads reach here through [workspace] remote: tt diff/merge TASK)."""
    from tinytown.supervisor.hosts import elsewhere
    from tinytown.supervisor.workspace import Repo
    workspace = _worktree_of(config, agent)
    fetch = "tt diff/merge TASK brings a task's work from [workspace] remote"
    if Repo.find(config.root).resolve(workspace.ref) is None:
        raise TinytownError(f"branch {workspace.branch} is not in this checkout: agent {agent.name} works on host "
                            f"{agent.host or '?'} ({fetch})")
    if elsewhere(config, agent.host):
        raise TinytownError(f"agent {agent.name} works on host {agent.host} now: branch {workspace.branch} here holds "
                            f"only its work from when it worked here ({fetch}; git merge {workspace.branch} takes "
                            "this one as it is)")
    return workspace.branch


def _task_work_here(config, task) -> None:
    """A task done on another host: its commits fetched from [workspace] remote (as a dependent
    task does), or one line saying why they cannot be had."""
    from tinytown.supervisor.workspace import Workspace
    from tinytown.supervisor.workspace_remote import bring_here
    for note in bring_here(Workspace(config.root, task.agent or "?"), [task.id], [task.head], lambda _ids: [task.head],
                           config.workspace.remote, config.name, what="task"):
        click.echo(f"tt: {note}", err=True)


def _town_option(func):
    """--town PATH (also TT_TOWN_DIR), as main.town_option; declared here because main imports
    this module to register its commands."""
    return click.option("--town", "town_path", metavar="PATH", envvar="TT_TOWN_DIR",
                        help="The town's folder (default: walk up from here to tinytown.toml).")(func)


def _town_config(ctx, town_path):
    from tinytown.cli.main import _config
    return _config(town_path or (ctx.find_root().obj or {}).get("town"))


@click.command(name="diff")
@click.argument("ref", metavar="TASK|AGENT")
@click.option("--stat", is_flag=True, help="Files and +/- counts only.")
@_town_option
@click.pass_context
def diff(ctx, ref, stat, town_path):
    """What a task changed (its base..head), or what an agent's branch adds to your HEAD; git's own
    diff, colour and pager."""
    from tinytown.cli.main import _running_town
    from tinytown.supervisor.workspace import diff_argv
    config = _town_config(ctx, town_path)
    town = _running_town(config)
    agent, task = _agent_or_task(town, ref)
    if agent is not None:
        argv = diff_argv(config.root, branch=_branch_here(config, agent), stat=stat)
    else:
        if not (task.base and task.head):
            raise _no_commits(town, task)
        _task_work_here(config, task)
        argv = diff_argv(config.root, base=task.base, head=task.head, stat=stat)
    import subprocess
    sys.stdout.flush()
    try:
        code = subprocess.run(argv).returncode  # the user's terminal: git's colour and pager
    except FileNotFoundError:
        raise TinytownError("git is not installed (or not on PATH)") from None
    sys.exit(code)


@click.command(name="merge")
@click.argument("ref", metavar="AGENT|TASK")
@click.option("--into", metavar="BRANCH", help="The branch to merge into (default: the town folder's).")
@_town_option
@click.pass_context
def merge(ctx, ref, into, town_path):
    """Bring an agent's branch (or a task's head) home into your branch: a fast-forward when it can,
    refused with nothing changed when your tree has uncommitted changes or the merge conflicts."""
    from tinytown.cli.main import _running_town
    from tinytown.supervisor.workspace import merge_home
    config = _town_config(ctx, town_path)
    town = _running_town(config)
    agent, task = _agent_or_task(town, ref)
    if agent is not None:
        source, label = "refs/heads/" + _branch_here(config, agent), agent.name
    else:
        if not task.head:
            raise _no_commits(town, task)
        _task_work_here(config, task)
        source, label = task.head, f"task {task.id[:8]}"
    done = merge_home(config.root, source, into, label=label)
    if done.how == "up to date":
        click.echo(f"{label}: already in {clean_written(done.branch)}")
    else:
        click.echo(f"merged {label} into {clean_written(done.branch)} ({done.how}, {done.before[:7]}..{done.after[:7]})")
    if task is not None and task.state != "completed":  # (asked for by id: its work as it was left)
        click.echo(f"note: task {task.id[:8]} {task.state}" + (f" ({clean_written(task.reason)})" if task.reason else "")
                   + ": what it left is merged as it was", err=True)
    if agent is not None and agent.busy:
        click.echo(f"{agent.name} is working: its running task's changes are not committed yet (they come "
                   "with its next tt merge)")
