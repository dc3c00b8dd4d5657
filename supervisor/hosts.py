"""One town on several machines: each host's lease, where agents are placed, who handles a lost
host, and the epochs that fence a host that comes back.

Each host's supervisor renews a lease in the shared Redis (`tick`, every [cluster] lease_renew);
the lease is a time on Redis's own clock, so the machines' clocks need not agree. The same script
holds an election: the `reaper` key names one live host, and lapses with its holder's lease, so a
survivor takes over. The reaper declares a host whose lease lapsed `lost`: its agents' in-flight
tasks go back to the front of their inboxes (the attempt counted, as after a crash), and its
unpinned agents move to the live host with the most free capacity. Every placement increments the
agent's `epoch`; a runner carries the epoch it was started for, and a runner whose epoch is stale
(its host was paused, declared lost, and came back) writes nothing: its heartbeat, its outcome and
its claim are refused (Town.heartbeat, Town.finish_task, Town.unclaim), and it exits FENCED_EXIT.

Everything is a Lua script: a lease, a placement or a loss is decided and written in one step, so
two spawns racing never exceed a host's capacity and two supervisors never handle one loss twice.
Capacity is counted from the agents' records (their `host` field), not from an index of its own
that a prune or a crash could leave wrong.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass

from .errors import TinytownError
from .resp import Script

# A runner that found its placement stale exits with this (EX_TEMPFAIL): its supervisor writes
# nothing for it and does not restart it.
FENCED_EXIT = 75


def fencing(config) -> bool:
    """Whether runners carry their placement's epoch: whenever another machine could share the
    town's Redis (TCP, or a remote URL). The embedded unix-socket Redis is one machine's, whose
    only supervisor never declares itself lost: its runners skip the checks' round trips."""
    return bool(config.redis_url) or not config.use_socket


def elsewhere(config, host: str | None, here: str | None = None) -> bool:
    """Whether `host` (an agent's placement) is another host than this folder's (`here`, else
    lifecycle.host_here): what a runner of the agent's left here (a log, an attach socket, a
    branch) is from when it ran here, not where it runs now. Never on a town that cannot span hosts."""
    if not host or not fencing(config):
        return False
    from .lifecycle import host_here
    return host != (here or host_here(config))


def placed_elsewhere(config, client, agent_ids: list[str]) -> set[str]:
    """Which of these agents are placed elsewhere (above), in one round trip; none on a town that
    cannot span hosts."""
    if not fencing(config) or not agent_ids:
        return set()
    from .keys import Keys
    keys = Keys(config.name)
    pipe = client.pipeline(transaction=False)
    for agent_id in agent_ids:
        pipe.hget(keys.agent(agent_id), "host")
    hosts = [h.decode() if isinstance(h, bytes) else h for h in pipe.execute()]
    from .lifecycle import host_here
    here = host_here(config)
    return {agent_id for agent_id, host in zip(agent_ids, hosts) if elsewhere(config, host, here)}


def machine_id() -> str:
    """This machine, as a host's record says which one holds its lease: its name and boot, so a
    supervisor can tell its own dead predecessor (take over) from another machine's (refuse)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()[:8]
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class Fenced(TinytownError):
    """This runner's placement is stale: the agent was moved (or its host declared lost)."""


