"""`tt`: one small function per command. Heavy imports (rich, the store) happen inside commands."""
from __future__ import annotations

import functools
import json
import os
import sys

import click

from tinytown.cli.entry import explain as _explain, stop_command
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.procutil import exit_now

STATES = ("pending", "assigned", "running", "completed", "failed", "cancelled")


class TinytownGroup(click.Group):
    """Turns expected failures into one line on stderr and a non-zero exit, never a traceback."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # (`tt --bogus`: the group's own options fail here, before invoke)
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # bare `tt`: click shows the help
        except click.UsageError as exc:
            _fail(_usage_line(exc), exc.exit_code)

    def invoke(self, ctx):
        try:
            try:
                return super().invoke(ctx)
            finally:  # (here, not at exit, whether it returns or exits: a reader gone is seen below)
                sys.stdout.flush()
        except click.UsageError as exc:  # a bad option or argument: one line too (exit 2)
            _fail(_usage_line(exc), self._error_exit(ctx, exc.exit_code))
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError as exc:
            if not _stdout_gone():  # (a socket's EPIPE is an error like any other)
                _fail(_explain(exc, ctx.meta.get(CONFIG_META)))
            # `tt list | head -1`: the reader has what it wanted; end quietly, as SIGPIPE would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except TinytownError as exc:
            _fail(str(exc), self._error_exit(ctx))
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001
            _fail(_explain(exc, ctx.meta.get(CONFIG_META)), self._error_exit(ctx))

    def _error_exit(self, ctx, default: int = 1) -> int:
        """The exit status of the command's errors: its `error_exit` where 1 and 2 say how the work
        ended (`tt wait`: a typo must not read as a failed task or a timeout), else `default`."""
        return getattr(self.commands.get(ctx.invoked_subcommand or ""), "error_exit", None) or default


def _stdout_gone() -> bool:
    """stdout is a pipe whose reader has closed it (poll says POLLERR)."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


CONFIG_META = "tinytown.config"  # the command's Config, once loaded (click's meta is shared by its contexts)


def _fail(message: str, code: int = 1):
    from tinytown.supervisor.terminal_text import clean_written   # (a message may quote a file or a CLI)
    click.echo(f"tt: error: {' '.join(clean_written(message).splitlines())}", err=True)  # (one line)
    sys.exit(code)


def _usage_line(exc: click.UsageError) -> str:
    """click's usage error as one line, with where to read more (and, for an unknown option, how
    to pass text that starts with '-')."""
    where = exc.ctx.command_path if exc.ctx is not None else "tt"
    takes_text = exc.ctx is not None and any(
        isinstance(param, click.Argument) and param.name in TEXT_ARGUMENTS for param in exc.ctx.command.params)
    hint = " (text that starts with '-' goes after --)" \
        if isinstance(exc, click.NoSuchOption) and not exc.possibilities and takes_text else ""
    return f"{exc.format_message().rstrip('.')}{hint}; see {where} --help"


TEXT_ARGUMENTS = ("description", "text")  # (assign, backlog add, send: a task's or a note's text)


class Seconds(click.ParamType):
    """A duration in seconds, 0 up to `most`: nan, inf and absurd values are a usage error (exit 2;
    tt wait's: 3), not a traceback or a Redis error later."""

    name = "seconds"

    def __init__(self, most: float | None = 365 * 86400.0):
        self.most = most  # (None: the command checks the bound itself, e.g. a setting's)

    def convert(self, value, param, ctx):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not (0 <= seconds < float("inf")):  # (false for nan too)
            self.fail(f"{value!r} is not a number of seconds from 0", param, ctx)
        if self.most is not None and seconds > self.most:
            self.fail(f"{value!r} is more than {self.most / 86400:g} days", param, ctx)
        return seconds


def town_option(func):
    """--town PATH on every command (also TT_TOWN_DIR): a town folder or its tinytown.toml."""

    @click.option("--town", "town_path", metavar="PATH", envvar="TT_TOWN_DIR",
                  help="The town's folder (default: walk up from here to tinytown.toml).")
    @functools.wraps(func)
    def wrapper(*args, town_path=None, **kwargs):
        ctx = click.get_current_context()
        return func(*args, town_path=town_path or (ctx.obj or {}).get("town"), **kwargs)

    return wrapper


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


