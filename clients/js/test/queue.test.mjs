// The write-ahead queue alone: a kill between any two storage writes leaves a queue that loads whole.
import assert from "node:assert/strict";
import { test } from "node:test";
import { WriteAheadQueue } from "../dist/esm/queue.js";

/** A storage that records, after every write or removal, its contents and what `state()` says then. */
function recordingStorage(state) {
  const map = new Map();
  const snapshots = [];
  const op = () => snapshots.push({ snap: new Map(map), ...state() });
  return {
    map,
    snapshots,
    getItem: (k) => (map.has(k) ? map.get(k) : null),
    setItem: async (k, v) => {
      map.set(k, v);
      op();
    },
    removeItem: async (k) => {
      map.delete(k);
      op();
    },
  };
}

const init = () => ({ v: 1, producer: "js-000000000000000000000000", uuid: "u", next: 1, answered: 0, first: 0, dropped: 0, droppedRanges: [] });

async function fromSnapshot(snapshot) {
  const q = new WriteAheadQueue({
    getItem: (k) => (snapshot.has(k) ? snapshot.get(k) : null),
    setItem: () => {},
    removeItem: () => {},
  });
  await q.load(init);
  return q;
}

test("a kill after any write: saved events are all there, no event twice, no seq given twice", async () => {
  let q;
  // At a kill the app had promised: events up to savedSeq are kept, unless answered already.
  const storage = recordingStorage(() => ({ saved: q.savedSeq, answered: q.meta.answered }));
  q = new WriteAheadQueue(storage);
  await q.load(init);
  let seq = 0;
  for (let round = 0; round < 12; round++) {
    for (let i = 0; i < 1 + ((round * 37) % 90); i++) {
      seq++;
      q.meta.next = seq + 1;
      q.push({ s: seq, u: "u", a: "product.view", t: 1, p: { i: seq }, size: 40 });
    }
    await q.saved();
    // Answer the older half of what is queued, as acks would.
    q.remove(new Set(q.events.slice(0, Math.ceil(q.events.length / 2))));
    await q.saved();
  }
  assert.ok(storage.snapshots.length > 30, `${storage.snapshots.length} writes`);
  for (const [k, { snap, saved, answered }] of storage.snapshots.entries()) {
    const reloaded = await fromSnapshot(snap);
    const seqs = reloaded.events.map((e) => e.s);
    assert.equal(new Set(seqs).size, seqs.length, `kill ${k}: an event twice`);
    assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), `kill ${k}: out of order`);
    for (let s = answered + 1; s <= saved; s++) assert.ok(seqs.includes(s), `kill ${k}: saved seq ${s} lost`);
    assert.ok(reloaded.meta.next > saved, `kill ${k}: next seq ${reloaded.meta.next} would reuse a saved seq`);
    for (const e of reloaded.events) assert.deepEqual(e.p, { i: e.s });
  }
  // At the end only the meta and the chunks still holding unanswered events remain.
  const chunks = [...storage.map.keys()].filter((key) => key.startsWith("chunk."));
  assert.ok(chunks.length <= Math.ceil(q.events.length / 16) + 2, `${chunks.length} chunks for ${q.events.length} events`);
});

test("dropped events stay dropped after a reload", async () => {
  const storage = recordingStorage(() => ({}));
  const q = new WriteAheadQueue(storage);
  await q.load(init);
  for (let s = 1; s <= 10; s++) {
    q.meta.next = s + 1;
    q.push({ s, u: "u", a: "product.view", t: 1, size: 40 });
  }
  q.dropAt(0);
  q.dropAt(0);
  q.dropAt(3);
  await q.saved();
  const reloaded = await fromSnapshot(storage.map);
  assert.deepEqual(reloaded.events.map((e) => e.s), [3, 4, 5, 7, 8, 9, 10]);
  assert.equal(reloaded.meta.dropped, 3);
  assert.equal(reloaded.meta.next, 11);
});
