"""Load and validate `tinytown.toml`: one place for defaults, CLI presets and runtime paths.

Errors name the file and, where it can be found, the line, because a user fixes a file by line.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TinytownError

import tomllib

CONFIG_FILE = "tinytown.toml"
RUNTIME_DIR = ".tt"
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
# Linux caps one argv string at MAX_ARG_STRLEN = 32 pages (128 KiB), NUL included.
MAX_ARG_BYTES = 128 * 1024 - 1

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
PROMPT_MODES = ("stdin", "arg", "file")


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

    def argv(self, prompt_text: str | None, prompt_file: str) -> list[str]:
        """The argv to exec, with placeholders filled; never passed through a shell."""
        uses_prompt = any("{prompt}" in part for part in self.command)
        uses_file = any("{prompt_file}" in part for part in self.command)
        argv = [part.replace("{prompt_file}", prompt_file) for part in self.command]
        if self.prompt == "arg":
            text = prompt_text or ""
            if len(text.encode("utf-8", "surrogateescape")) > MAX_ARG_BYTES:
                raise TinytownError(
                    f"prompt is too long to pass as an argument to {self.name!r} "
                    f"(over {MAX_ARG_BYTES} bytes); use prompt = \"stdin\" or \"file\""
                )
            argv = [part.replace("{prompt}", text) for part in argv]
            if not uses_prompt:
                argv.append(text)
        elif self.prompt == "file" and not uses_file:
            argv.append(prompt_file)
        return argv


PRESETS: dict[str, CliSpec] = {
    spec.name: spec
    for spec in (
        CliSpec("claude", ("claude", "--print", "--dangerously-skip-permissions"), "stdin"),
        CliSpec("auggie", ("auggie", "--print"), "stdin"),
        # "-" makes `codex exec` read the prompt from stdin.
        CliSpec("codex", ("codex", "exec", "--dangerously-bypass-approvals-and-sandbox", "-"), "stdin"),
        CliSpec("aider", ("aider", "--yes", "--no-auto-commits", "--message-file", "{prompt_file}"), "file"),
        CliSpec("gemini", ("gemini",), "stdin"),
        CliSpec("copilot", ("copilot", "--allow-all-tools", "-p", "{prompt}"), "arg"),
        CliSpec("cursor", ("cursor-agent", "--print", "--force", "{prompt}"), "arg"),
    )
}


@dataclass(frozen=True)
class SupervisorPolicy:
    """Restart, stop and health settings ([supervisor] in tinytown.toml)."""

    backoff_first: float = 0.5       # delay before the second quick restart (the first is immediate)
    backoff_factor: float = 2.0
    backoff_max: float = 30.0
    start_seconds: float = 1.0       # a runner up this long counts as started
    max_fast_failures: int = 5       # quick failures in a row before the agent is `failed`
    max_attempts: int = 3            # deliveries of one task before "agent crashed N times"
    stop_grace: float = 10.0         # seconds a working runner gets to finish on `tt stop`
    heartbeat_interval: float = 2.0
    heartbeat_stale: float = 10.0    # older than this and `tt status` says unresponsive
    task_timeout: float = 0.0        # 0 = none; per-agent override on spawn


@dataclass(frozen=True)
class LogPolicy:
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 3
    stream_maxlen: int = 1000        # Redis output stream entries kept per agent (each <= 64 KiB)


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


@dataclass(frozen=True)
class Config:
    root: Path                       # the folder holding tinytown.toml
    name: str
    default_cli: str = "claude"
    max_agents: int = 10
    use_socket: bool = True
    socket_path: str = "redis.sock"
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_server: str | None = None  # explicit redis-server binary
    clis: dict[str, CliSpec] = field(default_factory=dict)
    supervisor: SupervisorPolicy = field(default_factory=SupervisorPolicy)
    logs: LogPolicy = field(default_factory=LogPolicy)
    detach_keys: str = DEFAULT_DETACH_KEYS   # [attach] detach_keys

    @property
    def runtime_dir(self) -> Path:
        return self.root / RUNTIME_DIR

    @property
    def log_dir(self) -> Path:
        return self.runtime_dir / "logs"

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
    def redis_password(self) -> str | None:
        """The password every client sends (AUTH) before its first command; None: no AUTH.

        Only with TCP (a port any local user can connect to); the unix socket is owner-only.
        Read from the file each time: a command may load the config before the supervisor it
        starts has made the password.
        """
        if self.use_socket:
            return None
        try:
            return self.redis_password_file.read_text().strip() or None
        except OSError:
            return None

    def redis_kwargs(self) -> dict:
        if self.use_socket:
            return {"unix_socket_path": str(self.redis_socket)}
        return {"host": self.redis_host, "port": self.redis_port, "password": self.redis_password}


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
    if start is not None:
        p = Path(start).expanduser().resolve()
        if p.is_file():
            return p.parent
        if (p / CONFIG_FILE).is_file():
            return p
        raise TinytownError(f"no {CONFIG_FILE} in {p} (run `tt init` there)")
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise TinytownError(f"no {CONFIG_FILE} here or in any parent folder (run `tt init`, or pass --town PATH)")


def load(root: str | Path | None = None) -> Config:
    """Find and load the town's config, or raise TinytownError naming file and line."""
    folder = find_town(root)
    path = folder / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TinytownError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TinytownError(_toml_error(path, text, exc)) from None
    return _from_dict(data, folder, path, text)


