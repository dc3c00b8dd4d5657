"""Agent control, named as the reference names it: `tt interrupt`/`resume`, `close`, `kill`, `prune`.

How a pause or a close works: the command writes what the user asked into the agent's `hold` field
(models.Hold) and nudges the supervisor; the supervisor, which alone knows the runner's process,
signals it (SIGHUP: finish the task in hand, however long it takes, then exit; SIGUSR1 for a kill:
the task goes back to the front of the queue at once, its attempt not counted, as `tt stop --now`
does) and, once the runner is gone, records the agent `paused` or `stopped` (`settle`) and does
not start it again while the hold is there. Stopping the runner, rather than teaching a live runner
to stay away from its inbox, keeps one rule for what a runner does (it takes every task it can)
and makes a pause survive anything: a crash, a town stopped and started again. `tt resume` clears
the hold and the agent starts again (a runner start is a few ms); `tt restart` clears any hold.

Queued tasks stay where they are (in the agent's inbox, for its next runner) unless the user asked
`--to-backlog`: then `settle` gives them to the shared backlog (Coordination.give_back) once no
runner can take them any more.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .coordination import Coordination
from .errors import TinytownError
from .models import Agent, AgentState, Hold
from .town import Town

# The command behind each hold, as its events name it (agent_interrupt_requested, ...).
_WHAT = {Hold.PAUSE: "interrupt", Hold.CLOSE: "close", Hold.KILL: "kill"}


@dataclass
class Pruned:
    """What `tt prune` did for one agent."""

    name: str
    returned: int = 0              # queued tasks given to the backlog
    notes_dropped: int = 0         # notes left for it and never delivered (deleted with it)
    workspace: list[str] = field(default_factory=list)  # what happened to its worktree and branch


class AgentControl:
    def __init__(self, town: Town):
        self.town = town
        self.r = town.r
        self.keys = town.keys

    # --- what the commands ask ---------------------------------------------------------------
    def hold(self, name: str, hold: Hold, to_backlog: bool = False) -> tuple[Agent, str]:
        """Ask the supervisor to pause (Hold.PAUSE), close or kill agent `name`'s runner; the agent
        as it was and one line saying what happens now."""
        agent = self.town.agent(name)
        current = Hold(agent.hold) if agent.hold else None
        if hold is Hold.PAUSE:
            if agent.state == AgentState.FAILED.value:
                raise TinytownError(f"{name} has failed: no runner to interrupt (`tt restart {name}` starts it again)")
            if current in (Hold.CLOSE, Hold.KILL):
                raise TinytownError(f"{name} is {'closed' if agent.state == 'stopped' else 'closing'}: "
                                    f"nothing to interrupt (`tt restart {name}` opens it again)")
            if current is Hold.PAUSE:
                return agent, (f"{name} is paused already" if agent.state == AgentState.PAUSED.value
                               else f"{name} pauses after its current task already")
        elif current is Hold.KILL or (current is hold and agent.state == AgentState.STOPPED.value):
            # closed (or being killed) already: only a --to-backlog not asked before is news
            if not to_backlog or agent.to_backlog:
                stopped = agent.state == AgentState.STOPPED.value
                return agent, f"{name} is {'closed' if stopped else 'being killed'} already"
        fields = {"hold": (Hold.KILL if current is Hold.KILL else hold).value}
        if to_backlog:
            fields["to_backlog"] = "1"
        pipe = self.r.pipeline()
        pipe.hset(self.keys.agent(agent.id), mapping=fields)
        self.town._event(pipe, f"agent_{_WHAT[hold]}_requested", agent=name,
                         **({"to_backlog": 1} if to_backlog else {}))
        pipe.publish(self.keys.control, f"hold {agent.id}")
        pipe.execute()
        return agent, self._promise(agent, hold, to_backlog)

    @staticmethod
    def _promise(agent: Agent, hold: Hold, to_backlog: bool) -> str:
        name = agent.name
        queue = "its queued tasks go to the backlog" if to_backlog else "its queued tasks stay queued"
        working = agent.busy and agent.current_task
        if hold is Hold.PAUSE:
            if working:
                return (f"{name} pauses after its current task ({agent.current_task[:8]}); "
                        f"`tt resume {name}` lets it take tasks again")
            return f"{name} pauses now; `tt resume {name}` lets it take tasks again"
        if hold is Hold.CLOSE:
            when = f"after its current task ({agent.current_task[:8]})" if working else "now"
            return f"{name} closes {when}; {queue} (`tt restart {name}` opens it again)"
        what = f"its task {agent.current_task[:8]} goes back to the front of the queue; " if working else ""
        return f"{name} is killed: {what}{queue}"

    def resume(self, name: str) -> str:
        """`tt resume`: a paused agent (or one pausing after its task) takes tasks again."""
        agent = self.town.agent(name)
        if agent.hold != Hold.PAUSE.value:
            if agent.hold:
                raise TinytownError(f"{name} is {'closed' if agent.state == 'stopped' else 'closing'}, not paused "
                                    f"(`tt restart {name}` opens it again)")
            raise TinytownError(f"{name} is not paused ({agent.state})")
        paused = agent.state == AgentState.PAUSED.value
        pipe = self.r.pipeline()
        pipe.execute_command("HDEL", self.keys.agent(agent.id), "hold")
        if paused:  # before the supervisor hears of it: `tt status` says starting at once
            self.town.set_agent_state(agent.id, AgentState.STARTING, pipe=pipe, old=agent.state)
        self.town._event(pipe, "agent_resumed", agent=name)
        pipe.publish(self.keys.control, f"resume {agent.id}")
        pipe.execute()
        if paused:
            return f"{name} resumes: its runner starts and takes its next task"
        return f"{name} goes on taking tasks after its current one"

    # --- what the supervisor does once the runner is gone --------------------------------------
    def settle(self, agent: Agent) -> str:
        """Record a held agent whose runner is gone (or was never started) as `paused` or `stopped`,
        and give its queue to the backlog if asked; "" if there was nothing left to do. Only the
        supervisor calls this, and only when no runner of the agent is alive. Idempotent: each part
        is done only if not done yet, so a crash in between is finished by the next call."""
        hold = Hold(agent.hold)
        done = []
        self.town.put_back_inflight(agent.id)  # a runner killed with its supervisor left it there
        target = hold.final_state
        if agent.state != target.value:
            self.town.set_agent_state(agent.id, target, pid="", cli_pid="", current_task="", restart_at="")
            self.town.event(f"agent_{'paused' if hold is Hold.PAUSE else 'closed'}", agent=agent.name)
            done.append(target.value)
        if agent.to_backlog:
            moved = Coordination(self.town).give_back(agent.id)
            done.append(f"{moved} queued task(s) to the backlog")
        return ", ".join(done)

    # --- tt prune -----------------------------------------------------------------------------
    def prunable(self, names: list[str] | None = None) -> list[Agent]:
        """The agents `tt prune` removes: those named, or every closed one (`tt close`/`tt kill`)."""
        agents = self.town.agents()
        if not names:
            return [a for a in agents if a.hold in (Hold.CLOSE.value, Hold.KILL.value)
                    and a.state == AgentState.STOPPED.value]
        by_name = {a.name: a for a in agents}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise TinytownError(f"no agent named {missing[0]!r} (see `tt list`)")
        return [by_name[n] for n in dict.fromkeys(names)]

    def prune(self, agent: Agent, to_backlog: bool = False, delete_branches: bool = False) -> Pruned:
        """Remove one stopped agent: checked first (nothing changes if it cannot go), then its
        worktree (committed first, never lost; its branch kept unless merged and asked), then its
        records, in one step that checks again. Its tasks stay readable."""
        coord = Coordination(self.town)
        coord.remove_agent(agent.id, agent.name, to_backlog, check_only=True)
        done = Pruned(agent.name)
        done.workspace = self._prune_workspace(agent, delete_branches)
        from .hosts import elsewhere
        if agent.workspace == "worktree" and elsewhere(self.town.config, agent.host):
            # (this folder's is removed above, if it has one: the one it worked in is another machine's)
            done.workspace.append(f"its worktree and branch on host {agent.host} stay there: `git worktree remove "
                                  f"agents/{agent.name}` in that host's folder removes it")
        done.returned, done.notes_dropped = coord.remove_agent(agent.id, agent.name, to_backlog)
        return done

    def _prune_workspace(self, agent, delete_branch: bool) -> list[str]:
        """agents/NAME and its branch (supervisor/workspace.py; the branch the agent was spawned on,
        else <branch_prefix>NAME): the folder goes once its work is committed; the branch stays
        unless --delete-branches and all of it is merged. A town that is not a git repository has
        neither."""
        from .town import agent_workspace
        from .workspace import Repo, Unavailable, Workspace
        config = self.town.config
        space = agent_workspace(config.root, agent) or Workspace(config.root, agent.name,
                                                                   config.workspace.branch_prefix)
        try:
            repo = Repo.find(config.root)
        except Unavailable:
            return []
        if not space.exists() and repo.resolve(space.ref) is None:
            return []
        return space.prune(delete_branch=delete_branch)