PRELUDE = r"""
local ctx = cjson.decode(ARGV[1])
local K = ctx.keys
local clock = redis.call('TIME')
local NOW_MS = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local AT = string.format('%d.%06d', clock[1], clock[2])

local function event(kind, ...)
  redis.call('XADD', K.events, 'MAXLEN', '~', ctx.events_maxlen, '*', 'type', kind, 'at', AT, ...)
end

-- Every host ever seen: state, lease (ms, Redis's clock), capacity; `used` filled by count_agents.
local function load_hosts()
  local hosts = {}
  for _, name in ipairs(redis.call('SMEMBERS', K.hosts)) do
    local f = redis.call('HMGET', K.host .. name, 'state', 'lease_until', 'max_agents')
    hosts[name] = {state = f[1] or '', lease = tonumber(f[2] or '0') or 0,
                   cap = tonumber(f[3] or '0') or 0, used = 0}
  end
  return hosts
end

local function live(h)
  return h.state == 'live' and h.lease >= NOW_MS
end

-- Every agent with its host and pin, counting each host's agents (stopped ones count too, as
-- max_agents always counted them).
local function count_agents(hosts)
  local agents = {}
  for _, id in ipairs(redis.call('HVALS', K.agents)) do
    local f = redis.call('HMGET', K.agent .. id, 'host', 'pinned', 'name')
    if f[3] then
      local host = f[1] or ''
      if hosts[host] then hosts[host].used = hosts[host].used + 1 end
      agents[#agents + 1] = {id = id, host = host, pinned = f[2] == '1', name = f[3]}
    end
  end
  return agents
end

-- The live host with the most free room (ties: the first name), or nil when all are full.
local function best(hosts)
  local names = {}
  for name in pairs(hosts) do names[#names + 1] = name end
  table.sort(names)
  local pick, room = nil, 0
  for _, name in ipairs(names) do
    local h = hosts[name]
    if live(h) and h.cap - h.used > room then pick, room = name, h.cap - h.used end
  end
  return pick
end
"""

# ARGV: ctx, name, agent id, pinned host ("": any), this machine's host name and capacity (used
# when no host holds a lease: a town whose supervisor has not started yet), cli, "1" = only check,
# then the agent record's field/value pairs. {'ok', host}, or why not: {'taken'}, {'full', host
# or '', capacity}, {'nohost', name}, {'down', name, state}.
PLACE = PRELUDE + r"""
local name, id, pin, here, here_cap, dry = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[8] == '1'
if redis.call('HEXISTS', K.agents, name) == 1 then return {'taken'} end
local hosts = load_hosts()
local any_live = false
for _, h in pairs(hosts) do if live(h) then any_live = true end end
if not any_live and (pin == '' or pin == here) then
  hosts[here] = {state = 'live', lease = NOW_MS, cap = here_cap, used = 0}
end
count_agents(hosts)
local target
if pin ~= '' then
  local h = hosts[pin]
  if not h then return {'nohost', pin} end
  if not live(h) then return {'down', pin, h.state == 'live' and 'lost' or h.state} end
  if h.used >= h.cap then return {'full', pin, h.cap} end
  target = pin
else
  target = best(hosts)
  if not target then
    local cap = 0
    for _, h in pairs(hosts) do if live(h) then cap = cap + h.cap end end
    return {'full', '', cap}
  end
end
if dry then return {'ok', target} end
redis.call('HSET', K.agents, name, id)
redis.call('HSET', K.agent .. id, unpack(ARGV, 9))
redis.call('HSET', K.agent .. id, 'host', target, 'pinned', pin ~= '' and '1' or '0', 'epoch', 1)
event('agent_spawned', 'agent', name, 'agent_id', id, 'cli', ARGV[7], 'host', target)
redis.call('PUBLISH', ctx.control, 'reconcile')
return {'ok', target}
"""

