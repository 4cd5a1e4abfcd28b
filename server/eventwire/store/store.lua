#!lua name=eventwire_VERSION
-- The Redis side of eventwire: every step that must be atomic, as one Redis
-- function library (loaded by eventwire/store/functions.py with FUNCTION LOAD
-- REPLACE).
--
-- All keys of one call share one hash tag, so a call never crosses a Redis
-- Cluster slot: the site's ({site}), or with partitions = P one partition's
-- ({site:p}, p = crc32(uuid) mod P; every key below exists per partition,
-- and a producer's seq is kept in each partition it stored events in). Keys
-- of a customer (ew:{site}:sess:<uuid>, ew:{site}:conns:<uuid>) that are
-- only known inside a call are built from the key prefix passed in, under
-- the same tag.
--
--   ew:{site}:events          accepted and server-made events (XADD; trimmed by
--                             MAXLEN ~ (publish: one XTRIM per call), or, while
--                             it has a persist group and max_backlog is above
--                             0, only below what the group has acknowledged:
--                             see backlog_of)
--   ew:{site}:rejected        rejected events
--   ew:{site}:producer:<p>    a producer's highest stored seq (PX producer_ttl)
--   ew:{site}:sess:<uuid>     the customer's open session: id, first, last,
--                             events, seq (of its srv: producer), closed,
--                             quiet (a dropped bot's session)
--   ew:{site}:conns:<uuid>    the customer's live connections (members)
--   ew:{site}:live            every live connection -> heartbeat deadline (ms)
--   ew:{site}:due             customer -> when its session must be looked at
--   ew:{site}:dead            entries the persist worker gave up on (not here)
--   ew:{site}:alias:<uuid>    the customer an anonymous uuid merged into (in
--                             the anonymous uuid's partition; expires after the
--                             site's retain_days, never without it)
--   ew:{site}:aliases:<uuid>  the uuids merged into a customer (set, in the
--                             customer's partition; expires the site's
--                             retain_days after its last merge, never without)
--   ew:{site}:suppressed      keyed hashes of forgotten customers (set; each
--                             hash in the partition of the uuid it hashes)
--   ew:{site}:forgotten       ids of events entries a forget deleted before
--                             the persist worker read them (sorted set; not
--                             here: store/privacy.py)
--
-- A connection member is "<process>:<n>:<uuid>". Times are Redis' own clock
-- (TIME), so server processes on machines with skewed clocks agree.
--
-- The arguments: each function names its KEYS and ARGV once, in the first
-- lines of its body (`local a, b = unpack(keys)`, `local c, d =
-- unpack(args, 1, 2)`, then one such line per repeated part). Those names
-- are the fields of the typed argument builders in functions.py, in the same
-- order; tests/store/test_functions.py reads these lines and holds them to
-- the builders.
--
-- Server-made records (session.end, client.identify) are encoded in Python
-- by the msgspec Struct that is the author of every stored event; they come
-- here as templates, JSON text in which a byte 1 to 8 (which JSON text never
-- holds raw) marks each value only this code knows. fill() puts a JSON value
-- there: strings through cjson.encode, integers through %d, so a template
-- filled is JSON whatever the values are.
--
-- VERSION is replaced by a hash of this text when loaded: each version of the
-- code calls its own functions, so old and new server processes can share a
-- Redis during a rolling upgrade without calling each other's code.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The holes of a record template (see functions.py, RecordHole).
local HOLE_UUID, HOLE_SESSION, HOLE_PRODUCER, HOLE_SEQ = '\1', '\2', '\3', '\4'
local HOLE_TIME, HOLE_REASON, HOLE_DURATION, HOLE_EVENTS = '\5', '\6', '\7', '\8'

-- A template with its holes filled; values maps a hole to its JSON text.
local function fill(template, values)
  return (string.gsub(template, '[\1-\8]', values))
end

local function int(n)
  return string.format('%d', n)
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
-- one letter per event taken: s(ession.start), e(nd), i(dentify); q alone: a
-- dropped bot's session, marked quiet so that none is ever stored for it.
local function takes(taken, letter)
  return string.find(taken, letter, 1, true) ~= nil
end

-- The persist group on an events stream: {backlog = entries the group has
-- not acknowledged (pending with a consumer, or never delivered), floor =
-- an id below which every entry is acknowledged}, or nil if the stream (or
-- the group) does not exist. XINFO GROUPS costs O(groups): the check needs
-- no round trip of its own and no key the worker must keep up to date.
-- The most undelivered entries backlog_of counts itself (a bounded XRANGE).
local COUNT_MAX = 2000

local function backlog_of(events, cap)
  local groups = redis.pcall('XINFO', 'GROUPS', events)
  if type(groups) ~= 'table' or groups.err then
    return nil
  end
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do
      f[g[i]] = g[i + 1]
    end
    if f['name'] == 'persist' then
      local last, pending = f['last-delivered-id'], f['pending']
      local lag = f['lag']
      local need = cap - pending -- undelivered entries that make the backlog full
      if need > 0 and (type(lag) ~= 'number' or lag >= need) then
        -- Redis' lag is a counter that can be wrong (after an AOF reload it
        -- was seen 14,320 too high with everything delivered) or unknown
        -- (entries deleted past the group's position). Before refusing
        -- frames, count the undelivered entries themselves, at most
        -- COUNT_MAX of them: fewer than asked is the true number.
        local want = math.min(need, COUNT_MAX)
        local found = #redis.call('XRANGE', events, '(' .. last, '+', 'COUNT', want)
        if found < want or type(lag) ~= 'number' then
          lag = found
        end
      end
      return {backlog = pending + (lag or 0), pending = pending, last = last}
    end
  end
  return nil
end

-- Trim an events stream that has a persist group back under maxlen, but
-- never an entry the group has not acknowledged: every entry below the
-- group's oldest pending one (or, with none pending, its last delivered
-- one) is acknowledged, so MINID ~ there is safe (~: whole nodes only).
local function trim_acknowledged(events, maxlen, group)
  if redis.call('XLEN', events) <= tonumber(maxlen) then
    return
  end
  local floor = group.last
  if group.pending > 0 then
    floor = redis.call('XPENDING', events, 'persist')[2]
  end
  redis.call('XTRIM', events, 'MINID', '~', floor)
end

-- Append a server-made event: while the stream has a persist group it is
-- never trimmed here (publish trims it safely); otherwise MAXLEN ~ maxlen.
local function append(events, maxlen, payload)
  if backlog_of(events, 1) then
    redis.call('XADD', events, '*', 'event', payload)
  else
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'event', payload)
  end
end

-- Publish a server-made event of the session: producer srv:<session>, the
-- next seq of the session's own counter, the record's template filled.
local function server_event(events_key, skey, maxlen, sid, now, template, values)
  values[HOLE_SESSION] = cjson.encode(sid)
  values[HOLE_PRODUCER] = cjson.encode('srv:' .. sid)
  values[HOLE_SEQ] = int(redis.call('HINCRBY', skey, 'seq', 1))
  values[HOLE_TIME] = int(now)
  append(events_key, maxlen, fill(template, values))
end

-- End a session: its one session.end, then forget it. Callers decided inside
-- the same function call that it must end, so two processes can never both
-- end one session.
local function end_session(events_key, due_key, skey, maxlen, uuid, s, reason, now, taken, record)
  -- A quiet session (opened by a bot on a site that drops them) ends unseen.
  if takes(taken, 'e') and not s.quiet then
    server_event(events_key, skey, maxlen, s.id, now, record, {
      [HOLE_UUID] = cjson.encode(uuid),
      [HOLE_REASON] = cjson.encode(reason),
      [HOLE_DURATION] = int(s.last - s.first),
      [HOLE_EVENTS] = int(s.events),
    })
  end
  redis.call('DEL', skey)
  redis.call('ZREM', due_key, uuid)
end

local function load_session(skey)
  local v = redis.call('HMGET', skey, 'id', 'first', 'last', 'events', 'closed', 'quiet')
  if not v[1] then
    return nil
  end
  return {
    id = v[1], first = tonumber(v[2]), last = tonumber(v[3]),
    events = tonumber(v[4]), closed = tonumber(v[5]), quiet = v[6] ~= false,
  }
end

-- Store frames of one site. KEYS: the site's streams and due set, then per
-- frame the producer's seq key and the customer's session key. ARGV: the
-- fixed arguments, then per frame its session id ('' for server-made frames:
-- no session check), kinds (one letter per item, in seq order: the frame's
-- item count is its length), seqs (the items' seqs, comma-separated, or only
-- the first one's when each item's is the one before's plus 1), and one
-- payload per item. Kinds: e = event (stored once), r = rejected
-- (recorded once), R = rejected out of order (recorded, does not move the
-- stored seq), n = counted only. Returns per frame {added, duplicate,
-- status}, then the stream's backlog (-1: not watched). Status 0: stored; 1
-- (gone): the session the frame was encoded for has ended (now, or before);
-- 2 (full): the persist group's backlog is at max_backlog. Gone or full,
-- nothing of the frame was stored and the producer's seq did not move.
--
-- max_backlog above 0 (on_backlog = "reject"): while the events stream has a
-- persist group, nothing the group has not acknowledged is trimmed, and a
-- frame that finds max_backlog entries unacknowledged is refused. 0 (on_backlog
-- = "trim"), or no persist group: MAXLEN ~ events_maxlen, as a live-only
-- stream needs.
--
-- Redis' work per frame is mostly its redis.call()s, so each producer and
-- session key is read once per call and written once at its end (a call is
-- atomic: nobody sees the keys in between, and what is written is what a
-- write per frame would have left). A producer's first frame of the call
-- reads and writes its seq in one SET ... GET of the frame's highest seq;
-- only when that was not the new high-water mark (a resend, or more frames
-- of the producer in the call) is it written again at the end.
--
-- Each argument costs Redis an object and Lua a string (and each string
-- made into a number a strtod), so an item is its payload alone: a frame of
-- events with consecutive seqs (nearly all of them) carries one kind letter
-- per item and its first seq, and which of its items are new follows from
-- the stored seq without a look at each. A frame's uuid (only needed when its
-- session ends) is read from its session key.

-- The open session publish checks: as load_session, without closed and
-- quiet (read only when the session ends). Lua's tonumber() parses a string
-- twice (strtod is most of a frame's Lua time); arithmetic coerces it once.
local function open_session(skey)
  local v = redis.call('HMGET', skey, 'id', 'first', 'last', 'events')
  if not v[1] then
    return nil
  end
  return {id = v[1], first = v[2] + 0, last = v[3] + 0, events = v[4] + 0}
end

local KIND_R = 82 -- string.byte('R'): no standard library is there while the library loads

-- The seqs of a frame of more than one item: its first item's and nil when
-- they are consecutive (else nil and the list), whether it is plain (events
-- only, consecutive), and the seq of its last item that moves the stored seq
-- (all but R; nil if none): the stored seq after the frame, unless it was
-- higher already or a denied item (n) above it is (then the end of the call
-- writes it again).
local function frame_seqs(kinds, seqs)
  local first, list
  if string.find(seqs, ',', 1, true) then
    list = {}
    for seq in string.gmatch(seqs, '[^,]+') do
      list[#list + 1] = seq + 0
    end
  else
    first = seqs + 0
  end
  for j = #kinds, 1, -1 do
    if string.byte(kinds, j) ~= KIND_R then
      local plain = first ~= nil and not string.find(kinds, '[^e]')
      return first, list, plain, list and list[j] or first + j - 1
    end
  end
  return first, list, false, nil
end

local function publish(keys, args)
  local events, rejected, due = unpack(keys, 1, 3)
  local events_maxlen, rejected_maxlen, producer_ttl_ms, idle_ms, max_ms, taken, end_record,
    max_backlog = unpack(args, 1, 8)
  local call = redis.call
  local out, o = {}, 0 -- the reply, and its length
  local now, now_text -- Redis' clock (ms), and as text for HSET
  local idle, maxd = tonumber(idle_ms), tonumber(max_ms)
  local cap = tonumber(max_backlog)
  local group = cap > 0 and backlog_of(events, cap) or nil
  local backlog = group and group.backlog
  -- Per key of the call: sessions[key] = the session (false: none open), and
  -- marks[key] = {cur = the high-water mark, top = what to store, stored = what
  -- is in Redis} (numbers; top and stored nil when there is none; text: top
  -- as text, when a frame gave it).
  local sessions, touched, marks, producers = {}, {}, {}, {}
  local stored, recorded = 0, false -- events added, rejected records added
  local k, a, nkeys = 4, 9, #keys -- the first frame's keys and arguments
  while k <= nkeys do
    local producer, session = unpack(keys, k, k + 1)
    local session_id, kinds, seqs = unpack(args, a, a + 2)
    local n = #kinds
    k, a = k + 2, a + 3
    local status = 0
    local s
    if session_id ~= '' then
      if not now then
        now = now_ms()
        now_text = int(now)
      end
      s = sessions[session]
      if s == nil then
        s = open_session(session) or false
        sessions[session] = s
      end
      if not s or s.id ~= session_id then
        status = 1
      else
        local why
        if now >= s.last + idle then
          why = 'idle'
        elseif now >= s.first + maxd then
          why = 'max'
        end
        if why then
          -- The uuid is the session key's end: after the prefix (the events
          -- key's, less 'events') and 'sess:'.
          local uuid = string.sub(session, #events)
          s.quiet = call('HEXISTS', session, 'quiet') == 1
          end_session(events, due, session, events_maxlen, uuid, s, why, now, taken, end_record)
          sessions[session] = false
          status = 1
        end
      end
    end
    if status == 0 and backlog and backlog >= cap then
      status = 2
    end
    if status ~= 0 then
      out[o + 1], out[o + 2], out[o + 3] = 0, 0, status
      o = o + 3
    else
      -- Item j's seq: first + j - 1, or list[j] when they were listed.
      local first, list, plain, top
      if n == 1 then
        first, plain = seqs + 0, kinds == 'e'
        top = kinds ~= 'R' and first or nil
      elseif n > 1 then
        first, list, plain, top = frame_seqs(kinds, seqs)
      end
      local p = marks[producer]
      if p == nil then
        local was -- the stored seq before the call, as text (false: none)
        if top then
          was = call('SET', producer, n == 1 and seqs or int(top), 'PX', producer_ttl_ms, 'GET')
        else
          was = call('GET', producer)
        end
        -- Without a SET an existing key's expiry is renewed at the end (stored nil).
        local old = was and was + 0
        p = {cur = old or 0, top = old, text = was, stored = top}
        marks[producer] = p
        producers[#producers + 1] = producer
      end
      local cur = p.cur
      local added, dup = 0, 0
      if plain then
        -- Events only, seqs first .. first + n - 1: those above cur are new.
        local j = 1
        if cur >= first then
          j = cur - first + 2
          dup = math.min(j - 1, n)
        end
        for i = a + j - 1, a + n - 1 do
          call('XADD', events, '*', 'event', args[i])
        end
        if j <= n then
          added, cur = n - j + 1, first + n - 1
        end
      else
        for j = 1, n do
          local kind, payload = string.sub(kinds, j, j), args[a + j - 1]
          if kind == 'R' then
            call('XADD', rejected, '*', 'event', payload)
            recorded = true
          else
            local q = list and list[j] or first + j - 1
            if q > cur then
              cur = q
              if kind == 'e' then
                call('XADD', events, '*', 'event', payload)
                added = added + 1
              elseif kind == 'r' then
                call('XADD', rejected, '*', 'event', payload)
                recorded = true
              end
            elseif kind == 'e' then
              dup = dup + 1
            end
          end
        end
      end
      if cur ~= p.cur then
        p.cur, p.top = cur, cur
        p.text = n == 1 and seqs or nil -- the text of top, when it is at hand
      end
      if s and added > 0 then
        if not s.touched then
          s.touched = true
          touched[#touched + 1] = session
        end
        s.events = s.events + added
        s.last = now
      end
      stored = stored + added
      if backlog then
        backlog = backlog + added
      end
      out[o + 1], out[o + 2], out[o + 3] = added, dup, 0
      o = o + 3
    end
    a = a + n -- past its payloads
  end
  for _, key in ipairs(producers) do
    local p = marks[key]
    if p.top and p.top ~= p.stored then
      call('SET', key, p.text or int(p.top), 'PX', producer_ttl_ms)
    end
  end
  for _, key in ipairs(touched) do
    local s = sessions[key]
    if s then -- not ended later in the call
      call('HSET', key, 'events', int(s.events), 'last', now_text)
    end
  end
  -- The streams are trimmed once per call, as XADD's MAXLEN ~ would have left
  -- them (whole nodes from the head while more than maxlen remain; LIMIT 0:
  -- as many as that takes, as MAXLEN ~ on each XADD of the call would have).
  if group then
    trim_acknowledged(events, events_maxlen, group)
  elseif stored > 0 then
    call('XTRIM', events, 'MAXLEN', '~', events_maxlen, 'LIMIT', 0)
  end
  if recorded then
    call('XTRIM', rejected, 'MAXLEN', '~', rejected_maxlen, 'LIMIT', 0)
  end
  out[o + 1] = backlog or -1
  return out
end

-- A connection says hello (or renews its session after an idle or max end):
-- join the customer's open session, or open one with session_id and publish
-- start_record (its session.start). A carry above 0 is a stored seq
-- identify brings from another partition: the producer's high-water mark
-- here is raised to it, as if there were one key. Returns {session id,
-- resumed, acked}.
local function open(keys, args)
  local session, conns, live, due, events, producer, suppressed, aliases = unpack(keys)
  local uuid, member, session_id, start_record, heartbeat_ms, grace_ms, idle_ms, max_ms,
    events_maxlen, taken, end_record, carry, producer_ttl_ms, subject, alias, alias_ttl_ms =
    unpack(args)
  if redis.call('SISMEMBER', suppressed, subject) == 1 then
    -- A forgotten customer who asked to stay forgotten: nothing is registered,
    -- no session opened, nothing stored.
    return {'', 0, 0, 1}
  end
  if alias ~= '' then
    redis.call('SADD', aliases, alias)
    if tonumber(alias_ttl_ms) > 0 then
      redis.call('PEXPIRE', aliases, alias_ttl_ms)
    end
  end
  local now = now_ms()
  local grace, idle, maxd = tonumber(grace_ms), tonumber(idle_ms), tonumber(max_ms)
  local s = load_session(session)
  if s then
    local nconns = redis.call('SCARD', conns)
    local at, why = due_at(s.first, s.last, s.closed, nconns, grace, idle, maxd)
    if at <= now then
      -- Its end was due and no reaper has got to it yet: end it first.
      end_session(events, due, session, events_maxlen, uuid, s, why, now, taken, end_record)
      s = nil
    end
  end
  redis.call('SADD', conns, member)
  redis.call('ZADD', live, now + tonumber(heartbeat_ms), member)
  local sid, resumed = session_id, 0
  if s then
    sid, resumed = s.id, 1
    redis.call('HSET', session, 'closed', 0)
  else
    redis.call('HSET', session, 'id', sid, 'first', now, 'last', now, 'events', 0, 'seq', 1,
      'closed', 0)
    if takes(taken, 's') then
      append(events, events_maxlen, start_record)
    elseif takes(taken, 'q') then
      redis.call('HSET', session, 'quiet', 1)
    end
    redis.call('ZADD', due, math.min(now + idle, now + maxd), uuid)
  end
  local acked = redis.call('GET', producer) or '0'
  if tonumber(carry) > tonumber(acked) then
    acked = carry
    redis.call('SET', producer, acked, 'PX', producer_ttl_ms)
  end
  return {sid, resumed, acked, 0}
end

-- A connection ends (or leaves its customer for another with identify). The
-- producer key (the last) is optional: with it, its stored seq is returned, for
-- identify to carry to another partition. With an identify_record (the
-- client.identify of a move to another customer; '' for a close), the
-- session gets that event, and ends now (reason identify) if this was the
-- customer's last connection;
-- otherwise the last connection's close starts the grace period. With an
-- identify, the anonymous uuid left merges into the new customer when
-- may_merge allows it (identify_record then says merged); otherwise the
-- session gets refused_record, which says why. Returns {1 if the session
-- ended, the producer's stored seq (0 without its key), 1 if merged, 1 if
-- the customer had a session (0: nothing was stored, no merge decided)}.
-- Whether an anonymous uuid may merge into a customer (identify, Segment
-- alias), and why not. refused is the caller's reason ('' when the caller
-- allows it: the customer was proven by a token, or the site has no keys).
-- An anonymous uuid merges into one customer only, a uuid that has aliases
-- of its own is a customer (never an alias), and a forgotten one merges
-- nowhere. Returns (merged, reason).
local function may_merge(alias_key, own_aliases, suppressed, subject, to, refused)
  if refused ~= '' then
    return false, refused
  end
  local into = redis.call('GET', alias_key)
  if into and into ~= to then
    return false, 'the anonymous uuid is already merged into another customer'
  end
  if redis.call('EXISTS', own_aliases) == 1 then
    return false, 'the previous uuid has aliases of its own: a customer is never merged'
  end
  if redis.call('SISMEMBER', suppressed, subject) == 1 then
    return false, 'the previous uuid was forgotten'
  end
  return true, ''
end

-- Record a merge decided by may_merge: the alias key names its customer,
-- for ttl_ms (the site's retain_days: as long as the store keeps the merge;
-- 0: no expiry). A merge recorded again (the same customer) renews it.
local function record_merge(alias_key, to, ttl_ms)
  if tonumber(ttl_ms) > 0 then
    redis.call('SET', alias_key, to, 'PX', ttl_ms)
  else
    redis.call('SET', alias_key, to)
  end
end

local function leave(keys, args)
  local session, conns, live, due, events, alias_key, own_aliases, suppressed, producer =
    unpack(keys)
  local uuid, member, grace_ms, events_maxlen, taken, end_record, identify_record, refused_record,
    refused, subject, to, alias_ttl_ms = unpack(args)
  local now = now_ms()
  local stored = producer and (redis.call('GET', producer) or '0') or '0'
  redis.call('ZREM', live, member)
  redis.call('SREM', conns, member)
  local s = load_session(session)
  if not s then
    return {0, stored, 0, 0}
  end
  local identify = identify_record ~= ''
  local merged = 0
  if identify and takes(taken, 'i') then
    -- The merge is recorded in the same step as its client.identify, so the
    -- stream (and through it the store's aliases table) and Redis agree.
    local ok, why = may_merge(alias_key, own_aliases, suppressed, subject, to, refused)
    if ok then
      record_merge(alias_key, to, alias_ttl_ms)
      merged = 1
      server_event(events, session, events_maxlen, s.id, now, identify_record, {})
    else
      server_event(events, session, events_maxlen, s.id, now, refused_record,
        {[HOLE_REASON] = cjson.encode(why)})
    end
  end
  if redis.call('SCARD', conns) > 0 then
    return {0, stored, merged, 1}
  end
  if identify then
    end_session(events, due, session, events_maxlen, uuid, s, 'identify', now, taken, end_record)
    return {1, stored, merged, 1}
  end
  redis.call('HSET', session, 'closed', now)
  redis.call('ZADD', due, 'LT', now + tonumber(grace_ms), uuid)
  return {0, stored, merged, 1}
end

-- A merge without a connection (Segment alias, or identify with both ids):
-- decided and recorded as identify does, in the anonymous uuid's partition.
-- Returns {merged, reason}.
local function alias(keys, args)
  local alias_key, own_aliases, suppressed = unpack(keys)
  local subject, to, refused, alias_ttl_ms = unpack(args)
  local ok, why = may_merge(alias_key, own_aliases, suppressed, subject, to, refused)
  if ok then
    record_merge(alias_key, to, alias_ttl_ms)
    return {1, ''}
  end
  return {0, why}
end

-- Refresh the heartbeat deadlines of one process' connections of a site.
-- ARGV: the fixed arguments, then the members. A member that a reaper
-- already took for dead (Redis was unreachable longer than the ttl) is
-- registered again.
local function heartbeat(keys, args)
  local live = unpack(keys)
  local heartbeat_ms, site_prefix = unpack(args, 1, 2)
  local deadline = now_ms() + tonumber(heartbeat_ms)
  local back = 0
  for i = 3, #args do -- the members
    local m = args[i]
    if not redis.call('ZSCORE', live, m) then
      local uuid = string.match(m, '^[^:]*:[^:]*:(.*)$')
      if uuid then
        redis.call('SADD', site_prefix .. 'conns:' .. uuid, m)
        local skey = site_prefix .. 'sess:' .. uuid
        if redis.call('EXISTS', skey) == 1 then
          redis.call('HSET', skey, 'closed', 0)
        end
        back = back + 1
      end
    end
    redis.call('ZADD', live, deadline, m)
  end
  return back
end

-- Reap one site: connections whose heartbeat lapsed (their process died)
-- count as closed at their deadline; sessions whose end is due get their one
-- session.end. At most limit of each per call. Returns {dead connections,
-- sessions ended}.
local function reap(keys, args)
  local live, due, events = unpack(keys)
  local site_prefix, grace_ms, idle_ms, max_ms, limit, events_maxlen, taken, end_record =
    unpack(args)
  local now = now_ms()
  local grace, idle, maxd = tonumber(grace_ms), tonumber(idle_ms), tonumber(max_ms)
  local dead = redis.call('ZRANGEBYSCORE', live, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #dead, 2 do
    local m, deadline = dead[i], tonumber(dead[i + 1])
    redis.call('ZREM', live, m)
    local uuid = string.match(m, '^[^:]*:[^:]*:(.*)$')
    if uuid then
      local ckey = site_prefix .. 'conns:' .. uuid
      redis.call('SREM', ckey, m)
      local skey = site_prefix .. 'sess:' .. uuid
      if redis.call('SCARD', ckey) == 0 and redis.call('EXISTS', skey) == 1 then
        redis.call('HSET', skey, 'closed', deadline)
        redis.call('ZADD', due, 'LT', deadline + grace, uuid)
      end
    end
  end
  local ended = 0
  local found = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)
  for _, uuid in ipairs(found) do
    local skey = site_prefix .. 'sess:' .. uuid
    local s = load_session(skey)
    if not s then
      redis.call('ZREM', due, uuid)
    else
      local nconns = redis.call('SCARD', site_prefix .. 'conns:' .. uuid)
      local at, why = due_at(s.first, s.last, s.closed, nconns, grace, idle, maxd)
      if at <= now then
        end_session(events, due, skey, events_maxlen, uuid, s, why, now, taken, end_record)
        ended = ended + 1
      else
        redis.call('ZADD', due, at, uuid)
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
redis.register_function('ew_VERSION_alias', alias)
