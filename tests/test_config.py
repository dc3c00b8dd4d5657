"""Config loading and validation: pure file logic, no processes."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tinytown.supervisor.config import (MAX_UNIX_SOCKET_PATH, PRESETS, CliSpec, LogPolicy, SupervisorPolicy,
                                       TasksPolicy, WorkspacePolicy, documented_config, find_town, init_town, load, short_socket_path)
from tinytown.supervisor.errors import TinytownError


def write(tmp_path, text):
    (tmp_path / "tinytown.toml").write_text(text)
    return tmp_path


def test_init_writes_the_tutorial_config(tmp_path):
    config = init_town(tmp_path, "feature-builder")
    assert (config.name, config.default_cli, config.max_agents) == ("feature-builder", "claude", 10)
    assert config.use_socket and config.socket_path == "redis.sock"
    assert config.redis_socket == tmp_path.resolve() / ".tt" / "redis.sock"
    assert (tmp_path / "agents").is_dir()
    assert oct((tmp_path / ".tt").stat().st_mode & 0o777) == "0o700"
    assert (tmp_path / ".gitignore").read_text() == ".tt/\n"


def test_init_keeps_an_existing_gitignore_and_refuses_to_overwrite(tmp_path):
    (tmp_path / ".gitignore").write_text("node_modules")
    init_town(tmp_path, "t")
    assert (tmp_path / ".gitignore").read_text() == "node_modules\n.tt/\n"
    with pytest.raises(TinytownError, match="already exists"):
        init_town(tmp_path, "t")
    init_town(tmp_path, "t2", force=True)
    assert (tmp_path / ".gitignore").read_text().count(".tt/") == 1


def test_default_name_comes_from_folder_and_git_branch(tmp_path):
    folder = tmp_path / "my project"
    folder.mkdir()
    assert init_town(folder, None).name == "my-project"
    repo = tmp_path / "repo"
    repo.mkdir()
    os.system(f"git -C '{repo}' init -q -b feature/x 2>/dev/null || git -C '{repo}' init -q")
    name = init_town(repo, None).name
    assert name.startswith("repo")


def test_find_town_walks_up(tmp_path):
    init_town(tmp_path, "t")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    cwd = os.getcwd()
    try:
        os.chdir(deep)
        assert find_town() == tmp_path.resolve()
    finally:
        os.chdir(cwd)
    assert find_town(tmp_path / "tinytown.toml") == tmp_path.resolve()
    with pytest.raises(TinytownError, match="no tinytown.toml"):
        find_town(deep)


def test_malformed_toml_names_the_line(tmp_path):
    write(tmp_path, 'name = "t"\nmax_agents = \n')
    with pytest.raises(TinytownError, match=r"tinytown.toml:2: .*line 2"):
        load(tmp_path)


@pytest.mark.parametrize("text,pattern", [
    ('name = "t"\nmax_agents = "ten"\n', r"tinytown.toml:2: max_agents: expected int"),
    ('name = "t"\nmax_agents = 0\n', r":2: max_agents: must be positive"),
    ('max_agents = 3\n', r"name: missing"),
    ('name = "bad name!"\n', r":1: name: invalid town name"),
    ('name = "t"\ndefault_cli = "nope"\n', r":2: default_cli: unknown CLI 'nope'"),
    ('name = "t"\n[redis]\nuse_socket = "yes"\n', r":3: use_socket: expected bool"),
    ('name = "t"\n[agent_clis.x]\nprompt = "stdin"\n', r"command"),
    ('name = "t"\n[agent_clis.x]\ncommand = "x"\nprompt = "pipe"\n', r":4: prompt: must be one of"),
    ('name = "t"\n[supervisor]\nbackoff_factor = 0.5\n', r":3: backoff_factor: must be at least 1"),
    # misspelt keys and tables are refused, naming the nearest known one
    ('name = "t"\n\nmax_agent = 3\n', r"tinytown.toml:3: max_agent: unknown key \(did you mean 'max_agents'\?\)"),
    ('name = "t"\n[supervisr]\nstop_grace = 1\n', r":2: \[supervisr\]: unknown table \(did you mean \[supervisor\]\?\)"),
    ('name = "t"\n[agent_clis.x]\ncommand = "x"\npromt = "arg"\n',
     r":4: promt: unknown key in \[agent_clis.x\] \(did you mean 'prompt'\?\)"),
    ('name = "t"\n[logs]\nbackups = 1\n[supervisor]\nbackups = 2\n', r":5: backups: unknown key in \[supervisor\]"),
    ('name = "t"\nredis = 3\n', r":2: redis: must be a table"),
    # inf, nan and absurd values
    ('name = "t"\n[supervisor]\nheartbeat_interval = inf\n', r":3: heartbeat_interval: must be a finite number"),
    ('name = "t"\n[supervisor]\nstop_grace = nan\n', r":3: stop_grace: must be a finite number"),
    ('name = "t"\n[supervisor]\nstop_grace = -inf\n', r":3: stop_grace: must be a finite number"),
    ('name = "t"\nmax_agents = 100000000000000000000\n', r":2: max_agents: must be at most 10000"),
    ('name = "t"\n[supervisor]\nheartbeat_interval = 0\n', r":3: heartbeat_interval: must be at least 0.01"),
    ('name = "t"\n[supervisor]\nmax_attempts = true\n', r":3: max_attempts: expected int, got bool"),
    ('name = "t"\n[redis]\nport = 70000\n', r":3: port: must be at most 65535"),
    # what the kernel cannot start, refused here rather than in every runner start
    ('name = "t"\n[agent_clis.x]\ncommand = "x"\nenv = { "A=B" = "5" }\n', r":4: env: 'A=B' = '5': a variable's name"),
    ('name = "t"\n[agent_clis.x]\ncommand = "x"\nenv = { "" = "5" }\n', r":4: env: '' = '5'"),
    ('name = "t"\n[agent_clis.x]\ncommand = "x"\nenv = { A = "x\\u0000y" }\n', r":4: env: .*NUL"),
    ('name = "t"\n[agent_clis.x]\ncommand = ["x", "a\\u0000b"]\n', r":3: command: holds a NUL"),
    ('name = "t"\n[agent_clis."bad name!"]\ncommand = "x"\n', r":2: \[agent_clis.bad name!\]: a CLI's name"),
    ('name = "t"\n[agent_clis."x\\n"]\ncommand = "x"\n', r"a CLI's name"),          # ("$" let a newline end it)
])
def test_invalid_values_name_the_line(tmp_path, text, pattern):
    write(tmp_path, text)
    with pytest.raises(TinytownError, match=pattern):
        load(tmp_path)


def test_custom_cli_and_presets(tmp_path):
    write(tmp_path, 'name = "t"\ndefault_cli = "mine"\n[agent_clis.mine]\n'
                    'command = "my-cli --fast \'two words\'"\nprompt = "arg"\nenv = { A = "1" }\n')
    config = load(tmp_path)
    spec = config.cli("mine")
    assert spec.command == ("my-cli", "--fast", "two words") and spec.env == (("A", "1"),)
    assert spec.argv("a $(b) `c`", "/p") == ["my-cli", "--fast", "two words", "a $(b) `c`"]
    assert set(PRESETS) == {"claude", "auggie", "codex", "aider", "gemini", "copilot", "cursor"}
    assert config.cli("aider").argv(None, "/tmp/p.txt")[-2:] == ["--message-file", "/tmp/p.txt"]
    with pytest.raises(TinytownError, match="unknown CLI 'gpt'"):
        config.cli("gpt")


def test_argument_prompts_over_the_linux_limit_are_refused():
    spec = CliSpec("x", ("x", "-p", "{prompt}"), "arg")
    assert spec.argv("hi", "/f") == ["x", "-p", "hi"]
    with pytest.raises(TinytownError, match="too long to pass as an argument"):
        spec.argv("y" * (200 * 1024), "/f")


def test_long_socket_paths_are_shortened(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = short_socket_path(deep / ".tt" / "redis.sock", deep)
    assert len(os.fsencode(path)) <= MAX_UNIX_SOCKET_PATH
    assert path == short_socket_path(deep / ".tt" / "redis.sock", deep)  # stable: every command agrees
    short = short_socket_path(tmp_path / "r.sock", tmp_path)
    assert short == tmp_path / "r.sock"


def test_the_readme_shows_every_key_with_its_default():
    """The README's config block is rendered from the one definition of each default."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "```toml\n" + documented_config() + "```" in readme