def _config(town_path, use_started: bool = False):
    """The town's config. use_started: a command that reads the town, or stops it; while
    tinytown.toml does not load and its supervisor runs (on its previous config), it goes on with
    the config that supervisor started with, the error said on stderr (`tt status` shows the edit
    not applied). A command that changes the town waits for the file to be mended."""
    from tinytown.supervisor.config import load
    try:
        config = load(town_path)
    except TinytownError as exc:
        config = _started_config(town_path) if use_started else None
        if config is None:
            raise
        click.echo(f"tt: warning: {exc} (the town runs on its previous config: shown with the one it started with)",
                   err=True)
    click.get_current_context().meta[CONFIG_META] = config  # for _explain
    return config


def _started_config(town_path):
    """The config this folder's running supervisor started with, or None (none runs, or unreadable)."""
    from tinytown.supervisor import lock
    from tinytown.supervisor.config import load_started
    from tinytown.supervisor.town_dir import find, runtime_dir
    try:
        if not lock.holder(runtime_dir(find(town_path))):
            return None
        return load_started(town_path)
    except (OSError, TinytownError):
        return None


def _town(config):
    from tinytown.supervisor.town import Town
    return Town(config)


def _running_town(config, as_json: bool = False):
    """A Town for reading: the running town, else a stopped town's records as last written (said
    on stderr), else one clear line instead of a socket error."""
    town, running = _recorded_town(config)
    if not running and not as_json:
        click.echo(f"tt: town {config.name!r} is stopped: showing what it last recorded", err=True)
    return town


def _recorded_town(config):
    """(Town, running): the running town, else a stopped town's read-only copy (False); one clear
    line when there is neither."""
    town, running = _town_or_snapshot(config)
    if town is None:
        raise TinytownError(f"town {config.name!r} is not running (start it with `tt start`, or `tt spawn`)")
    return town, running


def _live_town(config, to: str):
    """A Town for a change only a running town can make (a stopped one's records are read from a
    read-only copy): one clear line when it is stopped. `to`: what the command does."""
    town, running = _town_or_snapshot(config)
    if not running:
        raise TinytownError(f"town {config.name!r} is not running: start it (`tt start`) to {to}")
    return town


def _town_or_snapshot(config):
    """(Town, True) for a running town; (Town on a read-only snapshot, False) for a stopped one
    whose records are here (closed when the command ends); (None, False) when neither."""
    from tinytown.supervisor.lifecycle import running_pid
    if running_pid(config):
        return _reading_town(config), True
    if config.use_socket or not _town(config).ping():  # TCP: a reachable Redis is read as before
        from tinytown.supervisor.snapshot import open_snapshot
        snapshot = open_snapshot(config)
        if snapshot is not None:
            click.get_current_context().with_resource(snapshot)
            return _town(snapshot.config), False
        if running_pid(config):  # it started while we looked: it wins
            return _reading_town(config), True
        if config.use_socket:
            return None, False
    return _reading_town(config), True


def _reading_town(config):
    """A Town for reading, once a supervisor that is starting has its Redis up and its record written."""
    from tinytown.supervisor.lifecycle import wait_recorded, wait_serving
    wait_serving(config)
    town = _town(config)
    wait_recorded(config, town)
    return town


def _started_town(config, check=None):
    """A Town for writing: starts the supervisor in the background if it is not running.
    check(town): what the command needs of the town's records (its agent, the tasks it waits on),
    asked first of a stopped town's records: a command refused starts nothing (a typo in an agent's
    name started the town, and every queued task with it)."""
    from tinytown.supervisor.lifecycle import ensure_running, running_pid
    if check is not None and not running_pid(config):
        _check_while_stopped(config, check)
    ensure_running(config, say=lambda text: click.echo(text, err=True))
    return _town(config)


def _check_while_stopped(config, check) -> None:
    """check(town) with no supervisor here: on the town's Redis if it answers (a shared one), else
    on a read-only snapshot of its records, closed before the town starts. Nothing to check (never
    started) or a snapshot that cannot be had: the command goes on, as it did before the check."""
    if not config.use_socket:
        town = _town(config)
        if town.ping():
            return check(town)
    from tinytown.supervisor.snapshot import open_snapshot
    try:
        snapshot = open_snapshot(config)
    except (TinytownError, OSError):
        return None
    if snapshot is not None:
        with snapshot:
            check(_town(snapshot.config))


