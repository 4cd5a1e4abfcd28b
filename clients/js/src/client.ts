/**
 * The Eventwire client: numbers events, keeps them in the write-ahead queue
 * (queue.ts), lets the sans-I/O delivery state (delivery.ts) decide what to send,
 * keeps one WebSocket open and delivers as docs/protocol.md section 4 says.
 *
 * Delivery rules (the same as the Python client's eventwire.client.delivery):
 * - every event gets its seq and is written to the storage before it is sent;
 * - `welcome.acked`: drop every queued event with `seq <= acked`, resend the
 *   rest in seq order with their original seqs;
 * - `ack`: the frame's events are done (accepted, duplicate or rejected; a
 *   rejection is final and reported once on "rejected");
 * - `nack`: send nothing new until every frame in flight is answered (the
 *   server nacks them all), then resend from the oldest unanswered event
 *   after the first nack's `retry_after_ms` (the later ones only hold the order);
 * - a lost connection: everything unanswered is resent after the next
 *   welcome; reconnects wait a random delay below a bound that doubles per
 *   failed attempt (reset by a welcome, except after a close a reconnect
 *   will meet again: 1007, 1008, 1009, HTTP 403/404).
 */
import { type Codec, type Encoding, type ServerMessage, codecFor } from "./codec.js";
import { type AppInfo, type PlatformLike, SDK_NAME, SDK_VERSION, buildContext } from "./context.js";
import { Delivery, FRAME_OVERHEAD, type WireRejection } from "./delivery.js";
import { Emitter } from "./emitter.js";
import { type Meta, type QueuedEvent, WriteAheadQueue, utf8Length } from "./queue.js";
import { type Storage, memoryStorage } from "./storage.js";

export type Status = "connecting" | "open" | "offline" | "backoff";

/** A rejected event, as reported once on "rejected". */
export interface Rejection {
  seq: number;
  code: string;
  detail: string;
  action: string;
}

export interface Stats {
  /** Events held and not answered yet. */
  queued: number;
  /** Their encoded bytes. */
  bytes: number;
  /** Events dropped because the queue was full (kept across restarts). */
  dropped: number;
  accepted: number;
  duplicate: number;
  rejected: number;
  /** Events dropped at a welcome because `welcome.acked` covered them. */
  skipped: number;
  nacks: number;
  /** Welcomes received. */
  connects: number;
  /** The last seq given to an event. */
  seq: number;
  status: Status;
  producer: string;
  uuid: string;
}

export interface EventwireOptions {
  /** The site's track URL: `wss://HOST/v1/track/{site}`. */
  url: string;
  /** Where the queue lives (default memoryStorage(): nothing survives the process). */
  storage?: Storage;
  /** Wire encoding (default "msgpack"). */
  encoding?: Encoding;
  /** The customer; else the uuid kept in the storage, else a new random one. */
  uuid?: string;
  /**
   * Asked for a JWT before each connect, with the uuid the hello is for; its
   * answer goes in the hello. A token that expired is so asked for again.
   */
  token?: (uuid: string) => string | undefined | null | Promise<string | undefined | null>;
  /** The app: sent in the hello context; with it, app.start and app.update are tracked on launch. */
  app?: AppInfo;
  /** React Native's Platform module, for the os and device of the context. */
  platform?: PlatformLike;
  /** More context for the hello (merged over what the SDK finds). */
  context?: Record<string, unknown>;
  /** The bound of the queue; when full the oldest unsent events are dropped and counted. */
  maxQueue?: { events?: number; bytes?: number };
  /** Events per track frame (also capped by welcome.max_batch). Default 100. */
  batchSize?: number;
  /** Frames sent and not answered at once. Default 8. */
  maxInflight?: number;
  /** The server's max_frame_bytes (default 262144). */
  maxFrameBytes?: number;
  /** Reconnect backoff bounds in ms (default 500 and 30000). */
  backoff?: { baseMs?: number; maxMs?: number };
  /** How long a connect may take until the welcome, in ms (default 10000). */
  connectTimeoutMs?: number;
  /** A WebSocket constructor; default the global one, else the `ws` package (Node.js). */
  WebSocket?: unknown;
}

type Events = {
  status: (status: Status) => void;
  rejected: (rejections: Rejection[]) => void;
  dropped: (count: number) => void;
  error: (error: { code: string; detail: string }) => void;
};

