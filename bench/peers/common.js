'use strict';
// What the Node.js reference peers of the benchmark share (node.js and
// node_dedup.js): the subset of eventwire's v1 protocol (docs/protocol.md)
// that bench/loadgen.py uses, done the way a careful Node engineer would:
// route /v1/track/{site}, check Origin, negotiate the subprotocol
// (eventwire.v1.json or eventwire.v1.msgpack), hello -> welcome, track ->
// validate and enrich -> publish (the peer's own step) -> ack, acks in frame
// order, nack when Redis fails. Not done: tokens, identify, session events,
// site rules beyond origins. The packages come from bench/node_modules
// (`npm ci` in bench/, which scripts/bench --peers runs).
//
// Env: PORT (8790), HOST (127.0.0.1), REDIS_URL (redis://127.0.0.1:6390/0),
//      SITES (bench; comma list), ORIGINS (http://localhost; comma list),
//      ALLOW_NO_ORIGIN (1), KEY_PREFIX (ew), STREAM_MAXLEN (1000000),
//      PRODUCER_TTL (604800 s; node_dedup.js only).
const http = require('http');
const { WebSocketServer } = require('ws');
const Redis = require('ioredis');
const { Packr, Unpackr } = require('msgpackr');

const env = process.env;
const cfg = {
  port: parseInt(env.PORT || '8790', 10),
  host: env.HOST || '127.0.0.1',
  redisUrl: env.REDIS_URL || 'redis://127.0.0.1:6390/0',
  sites: new Set((env.SITES || 'bench').split(',').filter(Boolean)),
  origins: new Set((env.ORIGINS || 'http://localhost').split(',').filter(Boolean)),
  allowNoOrigin: (env.ALLOW_NO_ORIGIN || '1') === '1',
  keyPrefix: env.KEY_PREFIX || 'ew',
  streamMaxlen: env.STREAM_MAXLEN || '1000000',
  producerTtl: env.PRODUCER_TTL || String(7 * 24 * 3600),
  maxBatch: 500,
  maxFrameBytes: 256 * 1024,
  maxEventBytes: 32 * 1024,
  maxClockSkewMs: 5 * 60 * 1000,
  maxEventAgeMs: 7 * 24 * 3600 * 1000,
  helloTimeoutMs: 5000,
};

const JSON_P = 'eventwire.v1.json';
const MSGPACK_P = 'eventwire.v1.msgpack';
const ACTION_RE = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$/;
const UUID_RE = /^[A-Za-z0-9._:-]{1,64}$/;
const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'auto' });

const keys = (site) => ({
  events: `${cfg.keyPrefix}:{${site}}:events`,
  rejected: `${cfg.keyPrefix}:{${site}}:rejected`,
  producer: (p) => `${cfg.keyPrefix}:{${site}}:producer:${p}`,
});

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function defaultLabel(action, params) {
  if (action === 'page.visit') return `Visited page ${params.title ?? params.url}`;
  if (action === 'session.start') return 'Started session';
  if (action === 'session.end') return 'Session end';
  return action;
}

