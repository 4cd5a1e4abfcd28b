// Delivery rules against a real eventwire serve and Redis: encodings, rejections, the bound, identify.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Eventwire, memoryStorage } from "../dist/esm/index.js";
import { UNIT, jwt, startStack, until } from "./harness.mjs";

let stack;
before(async () => {
  stack = await startStack();
});
after(async () => {
  await stack?.stop();
});

const FLUSH = { timeout: 10_000 * UNIT };

for (const encoding of ["msgpack", "json"]) {
  test(`${encoding}: 250 events arrive once each, in order, with their params and labels`, async () => {
    const ew = new Eventwire({ url: stack.server.url(), storage: memoryStorage(), encoding, uuid: `cust-${encoding}` });
    const params = { sku: "A-1", price: 12.5, big: 2 ** 40, nested: { tags: ["x", "ü"] }, none: null };
    for (let i = 1; i <= 250; i++) ew.track("product.view", { ...params, i }, `Viewed ${i}`);
    await ew.flush(FLUSH);
    const stats = ew.stats();
    await ew.close();
    const events = stack.redis.producerEvents(stats.producer);
    assert.deepEqual(events.map((e) => e.seq), Array.from({ length: 250 }, (_, i) => i + 1));
    assert.deepEqual(events[6].params, { ...params, i: 7 });
    assert.equal(events[6].label, "Viewed 7");
    assert.equal(events[6].uuid, `cust-${encoding}`);
    assert.equal(stats.accepted, 250);
    assert.equal(stats.queued, 0);
  });
}

test("a rejected event is reported once, counted, and never resent", async () => {
  const ew = new Eventwire({ url: stack.server.url("strict"), storage: memoryStorage(), encoding: "json" });
  const reports = [];
  ew.on("rejected", (list) => reports.push(...list));
  ew.track("product.view", { sku: "A-1" });
  ew.track("debug.dump", { x: 1 });
  ew.track("product.view", { sku: "A-2" });
  await ew.flush(FLUSH);
  assert.deepEqual(reports, [{ seq: 2, code: "denied", detail: "debug.dump is not taken by this site", action: "debug.dump" }]);
  assert.equal(ew.stats().rejected, 1);
  assert.equal(ew.stats().queued, 0);
  await ew.close();
  assert.deepEqual(stack.redis.producerEvents(ew.stats().producer, "strict").map((e) => e.seq), [1, 3]);
});

test("a full queue drops the oldest events, counts them, and says so", async () => {
  const ew = new Eventwire({ url: stack.server.url(), storage: memoryStorage(), maxQueue: { events: 10 } });
  const reported = [];
  ew.on("dropped", (n) => reported.push(n));
  // Tracked before the storage is read and before any connection: nothing is in flight.
  for (let i = 1; i <= 25; i++) ew.track("product.view", { i });
  await ew.flush(FLUSH);
  assert.equal(ew.stats().dropped, 15);
  assert.equal(reported.reduce((a, b) => a + b, 0), 15);
  await ew.close();
  const events = stack.redis.producerEvents(ew.stats().producer);
  assert.deepEqual(events.map((e) => e.params.i), Array.from({ length: 10 }, (_, i) => i + 16));
});

test("the byte bound of the queue drops too", async () => {
  const ew = new Eventwire({ url: stack.server.url(), storage: memoryStorage(), maxQueue: { bytes: 2000 } });
  for (let i = 1; i <= 40; i++) ew.track("product.view", { i, pad: "x".repeat(100) });
  await ew.flush(FLUSH);
  const { dropped } = ew.stats();
  await ew.close();
  assert.ok(dropped > 20 && dropped < 40, `dropped ${dropped}`);
  assert.equal(stack.redis.producerEvents(ew.stats().producer).length, 40 - dropped);
});

