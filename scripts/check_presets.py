"""Check Tinytown's built-in CLI presets against the real agent CLIs (run as scripts/check-presets).

A preset is a guess about someone else's program, and those programs change every week: a flag is
renamed, a trust check appears, stdin stops being read. So for each preset this installs the real
CLI into a cache folder of its own (npm --prefix; a venv for PyPI; never Tinytown's .venv), reads
its version and --help (and a subcommand's, as `codex exec --help`), looks for every flag of the
preset there (also those it adds to continue a session, `tt spawn --keep-context`: `codex exec
resume --help` for codex's), and then runs it exactly as the runner does (tinytown's CliSession: a pty, the prompt
as stdin, argument or file) with no credentials, an empty HOME and a deadline, watching its output
for the CLI's own "no input" / "not logged in" / network error. That error proves the flags were
taken and the prompt reached the CLI; a usage error, an exit without it, or silence is a FAIL.
There is no network to the model services here, so nothing gets further than that.

It prints one line per CLI: name, installed version, PASS/FAIL/SKIP and why; exit 1 on any FAIL.
"""
from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tinytown.supervisor.config import PRESETS, CliSpec
from tinytown.supervisor.errors import TinytownError
from tinytown.supervisor.pty_session import CliSession

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinytown" / "check-presets"
HELLO = "Say hello."
OUTPUT_KEPT = 256 * 1024  # of a CLI's output, the end is searched
EXIT_DRAIN_SECONDS = 2.0  # how long after the CLI's exit its last output may take to arrive
# What a CLI says when it did not take its command line (clap, yargs, commander, argparse...).
USAGE_ERROR = re.compile(r"unknown option|unrecognized (?:argument|option)|unexpected argument|unknown argument"
                         r"|invalid option|no such option|error: option|Unknown arguments?:", re.I)
VERSION = re.compile(r"\d+(?:\.\d+)+(?:-[\w.]+)?")
# Terminal control: CSI and OSC sequences, other escapes, then any control byte but newline and tab.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\^_]|\x1b.?")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Probe:
    """One run of the CLI as the runner runs it, and the line of its own that shows it got that far."""

    label: str                # "no input", "not logged in", "network"
    prompt: str
    expect: str               # a regex for the CLI's own error
    env: tuple[tuple[str, str], ...] = ()   # placeholder credentials: never real ones


@dataclass(frozen=True)
class CliCheck:
    preset: str                            # the key in PRESETS
    package: tuple[str, str] | None        # ("npm", name) or ("pypi", name); None: not in a registry
    probes: tuple[Probe, ...]
    note: str = ""                         # said on the SKIP line when the CLI cannot be found
    root_env: tuple[tuple[str, str], ...] = ()   # what the CLI needs to run at all as root


AUGGIE_SESSION = '{"accessToken": "placeholder", "tenantURL": "https://placeholder.invalid/", "scopes": ["email"]}'
# What each CLI was seen to print (claude 2.1, codex 0.171, gemini 0.61, auggie 0.36, aider 0.86,
# copilot 1.0); fixtures/fake_agent.py says the same lines, so the test suite runs this checker too.
CHECKS: dict[str, CliCheck] = {check.preset: check for check in (
    CliCheck("claude", ("npm", "@anthropic-ai/claude-code"), (
        Probe("no input", "", r"Input must be provided"),
        Probe("not logged in", HELLO, r"Not logged in|Invalid API key|Please run /login"),
    ), root_env=(("IS_SANDBOX", "1"),)),
    CliCheck("codex", ("npm", "@openai/codex"), (
        Probe("no input", "", r"No prompt provided"),
        Probe("network", HELLO, r"Reconnecting|stream disconnected|error sending request|Not logged in"),
    )),
    CliCheck("gemini", ("npm", "@google/gemini-cli"), (
        Probe("not logged in", HELLO, r"Please set an Auth method"),
        Probe("no input", "", r"No input provided", (("GEMINI_API_KEY", "placeholder"),)),
        Probe("network", HELLO, r"fetch failed|ENOTFOUND|ECONNREFUSED", (("GEMINI_API_KEY", "placeholder"),)),
    )),
    CliCheck("auggie", ("npm", "@augmentcode/auggie"), (
        Probe("not logged in", HELLO, r"No auth provided"),
        Probe("no input", "", r"No instruction provided", (("AUGMENT_SESSION_AUTH", AUGGIE_SESSION),)),
        Probe("network", HELLO, r"service is temporarily unavailable", (("AUGMENT_SESSION_AUTH", AUGGIE_SESSION),)),
    )),
    # aider given an empty message goes interactive: no "no input" probe. "Waiting for <model>" is
    # its spinner while it sends the message.
    CliCheck("aider", ("pypi", "aider-chat"), (
        Probe("not logged in", HELLO, r"No LLM model was specified and no API keys"),
        Probe("network", HELLO, r"Waiting for \S+|litellm\.\w*Error", (("OPENAI_API_KEY", "placeholder"),)),
    )),
    # copilot given an empty -p goes interactive: no "no input" probe.
    CliCheck("copilot", ("npm", "@github/copilot"), (
        Probe("not logged in", HELLO, r"No authentication information found"),
        Probe("network", HELLO, r"could not be validated|network fetch failed", (("GH_TOKEN", "placeholder"),)),
    )),
    # Cursor's CLI comes only from its own installer (the npm package "cursor-agent" is another
    # program); checked when found on PATH, its message not seen here.
    CliCheck("cursor", None, (
        Probe("not logged in", HELLO, r"Authentication required|CURSOR_API_KEY|not logged in|agent login"),
    ), note="not in a registry (Cursor's own installer); not on PATH"),
)}


