/**
 * The write-ahead queue: every event tracked and not answered yet, kept in a
 * {@link Storage} so that it survives a killed app.
 *
 * Layout in the storage (all JSON):
 * - `meta`: the producer id, the customer uuid, the next seq, the lowest seq
 *   not answered yet (`answered` is every seq below it that is done), the
 *   drop count, the ranges of dropped seqs above `answered`, the app version
 *   last seen, and the first chunk's number.
 * - `chunk.N`: up to {@link CHUNK_EVENTS} events in seq order; a chunk
 *   written with {@link SEAL_EVENTS} or more is not appended to again, so a
 *   write costs about what is new, not the whole chunk. Chunks are
 *   written before the meta that counts on them and removed after it: a kill
 *   between two writes leaves a queue that loads (a chunk past the meta's
 *   view is found by reading on until one is missing).
 *
 * Events are sent only once the write holding them resolved (`savedSeq`), so
 * a seq the server saw is never given to another event after a restart.
 */
import type { Storage } from "./storage.js";

/** Events per chunk: a write rewrites at most the chunk being filled (~25 KB at 100 B an event). */
export const CHUNK_EVENTS = 256;

/** One queued event, as stored (short keys) plus the in-memory delivery state. */
export interface QueuedEvent {
  s: number; // seq
  u: string; // the customer it was tracked for
  a: string; // action
  l?: string; // label
  t: number; // time, ms since the epoch
  p?: Record<string, unknown>; // params
  /** Encoded size in bytes (JSON), for maxQueue.bytes and frame budgets; not stored. */
  size: number;
}

export interface Meta {
  v: 1;
  producer: string;
  uuid: string;
  next: number;
  answered: number;
  first: number;
  dropped: number;
  droppedRanges: [number, number][];
  app?: { version?: string; build?: string };
}

/** A chunk written with this many events is not rewritten again: new events start the next one. */
export const SEAL_EVENTS = 16;

interface Chunk {
  id: number;
  events: QueuedEvent[];
  // Written with SEAL_EVENTS or more: appending would rewrite them on every pass.
  sealed?: boolean;
}

/** Bytes of a string in UTF-8 without encoding it into a buffer. */
export function utf8Length(text: string): number {
  let n = text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    // Two bytes up to U+07FF, three above, four for a surrogate pair (two halves, +1 each).
    if (c >= 0x80) n += c < 0x800 || (c >= 0xd800 && c <= 0xdfff) ? 1 : 2;
  }
  return n;
}

function stored(e: QueuedEvent): unknown {
  const out: Record<string, unknown> = { s: e.s, u: e.u, a: e.a, t: e.t };
  if (e.l !== undefined) out.l = e.l;
  if (e.p !== undefined) out.p = e.p;
  return out;
}

function inRanges(seq: number, ranges: [number, number][]): boolean {
  for (const [lo, hi] of ranges) if (seq >= lo && seq <= hi) return true;
  return false;
}

export class WriteAheadQueue {
  /** Unanswered, not dropped events in seq order (the sent ones first). */
  events: QueuedEvent[] = [];
  bytes = 0;
  meta!: Meta;
  /** Whether the storage held no queue before this load (the app's first launch). */
  fresh = false;
  /** The highest seq whose write resolved. */
  savedSeq = 0;
  /** Called with an error when a write fails (it is retried). */
  onError: (err: unknown) => void = () => {};
  /** Called after each write pass. */
  onSaved: () => void = () => {};

  private chunks: Chunk[] = [];
  private dirty = new Set<number>();
  private metaDirty = false;
  private writing: Promise<void> | null = null;
  private again = false;
  private retryMs = 50;
  private closed = false;

  constructor(private readonly storage: Storage) {}

  /** Read the queue; `init` makes the meta of a fresh storage. */
  async load(init: () => Meta): Promise<void> {
    const raw = await this.storage.getItem("meta");
    let meta: Meta | null = null;
    if (raw !== null) {
      try {
        const parsed = JSON.parse(raw) as Meta;
        if (parsed && parsed.v === 1 && typeof parsed.producer === "string") meta = parsed;
      } catch {
        meta = null;
      }
    }
    this.fresh = meta === null;
    this.meta = meta ?? init();
    const m = this.meta;
    m.droppedRanges ??= [];
    // A kill between the meta write and the removals leaves the chunk before `first`.
    if (m.first > 0) await this.storage.removeItem(`chunk.${m.first - 1}`);
    for (let id = m.first; ; id++) {
      const text = await this.storage.getItem(`chunk.${id}`);
      if (text === null) break;
      let list: QueuedEvent[];
      try {
        list = JSON.parse(text) as QueuedEvent[];
      } catch {
        // A chunk is written whole (or not at all) by a conforming adapter; a corrupt one is skipped.
        continue;
      }
      for (const e of list) {
        e.size = utf8Length(JSON.stringify(stored(e)));
        if (e.s >= m.next) m.next = e.s + 1;
        if (e.s > m.answered && !inRanges(e.s, m.droppedRanges)) {
          this.events.push(e);
          this.bytes += e.size;
        }
      }
      this.chunks.push({ id, events: list });
    }
    this.savedSeq = m.next - 1;
    if (this.fresh) this.markMeta();
  }