// Validate one wire event and build the stored event's JSON (docs/protocol.md).
// Returns {seq, json} or {code, detail}.
function buildEvent(c, e, received) {
  if (!isObject(e)) return { code: 'invalid', detail: 'event must be an object' };
  const seq = e.seq;
  if (!Number.isSafeInteger(seq) || seq < 1) return { code: 'invalid', detail: 'seq must be an integer >= 1' };
  const action = e.action;
  if (typeof action !== 'string' || action.length < 3 || action.length > 32 || !ACTION_RE.test(action)) {
    return { code: 'invalid_action', detail: 'action must be context.activity, 3-32 chars' };
  }
  // optional fields: absent or null means the default
  let params = e.params;
  if (params === undefined || params === null) params = {};
  else if (!isObject(params)) return { code: 'invalid', detail: 'params must be an object' };
  let label = e.label;
  if (label === undefined || label === null) label = defaultLabel(action, params);
  else if (typeof label !== 'string' || label.length > 256) {
    return { code: 'invalid', detail: 'label must be a string of at most 256 chars' };
  }
  let time = e.time;
  let originalTime;
  if (time === undefined || time === null) time = received;
  else if (!Number.isSafeInteger(time)) return { code: 'invalid', detail: 'time must be integer milliseconds' };
  else if (time > received + cfg.maxClockSkewMs) {
    originalTime = time;
    time = received;
  } else if (time < received - cfg.maxEventAgeMs) return { code: 'too_old', detail: 'event older than 7 days' };
  if (action === 'page.visit' && typeof params.url !== 'string') {
    return { code: 'missing_param', detail: 'page.visit requires params.url' };
  }
  const stored = {
    site: c.site, uuid: c.uuid, session: c.session, producer: c.producer, seq, action, label, time, received, params,
  };
  if (originalTime !== undefined) stored.original_time = originalTime;
  const json = JSON.stringify(stored);
  // chars <= bytes <= 3 * chars (UTF-16 units): measure bytes only when it can matter
  if (json.length > cfg.maxEventBytes ||
      (json.length * 3 > cfg.maxEventBytes && Buffer.byteLength(json) > cfg.maxEventBytes)) {
    return { code: 'too_large', detail: `encoded event over ${cfg.maxEventBytes} bytes` };
  }
  return { seq, json };
}