# ARGV: ctx, this host, its capacity, its supervisor's pid, lease ttl (ms).
# Returns {state before ('' new, 'live', 'lost', 'stopped'), reaper, names of the agents moved...}.
TICK = PRELUDE + r"""
local me, ttl = ARGV[2], tonumber(ARGV[5])
local key = K.host .. me
local before = redis.call('HGET', key, 'state') or ''
redis.call('SADD', K.hosts, me)
redis.call('HSET', key, 'state', 'live', 'lease_until', NOW_MS + ttl, 'renewed_at', AT,
           'max_agents', ARGV[3], 'pid', ARGV[4], 'machine', ARGV[6] or '')
if before ~= 'live' then
  redis.call('HSET', key, 'since', AT)
  event(before == 'lost' and 'host_returned' or 'host_joined', 'host', me)
end

-- The election: the key's holder handles lost hosts; it lapses with its holder's lease.
local holder = redis.call('GET', K.reaper)
if not holder then
  redis.call('SET', K.reaper, me, 'PX', ttl)
  holder = me
elseif holder == me then
  redis.call('PEXPIRE', K.reaper, ttl)
end
if holder ~= me then return {before, holder} end

local hosts = load_hosts()
local newly, any_lost = {}, false
for name, h in pairs(hosts) do
  if h.state == 'live' and h.lease < NOW_MS then
    redis.call('HSET', K.host .. name, 'state', 'lost', 'since', AT)
    h.state = 'lost'
    newly[name] = true
    event('host_lost', 'host', name)
  end
  if h.state == 'lost' then any_lost = true end
end
if not any_lost then return {before, holder} end

-- What the lost host's runner had in flight goes back to the front of the inbox, in order; a
-- task that had started keeps the attempt it counted (as after a runner's crash).
local function requeue_inflight(agent)
  local raws = redis.call('LRANGE', K.inflight .. agent.id, 0, -1)
  for i = #raws, 1, -1 do
    local raw = raws[i]
    local ok, msg = pcall(cjson.decode, raw)
    local task_id = ok and type(msg) == 'table' and type(msg.task_id) == 'string' and msg.task_id or ''
    local state = task_id ~= '' and redis.call('HGET', K.task .. task_id, 'state') or false
    if state == 'assigned' or state == 'running' then
      redis.call('HSET', K.task .. task_id, 'state', 'assigned', 'started_at', '')
      event('task_requeued', 'task', task_id, 'reason', 'host ' .. agent.host .. ' lost')
      redis.call('LPUSH', K.inbox .. agent.id, raw)
    elseif task_id == '' then
      redis.call('LPUSH', K.inbox .. agent.id, raw)  -- not a task: its next runner decides
    end
  end
  redis.call('DEL', K.inflight .. agent.id)
end

local moved = {}
for _, agent in ipairs(count_agents(hosts)) do
  local h = hosts[agent.host]
  if h and h.state == 'lost' then
    local akey = K.agent .. agent.id
    if newly[agent.host] then
      redis.call('HINCRBY', akey, 'epoch', 1)  -- its runner there, if it still runs, is fenced
      requeue_inflight(agent)
      redis.call('HSET', akey, 'pid', '', 'cli_pid', '', 'current_task', '')
    end
    local target = not agent.pinned and best(hosts) or nil
    if target then
      hosts[target].used = hosts[target].used + 1
      h.used = h.used - 1
      redis.call('HSET', akey, 'host', target)
      redis.call('HINCRBY', akey, 'epoch', 1)
      event('agent_moved', 'agent', agent.name, 'agent_id', agent.id, 'from', agent.host, 'to', target)
      moved[#moved + 1] = agent.name
    end
  end
end
if #moved > 0 or next(newly) then redis.call('PUBLISH', ctx.control, 'reconcile') end
return {before, holder, unpack(moved)}
"""

# ARGV: ctx, this host. A clean stop: the lease ends now (the host is `stopped`, not lost: its
# agents wait for it) and the reaper role is left for another host to take.
RELEASE = PRELUDE + r"""
local me = ARGV[2]
if redis.call('HGET', K.host .. me, 'state') then
  redis.call('HSET', K.host .. me, 'state', 'stopped', 'lease_until', 0, 'since', AT, 'pid', '')
  event('host_stopped', 'host', me)
end
if redis.call('GET', K.reaper) == me then redis.call('DEL', K.reaper) end
return 1
"""

# ARGV: ctx, this host. Agents registered before hosts existed (no `host`): placed here.
ADOPT = PRELUDE + r"""
local n = 0
for _, id in ipairs(redis.call('HVALS', K.agents)) do
  local f = redis.call('HMGET', K.agent .. id, 'name', 'host')
  if f[1] and (f[2] or '') == '' then
    redis.call('HSET', K.agent .. id, 'host', ARGV[2], 'pinned', '0')
    redis.call('HINCRBY', K.agent .. id, 'epoch', 1)
    n = n + 1
  end
end
return n
"""