@dataclass
class Result:
    name: str
    version: str = "-"
    verdict: str = "SKIP"     # PASS, FAIL or SKIP
    reasons: list[str] = field(default_factory=list)

    def line(self, width: int) -> str:
        return f"{self.name:<{width}}  {self.version:<10}  {self.verdict}  {'; '.join(self.reasons)}"


def clean(data: bytes | str) -> str:
    """A CLI's output as plain text: hostile bytes never reach our terminal."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return CONTROL.sub("", ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n"))


def short(line: str, limit: int = 140) -> str:
    line = " ".join(line.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return short(lines[-1]) if lines else "(no output)"


# -- installing -----------------------------------------------------------------------------------

def npm_bin(cache: Path) -> Path:
    return cache / "npm" / "node_modules" / ".bin"


def pypi_bin(cache: Path, package: str) -> Path:
    return cache / "pypi" / package / "bin"


def install(checks: list[CliCheck], cache: Path, python: str) -> dict[str, str]:
    """Install (or bring up to date) each CLI's package in the cache; {preset: why it failed}."""
    failed: dict[str, str] = {}
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "install.log"
    npm = [c for c in checks if c.package and c.package[0] == "npm"]
    if npm:
        if shutil.which("npm") is None:
            failed.update({c.preset: "npm not found: cannot install" for c in npm})
        else:
            argv = ["npm", "install", "--prefix", str(cache / "npm"), "--no-audit", "--no-fund", "--loglevel=error",
                    *(f"{c.package[1]}@latest" for c in npm)]
            if not run_logged(argv, log):
                failed.update({c.preset: f"npm install failed (see {log})" for c in npm})
    for check in checks:
        if check.package and check.package[0] == "pypi":
            venv = cache / "pypi" / check.package[1]
            ok = (venv / "bin" / "python").exists() or run_logged([python, "-m", "venv", str(venv)], log)
            if not (ok and run_logged([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                                       "--disable-pip-version-check", "--upgrade", check.package[1]], log)):
                failed[check.preset] = f"pip install failed (see {log})"
    return failed


def run_logged(argv: list[str], log: Path) -> bool:
    print(f"check-presets: {' '.join(argv)}", file=sys.stderr)
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
        fh.flush()
        try:
            return subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=900).returncode == 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            fh.write(f"{exc}\n".encode())
            return False


def find_cli(check: CliCheck, spec: CliSpec, cache: Path, extra_path: list[str]) -> str | None:
    """Where the preset's executable is: --path first, then the cache, then PATH."""
    dirs = [*extra_path, str(npm_bin(cache))]
    if check.package and check.package[0] == "pypi":
        dirs.append(str(pypi_bin(cache, check.package[1])))
    dirs.append(os.environ.get("PATH", os.defpath))
    return shutil.which(spec.command[0], path=os.pathsep.join(dirs))


# -- checking -------------------------------------------------------------------------------------