  /** Take a numbered event: into memory now, into the storage with the next write. */
  push(e: QueuedEvent): void {
    this.events.push(e);
    this.bytes += e.size;
    let tail = this.chunks[this.chunks.length - 1];
    if (!tail || tail.sealed || tail.events.length >= CHUNK_EVENTS) {
      tail = { id: tail ? tail.id + 1 : this.meta.first, events: [] };
      this.chunks.push(tail);
    }
    tail.events.push(e);
    this.dirty.add(tail.id);
    this.schedule();
  }

  /** Drop the event at `index` (never one in flight): it is counted, and skipped after a restart. */
  dropAt(index: number): QueuedEvent {
    const [e] = this.events.splice(index, 1);
    this.bytes -= e.size;
    const ranges = this.meta.droppedRanges;
    const last = ranges[ranges.length - 1];
    if (last && last[1] + 1 >= e.s && last[0] <= e.s) last[1] = Math.max(last[1], e.s);
    else ranges.push([e.s, e.s]);
    this.meta.dropped += 1;
    this.markMeta();
    return e;
  }

  /** Remove answered events (acked, rejected, or covered by welcome.acked). */
  remove(done: Set<QueuedEvent>): void {
    if (!done.size) return;
    let n = 0;
    while (n < this.events.length && done.has(this.events[n])) n++;
    const removed = n === done.size ? this.events.splice(0, n) : null;
    if (!removed) this.events = this.events.filter((e) => !done.has(e));
    for (const e of done) this.bytes -= e.size;
    this.advance();
  }

  private advance(): void {
    const m = this.meta;
    const answered = this.events.length ? this.events[0].s - 1 : m.next - 1;
    if (answered !== m.answered) {
      m.answered = answered;
      m.droppedRanges = m.droppedRanges.filter(([, hi]) => hi > answered);
      this.markMeta();
    }
  }

  /** Something in the meta changed (uuid, next seq, app version): write it with the next pass. */
  markMeta(): void {
    this.metaDirty = true;
    this.schedule();
  }

  /** Resolves once everything taken so far is written. */
  async saved(): Promise<void> {
    while (this.writing) await this.writing;
  }

  /** Stop writing after the current pass (close). */
  async close(): Promise<void> {
    await this.saved();
    this.closed = true;
  }

  private schedule(): void {
    if (this.closed) return;
    if (this.writing) {
      this.again = true;
      return;
    }
    this.writing = this.pass().finally(() => {
      this.writing = null;
      if (this.again && !this.closed) {
        this.again = false;
        this.schedule();
      }
    });
  }

  private async pass(): Promise<void> {
    // Let the events of the same tick join this write.
    await Promise.resolve();
    const m = this.meta;
    const upTo = m.next - 1;
    const answered = m.answered;
    const ids = [...this.dirty];
    this.dirty.clear();
    const writes = ids
      .map((id) => this.chunks.find((c) => c.id === id))
      .filter((c): c is Chunk => c !== undefined)
      .map((c) => {
        if (c.events.length >= SEAL_EVENTS) c.sealed = true;
        return [`chunk.${c.id}`, JSON.stringify(c.events.map(stored))] as const;
      });
    // Chunks fully answered go; the meta that no longer counts on them is written first.
    const gone: number[] = [];
    while (this.chunks.length && this.chunks[0].events[this.chunks[0].events.length - 1].s <= answered) {
      const c = this.chunks.shift() as Chunk;
      gone.push(c.id);
      this.dirty.delete(c.id);
    }
    if (gone.length) {
      m.first = gone[gone.length - 1] + 1;
      this.metaDirty = true;
    }
    const metaText = this.metaDirty ? JSON.stringify(m) : null;
    this.metaDirty = false;
    try {
      for (const [key, text] of writes) if (!gone.includes(Number(key.slice(6)))) await this.storage.setItem(key, text);
      if (metaText !== null) await this.storage.setItem("meta", metaText);
      for (const id of gone) await this.storage.removeItem(`chunk.${id}`);
      this.retryMs = 50;
      if (upTo > this.savedSeq) this.savedSeq = upTo;
    } catch (err) {
      for (const id of ids) if (!gone.includes(id)) this.dirty.add(id);
      if (metaText !== null) this.metaDirty = true;
      this.onError(err);
      await new Promise((r) => setTimeout(r, this.retryMs));
      this.retryMs = Math.min(this.retryMs * 2, 5000);
      this.again = true;
    }
    this.onSaved();
  }
}