def _from_dict(data: dict, root: Path, path: Path, text: str) -> Config:
    def fail(key: str, why: str):
        line = _line_of(text, key)
        where = f"{path}:{line}" if line else str(path)
        raise TinytownError(f"{where}: {key}: {why}")

    def get(table: dict, key: str, kind, default, check=None, why=""):
        if key not in table:
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            fail(key, f"expected {kind.__name__}, got {type(value).__name__}")
        if check and not check(value):
            fail(key, why)
        return value

    name = get(data, "name", str, None)
    if name is None:
        fail("name", "missing (the town's name)")
    try:
        validate_name("town", name)
    except TinytownError as exc:
        fail("name", str(exc))
    redis_t = get(data, "redis", dict, {})
    sup_t = get(data, "supervisor", dict, {})
    logs_t = get(data, "logs", dict, {})
    attach_t = get(data, "attach", dict, {})
    clis_t = get(data, "agent_clis", dict, {})

    clis: dict[str, CliSpec] = {}
    for cli_name, spec in clis_t.items():
        if not isinstance(spec, dict):
            fail(cli_name, "each [agent_clis.NAME] must be a table with `command`")
        command = spec.get("command")
        if isinstance(command, str):
            try:
                argv = tuple(shlex.split(command))
            except ValueError as exc:
                fail("command", f"cannot split {command!r}: {exc}")
        elif isinstance(command, list) and all(isinstance(a, str) for a in command):
            argv = tuple(command)
        else:
            fail("command", f"[agent_clis.{cli_name}] needs command = \"...\" or a list of strings")
        if not argv:
            fail("command", f"[agent_clis.{cli_name}] command is empty")
        prompt = spec.get("prompt", "stdin")
        if prompt not in PROMPT_MODES:
            fail("prompt", f"must be one of {', '.join(PROMPT_MODES)}")
        env = spec.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            fail("env", f"[agent_clis.{cli_name}] env must be a table of strings")
        clis[cli_name] = CliSpec(cli_name, argv, prompt, tuple(sorted(env.items())))

    positive = (lambda v: v > 0, "must be positive")
    non_negative = (lambda v: v >= 0, "must not be negative")
    policy = SupervisorPolicy(
        backoff_first=get(sup_t, "backoff_first", float, 0.5, *non_negative),
        backoff_factor=get(sup_t, "backoff_factor", float, 2.0, lambda v: v >= 1, "must be at least 1"),
        backoff_max=get(sup_t, "backoff_max", float, 30.0, *non_negative),
        start_seconds=get(sup_t, "start_seconds", float, 1.0, *non_negative),
        max_fast_failures=get(sup_t, "max_fast_failures", int, 5, *positive),
        max_attempts=get(sup_t, "max_attempts", int, 3, *positive),
        stop_grace=get(sup_t, "stop_grace", float, 10.0, *non_negative),
        heartbeat_interval=get(sup_t, "heartbeat_interval", float, 2.0, *positive),
        heartbeat_stale=get(sup_t, "heartbeat_stale", float, 10.0, *positive),
        task_timeout=get(sup_t, "task_timeout", float, 0.0, *non_negative),
    )
    logs = LogPolicy(
        max_bytes=get(logs_t, "max_bytes", int, 10 * 1024 * 1024, lambda v: v >= 1024, "must be at least 1024"),
        backups=get(logs_t, "backups", int, 3, *non_negative),
        stream_maxlen=get(logs_t, "stream_maxlen", int, 1000, *positive),
    )
    config = Config(
        root=root,
        name=name,
        default_cli=get(data, "default_cli", str, "claude"),
        max_agents=get(data, "max_agents", int, 10, *positive),
        use_socket=get(redis_t, "use_socket", bool, True),
        socket_path=get(redis_t, "socket_path", str, "redis.sock", bool, "must not be empty"),
        redis_host=get(redis_t, "host", str, "127.0.0.1"),
        redis_port=get(redis_t, "port", int, 6379, lambda v: 0 < v < 65536, "must be a TCP port"),
        redis_server=get(redis_t, "server", str, None),
        clis=clis,
        supervisor=policy,
        logs=logs,
        detach_keys=get(attach_t, "detach_keys", str, DEFAULT_DETACH_KEYS, _keys_ok,
                        "not a key sequence (use e.g. \"ctrl-]\" or \"ctrl-p,ctrl-q\")"),
    )
    if config.default_cli not in PRESETS and config.default_cli not in clis:
        fail("default_cli", f"unknown CLI {config.default_cli!r}")
    return config


