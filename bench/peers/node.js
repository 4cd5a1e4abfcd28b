'use strict';
// The benchmark row `node`: what an engineer would pick instead of eventwire,
// Node.js + ws + ioredis speaking the protocol subset of common.js, without
// the per-producer de-duplication step. Each accepted event is one
// XADD ew:{site}:events MAXLEN ~ 1000000 * event <json>; ioredis'
// auto-pipelining coalesces the XADDs issued in one tick into one write; the
// ack goes out once the frame's XADDs have resolved. welcome.acked and
// duplicate are always 0 (node_dedup.js does the same job as eventwire).
// Env: see common.js.
const { startPeer, cfg } = require('./common');

startPeer('node', {
  welcomeAcked: () => 0,
  publish(redis, k, producer, events) {
    const p = events.map((e) => redis.xadd(k.events, 'MAXLEN', '~', cfg.streamMaxlen, '*', 'event', e.json));
    return Promise.all(p).then(() => ({ accepted: events.length, duplicate: 0 }));
  },
});
