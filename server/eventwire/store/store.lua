#!lua name=eventwire_VERSION
-- The Redis side of eventwire: every step that must be atomic, as one Redis
-- function library (loaded by server/store.py with FUNCTION LOAD REPLACE).
--
-- All keys of one call share one hash tag, so a call never crosses a Redis
-- Cluster slot: the site's ({site}), or with partitions = P one partition's
-- ({site:p}, p = crc32(uuid) mod P; every key below exists per partition,
-- and a producer's seq is kept in each partition it stored events in). Keys
-- of a customer (ew:{site}:sess:<uuid>, ew:{site}:conns:<uuid>) that are
-- only known inside a call are built from the key prefix passed in, under
-- the same tag.
--
--   ew:{site}:events          accepted and server-made events (XADD MAXLEN ~)
--   ew:{site}:rejected        rejected events
--   ew:{site}:producer:<p>    a producer's highest stored seq (PX producer_ttl)
--   ew:{site}:sess:<uuid>     the customer's open session: id, first, last,
--                             events, seq (of its srv: producer), closed
--   ew:{site}:conns:<uuid>    the customer's live connections (members)
--   ew:{site}:live            every live connection -> heartbeat deadline (ms)
--   ew:{site}:due             customer -> when its session must be looked at
--
-- A connection member is "<process>:<n>:<uuid>". Times are Redis' own clock
-- (TIME), so server processes on machines with skewed clocks agree.
--
-- VERSION is replaced by a hash of this text when loaded: each version of the
-- code calls its own functions, so old and new server processes can share a
-- Redis during a rolling upgrade without calling each other's code.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The earliest moment the session must end, and why.
local function due_at(first, last, closed, nconns, grace, idle, maxd)
  local at, why = last + idle, 'idle'
  if first + maxd < at then
    at, why = first + maxd, 'max'
  end
  if nconns == 0 and closed > 0 and closed + grace < at then
    at, why = closed + grace, 'closed'
  end
  return at, why
end

-- Whether the site's allow/deny rules take a server-made event. `taken` holds
-- one letter per event taken: s(ession.start), e(nd), i(dentify).
local function takes(taken, letter)
  return string.find(taken, letter, 1, true) ~= nil
end

-- Publish a server-made event of the session: producer srv:<session>, the next
-- seq of the session's own counter.
local function server_event(events_key, skey, maxlen, site, uuid, sid, action, label, now, params)
  local seq = redis.call('HINCRBY', skey, 'seq', 1)
  local ev = cjson.encode({
    site = site, uuid = uuid, session = sid, producer = 'srv:' .. sid, seq = seq,
    action = action, label = label, time = now, received = now, params = params,
  })
  redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', 'event', ev)
end

-- End a session: its one session.end, then forget it. Callers decided inside
-- the same function call that it must end, so two processes can never both
-- end one session.
local function end_session(events_key, due_key, skey, maxlen, site, uuid, s, reason, now, taken)
  if takes(taken, 'e') then
    server_event(events_key, skey, maxlen, site, uuid, s.id, 'session.end', 'Session end', now, {
      session = s.id, reason = reason, duration_ms = s.last - s.first, events = s.events,
    })
  end
  redis.call('DEL', skey)
  redis.call('ZREM', due_key, uuid)
end

local function load_session(skey)
  local v = redis.call('HMGET', skey, 'id', 'first', 'last', 'events', 'closed')
  if not v[1] then
    return nil
  end
  return {
    id = v[1], first = tonumber(v[2]), last = tonumber(v[3]),
    events = tonumber(v[4]), closed = tonumber(v[5]),
  }
end

-- Store frames of one site. KEYS: events, rejected, due, then per frame the
-- producer key and the customer's session key. ARGV: events MAXLEN, rejected
-- MAXLEN, producer ttl (ms), site, session_idle (ms), session_max (ms), the
-- server-made events taken (see server_event), then per frame: session id ('' for server-made frames: no session check), uuid,
-- item count n, and n (seq, kind, payload) triples in seq order.
-- Kinds: e = event (stored once), r = rejected (recorded once), R = rejected
-- out of order (recorded, does not move the stored seq), n = counted only.
-- Returns per frame {added, duplicate, gone}; gone = 1 means the session the
-- frame was encoded for has ended (now, or before): nothing was stored and
-- the producer's seq did not move.
local function publish(keys, args)
  local out = {}
  local now
  local a, k = 8, 4
  while k <= #keys do
    local pkey, skey = keys[k], keys[k + 1]
    local sid, uuid, n = args[a], args[a + 1], tonumber(args[a + 2])
    k, a = k + 2, a + 3
    local gone = 0
    if sid ~= '' then
      now = now or now_ms()
      local s = load_session(skey)
      if not s or s.id ~= sid then
        gone = 1
      else
        local why
        if now >= s.last + tonumber(args[5]) then
          why = 'idle'
        elseif now >= s.first + tonumber(args[6]) then
          why = 'max'
        end
        if why then
          end_session(keys[1], keys[3], skey, args[1], args[4], uuid, s, why, now, args[7])
          gone = 1
        end
      end
    end
    if gone == 1 then
      a = a + 3 * n
      out[#out + 1] = 0
      out[#out + 1] = 0
      out[#out + 1] = 1
    else
      local top = redis.call('GET', pkey)
      local cur = tonumber(top or '0')
      local added, dup = 0, 0
      for _ = 1, n do
        local seq, kind = args[a], args[a + 1]
        local s = tonumber(seq)
        if kind == 'R' then
          redis.call('XADD', keys[2], 'MAXLEN', '~', args[2], '*', 'event', args[a + 2])
        elseif s > cur then
          cur, top = s, seq
          if kind == 'e' then
            redis.call('XADD', keys[1], 'MAXLEN', '~', args[1], '*', 'event', args[a + 2])
            added = added + 1
          elseif kind == 'r' then
            redis.call('XADD', keys[2], 'MAXLEN', '~', args[2], '*', 'event', args[a + 2])
          end
        elseif kind == 'e' then
          dup = dup + 1
        end
        a = a + 3
      end
      if top then
        redis.call('SET', pkey, top, 'PX', args[3])
      end
      if sid ~= '' and added > 0 then
        redis.call('HINCRBY', skey, 'events', added)
        redis.call('HSET', skey, 'last', now)
      end
      out[#out + 1] = added
      out[#out + 1] = dup
      out[#out + 1] = 0
    end
  end
  return out
end

-- A connection says hello (or renews its session after an idle or max end):
-- join the customer's open session, or open one and publish session.start.
-- KEYS: sess, conns, live, due, events, producer. ARGV: site, uuid, member,
-- candidate session id, session.start JSON for that id, heartbeat ttl,
-- grace, idle, max (ms), events MAXLEN, server-made events taken, and
-- optionally a carried seq with the producer ttl (ms): identify moved the
-- producer here from another partition, whose stored seq it brings, so the
-- producer's high-water mark follows it as if there were one key.
-- Returns {session id, resumed, acked}.
local function open(keys, args)
  local now = now_ms()
  local site, uuid, member, maxlen = args[1], args[2], args[3], args[10]
  local grace, idle, maxd = tonumber(args[7]), tonumber(args[8]), tonumber(args[9])
  local s = load_session(keys[1])
  if s then
    local nconns = redis.call('SCARD', keys[2])
    local at, why = due_at(s.first, s.last, s.closed, nconns, grace, idle, maxd)
    if at <= now then
      -- Its end was due and no reaper has got to it yet: end it first.
      end_session(keys[5], keys[4], keys[1], maxlen, site, uuid, s, why, now, args[11])
      s = nil
    end
  end
  redis.call('SADD', keys[2], member)
  redis.call('ZADD', keys[3], now + tonumber(args[6]), member)
  local sid, resumed = args[4], 0
  if s then
    sid, resumed = s.id, 1
    redis.call('HSET', keys[1], 'closed', 0)
  else
    redis.call('HSET', keys[1], 'id', sid, 'first', now, 'last', now, 'events', 0, 'seq', 1,
      'closed', 0)
    if takes(args[11], 's') then
      redis.call('XADD', keys[5], 'MAXLEN', '~', maxlen, '*', 'event', args[5])
    end
    redis.call('ZADD', keys[4], math.min(now + idle, now + maxd), uuid)
  end
  local acked = redis.call('GET', keys[6]) or '0'
  if args[12] and tonumber(args[12]) > tonumber(acked) then
    acked = args[12]
    redis.call('SET', keys[6], acked, 'PX', args[13])
  end
  return {sid, resumed, acked}
end

-- A connection ends (or leaves its customer for another with identify).
-- KEYS: sess, conns, live, due, events, and optionally the producer's key
-- (its stored seq is returned, for identify to carry to another partition).
-- ARGV: site, uuid, member, grace (ms),
-- events MAXLEN, identify_to (the new uuid, or ''), server-made events
-- taken. With identify_to, the
-- session gets a client.identify event, and ends now (reason identify) if
-- this was the customer's last connection; otherwise the last connection's
-- close starts the grace period. Returns {1 if the session ended, the
-- producer's stored seq (0 without its key)}.
local function leave(keys, args)
  local now = now_ms()
  local site, uuid, member, maxlen, to = args[1], args[2], args[3], args[5], args[6]
  local stored = keys[6] and (redis.call('GET', keys[6]) or '0') or '0'
  redis.call('ZREM', keys[3], member)
  redis.call('SREM', keys[2], member)
  local s = load_session(keys[1])
  if not s then
    return {0, stored}
  end
  if to ~= '' and takes(args[7], 'i') then
    server_event(keys[5], keys[1], maxlen, site, to, s.id, 'client.identify', 'client.identify',
      now, {previous_uuid = uuid})
  end
  if redis.call('SCARD', keys[2]) > 0 then
    return {0, stored}
  end
  if to ~= '' then
    end_session(keys[5], keys[4], keys[1], maxlen, site, uuid, s, 'identify', now, args[7])
    return {1, stored}
  end
  redis.call('HSET', keys[1], 'closed', now)
  redis.call('ZADD', keys[4], 'LT', now + tonumber(args[4]), uuid)
  return {0, stored}
end

-- Refresh the heartbeat deadlines of one process' connections of a site.
-- KEYS: live. ARGV: heartbeat ttl (ms), key prefix of the site
-- ("ew:{site}:"), then the members. A member that a reaper already took for
-- dead (Redis was unreachable longer than the ttl) is registered again.
local function heartbeat(keys, args)
  local deadline = now_ms() + tonumber(args[1])
  local kp = args[2]
  local back = 0
  for i = 3, #args do
    local m = args[i]
    if not redis.call('ZSCORE', keys[1], m) then
      local uuid = string.match(m, '^[^:]*:[^:]*:(.*)$')
      if uuid then
        redis.call('SADD', kp .. 'conns:' .. uuid, m)
        local skey = kp .. 'sess:' .. uuid
        if redis.call('EXISTS', skey) == 1 then
          redis.call('HSET', skey, 'closed', 0)
        end
        back = back + 1
      end
    end
    redis.call('ZADD', keys[1], deadline, m)
  end
  return back
end

-- Reap one site: connections whose heartbeat lapsed (their process died)
-- count as closed at their deadline; sessions whose end is due get their one
-- session.end. KEYS: live, due, events. ARGV: site, key prefix, grace, idle,
-- max (ms), how many of each to handle, events MAXLEN, server-made events taken.
-- Returns {dead connections, sessions ended}.
local function reap(keys, args)
  local now = now_ms()
  local site, kp, maxlen = args[1], args[2], args[7]
  local grace, idle, maxd = tonumber(args[3]), tonumber(args[4]), tonumber(args[5])
  local limit = tonumber(args[6])
  local dead = redis.call('ZRANGEBYSCORE', keys[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #dead, 2 do
    local m, deadline = dead[i], tonumber(dead[i + 1])
    redis.call('ZREM', keys[1], m)
    local uuid = string.match(m, '^[^:]*:[^:]*:(.*)$')
    if uuid then
      local ckey = kp .. 'conns:' .. uuid
      redis.call('SREM', ckey, m)
      local skey = kp .. 'sess:' .. uuid
      if redis.call('SCARD', ckey) == 0 and redis.call('EXISTS', skey) == 1 then
        redis.call('HSET', skey, 'closed', deadline)
        redis.call('ZADD', keys[2], 'LT', deadline + grace, uuid)
      end
    end
  end
  local ended = 0
  local due = redis.call('ZRANGEBYSCORE', keys[2], '-inf', now, 'LIMIT', 0, limit)
  for _, uuid in ipairs(due) do
    local skey = kp .. 'sess:' .. uuid
    local s = load_session(skey)
    if not s then
      redis.call('ZREM', keys[2], uuid)
    else
      local nconns = redis.call('SCARD', kp .. 'conns:' .. uuid)
      local at, why = due_at(s.first, s.last, s.closed, nconns, grace, idle, maxd)
      if at <= now then
        end_session(keys[3], keys[2], skey, maxlen, site, uuid, s, why, now, args[8])
        ended = ended + 1
      else
        redis.call('ZADD', keys[2], at, uuid)
      end
    end
  end
  return {#dead / 2, ended}
end

redis.register_function('ew_VERSION_publish', publish)
redis.register_function('ew_VERSION_open', open)
redis.register_function('ew_VERSION_leave', leave)
redis.register_function('ew_VERSION_heartbeat', heartbeat)
redis.register_function('ew_VERSION_reap', reap)