// Start a peer. hooks:
//   welcomeAcked(redis, keys, producer) -> Promise<number>   (welcome.acked)
//   publish(redis, keys, producer, events[{seq, json}]) -> Promise<{accepted, duplicate}>
function startPeer(name, hooks) {
  const redis = new Redis(cfg.redisUrl, {
    enableAutoPipelining: true, // coalesce the commands issued in one tick into one write
    maxRetriesPerRequest: 1,
  });
  let lastRedisError = 0;
  redis.on('error', (err) => { // ioredis reconnects by itself; log at most once a second
    if (Date.now() - lastRedisError > 1000) console.error(`redis: ${err.message}`);
    lastRedisError = Date.now();
  });
  if (hooks.setup) hooks.setup(redis);

  const wss = new WebSocketServer({
    noServer: true,
    perMessageDeflate: false,
    maxPayload: cfg.maxFrameBytes, // larger: ws closes 1009
    handleProtocols: (protocols) => {
      for (const p of protocols) if (p === JSON_P || p === MSGPACK_P) return p;
      return false;
    },
  });

  const server = http.createServer((req, res) => {
    res.writeHead(426, { 'Content-Type': 'text/plain' });
    res.end('WebSocket only: /v1/track/{site}\n');
  });
  const refuse = (socket, code, text) => {
    socket.end(`HTTP/1.1 ${code} ${text}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
  };
  server.on('upgrade', (req, socket, head) => {
    const m = /^\/v1\/track\/([^/?#]+)(?:\?.*)?$/.exec(req.url);
    const site = m && decodeURIComponent(m[1]);
    if (!site || !cfg.sites.has(site)) return refuse(socket, 404, 'Not Found');
    const origin = req.headers.origin;
    if (origin === undefined ? !cfg.allowNoOrigin : !cfg.origins.has(origin)) return refuse(socket, 403, 'Forbidden');
    wss.handleUpgrade(req, socket, head, (ws) => onConnection(ws, site));
  });

  function onConnection(ws, site) {
    const binary = ws.protocol === MSGPACK_P;
    const encode = binary ? (o) => packr.pack(o) : (o) => JSON.stringify(o);
    const decode = binary ? (d) => unpackr.unpack(d) : (d) => JSON.parse(d);
    const k = keys(site);
    const c = { site, uuid: null, session: null, producer: null };
    let chain = Promise.resolve(); // acks leave in frame order
    const send = (o) => { if (ws.readyState === 1) ws.send(encode(o), { binary }); };
    const fatal = (closeCode, code, detail) => {
      send({ type: 'error', code, detail });
      ws.close(closeCode, code);
    };
    const helloTimer = setTimeout(() => fatal(1008, 'hello_timeout', 'no hello within 5 s'), cfg.helloTimeoutMs);

    function storeRejected(records) {
      const p = [];
      for (const r of records) {
        p.push(redis.xadd(k.rejected, 'MAXLEN', '~', cfg.streamMaxlen, '*', 'event', JSON.stringify(r)));
      }
      return Promise.all(p);
    }

    function onHello(msg) {
      const { uuid, producer } = msg;
      if (typeof uuid !== 'string' || !UUID_RE.test(uuid) ||
          typeof producer !== 'string' || producer.length < 8 || producer.length > 64) {
        return fatal(1008, 'bad_hello', 'hello needs uuid (1-64 [A-Za-z0-9._:-]) and producer (8-64 chars)');
      }
      clearTimeout(helloTimer);
      Object.assign(c, { uuid, producer, session: `s-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}` });
      const acked = hooks.welcomeAcked(redis, k, producer);
      chain = chain.then(() => acked).then(
        (n) => send({ type: 'welcome', session: c.session, resumed: false, acked: n, server_time: Date.now(), max_batch: cfg.maxBatch }),
        () => fatal(1011, 'unavailable', 'redis unavailable'),
      );
    }

    function onTrack(msg) {
      const events = msg.events;
      if (!Array.isArray(events) || events.length < 1 || events.length > cfg.maxBatch) {
        return fatal(1008, 'invalid', `track needs 1..${cfg.maxBatch} events`);
      }
      const received = Date.now();
      const accepted = [];
      const rejected = [];
      const records = [];
      let maxSeq = 0;
      for (const e of events) {
        const seq = isObject(e) && Number.isSafeInteger(e.seq) ? e.seq : null;
        if (seq !== null && seq > maxSeq) maxSeq = seq;
        const r = buildEvent(c, e, received);
        if (r.json !== undefined) accepted.push(r);
        else {
          rejected.push({ seq, code: r.code, detail: r.detail });
          records.push({ site, uuid: c.uuid, producer: c.producer, seq, code: r.code, detail: r.detail, received,
            raw: JSON.stringify(e === undefined ? null : e).slice(0, 4096) });
        }
      }
      const stored = accepted.length ? hooks.publish(redis, k, c.producer, accepted) : Promise.resolve({ accepted: 0, duplicate: 0 });
      const done = records.length ? Promise.all([stored, storeRejected(records)]).then(([s]) => s) : stored;
      chain = chain.then(() => done).then(
        (s) => send({ type: 'ack', seq: maxSeq, accepted: s.accepted, duplicate: s.duplicate, rejected }),
        () => send({ type: 'nack', seq: maxSeq, code: 'unavailable', retry_after_ms: 500 }),
      );
    }

    ws.on('message', (data, isBinary) => {
      let msg;
      try {
        if (isBinary !== binary) throw new Error('wrong frame type for the subprotocol');
        msg = decode(data);
        if (!isObject(msg)) throw new Error('message must be an object');
      } catch (err) {
        storeRejected([{ site, uuid: c.uuid, producer: c.producer, seq: null, code: 'invalid', detail: String(err.message),
          received: Date.now(), raw: String(data).slice(0, 4096) }]).catch(() => {});
        return fatal(1007, 'invalid', 'frame not decodable');
      }
      if (c.producer === null) {
        if (msg.type !== 'hello') return fatal(1008, 'bad_hello', 'first message must be hello');
        return onHello(msg);
      }
      if (msg.type === 'track') return onTrack(msg);
      return fatal(1008, 'unsupported', `message type ${JSON.stringify(msg.type)} not supported by this peer`);
    });
    ws.on('close', () => clearTimeout(helloTimer));
    ws.on('error', () => {});
  }

  server.listen(cfg.port, cfg.host, () => {
    console.log(`${name} listening on ws://${cfg.host}:${cfg.port}/v1/track/{${[...cfg.sites].join(',')}} ` +
      `redis=${cfg.redisUrl} stream=${keys([...cfg.sites][0]).events}`);
  });

  function shutdown() {
    wss.close();
    server.close();
    redis.quit().finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 1000).unref();
  }
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

module.exports = { startPeer, cfg };
