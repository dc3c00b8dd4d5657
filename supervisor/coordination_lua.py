"""The Lua scripts behind supervisor/coordination.py: each runs atomically inside redis-server.

Why scripts: a dependency release must decide and write in one step (a task finishing while a
dependent is being created must neither lose the dependent nor deliver it twice), a backlog task
must be claimed exactly once among racing agents, and notes must move into a task's record in the
same step that hands the task over. A script is one step, and it can sit in the MULTI/EXEC that
records a task's outcome (EVAL is queued like any command; EVALSHA is not used there, as a
redis-server restarted in between would answer NOSCRIPT inside the transaction).

Contract shared by every script:
- KEYS[1] is the town's task index: unused by the code, it routes the call (every key of a town
  shares a prefix; a cluster would put them in one slot with a hash tag).
- ARGV[1] is a JSON object: `keys`, the key prefixes from keys.Keys (each a key name called with
  "", so `K.task .. id` is Keys.task(id): the schema stays in keys.py), `events_maxlen` and
  `control` (the supervisor's channel).
- Errors a user can act on are replies starting with "TTERR ", checked before anything is written.
- Every event carries the same `at` (one script, one step), like Town._event's events.
- No recursion: cascades walk a queue, so a chain of any length or 10 000 dependents is one loop.
"""
from __future__ import annotations

from .resp import Script


PRELUDE = r"""
local ctx = cjson.decode(ARGV[1])
local K = ctx.keys
local TERMINAL = {completed = true, failed = true, cancelled = true}
local clock = redis.call('TIME')
local AT = string.format('%d.%06d', clock[1], clock[2])

local function fail(text)
  return redis.error_reply('TTERR ' .. text)
end

local function event(kind, ...)
  redis.call('XADD', K.events, 'MAXLEN', '~', ctx.events_maxlen, '*', 'type', kind, 'at', AT, ...)
end

local function field(task_id, name)
  local value = redis.call('HGET', K.task .. task_id, name)
  if not value then return '' end
  return value
end

local function named(task_id)
  local agent = field(task_id, 'agent')
  if agent == '' then return task_id end
  return task_id .. ' (' .. agent .. ')'
end

-- The same TaskAssign message `tt assign` pushes (models.Message), for a task delivered here.
local function message(task_id)
  return cjson.encode({type = 'TaskAssign', id = task_id, created_at = tonumber(AT), task_id = task_id})
end

-- Agents that can take backlog work right now: idle, nothing queued, nothing in flight; the one
-- idle longest first. Computed once per script run and kept current as agents get work.
local free = nil

local function is_free(agent_id)
  if redis.call('HGET', K.agent .. agent_id, 'state') ~= 'idle' then return false end
  return redis.call('LLEN', K.inbox .. agent_id) == 0 and redis.call('LLEN', K.inflight .. agent_id) == 0
end

local function free_agents()
  if free == nil then
    free = {}
    for _, id in ipairs(redis.call('HVALS', K.agents)) do
      if is_free(id) then
        free[#free + 1] = {id = id, since = tonumber(redis.call('HGET', K.agent .. id, 'updated_at')) or 0}
      end
    end
    table.sort(free, function(a, b)
      if a.since ~= b.since then return a.since < b.since end
      return a.id < b.id
    end)
  end
  return free
end

local function busy(agent_id)
  if free == nil then return end
  for i, agent in ipairs(free) do
    if agent.id == agent_id then table.remove(free, i) return end
  end
end

local function backlog_role(task_id)
  local role = field(task_id, 'role')
  if role == '' then return '*' end
  return role
end

local function in_backlog(task_id)
  return redis.call('ZSCORE', K.backlog .. backlog_role(task_id), task_id) ~= false
end

-- A backlog task to one agent: out of the backlog, its agent set, its message on that inbox.
local function hand_over(task_id, agent_id)
  redis.call('ZREM', K.backlog .. backlog_role(task_id), task_id)
  local name = redis.call('HGET', K.agent .. agent_id, 'name')
  redis.call('HSET', K.task .. task_id, 'agent', name, 'agent_id', agent_id, 'state', 'assigned')
  redis.call('RPUSH', K.inbox .. agent_id, message(task_id))
  busy(agent_id)
  event('task_claimed', 'task', task_id, 'agent', name)
  return name
end

-- The oldest backlog task an agent may take: its roles' and the any-role ("*") sorted sets.
local function oldest_for(agent_id)
  local best, best_score = nil, nil
  local roles = redis.call('SMEMBERS', K.roles .. agent_id)
  roles[#roles + 1] = '*'
  for _, role in ipairs(roles) do
    local top = redis.call('ZRANGE', K.backlog .. role, 0, 0, 'WITHSCORES')
    if top[1] then
      local score = tonumber(top[2])
      if best == nil or score < best_score or (score == best_score and top[1] < best) then
        best, best_score = top[1], score
      end
    end
  end
  return best
end

-- Into the backlog, and at once to a free agent whose roles match, if there is one.
local function to_backlog(task_id)
  local role = backlog_role(task_id)
  redis.call('ZADD', K.backlog .. role, field(task_id, 'created_at'), task_id)
  redis.call('SADD', K.backlog_roles, role)
  event('task_backlogged', 'task', task_id, 'role', role)
  for _, agent in ipairs(free_agents()) do
    if role == '*' or redis.call('SISMEMBER', K.roles .. agent.id, role) == 1 then
      return hand_over(task_id, agent.id)
    end
  end
  return false
end

-- A task whose dependencies are all done: to its agent's inbox, or to the backlog.
local function deliver(task_id)
  if field(task_id, 'backlog') == '1' and field(task_id, 'agent_id') == '' then
    return to_backlog(task_id)
  end
  local agent_id = field(task_id, 'agent_id')
  redis.call('HSET', K.task .. task_id, 'state', 'assigned')
  redis.call('RPUSH', K.inbox .. agent_id, message(task_id))
  busy(agent_id)
  return field(task_id, 'agent')
end

local function mark_cancelled(task_id, reason)
  redis.call('HSET', K.task .. task_id, 'state', 'cancelled', 'reason', reason, 'finished_at', AT,
             'deps_left', 0)
  event('task_cancelled', 'task', task_id, 'agent', field(task_id, 'agent'), 'reason', reason)
end

-- The release: for a finished task, each pending dependent's counter goes down and at zero the
-- dependent is delivered; a failed or cancelled outcome cancels the dependents instead, and theirs
-- in turn. The dependents list is deleted at the end, so a second run finds nothing to do.
local function release(root)
  local queue, head, released, cancelled = {root}, 1, 0, 0
  while head <= #queue do
    local done = queue[head]
    head = head + 1
    local outcome = field(done, 'state')
    if TERMINAL[outcome] then
      redis.call('SREM', K.cancel_requests, done)
      local list = K.dependents .. done
      for _, dependent in ipairs(redis.call('LRANGE', list, 0, -1)) do
        local left = tonumber(field(dependent, 'deps_left')) or 0
        if field(dependent, 'state') == 'pending' and left > 0 then
          if outcome == 'completed' then
            if redis.call('HINCRBY', K.task .. dependent, 'deps_left', -1) == 0 then
              event('task_released', 'task', dependent, 'agent', field(dependent, 'agent'), 'after', done)
              deliver(dependent)
              released = released + 1
            end
          else
            mark_cancelled(dependent, 'dependency ' .. named(done) .. ' ' .. outcome)
            cancelled = cancelled + 1
            queue[#queue + 1] = dependent
          end
        end
      end
      redis.call('DEL', list)
      redis.call('SREM', K.awaited, done)
    end
  end
  return {released, cancelled}
end
"""