# ARGV: ctx, host name. A stopped or lost host no agent is placed on leaves the town's records
# (`tt forget-host`): {'ok'}, or why not: {'nohost'}, {'state', state} (live, or lapsed and not yet
# declared lost: it may be back), {'agents', name...}. Started again, it joins as a new host.
FORGET = PRELUDE + r"""
local name = ARGV[2]
local hosts = load_hosts()
local h = hosts[name]
if not h then return {'nohost'} end
if h.state ~= 'stopped' and h.state ~= 'lost' then return {'state', live(h) and 'live' or 'lapsed'} end
local held = {}
for _, agent in ipairs(count_agents(hosts)) do
  if agent.host == name then held[#held + 1] = agent.name end
end
if #held > 0 then table.sort(held) return {'agents', unpack(held)} end
redis.call('DEL', K.host .. name)
redis.call('SREM', K.hosts, name)
event('host_forgotten', 'host', name)
return {'ok'}
"""

# KEYS[1]: the agent's record. ARGV: host, epoch, now. The runner's heartbeat, written only while
# its placement holds: 1; stale: 0; the record gone (pruned): -1, nothing written.
HEARTBEAT = r"""
local f = redis.call('HMGET', KEYS[1], 'host', 'epoch', 'name')
if not f[3] then return -1 end
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[3])
return 1
"""

# KEYS: the agent's in-flight list, its inbox. ARGV: the message. A message a fenced runner
# claimed goes back to the front of the inbox, unless the reaper already put it back.
UNCLAIM = r"""
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then redis.call('LPUSH', KEYS[2], ARGV[1]) return 1 end
return 0
"""

SCRIPTS = {name: Script(text) for name, text in
           (("place", PLACE), ("tick", TICK), ("release", RELEASE), ("adopt", ADOPT),
            ("heartbeat", HEARTBEAT), ("unclaim", UNCLAIM), ("forget", FORGET))}


@dataclass
class Tick:
    """What a lease renewal found: the host's state before it (`lost`: it was declared lost while
    it did not renew, so its runners are fenced), who holds the reaper role, the agents moved."""

    before: str
    reaper: str
    moved: list[str]

    @property
    def returned(self) -> bool:
        return self.before == "lost"


