"""Workspaces on several hosts: each task's work pushed to the town's git remote ([workspace] remote),
and fetched from it by a dependent task whose host does not have it, before the merge.

Each host works in a checkout of its own, so a dependency's `head` commit, made by an agent on
another host, may not be in this repository. With a remote, the runner pushes every task's head at
its end as refs/tinytown/<town>/<task> (before the outcome is written, so a dependent released by
that outcome finds it there), and a dependent task fetches the refs of the dependencies it lacks
before workspace.begin merges them. Without a remote the dependent task fails before its CLI starts,
saying why: running it on stale code would look like success.

On one host this costs nothing: a head made here is a loose object, found by looking at one file
(git runs only for a head that is not, to look in the packs once for all of them).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from .workspace import Workspace, WorkspaceError, _last_line, _text, git, is_oid

REF_ROOT = "refs/tinytown"
# A fetch that fails for what may pass (_TRANSIENT) is tried again after these pauses (s): a
# task's dependency, or the agent's own work, is not given up for a moment of network.
FETCH_PAUSES = (0.5, 2.0)
_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")   # user:password@ or token@ in a URL git printed


def task_ref(town: str, task_id: str) -> str:
    """Where a task's head is kept on the remote (and, once fetched, here)."""
    return f"{REF_ROOT}/{town}/{task_id}"


def push_head(workspace: Workspace, remote: str, town: str, task_id: str, head: str) -> str:
    """Push a finished task's head to the remote; "" or why it could not be (a line for the task's
    workspace note: the work is committed here whatever happens)."""
    where = workspace.path if workspace.exists() else workspace.town_root
    done = git(where, "push", "--quiet", "--no-verify", remote, f"+{head}:{task_ref(town, task_id)}", ok=range(256))
    if done.returncode != 0:
        return (f"could not push its work to {remote}: {_said(done)} (tasks on other hosts cannot merge it until "
                f"it is pushed by hand: git push {remote} +{head}:{task_ref(town, task_id)})")
    return ""


def bring_here(workspace: Workspace, dependencies: list[str], heads: list[str], heads_of, remote: str | None,
               town: str, what: str = "dependency") -> list[str]:
    """Before a dependent task merges `heads` (its dependencies' head commits): fetch from the remote
    those this repository lacks. WorkspaceError, naming the dependency, when one cannot be had.
    heads_of(ids) -> their heads: asked only when one is missing, to say whose it is. Returns notes.
    (Also `tt diff`/`tt merge` of a task done on another host: `what` = "task".)"""
    missing = missing_commits(workspace, heads)
    if not missing:
        return []
    whose = {head: task_id for task_id in dependencies for head in heads_of([task_id])}
    first = missing[0]
    if not remote:
        raise WorkspaceError(f"{what} {whose.get(first, '?')}'s work ({first[:12]}) is on another host and "
                             "[workspace] remote is not set: nothing to fetch it from (see README, "
                             "\"Workspaces on several hosts\")")
    refs = [task_ref(town, whose[head]) for head in missing if head in whose]
    where = workspace.path if workspace.exists() else workspace.town_root
    done, still = None, missing
    for pause in (*FETCH_PAUSES, None):
        done = git(where, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", remote,
                   *(f"+{ref}:{ref}" for ref in refs), ok=range(256)) if refs else None
        still = missing_commits(workspace, missing)
        if not still or done is None or done.returncode == 0 or pause is None or not _passing(done):
            break
        time.sleep(pause)  # (a remote that did not answer: the network, a server restarting)
    if still:
        why = _said(done) if done is not None and done.returncode != 0 else f"{remote} does not have it"
        raise WorkspaceError(f"{what} {whose.get(still[0], '?')}'s work ({still[0][:12]}) is on another host "
                             f"and could not be fetched from {remote}: {why}")
    return [f"fetched the work of {', '.join(whose[h] for h in missing if h in whose)} from {remote}"]


def missing_commits(workspace: Workspace, heads: list[str]) -> list[str]:
    """The commits of `heads` this repository does not have, in order."""
    objects = _objects_dir(workspace)
    unsure = [h for h in dict.fromkeys(heads)
              if is_oid(h) and (objects is None or not (objects / h[:2] / h[2:]).is_file())]
    if not unsure:
        return []
    where = workspace.path if workspace.exists() else workspace.town_root
    out = git(where, "cat-file", "--batch-check", input="".join(f"{h}\n" for h in unsure).encode()).stdout
    gone = {line.split()[0] for line in out.decode("ascii", "replace").splitlines() if line.endswith(" missing")}
    return [h for h in unsure if h in gone]


# What git says of a failure that may pass (git runs with LC_ALL=C): a name not resolved, a connection
# refused or cut, a server's 5xx. Anything else (no such ref or repository, refused credentials, a
# host key, a timeout that already took minutes) is said at once.
_TRANSIENT = ("could not resolve host", "connection refused", "connection reset", "remote end hung up unexpectedly",
              "early eof", "rpc failed", "the requested url returned error: 5")


def _passing(done) -> bool:
    """Whether a failed fetch may work if asked again in a moment."""
    said = _text(done.stderr).lower()
    return any(sign in said for sign in _TRANSIENT)


def _said(done) -> str:
    """git's reason, without credentials a remote's URL may hold (it goes into the task's record)."""
    return _CREDENTIALS.sub(r"\1", _last_line(done))


def _objects_dir(workspace: Workspace) -> Path | None:
    """The repository's object store, read from the worktree's files (no git), None if it has none yet."""
    try:
        return workspace._dirs()[1] / "objects"
    except WorkspaceError:
        return None