test("identify delivers the earlier events for the previous customer first; reset gives a new anonymous uuid", async () => {
  const ew = new Eventwire({ url: stack.server.url(), storage: memoryStorage(), uuid: "anon-1" });
  ew.track("product.view", { n: 1 });
  ew.track("product.view", { n: 2 });
  const identified = ew.identify("customer-42");
  ew.track("cart.add", { n: 3 });
  await identified;
  assert.equal(ew.stats().uuid, "customer-42");
  await ew.reset();
  const anon = ew.stats().uuid;
  assert.match(anon, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  ew.track("product.view", { n: 4 });
  await ew.flush(FLUSH);
  await ew.close();
  const mine = stack.redis.producerEvents(ew.stats().producer);
  assert.deepEqual(
    mine.map((e) => [e.params.n, e.uuid]),
    [[1, "anon-1"], [2, "anon-1"], [3, "customer-42"], [4, anon]],
  );
  const switches = stack.redis.events().filter((e) => e.action === "client.identify");
  assert.deepEqual(
    switches.map((e) => e.params.previous_uuid).slice(-2),
    ["anon-1", "customer-42"],
  );
  // The log-in merges the anonymous history; reset() (a log-out) never merges.
  assert.deepEqual(
    switches.slice(-2).map((e) => [e.params.merged, e.params.reason]),
    [[true, undefined], [false, "the client asked not to merge (a log-out or reset)"]],
  );
  await assert.rejects(ew.identify("not a uuid!"), TypeError);
});

test("bad input is refused at track(), not on the wire", async () => {
  const ew = new Eventwire({ url: stack.server.url(), storage: memoryStorage() });
  assert.throws(() => ew.track(42), TypeError);
  assert.throws(() => ew.track("product.view", { n: 10n }), TypeError);
  const cycle = {};
  cycle.self = cycle;
  assert.throws(() => ew.track("product.view", cycle), TypeError);
  assert.throws(() => ew.track("product.view", { pad: "x".repeat(300_000) }), RangeError);
  assert.throws(() => new Eventwire({ url: "http://x" }), TypeError);
  assert.throws(() => new Eventwire({ url: stack.server.url(), encoding: "xml" }), TypeError);
  await ew.close();
  assert.equal(ew.stats().seq, 0);
});

test("nacks (rate limited) are waited out and resent from the first nacked seq", async () => {
  const ew = new Eventwire({ url: stack.server.url("slow"), storage: memoryStorage() });
  for (let i = 1; i <= 500; i++) ew.track("product.view", { i });
  await ew.flush(FLUSH);
  const stats = ew.stats();
  await ew.close();
  assert.ok(stats.nacks > 0, "the site's rate limit nacked some frames");
  assert.deepEqual(
    stack.redis.producerEvents(stats.producer, "slow").map((e) => e.seq),
    Array.from({ length: 500 }, (_, i) => i + 1),
  );
});

test("flush with a timeout rejects while the server is unreachable; the events stay queued", async () => {
  const ew = new Eventwire({ url: "ws://127.0.0.1:1/v1/track/app", storage: memoryStorage(), backoff: { baseMs: 20, maxMs: 50 } });
  const statuses = [];
  ew.on("status", (s) => statuses.push(s));
  ew.track("product.view", { n: 1 });
  await assert.rejects(ew.flush({ timeout: 300 }), /timed out/);
  await until(() => statuses.includes("backoff"));
  assert.equal(ew.stats().queued, 1);
  await ew.close({ timeout: 10 });
  assert.equal(ew.stats().status, "offline");
  await assert.rejects(ew.flush(), /closed/);
  assert.throws(() => ew.track("product.view"), /after close/);
});

test("a token site: token() is asked again after an expired token is refused; identify's token proves the new customer", async () => {
  const asked = [];
  const ew = new Eventwire({
    url: stack.server.url("secure"),
    storage: memoryStorage(),
    uuid: "cust-a",
    backoff: { baseMs: 20, maxMs: 100 },
    // The first token has expired: the server closes 1008 and the SDK asks again.
    token: (uuid) => (asked.push(uuid), jwt(uuid, "secure", asked.length === 1 ? -3600 : 600)),
  });
  const errors = [];
  ew.on("error", (e) => errors.push(e.code));
  ew.track("form.submit", { form: "login" });
  await ew.flush(FLUSH);
  assert.ok(asked.length >= 2, `token() asked ${asked.length} times`);
  assert.ok(asked.every((u) => u === "cust-a"));
  assert.ok(errors.includes("unauthorized"), `errors: ${errors}`);
  await ew.identify("cust-b", jwt("cust-b"));
  ew.track("form.submit", { form: "checkout" });
  await ew.flush(FLUSH);
  assert.equal(ew.stats().rejected, 0);
  await ew.close();
  const events = stack.redis.producerEvents(ew.stats().producer, "secure");
  assert.deepEqual(
    events.map((e) => [e.uuid, e.params.form, e.authenticated]),
    [["cust-a", "login", true], ["cust-b", "checkout", true]],
  );
});
