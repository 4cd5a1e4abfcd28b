'use strict';
// The null server of the benchmark: it says welcome to hello and acks every
// track frame at once (all events accepted), validating and storing nothing,
// with no Redis. Against it the load generators measure themselves: run
// bench/loadgen.py with --verify none, and scripts/bench --peers --half-rate
// uses it for the open-loop generator's own latency floor.
// Env: PORT (8790), HOST (127.0.0.1).
const { WebSocketServer } = require('ws');

const PORT = parseInt(process.env.PORT || '8790', 10);
const HOST = process.env.HOST || '127.0.0.1';
const wss = new WebSocketServer({
  host: HOST,
  port: PORT,
  perMessageDeflate: false,
  maxPayload: 256 << 10,
  handleProtocols: (p) => (p.has('eventwire.v1.json') ? 'eventwire.v1.json' : false),
});
wss.on('connection', (sock) => {
  sock.on('message', (data) => {
    const msg = JSON.parse(data);
    if (msg.type === 'hello') {
      sock.send(JSON.stringify({ type: 'welcome', session: 's-null', resumed: false, acked: 0,
        server_time: Date.now(), max_batch: 500 }));
    } else {
      const ev = msg.events;
      sock.send(`{"type":"ack","seq":${ev[ev.length - 1].seq},"accepted":${ev.length},"duplicate":0,"rejected":[]}`);
    }
  });
  sock.on('error', () => {});
});
wss.on('listening', () => console.log(`ack_only listening on ws://${HOST}:${PORT}/`));
process.on('SIGTERM', () => process.exit(0));