def test_the_init_template_holds_every_default(tmp_path):
    """Uncommenting every line of `tt init`'s template gives exactly the defaults Config has."""
    config = init_town(tmp_path, "t", default_cli="codex", max_agents=7)
    text = (tmp_path / "tinytown.toml").read_text()
    assert text.count("# [supervisor]") == 1 and "heartbeat_stale = 10.0" in text
    setting = re.compile(r"# ((?!command|env|fail_patterns|stall_|answers|question)\w+ = |\[(supervisor|logs|workspace|tasks|attach)\])")  # (not the mybot example)
    uncommented = "\n".join(line[2:] if setting.match(line) else line for line in text.splitlines())
    (tmp_path / "tinytown.toml").write_text(uncommented)
    everything = load(tmp_path)
    assert everything.supervisor == SupervisorPolicy() and everything.logs == LogPolicy()
    assert everything.workspace == WorkspacePolicy(remote="origin") and everything.tasks == TasksPolicy()
    assert (everything.default_cli, everything.max_agents) == ("codex", 7) == (config.default_cli, config.max_agents)
    assert everything.detach_keys == config.detach_keys and everything.redis_port == config.redis_port
    assert everything.redis_server == "/usr/bin/redis-server"  # the examples for keys without a default


def test_a_prompt_that_starts_with_a_dash_is_never_an_option():
    positional = CliSpec("pos", ("agent", "--print", "{prompt}"), "arg", options_end=True)
    assert positional.argv("--version please", "/f") == ["agent", "--print", "--", "--version please"]
    assert positional.argv("hi", "/f") == ["agent", "--print", "hi"]
    appended = CliSpec("app", ("agent",), "arg", options_end=True)
    assert appended.argv("-x", "/f") == ["agent", "--", "-x"]
    # the value of a flag, or a CLI not known to take "--": refused, with a line that says why
    for spec in (CliSpec("flag", ("agent", "-p", "{prompt}"), "arg"),
                 CliSpec("custom", ("agent", "{prompt}"), "arg")):
        with pytest.raises(TinytownError, match="starts with '-', which .* would read as an option"):
            spec.argv("--version", "/f")
        with pytest.raises(TinytownError, match="starts with '-'"):
            spec.check_prompt("-rf /")
        assert spec.argv("x -y", "/f")[-1] == "x -y"
    CliSpec("stdin", ("agent",), "stdin").check_prompt("--version")  # stdin and file prompts are data


