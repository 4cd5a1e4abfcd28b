/**
 * The two encodings of the protocol (docs/protocol.md section 1): JSON in text
 * frames (`eventwire.v1.json`) and MessagePack in binary frames
 * (`eventwire.v1.msgpack`). Both carry exactly the same messages.
 */
import { Decoder, Encoder } from "@msgpack/msgpack";

export type Encoding = "json" | "msgpack";

/** A message the server sends (section 3); fields the SDK does not read are kept as they come. */
export interface ServerMessage {
  type: string;
  [field: string]: unknown;
}

export interface Codec {
  readonly subprotocol: string;
  encode(message: object): string | Uint8Array;
  decode(data: unknown): ServerMessage | null;
}

// Made on first use: a JSON server sends text frames, and some runtimes lack TextDecoder.
let utf8: { decode(bytes: Uint8Array): string } | null = null;

function asObject(value: unknown): ServerMessage | null {
  return value !== null && typeof value === "object" && typeof (value as ServerMessage).type === "string"
    ? (value as ServerMessage)
    : null;
}

function bytesOf(data: unknown): Uint8Array | null {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (Array.isArray(data)) {
    // ws may hand fragmented messages as a list of Buffers.
    const parts = data as Uint8Array[];
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
  return null;
}

export const jsonCodec: Codec = {
  subprotocol: "eventwire.v1.json",
  encode: (message) => JSON.stringify(message),
  decode(data) {
    try {
      const bytes = typeof data === "string" ? null : bytesOf(data);
      return asObject(JSON.parse(bytes ? (utf8 ??= new TextDecoder()).decode(bytes) : String(data)));
    } catch {
      return null;
    }
  },
};

// Made once: a new Encoder per frame allocates and grows a buffer each time.
let mpEncoder: Encoder | null = null;
let mpDecoder: Decoder | null = null;

export const msgpackCodec: Codec = {
  subprotocol: "eventwire.v1.msgpack",
  // undefined fields are left out, as JSON.stringify does, so both encodings carry the same message.
  encode: (message) => (mpEncoder ??= new Encoder({ ignoreUndefined: true })).encode(message),
  decode(data) {
    const bytes = bytesOf(data);
    if (!bytes) return null;
    try {
      return asObject((mpDecoder ??= new Decoder()).decode(bytes));
    } catch {
      return null;
    }
  },
};

export function codecFor(encoding: Encoding): Codec {
  if (encoding === "json") return jsonCodec;
  if (encoding === "msgpack") return msgpackCodec;
  throw new TypeError(`encoding must be "json" or "msgpack", not ${JSON.stringify(encoding)}`);
}