# --- shell completion (click's: `_TT_COMPLETE=bash_source tt`, see the README) -----------------
def _completed(ctx, read) -> list[str]:
    """read(config, client, keys) for a completion, on the town's Redis: quick, and [] rather than
    an error when the town is not running or does not answer (a completion never prints into the
    user's line)."""
    from tinytown.supervisor.config import load
    from tinytown.supervisor.keys import Keys
    from tinytown.supervisor.resp import connect
    root = ctx.params.get("town_path") or (ctx.find_root().params or {}).get("town")
    try:
        config = load(root)
        from tinytown.supervisor.lifecycle import running_pid
        # no supervisor holds the town's lock: whatever answers on the socket is not its Redis
        if config.use_socket and (not config.redis_socket.exists() or not running_pid(config)):
            return []
        return read(config, connect(config, timeout=0.5), Keys(config.name))
    except Exception:  # noqa: BLE001
        return []


def complete_agent(ctx, _param, incomplete: str):
    """Agent names of the town (for AGENT arguments and --agent)."""
    names = _completed(ctx, lambda _config, client, keys: client.execute_command("HKEYS", keys.agent_index))
    return sorted(n for n in names if n.startswith(incomplete))


def complete_task(ctx, _param, incomplete: str):
    """Task ids of the town, newest first (a prefix is enough on the command line)."""
    ids = _completed(ctx, lambda _config, client, keys: client.zrange(keys.task_index, 0, -1))
    return [t for t in reversed(ids) if t.startswith(incomplete)][:200]


def complete_backlog_task(ctx, _param, incomplete: str):
    """The ids of the tasks `tt backlog` lists (for `tt backlog remove`): those waiting on
    dependencies too."""
    def backlog(config, client, _keys):
        from tinytown.supervisor.town import Town  # (only here: the other completions skip its import)
        return [t.id for t in Town(config, client).coordination.backlog()]
    ids = _completed(ctx, backlog)
    return [t for t in ids if t.startswith(incomplete)][:200]


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=TinytownGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--town", "town", metavar="PATH", help="The town's folder (default: walk up from here).")
@click.version_option(package_name="tinytown", prog_name="tt")
@click.pass_context
def cli(ctx, town):
    """Tinytown: run a town of AI coding agents, coordinated through Redis."""
    ctx.obj = {"town": town}


@cli.command()
@click.option("--name", help="The town's name (default: the folder's name and git branch).")
@click.option("--cli", "--model", "default_cli", default="claude", show_default=True,
              help="The default agent CLI preset.")
