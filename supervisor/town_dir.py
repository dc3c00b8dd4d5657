"""Where a town is: the folder holding tinytown.toml, and its runtime folder (.tt) beside it.

Apart from config.py, which builds on it, so that `tt stop` can find the town without importing
the config's parser and settings (about 25 ms of a ~70 ms command).
"""
from __future__ import annotations

import os

from .errors import TinytownError

CONFIG_FILE = "tinytown.toml"
RUNTIME_DIR = ".tt"
AGENTS_DIR = "agents"    # a worktree agent's checkout is agents/NAME in its town's folder (workspace.py)


def find(start: str | os.PathLike | None = None) -> str:
    """The folder holding tinytown.toml: `start` itself (a folder or the file), else walk up from
    the current folder. A resolved path; TinytownError if there is none. A worktree agent's
    checkout (TOWN/agents/NAME) holds a copy of a committed tinytown.toml: it is its town's,
    not a town of its own (a `tt spawn` there started a second town inside the first)."""
    if start is not None:
        path = os.path.realpath(os.path.expanduser(os.fspath(start)))
        if os.path.isfile(path):
            return _outer_town(os.path.dirname(path))
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            return _outer_town(path)
        raise TinytownError(f"no {CONFIG_FILE} in {path} (run `tt init` there)")
    folder = os.path.realpath(os.getcwd())
    while True:
        if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            return _outer_town(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            raise TinytownError(f"no {CONFIG_FILE} here or in any parent folder (run `tt init`, or pass --town PATH)")
        folder = parent


def runtime_dir(town: str | os.PathLike) -> str:
    return os.path.join(town, RUNTIME_DIR)


def _outer_town(folder: str) -> str:
    """`folder`, or the town it is inside an agent's checkout of: TOWN/agents/NAME/..., TOWN
    holding tinytown.toml (a town in a repository's subfolder has its copy at agents/NAME/sub);
    the outermost such town if checkouts nest."""
    found, path = folder, folder
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return found
        town = os.path.dirname(parent)
        if os.path.basename(parent) == AGENTS_DIR and os.path.isfile(os.path.join(town, CONFIG_FILE)):
            found = town
        path = parent