# ARGV: ctx, task id, n, n dependency ids, then the task hash's field/value pairs (state aside).
# Reply: {state, reason, agent, deps_left}: `assigned` (in its inbox), `pending` (waits on
# dependencies, or in the backlog: agent ""), `assigned` with the agent a backlog task went to at
# once, or `cancelled` (a dependency had already failed or been cancelled; reason names it).
CREATE = PRELUDE + r"""
local task_id, n = ARGV[2], tonumber(ARGV[3])
local key = K.task .. task_id
if redis.call('EXISTS', key) == 1 then return fail('task ' .. task_id .. ' exists already') end
local f = {}
for i = 4 + n, #ARGV, 2 do f[ARGV[i]] = ARGV[i + 1] end
if f.backlog ~= '1' and (f.agent_id == nil or redis.call('HGET', K.agents, f.agent or '') ~= f.agent_id) then
  return fail('no agent named ' .. (f.agent or '?') .. ' (see `tt list`)')
end
local unfinished, broken = {}, nil
for i = 1, n do
  local dep = ARGV[3 + i]
  local state = redis.call('HGET', K.task .. dep, 'state')
  if not state then return fail('no task ' .. dep) end
  if state == 'failed' or state == 'cancelled' then
    broken = broken or dep
  elseif state ~= 'completed' then
    unfinished[#unfinished + 1] = dep
  end
end
local pairs_ = {}
for i = 4 + n, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
redis.call('HSET', key, unpack(pairs_))
redis.call('ZADD', K.tasks, f.created_at, task_id)
local agent = f.agent or ''
if broken then
  local reason = 'dependency ' .. named(broken) .. ' ' .. field(broken, 'state')
  mark_cancelled(task_id, reason)
  return {'cancelled', reason, agent, 0}
end
if #unfinished > 0 then
  redis.call('HSET', key, 'state', 'pending', 'deps_left', #unfinished)
  for _, dep in ipairs(unfinished) do
    redis.call('RPUSH', K.dependents .. dep, task_id)
    redis.call('SADD', K.awaited, dep)
  end
  event('task_pending', 'task', task_id, 'agent', agent, 'by', f.created_by or '',
        'after', table.concat(unfinished, ','))
  return {'pending', '', agent, #unfinished}
end
if f.backlog == '1' then
  redis.call('HSET', key, 'state', 'pending')
  local taker = to_backlog(task_id)
  if taker then return {'assigned', '', taker, 0} end
  return {'pending', '', '', 0}
end
deliver(task_id)
event('task_assigned', 'task', task_id, 'agent', agent, 'by', f.created_by or '')
return {'assigned', '', agent, 0}
"""