@click.option("--max-agents", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing tinytown.toml.")
@click.option("--town", "town_path", metavar="PATH", help="The folder to make a town of (default: here).")
@click.pass_context
def init(ctx, name, default_cli, max_agents, force, town_path):
    """Write tinytown.toml here (or in --town) and create agents/ and .tt/."""
    from pathlib import Path

    from tinytown.supervisor.config import init_town
    folder = Path(town_path or (ctx.obj or {}).get("town") or ".")
    config = init_town(folder, name, default_cli, max_agents, force)
    click.echo(f"Initialized town {config.name!r} in {config.root}")
    click.echo(f"  config: {config.root / 'tinytown.toml'}   runtime: {config.runtime_dir}")
    click.echo("Next: tt spawn dev --model claude")


@cli.command()
@click.argument("name")
@click.option("--model", "--cli", "cli_name", metavar="PRESET", help="The agent CLI (default: default_cli).")
@click.option("--task-timeout", type=Seconds(most=None), metavar="S", help="Fail a task running longer than this (s).")
@click.option("--shared", is_flag=True, help="Work in the town folder, not a git worktree of its own.")
@click.option("--from", "from_ref", metavar="REF", help="Start its worktree's branch at REF (default: HEAD).")
@click.option("--role", "roles", multiple=True, metavar="ROLE", help="Backlog work it may take (repeatable).")
@click.option("--host", "pin", metavar="HOST", help="Run it on this host only (default: the live host with most room).")
@click.option("--answer", "answers", multiple=True, metavar="REGEX=TEXT",
              help="When its CLI's last line matches REGEX, type TEXT (\\r is Enter; repeatable).")
@click.option("--keep-context", is_flag=True,
              help="Each task continues the CLI session of the one before (the agent remembers its work).")
@json_option
@town_option
def spawn(name, cli_name, task_timeout, shared, from_ref, roles, pin, answers, keep_context, as_json, town_path):
    """Register agent NAME; the supervisor starts its runner (and is started if needed). In a git
    town its CLI works in agents/NAME, a worktree on branch tt/NAME."""
    from tinytown.supervisor.config import parse_answer, validate_name, validate_task_timeout
    config = _config(town_path)
    validate_name("agent", name)
    answers = [parse_answer(answer) for answer in answers]
    spec = config.cli(cli_name or config.default_cli)  # unknown preset: fail before starting anything
    validate_task_timeout(task_timeout)
    for role in roles:
        validate_name("role", role)
    if pin is not None:  # (--host '' is no host: refused, not taken for "anywhere")
        validate_name("host", pin)
    shared = shared or config.workspace.mode == "shared"
    if shared and from_ref:
        raise TinytownError('--from needs a worktree (not with --shared / [workspace] mode = "shared")')
    from tinytown.supervisor.hosts import elsewhere, fencing
    town = _started_town(config, check=lambda recorded: recorded.check_spawn(name, pin or ""))
    here = town.here
    states = town.hosts.states() if fencing(config) and not pin else {}  # (one machine's town: only this host)
    if states and here not in states and "live" not in states.values():  # (no host runs, this folder is none)
        raise TinytownError(f"no host of town {config.name!r} is running ({', '.join(sorted(states))}): `tt start` "
                            "in one of their folders first, or pin the agent to one with --host NAME")
    town.check_spawn(name, pin or "")  # before a worktree is made for it
    if from_ref and not shared and any(host != here and state == "live" for host, state in states.items()):
        raise TinytownError(f"--from makes {name}'s branch in this checkout, but the town runs on other hosts too and "
                            f"{name} may be placed on one of them: pin it here with --host {here}")
    pinned_elsewhere = pin if elsewhere(config, pin, here) else ""
    workspace = {"mode": "shared"} if shared else workspace_commands.prepare_workspace(
        config, town, name, from_ref, quiet=as_json, elsewhere=pinned_elsewhere)
    agent = town.spawn(name, cli_name or config.default_cli, task_timeout, workspace=workspace["mode"],
                       branch=workspace.get("branch", ""), host=pin or "", answers=answers,
                       keep_context=keep_context)
    if workspace.get("path") and elsewhere(config, agent.host, here):  # placed on another host for its room
        workspace["notes"] = workspace_commands.leave_to_host(config, name, workspace, agent.host, quiet=as_json)
    for line in _spawn_warnings(spec, keep_context, workspace["mode"] == "shared"):
        click.echo(f"tt: warning: {line}", err=True)
    if roles:
        roles = town.coordination.set_roles(name, roles)
    if as_json:
        from tinytown.supervisor.town import agent_json
        data = agent_json(agent, 0, config.supervisor.heartbeat_stale, config.root)
        data.update(workspace_notes=workspace.get("notes", []), workspace_why=workspace.get("why", ""),
                    roles=sorted(roles))
        _print_json(data)
    else:
        where = f" in {workspace['label']} (branch {workspace['branch']})" if workspace["mode"] == "worktree" else ""
        on = f" on host {agent.host}" if pin or town.r.execute_command("SCARD", town.keys.hosts) > 1 else ""
        click.echo(f"Spawned agent {agent.name} ({agent.id}) using {agent.cli}{where}{on}")


def _spawn_warnings(spec, keep_context: bool, shared: bool) -> list[str]:
    """What the user should know about the agent just spawned: it is spawned anyway, since the
    fix is in tinytown.toml (or in who runs the town) and `tt restart` picks it up."""
    import os

    from tinytown.supervisor.config import root_caveat
    warnings = [root_caveat(spec, {**os.environ, **dict(spec.env)})]
    if keep_context and not spec.can_continue:
        warnings.append(f"--keep-context: {spec.name!r} has no way to continue a session here (no continue_args "
                        f"in [agent_clis.{spec.name}]): each task starts a new one")
    elif keep_context and shared and spec.continue_args:
        warnings.append(f"--keep-context in the shared town folder: without a session id {spec.name!r} continues "
                        "the folder's last session, which may be another agent's (a worktree agent has its own)")
    return [line for line in warnings if line]


@cli.command(name="list")
@json_option
@town_option
def list_agents(as_json, town_path):
    """The town's agents with id and state."""
    from tinytown.cli import render
    config = _config(town_path, use_started=True)
    town = _running_town(config, as_json)
    agents = town.agents()
    queued = town.queued_counts(agents)
    waiting = town.coordination.waiting_counts()
    roles = town.coordination.roles([a.id for a in agents])
    host_states = town.hosts.states()
    if as_json:
        from tinytown.supervisor.town import agent_json
        _print_json([{**agent_json(a, queued.get(a.id, 0), config.supervisor.heartbeat_stale, config.root,
                                   host_states, waiting=waiting.get(a.id, 0)),
                      "roles": roles[a.id]}
                     for a in agents])
    else:
        pending = {a.id: queued.get(a.id, 0) + waiting.get(a.id, 0) for a in agents}
        render.agent_lines(agents, pending, roles, host_states)


@cli.command()
@click.argument("agent", shell_complete=complete_agent)
@click.argument("description", required=False)
@click.option("--file", "-f", "from_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the task text from a file ('-' for stdin): no size limit, any bytes.")
@click.option("--each", "each_file", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True),
              help="One task per line of FILE ('-' for stdin), all written at once; prints one id per line.")
