// Delivery through a killed app and a restarted server, against a real eventwire serve and Redis.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { Eventwire, fileStorage, memoryStorage } from "../dist/esm/index.js";
import { Redis, Server, UNIT, tempDir, until } from "./harness.mjs";

const PRODUCER = join(dirname(fileURLToPath(import.meta.url)), "fixtures/producer.mjs");
let redis;
let server;

before(async () => {
  redis = await new Redis().start();
  server = await new Server(redis).start(0);
});
after(async () => {
  await server?.dispose();
  await redis?.stop();
});

function seqsOf(events) {
  return events.map((e) => e.seq);
}

function range(lo, hi) {
  return Array.from({ length: hi - lo + 1 }, (_, i) => lo + i);
}

function runProducer(args) {
  const child = spawn(process.execPath, [PRODUCER, ...args], { stdio: ["ignore", "pipe", "inherit"] });
  const lines = createInterface({ input: child.stdout });
  const first = new Promise((ok, fail) => {
    lines.once("line", (line) => ok(JSON.parse(line)));
    child.once("exit", (code) => fail(new Error(`producer exited ${code} before printing`)));
  });
  return { child, first };
}

test("an app SIGKILLed mid-stream and started again delivers every seq exactly once", async () => {
  const dir = tempDir("ew-js-kill-");
  try {
    const url = server.url("slow"); // rate-limited: the stream takes long enough to be cut, and nacks happen
    const one = runProducer(["track", dir, url, "1000"]);
    const { saved, producer } = await one.first;
    assert.equal(saved, 1000);
    await until(() => redis.producerEvents(producer, "slow").length >= 100, 10_000 * UNIT, "a first part of the stream");
    one.child.kill("SIGKILL");
    await new Promise((ok) => one.child.once("exit", ok));
    const atKill = redis.producerEvents(producer, "slow").length;
    assert.ok(atKill < 1000, `the kill came after the whole stream (${atKill} stored)`);

    const two = runProducer(["flush", dir, url]);
    const stats = await two.first;
    assert.equal(stats.producer, producer, "the producer id survived the kill");
    assert.equal(stats.seq, 1000, "the next seq survived the kill");
    assert.equal(stats.queued, 0);
    const events = redis.producerEvents(producer, "slow");
    assert.deepEqual(seqsOf(events), range(1, 1000), "every seq exactly once, in order");
    assert.deepEqual(
      events.map((e) => e.params.i),
      range(1, 1000),
      "each seq carries its own event",
    );
    assert.deepEqual(readdirSync(dir), ["meta"], "acked chunks are removed from the storage");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("events tracked while the server is down are delivered once it is back; token() is asked on each connect", async () => {
  const own = await new Server(redis).start(0);
  let tokenCalls = 0;
  const statuses = [];
  const ew = new Eventwire({
    url: own.url(),
    storage: memoryStorage(),
    encoding: "json",
    token: async () => {
      tokenCalls++;
      return undefined;
    },
    backoff: { baseMs: 50, maxMs: 300 },
  });
  ew.on("status", (s) => statuses.push(s));
  try {
    for (let i = 0; i < 50; i++) ew.track("product.view", { sku: `B-${i}` });
    await ew.flush({ timeout: 10_000 * UNIT });
    assert.equal(tokenCalls, 1);
    await own.stop();
    for (let i = 50; i < 100; i++) ew.track("product.view", { sku: `B-${i}` });
    await until(() => statuses.includes("backoff"), 10_000 * UNIT, "backoff");
    assert.equal(ew.stats().queued, 50, "the events wait in the queue");
    await own.start(); // the same port
    await ew.flush({ timeout: 15_000 * UNIT });
    assert.ok(tokenCalls >= 2, `token() asked again before the reconnect (${tokenCalls})`);
    const events = redis.producerEvents(ew.stats().producer);
    assert.deepEqual(seqsOf(events), range(1, 100));
    assert.ok(ew.stats().connects >= 2);
    assert.deepEqual(statuses.slice(0, 2), ["connecting", "open"]);
  } finally {
    await ew.close();
    await own.dispose();
  }
});

test("fileStorage keeps the producer, the uuid and the seqs across restarts of the client", async () => {
  const dir = tempDir("ew-js-file-");
  try {
    const first = new Eventwire({ url: server.url(), storage: fileStorage(dir, { fsync: false }) });
    first.track("product.view", { sku: "C-1" });
    await first.close();
    const a = first.stats();
    const second = new Eventwire({ url: server.url(), storage: fileStorage(dir, { fsync: false }) });
    second.track("product.view", { sku: "C-2" });
    await second.close();
    const b = second.stats();
    assert.equal(b.producer, a.producer);
    assert.equal(b.uuid, a.uuid);
    assert.equal(b.seq, 2);
    const events = redis.producerEvents(a.producer);
    assert.deepEqual(seqsOf(events), [1, 2]);
    assert.ok(events.every((e) => e.uuid === a.uuid));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
