'use strict';
// The benchmark row `node-dedup`: node.js plus the per-producer exactly-once
// step, so it does the same job as eventwire. One Lua script per track frame
// (EVALSHA; ioredis falls back to EVAL on NOSCRIPT) over the stream and the
// producer key, which share the {site} hash tag: it skips the events whose
// seq is at most the producer's stored seq (counted duplicate), XADDs the
// rest, and stores the new highest seq with a TTL (PRODUCER_TTL, 7 days).
// welcome.acked is read from that key.
// Env: see common.js.
const { startPeer, cfg } = require('./common');

// KEYS[1] stream, KEYS[2] producer key; ARGV[1] maxlen, ARGV[2] ttl (s),
// then seq, event pairs in frame order. Returns {added, duplicate}.
const PUBLISH_LUA = `
local top = redis.call('GET', KEYS[2])
local cur = tonumber(top or '0')
local added, dup = 0, 0
for i = 3, #ARGV, 2 do
  local s = tonumber(ARGV[i])
  if s > cur then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[i + 1])
    cur = s
    top = ARGV[i]
    added = added + 1
  else
    dup = dup + 1
  end
end
if top then redis.call('SET', KEYS[2], top, 'EX', ARGV[2]) end
return {added, dup}
`;

startPeer('node-dedup', {
  setup(redis) {
    redis.defineCommand('ewPublish', { numberOfKeys: 2, lua: PUBLISH_LUA });
  },
  welcomeAcked(redis, k, producer) {
    return redis.get(k.producer(producer)).then((v) => (v === null ? 0 : Number(v)));
  },
  publish(redis, k, producer, events) {
    const args = [k.events, k.producer(producer), cfg.streamMaxlen, cfg.producerTtl];
    for (const e of events) args.push(e.seq, e.json);
    return redis.ewPublish(...args).then(([accepted, duplicate]) => ({ accepted, duplicate }));
  },
});