@click.option("--null", "-0", "null", is_flag=True, help="With --each: records end with NUL, not newline.")
@click.option("--after", "after", multiple=True, metavar="REF",
              help="Start only once these tasks completed: task ids/prefixes or agent names (repeatable, a,b).")
@click.option("--no-context", is_flag=True, help="Do not append the --after tasks' outcomes to the prompt.")
@json_option
@town_option
def assign(agent, description, from_file, each_file, null, after, no_context, as_json, town_path):
    """Give AGENT a task (DESCRIPTION, or --file, or '-' for stdin), or many (--each)."""
    if each_file:
        if description is not None or from_file:
            raise TinytownError("--each reads every task from its file: give no task text and no --file")
        return _assign_each(agent, each_file, null, as_json, town_path, after, no_context)
    if null:
        raise TinytownError("--null goes with --each")
    from tinytown.cli.coordination_commands import create_tasks, text_argument
    description = text_argument(description, from_file, "tt assign AGENT \"what to do\"")
    create_tasks(_config(town_path), agent, [description], after, no_context, as_json, single=True)


def _assign_each(agent, path, null, as_json, town_path, after=(), no_context=False):
    """`tt assign AGENT --each FILE`: a task per record, in one transaction (all or none)."""
    raw = _read_input(path)
    if null:
        records = raw.split(b"\0")
    else:
        records = [line[:-1] if line.endswith(b"\r") else line for line in raw.split(b"\n")]
    texts = [text for text in (r.decode("utf-8", "surrogateescape") for r in records) if text.strip()]
    if not texts:
        where = "stdin" if path == "-" else path
        raise TinytownError(f"no tasks in {where} (one per {'NUL-ended record' if null else 'line'}; "
                            "empty ones are skipped)")
    config = _config(town_path)
    if after or no_context:
        from tinytown.cli.coordination_commands import create_tasks
        return create_tasks(config, agent, texts, after, no_context, as_json, single=False)
    tasks = _started_town(config, check=lambda recorded: recorded.agent_id(agent)).assign_many(agent, texts)
    if as_json:
        _print_json([t.to_json() for t in tasks])
    else:
        click.echo("\n".join(t.id for t in tasks))