def clean_env(home: Path, exe: str, extra: dict[str, str]) -> dict[str, str]:
    """No credentials: a fresh environment with an empty HOME, not the caller's."""
    env = {"PATH": os.path.dirname(exe) + os.pathsep + os.environ.get("PATH", os.defpath), "HOME": str(home),
           "TERM": "xterm-256color", "LANG": os.environ.get("LANG", "C.UTF-8"), "TMPDIR": str(home)}
    for name in ("TZ", "USER", "LOGNAME", "SHELL"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


def flags_of(spec: CliSpec) -> tuple[list[str], list[str]]:
    """(subcommands, flags) of a preset's command: `codex exec --x -` is (["exec"], ["--x"])."""
    subcommands, flags = [], []
    for part in spec.command[1:]:
        if "{" in part:
            continue
        if part.startswith("-") and part != "-":
            flags.append(part.split("=", 1)[0])
        elif not flags and part != "-":
            subcommands.append(part)
    return subcommands, flags


def forms(spec: CliSpec) -> list[tuple[str, CliSpec]]:
    """The command lines a preset runs: as given, and continuing a session (--keep-context: the
    folder's last one, and one by id), each labelled for the PASS/FAIL line."""
    found = [("", spec)]
    for label, continued in (("continue", spec.continued()), ("resume", spec.continued("{session}"))):
        if continued.command not in [form.command for _, form in found]:
            found.append((label, continued))
    return found


def read_help(exe: str, subcommands: list[str], env: dict[str, str], timeout: float) -> tuple[str, str | None]:
    """(help text, error): `CLI --help` plus `CLI SUB --help` for a preset that runs a subcommand."""
    texts = []
    for argv in ([exe, "--help"], [exe, *subcommands, "--help"]) if subcommands else ([exe, "--help"],):
        try:
            proc = subprocess.run(argv, env=env, cwd=env["HOME"], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return "", f"`{' '.join(argv[1:])}` did not answer in {timeout:g}s"
        text = clean(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            return "", f"`{' '.join(argv[1:])}` exited {proc.returncode}: {last_line(text)}"
        texts.append(text)
    return "\n".join(texts), None


def has_flag(help_text: str, flag: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", help_text) is not None


def read_version(exe: str, env: dict[str, str], timeout: float) -> str:
    try:
        proc = subprocess.run([exe, "--version"], env=env, cwd=env["HOME"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "?"
    found = VERSION.search(clean(proc.stdout + proc.stderr))
    return found.group(0) if found else "?"


_spawn_lock = threading.Lock()  # CliSession changes the process's cwd to the CLI's on spawn
# How many CLIs run at once (--jobs): every check and every probe is a thread, most of a run is
# waiting for a CLI to start and fail, and a node CLI takes a core for a second or two doing so.
_slots = threading.BoundedSemaphore(4)


def run_probe(spec: CliSpec, probe: Probe, exe: str, env_extra: dict[str, str], timeout: float) -> str | None:
    """Run the preset as the runner would; None if the CLI reached probe.expect, else why not.

    The work folder is a git repository with a .gitignore, as a town usually is: a CLI that
    rewrites it (aider without --no-gitignore) fails the check.
    """
    with _slots, tempfile.TemporaryDirectory(prefix="tt-check-") as tmp:
        home, work = Path(tmp) / "home", Path(tmp) / "work"
        home.mkdir()
        work.mkdir()
        if shutil.which("git"):
            subprocess.run(["git", "init", "-q", str(work)], stdin=subprocess.DEVNULL, capture_output=True)
        gitignore = work / ".gitignore"
        gitignore.write_text(".tt/\n")
        env = clean_env(home, exe, {**dict(spec.env), **dict(probe.env), **env_extra, "TT_TASK_ID": "check"})
        (work / ".tt").mkdir()  # where a town keeps its prompt files (and ignores them)
        session = CliSession(spec, probe.prompt.encode(), work / ".tt" / "check.prompt", work, env)
        try:
            with _spawn_lock:
                cwd = os.getcwd()
                try:
                    session.start()
                finally:
                    os.chdir(cwd)
            reader = session.start_reader()
        except (TinytownError, OSError, RuntimeError) as exc:  # (no fd or thread for the reader)
            session.close()
            return f"{probe.label}: cannot start: {exc}"
        output = bytearray()
        expect = re.compile(probe.expect)
        deadline = time.monotonic() + timeout
        exited_at = None  # a helper of the CLI may hold the terminal open after it exits: not for long
        why: str | None = None
        try:
            while True:
                select.select([reader.notify_r], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
                chunks, eof = reader.take()
                output += b"".join(chunks)
                del output[:-OUTPUT_KEPT]
                text = clean(bytes(output))
                if expect.search(text):
                    break
                usage = USAGE_ERROR.search(text)
                if usage:
                    line = text[text.rfind("\n", 0, usage.start()) + 1:].splitlines()[0]
                    why = f"{probe.label}: usage error: {short(line)}"
                    break
                if exited_at is None and session.poll():
                    exited_at = time.monotonic()
                exited = exited_at is not None and (eof or time.monotonic() - exited_at > EXIT_DRAIN_SECONDS)
                if exited or time.monotonic() >= deadline:
                    how = session.outcome() if exited else f"still running after {timeout:g}s"
                    why = f"{probe.label}: {how} without /{probe.expect}/: {last_line(text)}"
                    break
        finally:
            session.close()
        if why is None and gitignore.read_text() != ".tt/\n":
            why = f"{probe.label}: it changed the work folder's .gitignore"
        return why


def check_one(check: CliCheck, spec: CliSpec, cache: Path, extra_path: list[str], env_extra: dict[str, str],
              timeout: float, install_error: str | None = None) -> Result:
    """Flags in --help, then each probe; `spec` is the preset (or, in a test, a variant of it)."""
    result = Result(check.preset)
    exe = find_cli(check, spec, cache, extra_path)
    if exe is None:
        if install_error:
            result.verdict, result.reasons = "FAIL", [install_error]
        else:
            result.reasons = [check.note or f"{spec.command[0]} not in the cache nor on PATH"]
        return result
    if install_error:
        result.reasons.append(f"{install_error}; checked {exe}")
    failures, shown = [], []
    with _slots, tempfile.TemporaryDirectory(prefix="tt-check-home-") as home:
        env = clean_env(Path(home), exe, env_extra)
        result.version = read_version(exe, env, timeout)
        for label, form in forms(spec):
            subcommands, flags = flags_of(form)
            help_text, error = read_help(exe, subcommands, env, timeout)
            where = f"`{' '.join([*subcommands, '--help'])}`" + (f" ({label})" if label else "")
            failures += [error] if error else [f"{flag} not in {where}" for flag in flags
                                               if not has_flag(help_text, flag)]
            extra = [part for part in form.command if part not in spec.command] if label else flags
            shown.append(f"{label + ': ' if label else ''}{' '.join(extra) or '(none)'}")
    if os.geteuid() == 0 and check.root_env:
        env_extra = {**dict(check.root_env), **env_extra}
        result.reasons.append("as root: run with " + " ".join(f"{k}={v}" for k, v in check.root_env))
    with ThreadPoolExecutor(max_workers=len(check.probes)) as pool:
        outcomes = list(pool.map(lambda probe: run_probe(spec, probe, exe, env_extra, timeout), check.probes))
    failures += [why for why in outcomes if why]
    passed = [probe.label for probe, why in zip(check.probes, outcomes) if not why]
    if failures:
        result.verdict = "FAIL"
        result.reasons[:0] = failures
    else:
        result.verdict = "PASS"
        result.reasons[:0] = [f"flags in --help: {'; '.join(shown)}",
                              f"reached its own error: {', '.join(passed)}"]
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="check-presets", description="Check Tinytown's CLI presets against the real CLIs: install them into a "
        "cache folder, look for each preset's flags in --help, run each preset as the runner does with no "
        "credentials and see it reach the CLI's own error.")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(CHECKS), help="check only these presets")
    parser.add_argument("--no-install", action="store_true",
                        help="install nothing: check what is already in the cache or on PATH")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where the CLIs go (default {DEFAULT_CACHE})")
    parser.add_argument("--path", action="append", default=[], metavar="DIR",
                        help="look for the CLIs in DIR before the cache and PATH (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for every run (the test suite's fake CLI uses it); "
                             "the check is meant to run without credentials: pass none")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds each run may take (default 60)")
    parser.add_argument("--jobs", type=int, default=4, help="CLI runs at once (default 4)")
    parser.add_argument("--python", default=sys.executable, help="the Python for a PyPI CLI's venv")
    args = parser.parse_args(argv)
    for item in args.env:
        if "=" not in item or not item.split("=", 1)[0]:
            parser.error(f"--env wants NAME=VALUE, not {item!r}")
    if args.timeout <= 0 or args.jobs < 1:
        parser.error("--timeout and --jobs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    checks = [CHECKS[name] for name in (args.only or CHECKS)]
    cache = args.cache.expanduser().resolve()
    extra_path = [str(Path(p).expanduser().resolve()) for p in args.path]
    env_extra = dict(item.split("=", 1) for item in args.env)
    install_errors = {} if args.no_install else install(checks, cache, args.python)
    global _slots
    _slots = threading.BoundedSemaphore(args.jobs)
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        results = list(pool.map(lambda c: check_one(c, PRESETS[c.preset], cache, extra_path, env_extra, args.timeout,
                                                    install_errors.get(c.preset)), checks))
    width = max(len(r.name) for r in results)
    for result in results:
        print(result.line(width), flush=True)
    return 1 if any(r.verdict == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