class Hosts:
    """The town's hosts in Redis. `town`: a town.Town (its client, keys and config)."""

    def __init__(self, town, events_maxlen: int):
        self.town = town
        self.r = town.r
        k = town.keys
        templates = {"hosts": k.hosts, "host": k.host(""), "reaper": k.reaper, "agents": k.agent_index,
                     "agent": k.agent(""), "inbox": k.inbox(""), "inflight": k.inflight(""), "task": k.task(""),
                     "events": k.events}
        self.ctx = json.dumps({"keys": templates, "events_maxlen": events_maxlen, "control": k.control},
                              separators=(",", ":"))

    def _run(self, name: str, *args, keys=None):
        return SCRIPTS[name](self.r, keys or (self.town.keys.agent_index,), (self.ctx, *args))

    # --- a host's own supervisor --------------------------------------------------------------
    def tick(self, host: str, capacity: int, pid: int, lease_ttl: float, machine: str = "") -> Tick:
        """Renew `host`'s lease; if it holds the reaper role (or takes it), handle lost hosts."""
        reply = self._run("tick", host, capacity, pid, int(lease_ttl * 1000), machine)
        return Tick(before=reply[0], reaper=reply[1], moved=list(reply[2:]))

    def live_holder(self, host: str) -> tuple[str, str] | None:
        """(pid, machine) of the supervisor holding `host`'s lease, if it is live by Redis's clock."""
        pipe = self.r.pipeline(transaction=False)
        pipe.execute_command("HMGET", self.town.keys.host(host), "state", "lease_until", "pid", "machine")
        pipe.execute_command("TIME")
        (state, until, pid, machine), clock = pipe.execute()
        now_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
        if state != "live" or int(float(until or 0)) <= now_ms:
            return None
        return pid or "", machine or ""

    def release(self, host: str) -> None:
        self._run("release", host)

    def adopt_unplaced(self, host: str) -> int:
        """Agents with no host (registered before this version): placed on `host`; how many."""
        return self._run("adopt", host)

    def forget(self, name: str) -> None:
        """Remove a stopped or lost host, with no agent placed on it, from the town's records (it
        stays in `tt status` otherwise, for good); TinytownError saying why it cannot be."""
        reply = self._run("forget", name)
        if reply[0] == "nohost":
            raise TinytownError(f"no host named {name!r} (see `tt status`)")
        if reply[0] == "state":
            raise TinytownError(f"host {name} is {reply[1]}: only a stopped or lost host is forgotten "
                                f"(`tt stop` there, or wait for it to be declared lost)")
        if reply[0] == "agents":
            raise TinytownError(f"host {name} still has agent(s) {', '.join(reply[1:])} placed on it: "
                                "`tt prune` them first (or start it again)")

    # --- placement ---------------------------------------------------------------------------
    def place(self, name: str, agent_id: str, pin: str, here: str, here_capacity: int, cli: str,
              fields: dict[str, str], dry: bool = False) -> str:
        """Register agent `name` on a host (pinned, or the live one with the most free room) in
        one step: its host. TinytownError when it cannot be (taken, full, no such host...)."""
        args = [name, agent_id, pin, here, here_capacity, cli, "1" if dry else "0"]
        args += [x for pair in fields.items() for x in pair]
        reply = self._run("place", *args)
        if reply[0] == "ok":
            return reply[1]
        raise TinytownError(self._refusal(name, reply))

    def _refusal(self, name: str, reply: list) -> str:
        config = self.town.config
        why = reply[0]
        if why == "taken":
            return f"an agent named {name!r} already exists"
        if why == "nohost":
            known = ", ".join(sorted(self.r.execute_command("SMEMBERS", self.town.keys.hosts))) or "none yet"
            return f"no host named {reply[1]!r} (hosts: {known}; see `tt status`)"
        if why == "down":
            return (f"host {reply[1]!r} is {reply[2]}: its supervisor does not hold its lease "
                    f"(start it there: `tt start --host {reply[1]}`)")
        if reply[1]:
            return (f"host {reply[1]!r} is full (max_agents {reply[2]}); raise [hosts.{reply[1]}] max_agents, "
                    "or remove agents: stopped ones count too (`tt close NAME`, then `tt prune`)")
        return (f"max_agents reached ({reply[2]}); raise max_agents in {config.root / 'tinytown.toml'}, "
                "or remove agents: stopped ones count too (`tt close NAME`, then `tt prune`)")

    # --- what `tt status` shows ------------------------------------------------------------------
    def listing(self) -> list[dict]:
        """Every host: name, state (a `live` one whose lease lapsed shows `lapsed` until the reaper
        declares it lost), capacity, pid, last renewal (epoch seconds), since."""
        names = sorted(self.r.execute_command("SMEMBERS", self.town.keys.hosts))
        if not names:
            return []
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.town.keys.host(name))
        pipe.execute_command("TIME")
        *records, clock = pipe.execute()
        now_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
        found = []
        for name, data in zip(names, records):
            state = data.get("state", "")
            if state == "live" and int(float(data.get("lease_until") or 0)) < now_ms:
                state = "lapsed"
            found.append({"name": name, "state": state, "max_agents": int(data.get("max_agents") or 0),
                          "pid": int(data["pid"]) if data.get("pid") else None,
                          "renewed_at": float(data["renewed_at"]) if data.get("renewed_at") else None,
                          "since": float(data["since"]) if data.get("since") else None})
        return found

    def lost(self, name: str) -> bool:
        """Whether host `name` was declared lost (one read: a command about one agent asks this)."""
        return self.state(name) == "lost"

    def state(self, name: str) -> str:
        """Host `name`'s recorded state (live, stopped, lost; "" for no such host), in one read."""
        return (self.r.hget(self.town.keys.host(name), "state") or "") if name else ""

    def live(self) -> list[str]:
        """The names of the hosts whose lease is live now (by Redis's clock)."""
        return [name for name, state in self.states().items() if state == "live"]

    def states(self) -> dict[str, str]:
        """Each host's state as listing() shows it, by name."""
        return {h["name"]: h["state"] for h in self.listing()}