def _read_input(path: str) -> bytes:
    """A file's bytes ('-': stdin), or one clear line about why not."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise TinytownError(f"no such file: {path}") from None
    except OSError as exc:
        raise TinytownError(f"cannot read {path}: {exc.strerror or exc}") from None


@cli.command()
@json_option
@town_option
def status(as_json, town_path):
    """The town, its agents and their states, and pending work."""
    config = _config(town_path, use_started=True)
    town, running = _town_or_snapshot(config)
    if town is None:
        data = {"town": config.name, "root": str(config.root), "running": False, "agents": [], "tasks": {}}
        if as_json:
            _print_json(data)
        else:
            click.echo(f"Town {config.name}: not running (start it with `tt start`)")
        return
    data = town.status()
    from tinytown.supervisor.hosts import fencing
    from tinytown.supervisor.lifecycle import running_pid
    if running and fencing(config) and not running_pid(config):  # (a shared Redis answers: a host runs?)
        running = any(h["state"] in ("live", "lapsed") for h in data.get("hosts") or [])
    data["running"] = running
    if not running:  # as last recorded, but not the snapshot's own address, nor a pid long gone
        data["redis"] = config.redis_where
        data["supervisor"].update(state="stopped", pid=None, disk_error="")
        for agent in data["agents"]:  # (a town killed outright left its agents as they were)
            agent["pid"] = None
            if agent["state"] not in ("stopped", "failed", "paused"):
                agent["reason"] = f"{agent['state']} when the town went down"
                agent.update(state="stopped", health="stopped", responsive=True)
    if as_json:
        _print_json(data)
    else:
        from tinytown.cli import render
        render.status(data)


@cli.command()
@click.option("--agent", help="Only this agent's tasks.", shell_complete=complete_agent)
@click.option("--state", type=click.Choice(STATES), help="Only tasks in this state.")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=0, metavar="N", help="Only the newest N (0: all).")
@json_option
@town_option
def tasks(agent, state, limit, as_json, town_path):
    """The town's tasks, oldest first."""
    config = _config(town_path, use_started=True)
    town = _running_town(config, as_json)
    found = town.tasks(agent=agent, state=state, limit=limit)
    if agent and not found and not (state and town.tasks(agent=agent, limit=1)):
        town.agent_id(agent)  # (a pruned agent's tasks are still listed by its name; a typo is said)
    if as_json:
        from tinytown.cli.coordination_commands import tasks_json
        _print_json(tasks_json(town, found))
    else:
        from tinytown.cli import render
        render.tasks(found)


@cli.command()
@click.argument("task_id", shell_complete=complete_task)
@click.option("--raw", is_flag=True, help="The description and output bytes as written, escape sequences included.")
@json_option
@town_option
def task(task_id, raw, as_json, town_path):
    """One task in full (TASK_ID may be a unique prefix)."""
    config = _config(town_path, use_started=True)
    town = _running_town(config, as_json)
    found = town.task(task_id)
    so_far = found.state == "running" and not found.output
    if so_far:  # the task keeps its output once it ends; until then the agent's stream has it
        from tinytown.cli.logview import task_output_so_far
        found.output = task_output_so_far(town.config, found)
    from tinytown.cli import render
    if as_json:
        from tinytown.cli.coordination_commands import tasks_json
        _print_json({**tasks_json(town, [found])[0], **({"output_so_far": True} if so_far else {})})
    elif raw:
        render.task_raw(found, sys.stdout.buffer, so_far=so_far)
    else:
        render.task(found, so_far=so_far)


@cli.command()
@click.option("--host", metavar="NAME", help="This machine's name in the town (default: [cluster] host, else its hostname).")
@town_option
def start(host, town_path):
    """Run the supervisor in the foreground (Ctrl+C stops the town gracefully)."""
    from tinytown.supervisor.daemon import Supervisor
    config = _config(town_path)
    exit_now(Supervisor(config, say=lambda text: click.echo(f"tt: {text}"), host=config.host_name(host)).serve())


@cli.command()
@click.option("--now", is_flag=True, help="Do not wait for running tasks; re-queue them at once.")
@json_option
@town_option
def stop(now, as_json, town_path):
    """Stop every runner, then the town's own redis-server (none with a url); unfinished tasks go back to their inbox."""
    stop_command(_config(town_path, use_started=True), now, as_json, click.echo)  # (also cli/entry.py's, without click)