def _keys_ok(spec: str) -> bool:
    try:
        return bool(parse_keys(spec))
    except ValueError:
        return False


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


def _line_of(text: str, key: str) -> int | None:
    """Best-effort line number of `key = ...` or `[key]`, for error messages."""
    pattern = re.compile(rf"^\s*(\[+\s*[\w.\"-]*{re.escape(key)}[\w.\"-]*\s*\]+|\"?{re.escape(key)}\"?\s*=)")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


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


CONFIG_TEMPLATE = """\
name = "{name}"
default_cli = "{default_cli}"
max_agents = {max_agents}

[redis]
use_socket = true
socket_path = "redis.sock"

# Optional. Restart policy and stop behaviour of `tt start` (defaults shown).
# [supervisor]
# backoff_first = 0.5
# backoff_factor = 2.0
# backoff_max = 30.0
# start_seconds = 1.0
# max_fast_failures = 5
# max_attempts = 3
# stop_grace = 10.0
# task_timeout = 0            # seconds; 0 = none (per agent: tt spawn NAME --task-timeout S)
# heartbeat_interval = 2.0
# heartbeat_stale = 10.0      # then `tt status` shows the agent unresponsive

# Optional. Log rotation, and the key sequence that leaves `tt attach` (defaults shown).
# [logs]
# max_bytes = 10485760
# backups = 3
# [attach]
# detach_keys = "ctrl-]"

# Your own model CLI (prompt = "stdin", "arg" or "file"):
# [agent_clis.mybot]
# command = "mybot --non-interactive"
# prompt = "stdin"
# env = {{ MYBOT_MODE = "fast" }}
"""


def init_town(folder: Path, name: str | None, default_cli: str = "claude", max_agents: int = 10,
              force: bool = False) -> Config:
    """Write tinytown.toml, create agents/ and .tt/, and keep .tt/ out of git."""
    folder = folder.resolve()
    path = folder / CONFIG_FILE
    if path.exists() and not force:
        raise TinytownError(f"{path} already exists (use --force to overwrite)")
    name = validate_name("town", name) if name else default_town_name(folder)
    if default_cli not in PRESETS:
        raise TinytownError(f"unknown CLI {default_cli!r} (known: {', '.join(sorted(PRESETS))})")
    if max_agents < 1:
        raise TinytownError("max_agents must be at least 1")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(CONFIG_TEMPLATE.format(name=name, default_cli=default_cli, max_agents=max_agents))
    (folder / "agents").mkdir(exist_ok=True)
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

