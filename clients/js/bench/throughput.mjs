// Throughput of the SDK from one Node process to one server: events/s acked, 100-event frames as the SDK
// forms them (batchSize 100, 8 frames in flight), then a check of the stream: every seq once.
// usage: node bench/throughput.mjs --url WS_URL --redis-port P [--duration 8] [--warmup 1]
//          [--encoding msgpack|json] [--storage memory|file] [--server-pid N] [--redis-pid N]
// Prints one JSON line (scripts/bench --sdk reads it).
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { Eventwire, fileStorage, memoryStorage } from "../dist/esm/index.js";

const { values: a } = parseArgs({
  options: {
    url: { type: "string" },
    "redis-port": { type: "string" },
    duration: { type: "string", default: "8" },
    warmup: { type: "string", default: "1" },
    encoding: { type: "string", default: "msgpack" },
    storage: { type: "string", default: "memory" },
    "server-pid": { type: "string" },
    "redis-pid": { type: "string" },
    backlog: { type: "string", default: "4000" },
    window: { type: "string", default: "8" },
  },
});
const site = new URL(a.url).pathname.split("/").pop();
const EVENTS = [
  ["page.visit", "Visited page Home - Example Shop",
    { url: "https://shop.example.com/?utm_source=newsletter&utm_campaign=c42", title: "Home - Example Shop", referrer: "https://www.google.com/" }],
  ["product.view", "Blue Running Shoes",
    { url: "https://shop.example.com/p/blue-running-shoes-48213", title: "Blue Running Shoes - Example Shop", product_id: "48213", category: "shoes", price: 89.95, currency: "EUR" }],
  ["cart.add", "Merino Wool Sweater",
    { url: "https://shop.example.com/p/merino-wool-sweater-19342", title: "Merino Wool Sweater - Example Shop", product_id: "19342", category: "knitwear", price: 129.5, currency: "EUR", qty: 2 }],
  ["search.query", "running shoes",
    { url: "https://shop.example.com/search?q=running+shoes", title: "Search: running shoes", query: "running shoes", results: 117 }],
];

const ticks = 100; // USER_HZ on Linux
function pidCpu(pid) {
  if (!pid) return null;
  try {
    const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
    return (Number(f[11]) + Number(f[12])) / ticks;
  } catch {
    return null;
  }
}
function machineBusy() {
  const f = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / ticks; // user nice system irq softirq steal
}
function cpuSnapshot() {
  const u = process.cpuUsage();
  return { t: performance.now() / 1000, self: (u.user + u.system) / 1e6, server: pidCpu(a["server-pid"]), redis: pidCpu(a["redis-pid"]), busy: machineBusy() };
}

const dir = a.storage === "file" ? mkdtempSync(join(tmpdir(), "ew-sdk-bench-")) : null;
const ew = new Eventwire({
  url: a.url,
  encoding: a.encoding,
  storage: dir ? fileStorage(dir) : memoryStorage(),
  maxQueue: { events: 1_000_000, bytes: 1_000_000_000 },
  maxInflight: Number(a.window),
});
const backlog = Number(a.backlog);
let feeding = true;
let n = 0;
function feed() {
  if (!feeding) return;
  let room = backlog - ew.stats().queued;
  while (room-- > 0) {
    const [action, label, params] = EVENTS[n++ % EVENTS.length];
    ew.track(action, params, label);
  }
  setImmediate(feed);
}
await ew.flush();
feed();
await new Promise((r) => setTimeout(r, Number(a.warmup) * 1000));
const s0 = ew.stats();
const c0 = cpuSnapshot();
await new Promise((r) => setTimeout(r, Number(a.duration) * 1000));
const s1 = ew.stats();
const c1 = cpuSnapshot();
feeding = false;
let flushed = true;
await ew.flush({ timeout: 60_000 }).catch(() => (flushed = false));
const final = ew.stats();
await ew.close({ timeout: 1000 });
if (dir) rmSync(dir, { recursive: true, force: true });

// Every seq 1..N of this producer exactly once in the stream.
const key = `ew:{${site}}:events`;
const seen = new Uint8Array(final.seq + 1);
let stored = 0;
let duplicate = 0;
let unexpected = 0;
let start = "-";
for (;;) {
  const r = spawnSync("redis-cli", ["-p", a["redis-port"], "--raw", "XRANGE", key, start, "+", "COUNT", "20000"], { encoding: "utf8", maxBuffer: 1 << 30 });
  const lines = r.stdout.split("\n");
  let last = null;
  let got = 0;
  for (let i = 0; i + 2 < lines.length; i += 3) {
    last = lines[i];
    got++;
    const e = JSON.parse(lines[i + 2]);
    if (e.producer !== final.producer) continue;
    if (e.seq < 1 || e.seq > final.seq) unexpected++;
    else if (seen[e.seq]) duplicate++;
    else (seen[e.seq] = 1), stored++;
  }
  if (got < 20000 || !last) break;
  const [ms, sq] = last.split("-");
  start = `${ms}-${Number(sq) + 1}`;
}
const wall = c1.t - c0.t;
const pct = (x0, x1) => (x0 === null || x1 === null ? null : Math.round((100 * (x1 - x0)) / wall));
const self = pct(c0.self, c1.self);
const server = pct(c0.server, c1.server);
const redis = pct(c0.redis, c1.redis);
const busy = pct(c0.busy, c1.busy);
const result = {
  client: "eventwire-js (Node " + process.versions.node + ")",
  encoding: a.encoding,
  storage: a.storage,
  B: 100,
  W: Number(a.window),
  events_per_s: Math.round((s1.accepted - s0.accepted) / wall),
  client_cpu: self,
  server_cpu: server,
  redis_cpu: redis,
  other_cpu: busy === null ? null : Math.max(0, busy - (self ?? 0) - (server ?? 0) - (redis ?? 0)),
  tracked: final.seq,
  nacks: final.nacks,
  reconnects: final.connects - 1,
  flushed,
  verify: { stored, missing: final.seq - stored, duplicate, unexpected },
  ok: flushed && stored === final.seq && duplicate === 0 && unexpected === 0,
};
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