def test_a_config_others_can_change_is_refused(tmp_path):
    """tinytown.toml decides which commands run as you: tt init never makes it writable by others,
    and a town whose file (or folder) anyone can write is refused in one line."""
    old = os.umask(0)
    try:
        init_town(tmp_path / "town", "t")
    finally:
        os.umask(old)
    path = tmp_path / "town" / "tinytown.toml"
    assert path.stat().st_mode & 0o777 == 0o644 and (tmp_path / "town" / "agents").stat().st_mode & 0o777 == 0o755
    assert load(tmp_path / "town").name == "t"
    path.chmod(0o666)
    with pytest.raises(TinytownError, match="writable by every user .*chmod o-w"):
        load(tmp_path / "town")
    path.chmod(0o644)
    (tmp_path / "town").chmod(0o777)
    with pytest.raises(TinytownError, match="anyone could replace tinytown.toml"):
        load(tmp_path / "town")
    (tmp_path / "town").chmod(0o1777)  # sticky, as /tmp: only the owner may replace the file
    assert load(tmp_path / "town").name == "t"
    (tmp_path / "town").chmod(0o755)
    if os.getuid() == 0:  # root can hand the file to another user
        os.chown(path, 65534, 65534)
        with pytest.raises(TinytownError, match="belongs to another user"):
            load(tmp_path / "town")