# ARGV: ctx, task id. Reply: {released, cancelled}. A task not finished yet: {0, 0}, nothing done.
RELEASE = PRELUDE + r"""
return release(ARGV[2])
"""

# ARGV: ctx. Re-runs the release for every task someone waits on (those not finished are left
# alone), then gives backlog work to every free agent. Reply: {released, cancelled, claimed}.
RECOVER = PRELUDE + r"""
local released, cancelled, claimed = 0, 0, 0
for _, task_id in ipairs(redis.call('SMEMBERS', K.awaited)) do
  local r = release(task_id)
  released, cancelled = released + r[1], cancelled + r[2]
end
local agents = {}
for i, agent in ipairs(free_agents()) do agents[i] = agent.id end
for _, agent_id in ipairs(agents) do
  local task_id = oldest_for(agent_id)
  if task_id then
    hand_over(task_id, agent_id)
    claimed = claimed + 1
  end
end
return {released, cancelled, claimed}
"""

# ARGV: ctx, agent id, task id ("": the oldest the agent's roles match), "1" = only if the agent is
# free (idle, empty inbox, nothing in flight). Reply: the claimed task id, or nil.
CLAIM = PRELUDE + r"""
local agent_id, wanted, if_free = ARGV[2], ARGV[3], ARGV[4] == '1'
if redis.call('EXISTS', K.agent .. agent_id) == 0 then return fail('no agent ' .. agent_id) end
if wanted ~= '' then
  if field(wanted, 'state') == '' then return fail('no task ' .. wanted) end
  if not in_backlog(wanted) then
    local holder = field(wanted, 'agent')
    if holder ~= '' then return fail('task ' .. wanted .. ' was taken by ' .. holder) end
    return fail('task ' .. wanted .. ' is not waiting in the backlog')
  end
  hand_over(wanted, agent_id)
  return wanted
end
if if_free and not is_free(agent_id) then return false end
local task_id = oldest_for(agent_id)
if not task_id then return false end
hand_over(task_id, agent_id)
return task_id
"""

# ARGV: ctx, task id, reason, "1" = only an unclaimed backlog task (`tt backlog remove`).
# Reply: {"cancelled", dependents cancelled with it} or {"requested", 0} (in flight: its runner
# is to stop it; the supervisor is nudged on the control channel).
CANCEL = PRELUDE + r"""
local task_id, reason, only_backlog = ARGV[2], ARGV[3], ARGV[4] == '1'
local state = field(task_id, 'state')
if state == '' then return fail('no task ' .. task_id) end
-- (a backlog task waiting on its dependencies is listed in the backlog, and removed from it, too)
local waiting_backlog = state == 'pending' and field(task_id, 'backlog') == '1' and field(task_id, 'agent') == ''
if only_backlog and not in_backlog(task_id) and not waiting_backlog then
  if field(task_id, 'agent') ~= '' then
    return fail('task ' .. task_id .. ' is not in the backlog: ' .. field(task_id, 'agent') .. ' has it')
  end
  return fail('task ' .. task_id .. ' is not in the backlog (' .. state .. ')')
end
if TERMINAL[state] then return fail('task ' .. task_id .. ' is already ' .. state .. '; nothing to cancel') end
if state == 'pending' then
  redis.call('ZREM', K.backlog .. backlog_role(task_id), task_id)
  mark_cancelled(task_id, reason)
  return {'cancelled', release(task_id)[2]}
end
if state == 'assigned' then
  local inbox = K.inbox .. field(task_id, 'agent_id')
  for _, raw in ipairs(redis.call('LRANGE', inbox, 0, -1)) do
    if string.find(raw, task_id, 1, true) then
      redis.call('LREM', inbox, 1, raw)
      mark_cancelled(task_id, reason)
      return {'cancelled', release(task_id)[2]}
    end
  end
end
redis.call('HSET', K.task .. task_id, 'cancel_request', reason)
redis.call('SADD', K.cancel_requests, task_id)
event('task_cancel_requested', 'task', task_id, 'agent', field(task_id, 'agent'), 'reason', reason)
redis.call('PUBLISH', ctx.control, 'cancel ' .. task_id)
return {'requested', 0}
"""

