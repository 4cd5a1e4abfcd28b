/**
 * The delivery state of one connection, without I/O (docs/protocol.md sections 3-4).
 *
 * {@link Delivery} decides what to send and what each answer means; the
 * client ({@link ./client.ts}) moves bytes and time into it and carries out
 * what it returns. The rules are those of the Python client's
 * `eventwire.client.delivery`:
 *
 * - `welcome`: drop every queued event with `seq <= acked` (stored by an
 *   earlier connection) and send the rest in seq order with their seqs;
 *   frames hold at most `min(batchSize, welcome.max_batch)` events and
 *   `maxFrameBytes` bytes, and only events whose storage write resolved.
 * - `ack`: the oldest frame in flight is answered; its events are done
 *   (accepted, duplicate, or rejected: a rejection is final).
 * - `nack`: nothing of the frame was stored. The server nacks every later
 *   frame too, so nothing new is sent until every frame in flight is
 *   answered; then everything unanswered is resent in seq order after the
 *   first nack's `retry_after_ms`, one frame in flight at first, doubling
 *   per ack.
 * - The events of one frame are of one customer: before a run of another
 *   customer's events (tracked before an identify()) goes an `identify`,
 *   and once everything is sent the connection is identified as the
 *   current customer (with the current token).
 */
import type { QueuedEvent, WriteAheadQueue } from "./queue.js";

/** Bytes of a track frame beside its events. */
export const FRAME_OVERHEAD = 64;
/** Bytes of the keys and separators of one event in a frame, beside its stored size. */
export const PER_EVENT_OVERHEAD = 16;

export interface DeliveryLimits {
  batchSize: number;
  maxInflight: number;
  maxFrameBytes: number;
}

/** A rejection as the server sends it. */
export interface WireRejection {
  seq: number;
  code: string;
  detail: string;
}

/** What an ack meant. */
export interface AckResult {
  accepted: number;
  duplicate: number;
  rejected: Array<WireRejection & { action: string }>;
}

/** What to do next: messages to send now, and when to ask again (ms), if a delay holds them. */
export interface Next {
  messages: object[];
  waitMs: number | null;
}

interface Frame {
  events: QueuedEvent[];
}

export class Delivery {
  /** Whether the welcome came. */
  welcomed = false;
  /** Events queue.events[0..sent) are in flight (or nacked, waiting for the round to end). */
  sent = 0;
  private inflight: Frame[] = [];
  private limit = 0;
  private nacked = false;
  private window: number;
  private retryAfterMs = 0;
  private resumeAt = 0;

  /**
   * Args: the queue, the limits, the uuid and token the hello carried, and
   * the tokens given to identify() by uuid, and the uuids whose identify
   * must not merge (reset()'s).
   */
  constructor(
    private readonly queue: WriteAheadQueue,
    private readonly limits: DeliveryLimits,
    private uuid: string,
    private token: string | undefined,
    private readonly tokens: Map<string, string>,
    private readonly noMerge: ReadonlySet<string> = new Set(),
  ) {
    this.window = limits.maxInflight;
  }

  /** The welcome: drop what `acked` covers. Returns how many events it covered. */
  onWelcome(acked: number, maxBatch: number): number {
    this.welcomed = true;
    this.limit = Math.max(1, Math.min(this.limits.batchSize, maxBatch || this.limits.batchSize));
    const covered = new Set<QueuedEvent>();
    for (const e of this.queue.events) {
      if (e.s > acked) break;
      covered.add(e);
    }
    this.queue.remove(covered);
    return covered.size;
  }

  /** An ack: the oldest frame in flight is done. Null for an ack with nothing in flight. */
  onAck(accepted: number, duplicate: number, rejected: WireRejection[]): AckResult | null {
    const frame = this.inflight.shift();
    if (!frame) return null;
    this.sent -= frame.events.length;
    this.window = Math.min(this.limits.maxInflight, this.window * 2);
    const bySeq = new Map(frame.events.map((e) => [e.s, e]));
    this.queue.remove(new Set(frame.events));
    return {
      accepted,
      duplicate,
      rejected: rejected.map((r) => ({ seq: r.seq, code: r.code, detail: r.detail, action: bySeq.get(r.seq)?.a ?? "" })),
    };
  }

  /** A nack of the oldest frame in flight, at `now` (ms). Returns false for a nack with nothing in flight. */
  onNack(retryAfterMs: number, now: number): boolean {
    if (!this.inflight.shift()) return false;
    // The first nack of a round names the real wait (a rate limit's refill, Redis' retry);
    // the frames after it are nacked only to hold the order, with the server's default delay.
    if (!this.nacked) this.retryAfterMs = Math.max(0, retryAfterMs || 0);
    this.nacked = true;
    if (this.inflight.length) return true;
    // Every frame is answered: resend everything unanswered, in seq order, after the delay.
    this.sent = 0;
    this.nacked = false;
    // Probe with one frame: a full window would only be nacked again behind it.
    this.window = 1;
    this.resumeAt = now + this.retryAfterMs;
    this.retryAfterMs = 0;
    return true;
  }

  /**
   * What to send at `now` (ms) for the current customer `current`: track
   * frames and identify messages, in order.
   */
  next(now: number, current: string): Next {
    const out: Next = { messages: [], waitMs: null };
    if (!this.welcomed || this.nacked) return out;
    if (now < this.resumeAt) {
      out.waitMs = this.resumeAt - now;
      return out;
    }
    const events = this.queue.events;
    const saved = this.queue.savedSeq;
    const budget = this.limits.maxFrameBytes - FRAME_OVERHEAD;
    let i = this.sent;
    while (this.inflight.length < this.window && i < events.length && events[i].s <= saved) {
      const u = events[i].u;
      if (u !== this.uuid) out.messages.push(this.identify(u));
      const batch: QueuedEvent[] = [];
      let size = 0;
      while (i < events.length && batch.length < this.limit && events[i].u === u && events[i].s <= saved) {
        size += events[i].size + PER_EVENT_OVERHEAD;
        if (batch.length && size > budget) break;
        batch.push(events[i]);
        i++;
      }
      this.inflight.push({ events: batch });
      this.sent = i;
      out.messages.push({
        type: "track",
        events: batch.map((e) => ({ seq: e.s, action: e.a, label: e.l, time: e.t, params: e.p })),
      });
    }
    if (i >= events.length && (this.uuid !== current || this.token !== this.tokens.get(current))) {
      out.messages.push(this.identify(current));
    }
    return out;
  }

  private identify(uuid: string): object {
    const token = this.tokens.get(uuid);
    this.uuid = uuid;
    this.token = token;
    const msg: Record<string, unknown> = token ? { type: "identify", uuid, token } : { type: "identify", uuid };
    if (this.noMerge.has(uuid)) msg.merge = false;
    return msg;
  }
}
