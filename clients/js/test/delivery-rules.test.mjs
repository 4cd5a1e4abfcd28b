// The delivery rules without a socket (src/delivery.ts), as tests/client/test_delivery.py checks the Python client's.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Delivery } from "../dist/esm/delivery.js";
import { WriteAheadQueue } from "../dist/esm/queue.js";
import { memoryStorage } from "../dist/esm/index.js";

const init = () => ({ v: 1, producer: "js-000000000000000000000000", uuid: "u", next: 1, answered: 0, first: 0, dropped: 0, droppedRanges: [] });

async function setup({ events = 0, uuid = "u", limits = {}, save = true } = {}) {
  const queue = new WriteAheadQueue(memoryStorage());
  await queue.load(init);
  const add = (n, u = uuid, size = 40) => {
    for (let i = 0; i < n; i++) {
      const s = queue.meta.next++;
      queue.push({ s, u, a: "product.view", t: 1, size });
    }
  };
  add(events);
  if (save) await queue.saved();
  const tokens = new Map();
  const d = new Delivery(queue, { batchSize: 100, maxInflight: 8, maxFrameBytes: 262144, ...limits }, uuid, undefined, tokens);
  return { queue, d, add, tokens };
}

const seqs = (m) => m.events.map((e) => e.seq);
const tracks = (next) => next.messages.filter((m) => m.type === "track");

test("welcome.acked drops what it covers; the rest goes in seq order, min(batchSize, max_batch) per frame", async () => {
  const { d, queue } = await setup({ events: 250 });
  assert.equal(d.next(0, "u").messages.length, 0, "nothing before the welcome");
  assert.equal(d.onWelcome(30, 50), 30);
  assert.equal(queue.events[0].s, 31);
  const frames = tracks(d.next(0, "u"));
  assert.equal(frames.length, 5);
  assert.deepEqual(frames.map((f) => [f.events[0].seq, f.events.length]), [[31, 50], [81, 50], [131, 50], [181, 50], [231, 20]]);
});

test("write-ahead: an event is not sent before its storage write resolved", async () => {
  const { d, add, queue } = await setup({ save: false });
  d.onWelcome(0, 500);
  add(3);
  assert.equal(tracks(d.next(0, "u")).length, 0);
  await queue.saved();
  assert.deepEqual(seqs(tracks(d.next(0, "u"))[0]), [1, 2, 3]);
});

test("at most maxInflight frames; an ack frees one and its events are done", async () => {
  const { d, queue } = await setup({ events: 1000, limits: { maxInflight: 2 } });
  d.onWelcome(0, 500);
  assert.equal(tracks(d.next(0, "u")).length, 2);
  assert.equal(tracks(d.next(0, "u")).length, 0);
  const r = d.onAck(99, 1, [{ seq: 7, code: "denied", detail: "no" }]);
  assert.deepEqual(r.rejected, [{ seq: 7, code: "denied", detail: "no", action: "product.view" }]);
  assert.equal(queue.events[0].s, 101);
  assert.deepEqual(seqs(tracks(d.next(0, "u"))[0]).slice(0, 1), [201]);
  assert.equal(d.onAck(0, 0, []) !== null, true);
  assert.equal(d.onAck(0, 0, []) !== null, true);
  assert.equal(d.onAck(0, 0, []), null, "an ack with nothing in flight");
});

test("a nack: nothing new until every frame is answered, then a resend from the first nacked seq after its delay", async () => {
  const { d } = await setup({ events: 500 });
  d.onWelcome(0, 500);
  assert.equal(tracks(d.next(0, "u")).length, 5);
  d.onAck(100, 0, []); // frame 1 stored
  d.onNack(180, 1000); // frame 2 refused: the round starts
  assert.equal(d.next(1000, "u").messages.length, 0);
  d.onNack(500, 1001);
  d.onNack(500, 1002);
  d.onNack(500, 1003); // the last frame in flight answered
  const early = d.next(1100, "u");
  assert.equal(early.messages.length, 0);
  assert.equal(early.waitMs, 83, "the first nack's retry_after_ms from the round's end, not the longest");
  const again = tracks(d.next(1183, "u"));
  assert.equal(again.length, 1, "one frame probes first");
  assert.equal(again[0].events[0].seq, 101);
  d.onAck(100, 0, []);
  assert.equal(tracks(d.next(1200, "u")).length, 2, "the window doubles per ack");
});

test("each frame is of one customer: identify before a run of another's events, then the current one", async () => {
  const { d, add, queue, tokens } = await setup({ events: 2, uuid: "anon" });
  add(2, "cust-42");
  await queue.saved();
  tokens.set("cust-42", "jwt-42");
  d.onWelcome(0, 500);
  const msgs = d.next(0, "cust-42").messages;
  assert.deepEqual(
    msgs.map((m) => (m.type === "track" ? ["track", ...seqs(m)] : [m.type, m.uuid, m.token])),
    [["track", 1, 2], ["identify", "cust-42", "jwt-42"], ["track", 3, 4]],
  );
  assert.equal(d.next(0, "cust-42").messages.length, 0, "already identified");
  tokens.set("cust-42", "jwt-42b");
  assert.deepEqual(d.next(0, "cust-42").messages, [{ type: "identify", uuid: "cust-42", token: "jwt-42b" }], "a fresh token");
});

test("a frame stays under maxFrameBytes", async () => {
  const q2 = await setup({ events: 0, limits: { maxFrameBytes: 1064 } });
  q2.add(30, "u", 84); // 100 bytes an event with the frame's per-event overhead
  await q2.queue.saved();
  q2.d.onWelcome(0, 500);
  const frames = tracks(q2.d.next(0, "u"));
  assert.deepEqual(frames.map((f) => f.events.length), [10, 10, 10]);
});