# ARGV: ctx, agent id, task id: the step between a runner's claim and its CLI's start.
# Reply: {status, task hash (flat), agent state, notes (flat hashes), upstream}. status: `ok`,
# `gone` (no such task), `finished` (already finished: drop the message) or `cancel` (a cancel was
# asked while it waited: record it cancelled). On `ok` the notes waiting for the agent have moved
# into the task's record (a runner dying after this delivers them again with the task) and are all
# the task's notes; upstream: per dependency {id, agent, state, exit_code, output}, unless no_context.
BEGIN = PRELUDE + r"""
local agent_id, task_id = ARGV[2], ARGV[3]
local key = K.task .. task_id
local agent = redis.call('HMGET', K.agent .. agent_id, 'state', 'work_task', 'work_host')
local agent_state, work = agent[1] or '', {agent[2] or '', agent[3] or ''}
if redis.call('EXISTS', key) == 0 then return {'gone', {}, agent_state, {}, {}, work} end
local state = field(task_id, 'state')
if TERMINAL[state] then return {'finished', redis.call('HGETALL', key), agent_state, {}, {}, work} end
if field(task_id, 'cancel_request') ~= '' then return {'cancel', redis.call('HGETALL', key), agent_state, {}, {}, work} end
local waiting = redis.call('LRANGE', K.notes .. agent_id, 0, -1)
if #waiting > 0 then
  redis.call('DEL', K.notes .. agent_id)
  for _, id in ipairs(waiting) do
    redis.call('HSET', K.note .. id, 'delivered_at', AT, 'task', task_id)
    redis.call('RPUSH', K.delivered_notes .. agent_id, id)
  end
  local ids = field(task_id, 'notes')
  if ids ~= '' then ids = ids .. ',' end
  redis.call('HSET', key, 'notes', ids .. table.concat(waiting, ','))
  event('notes_delivered', 'task', task_id, 'agent', field(task_id, 'agent'), 'notes', table.concat(waiting, ','))
end
local notes = {}
for id in string.gmatch(field(task_id, 'notes'), '[^,]+') do notes[#notes + 1] = redis.call('HGETALL', K.note .. id) end
local upstream = {}
if field(task_id, 'no_context') ~= '1' then
  for id in string.gmatch(field(task_id, 'after'), '[^,]+') do
    upstream[#upstream + 1] = redis.call('HMGET', K.task .. id, 'id', 'agent', 'state', 'exit_code', 'output')
  end
end
return {'ok', redis.call('HGETALL', key), agent_state, notes, upstream, work}
"""