/** Close codes that a reconnect will meet again (policy, undecodable, too large). */
const REPEATING_CLOSES = new Set([1007, 1008, 1009]);
const EVENT_OVERHEAD = 128;
const UUID_RE = /^[A-Za-z0-9._:-]{1,64}$/;

interface SocketLike {
  binaryType: string;
  protocol: string;
  readyState: number;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: { message?: string; error?: unknown }) => void) | null;
}
type SocketClass = new (url: string, protocols: string[]) => SocketLike;

interface Connection {
  ws: SocketLike;
  delivery: Delivery;
  timer: ReturnType<typeof setTimeout> | null;
}

interface Waiter {
  seq: number;
  resolve: () => void;
  reject: (err: Error) => void;
  timer: ReturnType<typeof setTimeout> | null;
}

function randomHex(bytes: number): string {
  const buf = new Uint8Array(bytes);
  const c = (globalThis as { crypto?: { getRandomValues?(b: Uint8Array): Uint8Array } }).crypto;
  if (c?.getRandomValues) c.getRandomValues(buf);
  else for (let i = 0; i < bytes; i++) buf[i] = Math.floor(Math.random() * 256);
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A random UUIDv4 (the anonymous customer id). */
export function randomUuid(): string {
  const h = randomHex(16).split("");
  h[12] = "4";
  h[16] = "89ab"[parseInt(h[16], 16) & 3];
  const s = h.join("");
  return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`;
}

function checkUuid(uuid: unknown): string {
  if (typeof uuid !== "string" || !UUID_RE.test(uuid)) {
    throw new TypeError(`uuid must be 1-64 characters of [A-Za-z0-9._:-], not ${JSON.stringify(uuid)}`);
  }
  return uuid;
}

const wsPackage = "ws";

async function socketClass(given: unknown): Promise<SocketClass> {
  if (given) return given as SocketClass;
  const global = (globalThis as { WebSocket?: unknown }).WebSocket;
  if (global) return global as SocketClass;
  try {
    const mod = (await import(wsPackage)) as { default?: unknown; WebSocket?: unknown };
    const Ws = (mod.WebSocket ?? mod.default) as new (url: string, protocols: string[], options: object) => SocketLike;
    // Frames are small and many: compressing each costs both ends more CPU than it saves
    // on a server link (the Python client turns it off too).
    // A constructor that returns its object: `new` hands back the ws socket.
    const noDeflate = function (url: string, protocols: string[]) {
      return new Ws(url, protocols, { perMessageDeflate: false });
    };
    return noDeflate as unknown as SocketClass;
  } catch {
    throw new Error("no WebSocket: this runtime has no global WebSocket; install the ws package (npm install ws)");
  }
}

/** The eventwire SDK: see the README section "Mobile and Node.js". */
export class Eventwire extends Emitter<Events> {
  private readonly opts: EventwireOptions;
  private readonly codec: Codec;
  private readonly queue: WriteAheadQueue;
  private readonly maxEvents: number;
  private readonly maxBytes: number;
  private readonly batchSize: number;
  private readonly maxInflight: number;
  private readonly maxFrameBytes: number;
  private readonly backoffBase: number;
  private readonly backoffMax: number;
  private readonly context: Record<string, unknown>;
  private readonly loaded: Promise<void>;
  private readonly tokens = new Map<string, string>();
  /** uuids reset() made: their identify says `merge: false` (never merge a log-out). */
  private readonly fresh = new Set<string>();
  private early: Array<() => void> = [];
  private ready = false;
  private closing = false;
  private paused = false;
  private uuid = "";
  private conn: Connection | null = null;
  private waiters: Waiter[] = [];
  private wake: (() => void) | null = null;
  private loop: Promise<void>;
  private status: Status = "offline";
  private attempt = 0;
  private strikes = 0;
  private droppedToReport = 0;
  private counts = { accepted: 0, duplicate: 0, rejected: 0, skipped: 0, nacks: 0, connects: 0 };
  private appStateSub: (() => void) | null = null;

  constructor(options: EventwireOptions) {
    super();
    if (!options || typeof options.url !== "string" || !/^wss?:\/\//.test(options.url)) {
      throw new TypeError("Eventwire needs url: the site's ws:// or wss:// track URL");
    }
    this.opts = options;
    this.codec = codecFor(options.encoding ?? "msgpack");
    if (options.uuid !== undefined) checkUuid(options.uuid);
    this.maxEvents = options.maxQueue?.events ?? 10_000;
    this.maxBytes = options.maxQueue?.bytes ?? 5_000_000;
    this.batchSize = Math.max(1, options.batchSize ?? 100);
    this.maxInflight = Math.max(1, options.maxInflight ?? 8);
    this.maxFrameBytes = options.maxFrameBytes ?? 262_144;
    this.backoffBase = options.backoff?.baseMs ?? 500;
    this.backoffMax = options.backoff?.maxMs ?? 30_000;
    this.context = buildContext(options.app, options.platform, options.context);
    this.queue = new WriteAheadQueue(options.storage ?? memoryStorage());
    this.queue.onSaved = () => this.pump();
    this.queue.onError = (err) => this.emit("error", { code: "storage", detail: String(err) });
    this.loaded = this.load();
    this.loop = this.loaded.then(
      () => this.run(),
      (err) => this.emit("error", { code: "storage", detail: `the queue could not be read: ${err}` }),
    );
  }

  // -- the app's side ----------------------------------------------------------

  /**
   * Track an event. It is numbered, written to the storage, then sent.
   *
   * Throws TypeError for an action that is not a string or params that JSON
   * cannot hold (a cycle, a BigInt), RangeError for an event larger than a frame.
   */
  track(action: string, params?: Record<string, unknown>, label?: string): void {
    if (this.closing) throw new Error("eventwire: track() after close()");
    if (typeof action !== "string") throw new TypeError("action must be a string such as product.view");
    if (params !== undefined && (params === null || typeof params !== "object" || Array.isArray(params))) {
      throw new TypeError("params must be an object");
    }
    if (label !== undefined && typeof label !== "string") throw new TypeError("label must be a string");
    const time = Date.now();
    const e: QueuedEvent = { s: 0, u: "", a: action, t: time, size: 0 };
    if (label !== undefined) e.l = label;
    if (params !== undefined) e.p = params;
    let text = "";
    if (params !== undefined) {
      try {
        text = JSON.stringify(params);
      } catch (err) {
        throw new TypeError(`params cannot be encoded: ${(err as Error).message}`);
      }
      // A copy now: later changes by the app to its object do not change the event.
      e.p = JSON.parse(text) as Record<string, unknown>;
    }
    // The stored form: seq, uuid, time and keys take at most EVENT_OVERHEAD bytes beside these.
    e.size = utf8Length(text) + utf8Length(action) + (label === undefined ? 0 : utf8Length(JSON.stringify(label))) + EVENT_OVERHEAD;
    if (e.size + FRAME_OVERHEAD > this.maxFrameBytes) {
      throw new RangeError(`event encodes to ${e.size} bytes; it cannot fit a frame of ${this.maxFrameBytes}`);
    }
    if (this.ready) this.enqueue(e);
    else this.early.push(() => this.enqueue(e));
  }

  /** Track `screen.view` with params.name, labelled "Viewed screen NAME". */
  screen(name: string, params?: Record<string, unknown>): void {
    if (typeof name !== "string" || !name) throw new TypeError("screen name must be a non-empty string");
    this.track("screen.view", { ...params, name }, `Viewed screen ${name}`.slice(0, 256));
  }

  /**
   * Switch to another customer (log-in). Events tracked before are delivered
   * for the previous customer first, then the connection is identified; the
   * promise resolves once they are answered. `token` proves the new customer.
   */
  async identify(uuid: string, token?: string): Promise<void> {
    checkUuid(uuid);
    if (token !== undefined && typeof token !== "string") throw new TypeError("token must be a string");
    // The switch happens now, in the order of the calls: an event tracked
    // right after identify() is the new customer's.
    const change = () => {
      if (token) this.tokens.set(uuid, token);
      else this.tokens.delete(uuid);
      this.setUuid(uuid);
      this.pump();
    };
    if (this.ready) change();
    else this.early.push(change);
    await this.flush();
  }

  /**
   * Log-out: a new anonymous uuid (kept in storage), no token. Its identify
   * says `merge: false`, so the server never merges the customer left into it
   * (docs/protocol.md section 17).
   */
  async reset(): Promise<void> {
    this.tokens.clear();
    const uuid = randomUuid();
    this.fresh.add(uuid);
    await this.identify(uuid);
  }

  /**
   * Resolves when every event tracked so far is answered (acked, or rejected,
   * or dropped). With `timeout` (ms) it rejects after that long; the events
   * stay queued.
   */
  async flush(options: { timeout?: number } = {}): Promise<void> {
    await this.loaded;
    const seq = this.queue.meta.next - 1;
    if (!this.pendingAtOrBelow(seq)) return;
    if (this.closing) throw new Error("eventwire: closed; the queued events wait in the storage for the next start");
    await new Promise<void>((resolve, reject) => {
      const w: Waiter = { seq, resolve, reject, timer: null };
      if (options.timeout !== undefined) {
        w.timer = setTimeout(() => {
          this.waiters = this.waiters.filter((x) => x !== w);
          reject(new Error(`eventwire: flush timed out after ${options.timeout} ms`));
        }, options.timeout);
      }
      this.waiters.push(w);
      // Someone waits: do not sit out a backoff.
      this.wake?.();
    });
  }

  /** Resolves once every event tracked so far is written to the storage (not yet sent, maybe). */
  async saved(): Promise<void> {
    await this.loaded;
    await this.queue.saved();
  }

  /** Counters and the queue's state. */
  stats(): Stats {
    const q = this.queue;
    return {
      queued: this.ready ? q.events.length : this.early.length,
      bytes: this.ready ? q.bytes : 0,
      dropped: this.ready ? q.meta.dropped : 0,
      ...this.counts,
      seq: this.ready ? q.meta.next - 1 : 0,
      status: this.status,
      producer: this.ready ? q.meta.producer : "",
      uuid: this.uuid,
    };
  }

  /**
   * Flush (up to `timeout` ms, default 10000), close the connection, stop.
   * Events not acked by then stay in the storage for the next start.
   */
  async close(options: { timeout?: number } = {}): Promise<void> {
    if (this.closing) return this.loop;
    try {
      await this.flush({ timeout: options.timeout ?? 10_000 });
    } catch {
      // What is not acked stays in the storage.
    }
    this.closing = true;
    this.appStateSub?.();
    for (const w of this.waiters) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(new Error("eventwire: closed before every event was acked"));
    }
    this.waiters = [];
    this.conn?.ws.close(1000, "client closed");
    this.wake?.();
    await this.loop;
    await this.queue.close();
    this.setStatus("offline");
  }

  /**
   * React Native: follow `AppState`. Tracks app.foreground and app.background;
   * on background, flushes (up to 5 s) then disconnects (status "offline");
   * on foreground, reconnects. Returns a function that stops following.
   */
  useAppState(appState: {
    currentState?: string;
    addEventListener(type: "change", listener: (state: string) => void): { remove(): void } | undefined | void;
  }): () => void {
    let last = appState.currentState ?? "active";
    const sub = appState.addEventListener("change", (next: string) => {
      if (this.closing) return;
      if (next === "active" && last !== "active") {
        this.track("app.foreground");
        this.resume();
      } else if (next === "background" && last !== "background") {
        this.track("app.background");
        void this.flush({ timeout: 5000 })
          .catch(() => undefined)
          .then(() => {
            if (last === "background") this.pause();
          });
      }
      last = next;
    });
    const stop = () => {
      if (sub && typeof sub.remove === "function") sub.remove();
      if (this.appStateSub === stop) this.appStateSub = null;
    };
    this.appStateSub = stop;
    return stop;
  }

  // -- the queue -----------------------------------------------------------------

  private async load(): Promise<void> {
    await this.queue.load(() => ({
      v: 1,
      producer: `js-${randomHex(12)}`,
      uuid: this.opts.uuid ?? randomUuid(),
      next: 1,
      answered: 0,
      first: 0,
      dropped: 0,
      droppedRanges: [],
    }));
    const meta = this.queue.meta;
    this.uuid = meta.uuid;
    if (this.opts.uuid !== undefined && this.opts.uuid !== meta.uuid) this.setUuid(this.opts.uuid);
    this.ready = true;
    this.launch(meta);
    this.flushEarly();
    this.enforceBound();
  }

  private launch(meta: Meta): void {
    const app = this.opts.app;
    if (!app) return;
    const fresh = this.queue.fresh;
    const previous = meta.app?.version;
    this.enqueue(this.event("app.start", { first_launch: fresh, version: app.version, build: app.build }));
    if (!fresh && previous !== app.version) {
      this.enqueue(this.event("app.update", { previous_version: previous ?? null, version: app.version }));
    }
    meta.app = { version: app.version, build: app.build };
    this.queue.markMeta();
  }

  private event(action: string, params: Record<string, unknown>): QueuedEvent {
    const e: QueuedEvent = { s: 0, u: "", a: action, t: Date.now(), p: params, size: 0 };
    e.size = utf8Length(JSON.stringify(e)) + 16;
    return e;
  }

  private flushEarly(): void {
    const early = this.early;
    this.early = [];
    for (const f of early) f();
  }

  private setUuid(uuid: string): void {
    this.uuid = uuid;
    this.queue.meta.uuid = uuid;
    this.queue.markMeta();
  }

  private enqueue(e: QueuedEvent): void {
    const meta = this.queue.meta;
    e.s = meta.next++;
    e.u = this.uuid;
    this.queue.push(e);
    this.enforceBound();
    this.pump();
  }

  private enforceBound(): void {
    const q = this.queue;
    let dropped = 0;
    while (q.events.length > this.maxEvents || q.bytes > this.maxBytes) {
      // Events in flight (or nacked, waiting) are not dropped: the server may
      // hold them, and a nack's resend must start at its first seq.
      const index = this.conn ? this.conn.delivery.sent : 0;
      if (index >= q.events.length - 1) break;
      q.dropAt(index);
      dropped++;
    }
    if (!dropped) return;
    this.checkWaiters();
    if (this.droppedToReport === 0) {
      queueMicrotask(() => {
        const n = this.droppedToReport;
        this.droppedToReport = 0;
        if (n) this.emit("dropped", n);
      });
    }
    this.droppedToReport += dropped;
  }

  private pendingAtOrBelow(seq: number): boolean {
    const first = this.queue.events[0];
    return (first !== undefined && first.s <= seq) || this.early.length > 0;
  }

  private checkWaiters(): void {
    if (!this.waiters.length) return;
    this.waiters = this.waiters.filter((w) => {
      if (this.pendingAtOrBelow(w.seq)) return true;
      if (w.timer) clearTimeout(w.timer);
      w.resolve();
      return false;
    });
  }

  // -- the connection ------------------------------------------------------------

  private setStatus(status: Status): void {
    if (status === this.status) return;
    this.status = status;
    this.emit("status", status);
  }

  private pause(): void {
    this.paused = true;
    this.conn?.ws.close(1000, "app in background");
    this.wake?.();
  }

  private resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.attempt = 0;
    this.wake?.();
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        if (self.wake === done) self.wake = null;
        resolve();
      }
      this.wake = done;
    });
  }

  private async run(): Promise<void> {
    const Socket = await socketClass(this.opts.WebSocket).catch((err: Error) => {
      this.emit("error", { code: "no_websocket", detail: err.message });
      return null;
    });
    if (!Socket) return;
    while (!this.closing) {
      if (this.paused) {
        this.setStatus("offline");
        await this.sleep(2 ** 31 - 1);
        continue;
      }
      const { welcomed, repeats } = await this.connectOnce(Socket);
      if (this.closing) break;
      if (this.paused) continue;
      if (welcomed) this.attempt = 0;
      if (repeats) {
        this.attempt = Math.max(this.attempt, this.strikes);
        this.strikes++;
      } else if (welcomed) this.strikes = 0;
      const bound = Math.min(this.backoffMax, this.backoffBase * 2 ** Math.min(this.attempt, 32));
      this.attempt++;
      this.setStatus("backoff");
      // Full jitter: a crowd of apps that lost one server do not come back in step.
      await this.sleep(Math.random() * bound);
    }
  }

  private async connectOnce(Socket: SocketClass): Promise<{ welcomed: boolean; repeats: boolean }> {
    this.setStatus("connecting");
    const first = this.queue.events[0];
    const uuid = first ? first.u : this.uuid;
    let token: string | undefined;
    try {
      if (this.opts.token) {
        const asked = await this.opts.token(uuid);
        if (asked) this.tokens.set(uuid, asked);
      }
      token = this.tokens.get(uuid);
    } catch (err) {
      this.emit("error", { code: "token", detail: `token() failed: ${err}` });
      return { welcomed: false, repeats: false };
    }
    if (this.closing || this.paused) return { welcomed: false, repeats: false };
    let ws: SocketLike;
    try {
      ws = new Socket(this.opts.url, [this.codec.subprotocol]);
    } catch (err) {
      this.emit("error", { code: "connect", detail: String(err) });
      return { welcomed: false, repeats: true };
    }
    ws.binaryType = "arraybuffer";
    const delivery = new Delivery(
      this.queue,
      { batchSize: this.batchSize, maxInflight: this.maxInflight, maxFrameBytes: this.maxFrameBytes },
      uuid,
      token,
      this.tokens,
      this.fresh,
    );
    const conn: Connection = { ws, delivery, timer: null };
    this.conn = conn;
    let repeats = false;
    const helloTimer = setTimeout(() => ws.close(4000, "no welcome in time"), this.opts.connectTimeoutMs ?? 10_000);
    await new Promise<void>((resolve) => {
      ws.onopen = () => {
        // An empty protocol is a runtime that does not report it; another name is a refusal.
        if (ws.protocol && ws.protocol !== this.codec.subprotocol) {
          repeats = true;
          this.emit("error", { code: "subprotocol", detail: `the server refused ${this.codec.subprotocol}` });
          ws.close(1000, "subprotocol refused");
          return;
        }
        const hello: Record<string, unknown> = {
          type: "hello",
          uuid,
          producer: this.queue.meta.producer,
          client: `${SDK_NAME}/${SDK_VERSION}`,
          context: this.context,
        };
        if (token) hello.token = token;
        ws.send(this.codec.encode(hello));
      };
      ws.onmessage = (ev) => {
        const msg = this.codec.decode(ev.data);
        if (msg) this.onMessage(conn, msg);
      };
      ws.onerror = (ev) => {
        const text = ev.message ?? String(ev.error ?? "");
        // ws says "Unexpected server response: 404" for a refused handshake.
        if (/response: 40[34]\b/.test(text)) repeats = true;
      };
      ws.onclose = (ev) => {
        if (REPEATING_CLOSES.has(ev.code)) repeats = true;
        resolve();
      };
    });
    clearTimeout(helloTimer);
    if (conn.timer) clearTimeout(conn.timer);
    this.conn = null;
    return { welcomed: delivery.welcomed, repeats };
  }

  private onMessage(conn: Connection, msg: ServerMessage): void {
    if (this.conn !== conn) return;
    switch (msg.type) {
      case "welcome":
        return this.onWelcome(conn, msg);
      case "ack":
        return this.onAck(conn, msg);
      case "nack":
        return this.onNack(conn, msg);
      case "error":
        this.emit("error", { code: String(msg.code), detail: String(msg.detail ?? "") });
        return;
      default:
        return;
    }
  }

  private onWelcome(conn: Connection, msg: ServerMessage): void {
    this.counts.connects++;
    this.counts.skipped += conn.delivery.onWelcome(Number(msg.acked) || 0, Number(msg.max_batch) || 0);
    this.checkWaiters();
    this.setStatus("open");
    this.pump();
  }

  private onAck(conn: Connection, msg: ServerMessage): void {
    const rejected = Array.isArray(msg.rejected) ? (msg.rejected as WireRejection[]) : [];
    const result = conn.delivery.onAck(Number(msg.accepted) || 0, Number(msg.duplicate) || 0, rejected);
    if (!result) return;
    this.counts.accepted += result.accepted;
    this.counts.duplicate += result.duplicate;
    if (result.rejected.length) {
      this.counts.rejected += result.rejected.length;
      this.emit("rejected", result.rejected);
    }
    this.checkWaiters();
    this.pump();
  }

  private onNack(conn: Connection, msg: ServerMessage): void {
    if (!conn.delivery.onNack(Number(msg.retry_after_ms) || 0, Date.now())) return;
    this.counts.nacks++;
    this.pump();
  }

  private pump(): void {
    const conn = this.conn;
    if (!conn || conn.ws.readyState !== 1 || conn.timer) return;
    const { messages, waitMs } = conn.delivery.next(Date.now(), this.uuid);
    for (const m of messages) conn.ws.send(this.codec.encode(m));
    if (waitMs !== null) {
      conn.timer = setTimeout(() => {
        conn.timer = null;
        this.pump();
      }, waitMs);
    }
  }
}