@cli.command(name="forget-host")
@click.argument("hosts", nargs=-1, required=True)
@town_option
def forget_host(hosts, town_path):
    """Remove stopped or lost hosts that no agent is placed on from the town (`tt status` lists every
    host the town ever ran on). Started again, such a host joins as a new one."""
    config = _config(town_path)
    town = _live_town(config, "forget a host")
    failed = False
    for name in hosts:
        try:
            town.hosts.forget(name)
        except TinytownError as exc:
            click.echo(f"tt: error: {exc}", err=True)
            failed = True
        else:
            click.echo(f"Forgot host {name}")
    if failed:
        raise SystemExit(1)


@cli.command(name="reload")
@town_option
def reload_config(town_path):
    """Apply an edited tinytown.toml to the running town (it also notices edits by itself)."""
    from tinytown.supervisor.lifecycle import reload as reload_town
    try:
        config = _config(town_path)
    except TinytownError as exc:
        raise TinytownError(f"{exc} (the town runs on its previous config)") from None
    outcome = reload_town(config)
    if outcome is None:
        click.echo(f"Town {config.name} is not running: the next start reads tinytown.toml")
        return
    error, note = outcome
    if error:
        raise TinytownError(f"{error} (the town runs on its previous config)")
    click.echo(f"Town {config.name}: tinytown.toml read again: {note}")


@cli.command()
@click.argument("agent", shell_complete=complete_agent)
@click.option("--without-latest", is_flag=True,
              help="For an agent failed because its latest work, made on a host since lost, cannot be fetched: "
                   "go on from its branch where it runs now, without that work.")
@town_option
def restart(agent, without_latest, town_path):
    """Clear a failed agent (or one waiting to restart) and start its runner again; a runner that
    stopped sending heartbeats (hung) is stopped first, as `tt kill` would. An idle or working
    agent gets a new runner (reading tinytown.toml as it is now) once its task in hand is done."""
    config = _config(town_path)
    town = _started_town(config, check=lambda recorded: recorded.agent_id(agent))
    held = town.agent(agent)
    before = held.state
    if without_latest:  # (before anything is stopped: a refused restart must change nothing)
        from tinytown.supervisor.town import check_latest_to_leave
        check_latest_to_leave(held)
    from tinytown.supervisor.hosts import fencing
    from tinytown.supervisor.town import LIVE_STATES
    host_state = town.hosts.state(held.host) if held.host and fencing(config) else ""  # (one read, said below too)
    lost = host_state == "lost"
    if lost and held.state in LIVE_STATES and not held.hold:  # (its runner died with its host: not hung)
        from tinytown.cli.render import lost_host_note
        raise TinytownError(f"{lost_host_note(held.name, held.host, held.pinned)}: its runner is not hung, "
                            f"nothing to restart (`tt prune {held.name}` removes it)")
    if held.health(config.supervisor.heartbeat_stale) == "unresponsive" and not lost:  # (lost: its hold goes, below)
        from tinytown.cli.agent_commands import stop_now
        click.echo(f"{held.name}'s runner has sent no heartbeat for over {config.supervisor.heartbeat_stale:g}s "
                   "(hung?): stopping it first")
        try:
            stop_now(town, agent)
        except TinytownError as exc:
            raise TinytownError(f"{exc}: it is being stopped; `tt restart {held.name}` again once `tt status` "
                                "shows it stopped") from None
        before = "unresponsive"
    found, done = town.restart_agent(agent, without_latest)
    if without_latest:
        click.echo(f"{found.name} goes on without its latest work (task {found.work_task}, on host "
                   f"{found.work_host}): its commits stay there, on branch {found.branch}")
    if done == "started" or before == "unresponsive":
        click.echo(f"Restarting agent {found.name} (it was {before}{', ' + held.hold + ' asked' if held.hold else ''})")
        if host_state in ("stopped", "lost"):
            click.echo(f"tt: note: its host {held.host} is {host_state}: it starts once "
                       + ("`tt start` runs there" if host_state == "stopped" else "that host is back"), err=True)
    elif done == "replaced":  # a new runner, with the config as it is now
        click.echo(f"Restarting agent {found.name}'s runner" + (" once its current task is done"
                                                               if found.state != "idle" else ""))
    else:
        click.echo(f"Agent {found.name} is {found.state}: nothing to restart")