def test_settings_that_contradict_each_other_or_leave_tt_are_named_with_file_and_line(tmp_path):
    """heartbeat_stale under heartbeat_interval showed every healthy agent unresponsive (inviting a
    restart of a good runner); backoff_max under backoff_first; an absolute socket_path made
    folders anywhere (/nonexistent/dir), where the README says it is relative to .tt/."""
    init_town(tmp_path, "t")
    path = tmp_path / "tinytown.toml"
    base = path.read_text()
    for old, new, why in (
            ("# heartbeat_stale = 10.0", "heartbeat_stale = 2\nheartbeat_interval = 20",
             r"tinytown.toml:\d+: heartbeat_stale: must be longer than heartbeat_interval \(20\)"),
            ("# backoff_max = 30.0", "backoff_max = 1\nbackoff_first = 100",
             r"tinytown.toml:\d+: backoff_max: must be at least backoff_first \(100\)"),
            ('socket_path = "redis.sock"', 'socket_path = "/nonexistent/dir/x.sock"',
             r"tinytown.toml:7: socket_path: must be a path inside .tt/"),
            ('socket_path = "redis.sock"', 'socket_path = "../x.sock"', r"tinytown.toml:7: socket_path: must be")):
        assert old in base
        path.write_text(base.replace(old, new, 1).replace("# [supervisor]", "[supervisor]", 1))
        with pytest.raises(TinytownError, match=why):
            load(tmp_path)
    path.write_text(base.replace('socket_path = "redis.sock"', 'socket_path = "sub/r.sock"', 1))
    assert load(tmp_path).socket_path == "sub/r.sock"
    assert not os.path.exists("/nonexistent")


def test_the_started_config_is_kept_only_without_secrets(tmp_path):
    """.tt/started.toml (what reading commands use while tinytown.toml is broken) is a copy of the
    file: never made when it holds a password in its url or an [agent_clis] env (API keys)."""
    from tinytown.supervisor.config import load_started, remember_started
    from tinytown.supervisor.procutil import file_stamp
    config = init_town(tmp_path, "t")
    remember_started(config, file_stamp(tmp_path / "tinytown.toml"))
    assert load_started(tmp_path) == config
    path = tmp_path / "tinytown.toml"
    path.write_text(path.read_text() + '\n[agent_clis.mine]\ncommand = ["mine"]\nenv = {API_KEY = "sk-secret"}\n')
    path.chmod(0o600)
    remember_started(load(tmp_path), file_stamp(path))
    assert not (tmp_path / ".tt" / "started.toml").exists()  # (and the earlier copy is gone with it)


def test_an_agents_checkout_of_a_town_in_a_subfolder_is_that_towns(tmp_path):
    """A town at repo/sub has its agents work in agents/NAME/sub, where the committed copy of its
    tinytown.toml is: that is the town's checkout, not a town of its own."""
    town = tmp_path / "repo" / "sub"
    inner = town / "agents" / "dev" / "sub"
    inner.mkdir(parents=True)
    for folder in (town, inner):
        (folder / "tinytown.toml").write_text('name = "t"\n')
    assert find_town(inner) == town and find_town(town) == town
    assert find_town(tmp_path / "repo" / "sub" / "agents" / "dev" / "sub" / "tinytown.toml") == town