# An agent's queued work, given to the shared backlog (`tt close/kill/prune --to-backlog`): each
# task waiting in its inbox, in order, and each of its tasks still waiting on dependencies. A task
# given back is `pending` with no agent, in backlog:<its role> at its creation time (its place among
# the others), and offered to a free matching agent at once. Its caller has made sure no runner
# of the agent is alive. The pending ones are found by reading every task's state and agent (a
# rare command: one step, so no task is created for the agent in between and missed).
AGENT_QUEUE = r"""
-- only_backlog: only the tasks that came from the backlog (for an agent that failed holding them).
local function queued_work(agent_id, only_backlog)
  local inbox, pending = {}, {}
  for _, raw in ipairs(redis.call('LRANGE', K.inbox .. agent_id, 0, -1)) do
    local ok, msg = pcall(cjson.decode, raw)
    local task_id = ok and type(msg) == 'table' and msg.task_id or nil
    if type(task_id) == 'string' and task_id ~= '' then
      local t = redis.call('HMGET', K.task .. task_id, 'state', 'agent_id', 'backlog')
      if t[1] == 'assigned' and t[2] == agent_id and (t[3] == '1' or not only_backlog) then
        inbox[#inbox + 1] = {raw, task_id}
      end
    end
  end
  if only_backlog then return inbox, pending end  -- (a pending backlog task has no agent yet)
  for _, task_id in ipairs(redis.call('ZRANGE', K.tasks, 0, -1)) do
    local t = redis.call('HMGET', K.task .. task_id, 'state', 'agent_id')
    if t[1] == 'pending' and t[2] == agent_id then pending[#pending + 1] = task_id end
  end
  return inbox, pending
end

local function give_back(agent_id, only_backlog)
  local name = redis.call('HGET', K.agent .. agent_id, 'name') or ''
  local inbox, pending = queued_work(agent_id, only_backlog)
  for _, item in ipairs(inbox) do
    redis.call('LREM', K.inbox .. agent_id, 1, item[1])
    redis.call('HSET', K.task .. item[2], 'agent', '', 'agent_id', '', 'backlog', '1', 'state', 'pending')
    event('task_returned', 'task', item[2], 'agent', name)
    to_backlog(item[2])
  end
  for _, task_id in ipairs(pending) do  -- to the backlog once its dependencies complete
    redis.call('HSET', K.task .. task_id, 'agent', '', 'agent_id', '', 'backlog', '1')
    event('task_returned', 'task', task_id, 'agent', name)
  end
  redis.call('HDEL', K.agent .. agent_id, 'to_backlog')
  return #inbox + #pending
end
"""

# ARGV: ctx, agent id, "1" = only the tasks that came from the backlog. Reply: how many went back.
GIVE_BACK = PRELUDE + AGENT_QUEUE + r"""
return give_back(ARGV[2], ARGV[3] == '1')
"""

# ARGV: ctx, agent id, name, "1" = give its queued work to the backlog, "1" = only check.
# `tt prune`: the agent leaves the registry with its keys (record, inbox, in-flight list, roles,
# notes not yet delivered, output stream); its tasks stay. Refused (TTERR) while a runner may live
# (state not stopped or failed, on a host not lost: a lost host's agents are settled by nobody, and
# a runner of it that comes back finds its record gone), with a task in flight, or with queued work
# and no give-back. Reply: {tasks given back, undelivered notes dropped}.
PRUNE = PRELUDE + AGENT_QUEUE + r"""
local agent_id, name, to_back, dry = ARGV[2], ARGV[3], ARGV[4] == '1', ARGV[5] == '1'
if redis.call('HGET', K.agents, name) ~= agent_id then return fail('no agent named ' .. name) end
local f = redis.call('HMGET', K.agent .. agent_id, 'state', 'host')
local state, host = f[1] or '', f[2] or ''
local host_lost = host ~= '' and redis.call('HGET', K.host .. host, 'state') == 'lost'
if state ~= 'stopped' and state ~= 'failed' and not host_lost then
  return fail(name .. ' is ' .. state .. ': only a stopped agent is pruned (`tt close ' .. name .. '` first)')
end
if redis.call('LLEN', K.inflight .. agent_id) > 0 then
  return fail(name .. ' still has a task in flight: its runner died with it (`tt restart ' .. name ..
              '` delivers it again)')
end
local inbox, pending = queued_work(agent_id, false)
local queued = #inbox + #pending
if queued > 0 and not to_back then
  return fail(name .. ' has ' .. queued .. ' queued task(s): `--to-backlog` gives them to the backlog, ' ..
              '`tt cancel` drops them, `tt restart ' .. name .. '` runs them')
end
local waiting = redis.call('LRANGE', K.notes .. agent_id, 0, -1)
if dry then return {queued, #waiting} end
local moved = 0
if to_back then moved = give_back(agent_id, false) end
for _, id in ipairs(waiting) do redis.call('DEL', K.note .. id) end
redis.call('DEL', K.agent .. agent_id, K.inbox .. agent_id, K.inflight .. agent_id, K.roles .. agent_id,
           K.notes .. agent_id, K.delivered_notes .. agent_id, K.output .. agent_id)
redis.call('HDEL', K.agents, name)
event('agent_pruned', 'agent', name, 'agent_id', agent_id, 'returned', moved, 'notes_dropped', #waiting)
return {moved, #waiting}
"""


# Each a resp.Script: EVALSHA outside transactions (EVAL when Redis does not have it yet), EVAL
# inside them (a NOSCRIPT inside EXEC would not undo the transaction's other writes).
SCRIPTS = {name: Script(text) for name, text in
           (("create", CREATE), ("release", RELEASE), ("recover", RECOVER), ("claim", CLAIM),
            ("cancel", CANCEL), ("begin", BEGIN), ("give_back", GIVE_BACK), ("prune", PRUNE))}