@cli.command()
@click.argument("agents", nargs=-1, shell_complete=complete_agent)
@click.option("-n", "--lines", type=click.IntRange(min=0), metavar="N",
              help="Show the last N lines of each agent (default 100; all with --since or --task).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until Ctrl+C.")
@click.option("--task", "task_id", metavar="ID", shell_complete=complete_task, help="Only this task's output (with -f: until it finishes).")
@click.option("--since", metavar="WHEN", help="Only output since then: 90s, 10m, 2h, 1d, 14:30, or an ISO time.")
@click.option("--no-color", is_flag=True, help="No coloured agent prefixes.")
@click.option("--raw", is_flag=True, help="Bytes as the CLI wrote them, escape sequences included.")
@click.option("--redis", "from_redis", is_flag=True,
              help="Read from the town's Redis, not .tt/logs (the default when the files are not here).")
@town_option
def logs(agents, lines, follow, task_id, since, no_color, raw, from_redis, town_path):
    """Agents' recent output; -f follows it (all agents unless named, `agent |` prefixed)."""
    import signal

    from tinytown.cli import logview
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tt logs | head` ends quietly, like tail
    if task_id and agents:
        raise TinytownError("give either agent names or --task, not both")
    if task_id is not None and not task_id.strip():
        raise TinytownError("--task '': no task id given")
    config = _config(town_path, use_started=True)
    if follow:
        from tinytown.cli.entry import end_on_ctrl_c
        end_on_ctrl_c()
    try:
        logview.show(config, list(agents), lines=lines, follow=follow, task=task_id, since=since, raw=raw,
                     colour=logview.colour_wanted(no_color), from_redis=from_redis)
    except KeyboardInterrupt:  # Ctrl+C while it prints what there is (without -f): not an error either
        pass


@cli.command()
@click.argument("agent", shell_complete=complete_agent)
@click.option("--read-only", is_flag=True, help="Watch without sending keystrokes or window size.")
@click.option("--detach-keys", metavar="KEYS",
              help='Key sequence that detaches, e.g. "ctrl-]" (default) or "ctrl-p,ctrl-q"; '
                   "also [attach] detach_keys in tinytown.toml.")
@click.option("--via-redis", is_flag=True,
              help="Through the town's Redis even when the agent's runner is on this machine "
                   "(the way an agent on another host is reached).")
@town_option
def attach(agent, read_only, detach_keys, via_redis, town_path):
    """Your terminal on AGENT's live CLI; the detach key (Ctrl-]) leaves it running."""
    from tinytown.cli import attach as attaching
    from tinytown.supervisor.config import parse_keys
    config = _config(town_path)
    spec = detach_keys or config.detach_keys
    try:
        keys = parse_keys(spec)
    except ValueError as exc:
        raise TinytownError(f"--detach-keys: {exc}") from None
    sys.exit(attaching.attach(config, agent, keys, spec, read_only=read_only, via_redis=via_redis))


from tinytown.cli import workspace_commands  # noqa: E402 - its commands, registered here

cli.add_command(workspace_commands.diff)
cli.add_command(workspace_commands.merge)



def main() -> None:
    try:
        cli(prog_name="tt")
        code = 0
    except SystemExit as exc:
        code = exc.code
    if isinstance(code, str):  # sys.exit("message"), as Python itself would report it
        print(code, file=sys.stderr)
        code = 1
    # A `tt` command is done once its output is out: skip the interpreter's teardown of every
    # imported module (several ms; `tt list` is meant to feel instant).
    exit_now(code or 0)


# More commands, in modules of their own that use the helpers above: run as `python -m`, this
# module is __main__, and must also be the tinytown.cli.main they import (not a second copy).
sys.modules.setdefault("tinytown.cli.main", sys.modules[__name__])
from tinytown.cli import coordination_commands  # noqa: E402
from tinytown.cli.agent_commands import COMMANDS as _AGENT_COMMANDS  # noqa: E402

for _command in _AGENT_COMMANDS:
    cli.add_command(_command)
coordination_commands.register(cli)

if __name__ == "__main__":
    main()
