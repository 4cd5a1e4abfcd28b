"""Closed-loop load generator of the peer benchmark, and the check of the stream it leaves.

This module owns the load ``bench/run.sh`` puts on every row (eventwire and the
reference peers alike) and the verdict on what the row stored. It speaks the v1
wire protocol itself (docs/protocol.md; a raw RFC 6455 client by default) and
imports nothing from ``server/``, so it measures eventwire exactly as it
measures any other v1 server.

Each of C connections opens ``ws://HOST:PORT/v1/track/{site}`` offering the
subprotocol ``eventwire.v1.json`` (or ``.msgpack``) with ``Origin:
http://localhost``, says hello with a producer of its own (unique per
connection and run), waits for welcome, then sends track frames of B events
with strictly rising seqs, never more than W of them unacknowledged. It expects
one ack per frame, in order, whose ``seq`` is the frame's highest and whose
accepted + duplicate + rejected is B. A nack is counted, not resent, and fails
the run, as does an error, a close or a malformed ack.

``--ledger FILE`` (``scripts/chaos``' second client kind) is the other way
round: frames go through the ``websockets`` client, a nacked frame is resent
(same bytes: same producer and seqs) after ``retry_after_ms`` once every
frame in flight is answered, a lost connection is made again with the same
producer and what ``welcome.acked`` does not cover is resent, and every
stored event's ``producer seq`` is written to FILE. ``--rate`` paces it. The
run fails only if a frame is still unanswered at the timeout or an ack is
malformed.

Frames are encoded once into a pool, and for the raw client framed and masked
once too: a send patches only the frame number inside each seq (a few integer
operations, the same bytes for every event of the frame) and makes one
``transport.write``, so the generator costs little beside the servers it
measures. ``seq = frame_number * M + index``: JSON frame numbers run from
1,000,000 (always 7 digits, so the template keeps its length) with
``M = 10 ** digits(B - 1)``; msgpack seqs are uint64 with ``M = 65536``. Gaps
are allowed by the protocol and every seq stays below 2**53.
``--impl websockets`` drives the same frames through the ``websockets`` client
instead, as a cross-check (about 3x the CPU per frame).

After the run, ``--verify scan`` (the default) reads the entries the run added
to ``{prefix}:{site}:events`` and checks that each is one field ``event`` with
the stored event's JSON, that this run's producers hold exactly the acked seqs
with none stored twice, that site, uuid and session are right, and that
accepted equals stored. Server-made events (producer ``srv:...``) are counted
apart. If the server's ``MAXLEN ~`` trimmed events of the run, only what is
left is checked and the table says ``yes*``. ``--verify count`` only compares
the stream's ``entries-added`` with the acked count.

It reports events/s and frames/s (acked during the run / its length), ack
latency p50/p99 and the CPU% of ``--cpu-pids`` processes (with their
descendants; also their busiest thread), of itself and of the whole machine.
``--json FILE`` appends the result as one line; ``loadgen.py --table FILE``
prints the markdown table of such lines (with ``bench/raw_redis.sh``'s rows).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import msgspec
import redis

#: RFC 6455's key suffix for Sec-WebSocket-Accept.
WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: The largest frame a v1 server must take (``max_batch``).
MAX_BATCH: Final = 500

#: Opening handshakes at once; more would only queue in the server's accept backlog.
CONNECT_CONCURRENCY: Final = 200

#: How long all C connections may take to be welcomed.
CONNECT_TIMEOUT: Final = 30.0

#: Entries read per XRANGE call while verifying.
SCAN_COUNT: Final = 10_000

#: Distinct customers (uuids) the connections are spread over.
CUSTOMERS: Final = 2000


# -- server messages -----------------------------------------------------------


class Welcome(msgspec.Struct, tag_field="type", tag="welcome"):
    """The answer to hello."""

    session: str
    acked: int = 0
    resumed: bool = False


class Ack(msgspec.Struct, tag_field="type", tag="ack"):
    """One frame stored: how many events were new, duplicate or rejected."""

    seq: int
    accepted: int
    duplicate: int = 0
    rejected: list[Any] = msgspec.field(default_factory=list)


class Nack(msgspec.Struct, tag_field="type", tag="nack"):
    """One frame not stored (the server could not reach Redis)."""

    seq: int = 0
    code: str = ""
    retry_after_ms: int = 0


class Error(msgspec.Struct, tag_field="type", tag="error"):
    """The server ends the connection."""

    code: str = ""
    detail: str = ""


ServerMessage = Welcome | Ack | Nack | Error


class StoredEvent(msgspec.Struct):
    """The stored event's JSON (extra fields are allowed and ignored)."""

    site: str
    uuid: str
    session: str
    producer: str
    seq: int
    action: str
    label: str
    time: int
    received: int
    params: dict[str, Any]


# -- realistic events ----------------------------------------------------------

_PRODUCTS: Final = [
    ("Blue Running Shoes", "shoes"),
    ("Merino Wool Sweater", "knitwear"),
    ("Leather Weekender Bag", "bags"),
    ("Wireless Earbuds Pro", "audio"),
    ("Cast Iron Skillet 28cm", "kitchen"),
    ("Organic Cotton T-Shirt", "tops"),
    ("Smart Fitness Watch", "wearables"),
    ("Ceramic Pour-Over Set", "coffee"),
]
_PAGES: Final = [
    ("/", "Home - Example Shop"),
    ("/sale", "Summer Sale - Example Shop"),
    ("/account", "My Account - Example Shop"),
    ("/blog/how-to-choose-running-shoes", "How to choose running shoes"),
]
_REFERRERS: Final = [
    "https://www.google.com/",
    "https://news.example.org/article/123",
    "",
    "https://t.co/abc123",
    "https://shop.example.com/",
]
_ACTIONS: Final = [
    "page.visit",
    "product.view",
    "cart.add",
    "cart.remove",
    "search.query",
    "checkout.start",
    "checkout.complete",
    "user.login",
]
_ACTION_WEIGHTS: Final = [40, 25, 10, 3, 10, 5, 3, 4]
_QUERIES: Final = ["running shoes", "wool sweater size m", "earbuds", "skillet", "gift ideas"]
_SHOP: Final = "https://shop.example.com"


def make_event(rng: random.Random, now_ms: int) -> dict[str, Any]:
    """One realistic track event without its seq (about 230 bytes of JSON)."""
    action = rng.choices(_ACTIONS, weights=_ACTION_WEIGHTS)[0]
    name, category = rng.choice(_PRODUCTS)
    product_id = rng.randint(10000, 99999)
    slug = name.lower().replace(" ", "-")
    params: dict[str, Any]
    if action == "page.visit":
        path, title = rng.choice(_PAGES)
        label = "Visited page " + title
        campaign = f"?utm_source=newsletter&utm_campaign=c{rng.randint(1, 99)}"
        params = {"url": _SHOP + path + campaign, "title": title}
        params["referrer"] = rng.choice(_REFERRERS)
    elif action in ("product.view", "cart.add", "cart.remove"):
        label = name
        params = {
            "url": f"{_SHOP}/p/{slug}-{product_id}",
            "title": f"{name} - Example Shop",
            "product_id": str(product_id),
            "category": category,
            "price": round(rng.uniform(5, 300), 2),
            "currency": "EUR",
        }
        if action != "product.view":
            params["qty"] = rng.randint(1, 3)
    elif action == "search.query":
        label = query = rng.choice(_QUERIES)
        params = {
            "url": f"{_SHOP}/search?q={query.replace(' ', '+')}",
            "title": f"Search: {query}",
            "query": query,
            "results": rng.randint(0, 240),
        }
    elif action.startswith("checkout"):
        label = "checkout"
        params = {
            "url": f"{_SHOP}/checkout/step-{rng.randint(1, 3)}",
            "title": "Checkout - Example Shop",
            "cart_value": round(rng.uniform(10, 900), 2),
            "items": rng.randint(1, 8),
            "currency": "EUR",
        }
    else:
        label = "login"
        params = {
            "url": f"{_SHOP}/login?next=%2Faccount",
            "title": "Sign in - Example Shop",
            "method": rng.choice(["password", "google", "apple"]),
        }
    return {
        "action": action,
        "label": label,
        "time": now_ms - rng.randint(0, 5000),
        "params": params,
    }


# -- WebSocket framing ---------------------------------------------------------


def ws_header(length: int, opcode: int, masked: bool) -> bytes:
    """The header of a final, unfragmented frame of ``length`` payload bytes."""
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((0x80 | opcode, mask_bit | length))
    if length < 65536:
        return bytes((0x80 | opcode, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((0x80 | opcode, mask_bit | 127)) + length.to_bytes(8, "big")


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` masked with the 4-byte ``mask`` (one big-integer XOR, not a byte loop)."""
    n = len(payload)
    if not n:
        return payload
    repeated = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def mask_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A complete, final, client-masked frame."""
    mask = os.urandom(4)
    return ws_header(len(payload), opcode, True) + mask + xor_mask(payload, mask)


# -- encodings and frame templates ----------------------------------------------


class Codec:
    """What differs between the encodings: hello, the decoder, the track frame layout.

    Args:
        name: ``json`` or ``msgpack``.
        batch: B, events per frame.
    """

    def __init__(self, name: str, batch: int) -> None:
        self.name = name
        self.batch = batch
        self.subprotocol = f"eventwire.v1.{name}"
        self.opcode = 0x1 if name == "json" else 0x2
        self.encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder
        self.decoder: msgspec.json.Decoder[ServerMessage] | msgspec.msgpack.Decoder[ServerMessage]
        if name == "json":
            self.encoder = msgspec.json.Encoder()
            self.decoder = msgspec.json.Decoder(ServerMessage)
            self.low_digits = len(str(batch - 1)) if batch > 1 else 0
            self.M = 10**self.low_digits
            #: Bytes of the frame-number slot: 7 decimal digits, 1_000_000 .. 9_999_999.
            self.slot_width = 7
            self.first_frame = 1_000_000
            self.last_frame = 9_999_999
        else:
            self.encoder = msgspec.msgpack.Encoder()
            self.decoder = msgspec.msgpack.Decoder(ServerMessage)
            # A uint64 seq: 6 bytes of frame number, then a 2-byte index.
            self.low_digits = 0
            self.M = 65536
            self.slot_width = 6
            self.first_frame = 1
            self.last_frame = 2**36  # keeps every seq below 2**53

    def hello(self, customer: str, producer: str) -> bytes:
        """The hello message's payload."""
        message = {"type": "hello", "uuid": customer, "producer": producer}
        message["client"] = "eventwire-bench-loadgen/1"
        return self.encoder.encode(message)

    def slot_value(self, frame: int) -> int:
        """The integer whose big-endian bytes fill the slot for frame number ``frame``."""
        if self.name == "json":
            return int.from_bytes(b"%07d" % frame, "big")
        return frame

    def track_segments(self, events: list[dict[str, Any]]) -> list[bytes]:
        """A track frame's payload cut around its B seq slots: seg0 SLOT seg1 ... SLOT segB."""
        encode = self.encoder.encode
        segments: list[bytes] = []
        if self.name == "json":
            current = b'{"type":"track","events":['
            for i, event in enumerate(events):
                body = encode(event)  # {"action":...}
                low = b"%0*d" % (self.low_digits, i) if self.low_digits else b""
                segments.append(current + (b"," if i else b"") + b'{"seq":')
                current = low + b"," + body[1:]
            segments.append(current + b"]}")
            return segments
        n = len(events)
        array = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
        current = b"\x82" + encode("type") + encode("track") + encode("events") + array
        for i, event in enumerate(events):
            body = encode(event)
            if body[0] & 0xF0 != 0x80:
                raise ValueError("an event must encode as a msgpack fixmap")
            segments.append(current + bytes((0x80 | ((body[0] & 0x0F) + 1),)) + b"\xa3seq\xcf")
            current = i.to_bytes(2, "big") + body[1:]
        segments.append(current)
        return segments


class FrameTemplate:
    """One track frame, encoded (and for the raw client framed and masked) once.

    The seq slots are cut out so that a send only patches them: masking is a
    XOR, so the masked slot is the frame number XOR the mask bytes that fall
    on it, which depend only on the slot's offset modulo 4.

    Args:
        segments: the payload around the slots (:meth:`Codec.track_segments`).
        slot_width: bytes of each slot.
        opcode: text or binary.
        mask: the frame's mask, or None for a plain payload (websockets client).
    """

    __slots__ = ("first", "last", "layout", "mask_ints", "phase0", "phases", "single")

    def __init__(
        self, segments: list[bytes], slot_width: int, opcode: int, mask: bytes | None
    ) -> None:
        slots: list[int] = []
        offset = 0
        for segment in segments[:-1]:
            offset += len(segment)
            slots.append(offset)
            offset += slot_width
        payload = b"".join(s + b"\0" * slot_width for s in segments[:-1]) + segments[-1]
        if mask is None:
            head, body, mask = b"", payload, b"\0\0\0\0"
        else:
            head, body = ws_header(len(payload), opcode, True) + mask, xor_mask(payload, mask)
        constants: list[bytes] = []
        previous = 0
        for slot in slots:
            constants.append(body[previous:slot])
            previous = slot + slot_width
        constants.append(body[previous:])
        constants[0] = head + constants[0]
        mask16 = mask * 4
        self.mask_ints = [int.from_bytes(mask16[p : p + slot_width], "big") for p in range(4)]
        self.phases = [slot % 4 for slot in slots]
        self.layout: list[bytes] = [b""] * (2 * len(constants) - 1)
        self.layout[0::2] = constants
        self.single = len(slots) == 1
        self.first, self.last = constants[0], constants[-1]
        self.phase0 = self.phases[0]

    def render(self, value: int, width: int) -> bytes:
        """The frame's bytes with every slot holding ``value``."""
        if self.single:
            return (
                self.first
                + (value ^ self.mask_ints[self.phase0]).to_bytes(width, "big")
                + self.last
            )
        patched = [(value ^ m).to_bytes(width, "big") for m in self.mask_ints]
        out = self.layout.copy()
        out[1::2] = [patched[p] for p in self.phases]
        return b"".join(out)


def build_pool(
    codec: Codec, frames: int, seed: int, masked: bool
) -> tuple[list[FrameTemplate], int]:
    """Encode ``frames`` distinct frames of B events; also the events' bytes as JSON."""
    rng = random.Random(seed)
    mask_rng = random.Random(seed + 1)
    now_ms = int(time.time() * 1000)
    json_encode = msgspec.json.Encoder().encode
    pool: list[FrameTemplate] = []
    event_bytes = 0
    for _ in range(frames):
        events = [make_event(rng, now_ms) for _ in range(codec.batch)]
        seq = codec.first_frame * codec.M
        event_bytes += sum(len(json_encode({"seq": seq, **e})) for e in events)
        mask = mask_rng.randbytes(4) if masked else None
        pool.append(
            FrameTemplate(codec.track_segments(events), codec.slot_width, codec.opcode, mask)
        )
    return pool, event_bytes


# -- the run's state -------------------------------------------------------------


@dataclass(slots=True)
class Producer:
    """One connection's producer and what it sent and got acked."""

    index: int
    customer: str
    name: str
    #: Frame numbers sent are ``first_frame .. next_frame - 1``.
    first_frame: int
    next_frame: int
    #: The frame number the next ack or nack answers.
    answered: int
    accepted: int = 0
    session: str | None = None


class Run:
    """Everything the connections of one run share: settings, pool, counters.

    Args:
        args: the parsed command line.
        codec: the encoding.
        pool: the encoded frames.
    """

    def __init__(self, args: argparse.Namespace, codec: Codec, pool: list[FrameTemplate]) -> None:
        self.args = args
        self.codec = codec
        self.pool = pool
        self.run_id = os.urandom(4).hex()
        rng = random.Random(args.seed + 2)
        self.customers = [
            str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(CUSTOMERS)
        ]
        self.latencies_ns: list[int] = []
        self.accepted = self.duplicate = self.rejected = 0
        self.acked_frames = self.nacks = self.bad_acks = 0
        #: Ledger mode: nacks by code, and connections lost and made again.
        self.nack_codes: dict[str, int] = {}
        self.reconnects = 0
        #: Ledger mode: frames a welcome's ``acked`` covered (their ack was lost).
        self.resumed = 0
        self.sent_events = self.sent_frames = 0
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.producers: list[Producer] = []
        self.t0 = 0
        self.t_last_ack = 0
        self.deadline_ns: int | None = None
        self.cpu = CpuWatch(args.cpu_pids)
        self.cpu_before: CpuSnapshot | None = None
        self.cpu_after: CpuSnapshot | None = None

    def producer(self, index: int) -> Producer:
        """A new connection's producer: unique per connection and run."""
        first = self.codec.first_frame
        p = Producer(
            index=index,
            customer=self.customers[index % len(self.customers)],
            name=f"lg-{self.run_id}-{index}",
            first_frame=first,
            next_frame=first,
            answered=first,
        )
        self.producers.append(p)
        return p

    def frames_per_connection(self) -> int:
        """How many frames one connection may send: N / B, within the seq space."""
        codec = self.codec
        return min(self.args.events // self.args.batch, codec.last_frame - codec.first_frame + 1)

    def note(self, text: str) -> None:
        """Keep the first few remarks for the report."""
        if len(self.notes) < 10:
            self.notes.append(text)

    def on_ack(self, p: Producer, ack: Ack) -> None:
        """Count an ack and check that it answers the frame it should, in full."""
        codec = self.codec
        expected = p.answered * codec.M + codec.batch - 1
        p.answered += 1
        rejected = len(ack.rejected)
        if ack.seq != expected or ack.accepted + ack.duplicate + rejected != codec.batch:
            self.bad_acks += 1
            shown = msgspec.json.encode(ack).decode()[:300]
            self.note(
                f"conn {p.index}: ack {shown} (expected seq {expected}, {codec.batch} events)"
            )
        elif rejected:
            shown = msgspec.json.encode(ack.rejected[:2]).decode()[:300]
            self.note(f"conn {p.index}: rejected {shown}")
        self.accepted += ack.accepted
        self.duplicate += ack.duplicate
        self.rejected += rejected
        p.accepted += ack.accepted
        self.acked_frames += 1

    def on_nack(self, p: Producer, nack: Nack) -> None:
        """Count a nack (never resent: a nack fails the run)."""
        p.answered += 1
        self.nacks += 1
        self.note(f"conn {p.index}: nack {nack.code} seq={nack.seq}")


# -- the raw client --------------------------------------------------------------


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    """Mark a future's exception as seen: failures are reported through ``Run.errors``."""
    if not future.cancelled():
        future.exception()


class RawConnection(asyncio.Protocol):
    """One connection of the raw client: handshake, hello, then W frames in flight.

    Args:
        run: the run it belongs to.
        index: its number (names its producer).
    """

    def __init__(self, run: Run, index: int) -> None:
        self.run = run
        self.index = index
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        for future in (self.ready, self.done):
            future.add_done_callback(_ignore_outcome)
        self.transport: asyncio.Transport | None = None
        self.state = "http"  # http -> hello -> run
        self.buffer = b""
        self.fragments = b""
        self.fragment_opcode = 0x1
        self.key = base64.b64encode(os.urandom(16))
        self.producer = run.producer(index)
        self.frames_left = run.frames_per_connection()
        self.window = run.args.window
        self.inflight: deque[int] = deque()
        self.position = (index * 7919) % len(run.pool)
        self.frame = self.producer.next_frame
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the opening handshake."""
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = self.run.args
        origin = f"Origin: {a.origin}\r\n" if a.origin else ""
        request = (
            f"GET /v1/track/{a.site} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {self.run.codec.subprotocol}\r\n{origin}\r\n"
        )
        self.transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail whatever still waits on this connection."""
        if not self.closed.done():
            self.closed.set_result(None)
        text = f"conn {self.index}: connection lost ({exc})"
        for future in (self.ready, self.done):
            if not future.done():
                self.run.errors.append(text)
                future.set_exception(ConnectionError(text))

    def fail(self, text: str) -> None:
        """Record a protocol failure and drop the connection."""
        self.run.errors.append(f"conn {self.index}: {text}")
        for future in (self.ready, self.done):
            if not future.done():
                future.set_exception(ConnectionError(text))
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self) -> bool:
        """Check the server's 101 answer and send hello; False until it is complete."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
        lines = head.split("\r\n")
        if " 101 " not in lines[0] + " ":
            self.fail(f"handshake failed: {lines[0]!r}")
            return False
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            self.fail("bad Sec-WebSocket-Accept")
            return False
        chosen = headers.get("sec-websocket-protocol")
        codec = self.run.codec
        # No subprotocol in the answer means JSON (docs/protocol.md).
        if chosen != codec.subprotocol and not (chosen is None and codec.name == "json"):
            self.fail(f"server chose subprotocol {chosen!r}, offered {codec.subprotocol!r}")
            return False
        self.state = "hello"
        assert self.transport is not None
        hello = codec.hello(self.producer.customer, self.producer.name)
        self.transport.write(mask_frame(hello, codec.opcode))
        return True

    def data_received(self, data: bytes) -> None:
        """Parse the server's frames; take acks, pongs and closes; send what the window allows."""
        if self.state == "http":
            self.buffer += data
            if not self._handshake() or not self.buffer:
                return
            data, self.buffer = self.buffer, b""
        buf = self.buffer + data if self.buffer else data
        run = self.run
        pos, n = 0, len(buf)
        now = time.perf_counter_ns()
        inflight = self.inflight
        latencies = run.latencies_ns
        decode = run.codec.decoder.decode
        p = self.producer
        assert self.transport is not None
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, header = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, header = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, header = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:
                return self.fail("server frame is masked")
            end = pos + header + length
            if end > n:
                break
            payload = buf[pos + header : end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 0x0 or not b0 & 0x80:  # a fragment
                self.fragments += payload
                if not b0 & 0x80:
                    if opcode != 0x0:
                        self.fragment_opcode = opcode
                    continue
                payload, self.fragments, opcode = self.fragments, b"", self.fragment_opcode
            if opcode in (0x1, 0x2):
                try:
                    message = decode(payload)
                except msgspec.DecodeError as exc:
                    return self.fail(f"bad server message {bytes(payload[:200])!r}: {exc}")
                kind = type(message)
                if kind is Ack or kind is Nack:
                    if not inflight:
                        return self.fail(f"unexpected answer {bytes(payload[:200])!r}")
                    latencies.append(now - inflight.popleft())
                    if kind is Ack:
                        run.on_ack(p, message)  # type: ignore[arg-type]
                    else:
                        run.on_nack(p, message)  # type: ignore[arg-type]
                elif kind is Welcome and self.state == "hello":
                    assert isinstance(message, Welcome)
                    self.state = "run"
                    p.session = message.session
                    if message.acked:
                        run.note(
                            f"conn {self.index}: welcome.acked={message.acked} for a new producer"
                        )
                    self.ready.set_result(None)
                else:
                    return self.fail(f"unexpected message {bytes(payload[:300])!r}")
            elif opcode == 0x9:
                self.transport.write(mask_frame(bytes(payload), 0xA))
            elif opcode == 0x8:
                if not self.closing:
                    self.closing = True
                    self.transport.write(mask_frame(bytes(payload[:2]), 0x8))
                self.transport.close()
                if not self.done.done():
                    self.fail(f"server closed: {bytes(payload)!r}")
                return
        self.buffer = buf[pos:] if pos < n else b""
        if self.state == "run" and run.t0:
            run.t_last_ack = now
            self._pump(now)

    def _pump(self, now: int) -> None:
        """Send as many frames as the window has room for, in one write."""
        run = self.run
        free = self.window - len(self.inflight)
        past_deadline = run.deadline_ns is not None and now > run.deadline_ns
        if free > 0 and self.frames_left > 0 and not past_deadline:
            k = min(free, self.frames_left)
            pool, position, size = run.pool, self.position, len(run.pool)
            width, slot_value = run.codec.slot_width, run.codec.slot_value
            frame = self.frame
            out = []
            for _ in range(k):
                out.append(pool[position].render(slot_value(frame), width))
                frame += 1
                position += 1
                if position == size:
                    position = 0
                self.inflight.append(now)
            self.position, self.frame = position, frame
            self.producer.next_frame = frame
            self.frames_left -= k
            run.sent_frames += k
            run.sent_events += k * run.codec.batch
            assert self.transport is not None
            self.transport.write(out[0] if k == 1 else b"".join(out))
        elif not self.inflight and not self.done.done():
            self.done.set_result(None)

    def start(self) -> None:
        """Begin sending (after every connection got its welcome)."""
        self._pump(time.perf_counter_ns())

    def close(self) -> None:
        """Start the closing handshake."""
        if self.transport is not None and not self.transport.is_closing():
            self.closing = True
            self.transport.write(mask_frame((1000).to_bytes(2, "big"), 0x8))


async def run_raw(run: Run) -> int:
    """Connect every raw connection, run the load, close; returns the end time (ns)."""
    a = run.args
    loop = asyncio.get_running_loop()
    connections = [RawConnection(run, i) for i in range(a.conns)]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(c: RawConnection) -> None:
        async with gate:
            await loop.create_connection(lambda: c, a.host, a.port)
            await c.ready

    async with asyncio.timeout(CONNECT_TIMEOUT):
        await asyncio.gather(*(connect(c) for c in connections))
    run.cpu_before = run.cpu.snapshot()
    run.t0 = time.perf_counter_ns()
    if a.duration:
        run.deadline_ns = run.t0 + int(a.duration * 1e9)
    for c in connections:
        c.start()
    try:
        async with asyncio.timeout(a.timeout):
            await asyncio.gather(*(c.done for c in connections))
    except (TimeoutError, ConnectionError) as exc:
        run.errors.append(f"run aborted: {type(exc).__name__} {exc}")
    t_end = time.perf_counter_ns()
    run.cpu_after = run.cpu.snapshot()
    for c in connections:
        c.close()
    await asyncio.wait([c.closed for c in connections], timeout=3)
    for c in connections:
        if c.transport is not None and not c.transport.is_closing():
            c.transport.close()
    return t_end


# -- the websockets client (cross-check) -------------------------------------------


async def wait_clients(
    run: Run, tasks: list[asyncio.Task[Any]], within: float, who: str, late: str
) -> set[asyncio.Task[Any]]:
    """Wait for the client tasks; cancel and note those still running, note those that failed."""
    done, pending = await asyncio.wait(tasks, timeout=within)
    for task in pending:
        task.cancel()
        run.errors.append(f"{who}: {late}")
    for task in done:
        if task.exception():
            run.errors.append(f"{who}: {task.exception()!r}")
    return pending


async def run_websockets(run: Run) -> int:
    """The same load through the ``websockets`` client; returns the end time (ns)."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.typing import Origin, Subprotocol

    a = run.args
    codec = run.codec
    url = f"ws://{a.host}:{a.port}/v1/track/{a.site}"
    go = asyncio.Event()
    text = codec.name == "json"
    decode = codec.decoder.decode

    async def read_answers(
        ws: ClientConnection, p: Producer, inflight: deque[int], slots: asyncio.Semaphore
    ) -> None:
        async for raw in ws:
            now = time.perf_counter_ns()
            message = decode(raw)
            if isinstance(message, Ack):
                run.on_ack(p, message)
            elif isinstance(message, Nack):
                run.on_nack(p, message)
            else:
                raise ConnectionError(f"unexpected message {message!r}")
            run.latencies_ns.append(now - inflight.popleft())
            run.t_last_ack = now
            slots.release()

    async def one(index: int, ready: asyncio.Future[None]) -> None:
        p = run.producer(index)
        origin = Origin(a.origin) if a.origin else None
        async with connect(
            url,
            origin=origin,
            subprotocols=[Subprotocol(codec.subprotocol)],
            compression=None,
            max_size=None,
            max_queue=None,
            ping_interval=None,
            proxy=None,
        ) as ws:
            if ws.subprotocol != codec.subprotocol and not (text and ws.subprotocol is None):
                raise ConnectionError(f"server chose subprotocol {ws.subprotocol!r}")
            await ws.send(codec.hello(p.customer, p.name), text=text)
            welcome = decode(await ws.recv())
            if not isinstance(welcome, Welcome):
                raise ConnectionError(f"expected welcome, got {welcome!r}")
            p.session = welcome.session
            ready.set_result(None)
            await go.wait()
            frames_left = run.frames_per_connection()
            inflight: deque[int] = deque()
            slots = asyncio.Semaphore(a.window)
            reader = asyncio.create_task(read_answers(ws, p, inflight, slots))
            position = (index * 7919) % len(run.pool)
            width = codec.slot_width
            while frames_left > 0:
                await slots.acquire()
                now = time.perf_counter_ns()
                if run.deadline_ns is not None and now > run.deadline_ns:
                    slots.release()
                    break
                inflight.append(now)
                frame = run.pool[position].render(codec.slot_value(p.next_frame), width)
                await ws.send(frame, text=text)
                p.next_frame += 1
                run.sent_frames += 1
                run.sent_events += codec.batch
                frames_left -= 1
                position = (position + 1) % len(run.pool)
            # Wait for the last W answers: every slot back, or the reader failed.
            for _ in range(a.window):
                acquire = asyncio.ensure_future(slots.acquire())
                await asyncio.wait([acquire, reader], return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    acquire.cancel()
                    reader.result()
            reader.cancel()

    async def guarded(index: int, ready: asyncio.Future[None]) -> None:
        try:
            await one(index, ready)
        except BaseException as exc:
            if not ready.done():  # a failed handshake or hello ends the connect phase
                ready.set_exception(ConnectionError(f"conn {index}: {exc!r}"))
            raise

    loop = asyncio.get_running_loop()
    readies: list[asyncio.Future[None]] = [loop.create_future() for _ in range(a.conns)]
    tasks = [asyncio.create_task(guarded(i, r)) for i, r in enumerate(readies)]
    for task in tasks:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await asyncio.gather(*readies)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    run.cpu_before = run.cpu.snapshot()
    run.t0 = time.perf_counter_ns()
    if a.duration:
        run.deadline_ns = run.t0 + int(a.duration * 1e9)
    go.set()
    await wait_clients(run, tasks, a.timeout, "websockets client", "timed out")
    t_end = time.perf_counter_ns()
    run.cpu_after = run.cpu.snapshot()
    return t_end


# -- the ledger client (chaos runs) --------------------------------------------------


@dataclass(slots=True)
class LedgerFrame:
    """One frame of a ledger connection: its number, its bytes and when it was first sent."""

    number: int
    payload: bytes
    sent_ns: int = 0


async def run_ledger(run: Run) -> int:
    """Frames that must all be stored once, whatever fails; returns the end time (ns).

    Each of C connections keeps one producer for the whole run and holds
    every frame until it is answered: a ``nack`` puts the frame aside, nothing
    new is sent until every frame in flight is answered, and then the nacked
    frames go again, same bytes (same producer and seqs), after the longest
    ``retry_after_ms``. A lost connection (or an ``error`` and its close)
    puts every unanswered frame back; the connection reconnects with the same
    producer, drops what ``welcome.acked`` covers (stored by an earlier
    connection) and resends the rest. Each stored event's ``producer seq``
    goes to the ledger file as one line. ``--duration`` bounds the new
    frames, ``--rate`` their events per second per connection.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.typing import Origin, Subprotocol

    a = run.args
    codec = run.codec
    url = f"ws://{a.host}:{a.port}/v1/track/{a.site}"
    text = codec.name == "json"
    decode = codec.decoder.decode
    ledger = open(a.ledger, "w")  # noqa: SIM115, ASYNC230 - closed below, after every task
    origin = Origin(a.origin) if a.origin else None
    run.t0 = time.perf_counter_ns()
    run.cpu_before = run.cpu.snapshot()
    if a.duration:
        run.deadline_ns = run.t0 + int(a.duration * 1e9)
    gap_ns = int(codec.batch / a.rate * 1e9) if a.rate else 0

    def stored(p: Producer, frame: LedgerFrame) -> None:
        first = frame.number * codec.M
        ledger.write("".join(f"{p.name} {first + i}\n" for i in range(codec.batch)))
        run.acked_frames += 1
        run.t_last_ack = time.perf_counter_ns()

    async def one(index: int) -> None:
        p = run.producer(index)
        frames_left = run.frames_per_connection()
        position = (index * 7919) % len(run.pool)
        pending: deque[LedgerFrame] = deque()  # not sent on this connection, in seq order
        next_send = time.perf_counter_ns()
        attempt = 0
        while True:
            if not pending and (
                frames_left <= 0 or time.perf_counter_ns() > (run.deadline_ns or 1 << 62)
            ):
                return
            # Unanswered frames of this connection, back to ``pending`` if it is lost.
            inflight: deque[LedgerFrame] = deque()
            nacked: list[LedgerFrame] = []
            try:
                async with connect(
                    url, origin=origin, subprotocols=[Subprotocol(codec.subprotocol)],
                    compression=None, max_size=None, max_queue=None, ping_interval=None,
                    proxy=None, open_timeout=10,
                ) as ws:  # fmt: skip
                    await ws.send(codec.hello(p.customer, p.name), text=text)
                    welcome = decode(await ws.recv(decode=False))
                    if not isinstance(welcome, Welcome):
                        raise ConnectionError(f"expected welcome, got {welcome!r}")
                    attempt = 0
                    last = codec.batch - 1
                    while pending and pending[0].number * codec.M + last <= welcome.acked:
                        # Stored by an earlier connection whose ack was lost: counted
                        # as accepted (the server took them then).
                        stored(p, pending.popleft())
                        run.accepted += codec.batch
                        p.accepted += codec.batch
                        run.resumed += 1
                    retry_ms = 0
                    while True:
                        # Send: the pending frames first, then new ones (paced), W at most.
                        while len(inflight) < a.window and not nacked:
                            if pending:
                                frame = pending.popleft()
                            else:
                                now = time.perf_counter_ns()
                                if frames_left <= 0 or (
                                    run.deadline_ns is not None and now > run.deadline_ns
                                ):
                                    break
                                if now < next_send:
                                    if not inflight:
                                        await asyncio.sleep((next_send - now) / 1e9)
                                        continue
                                    break
                                next_send = max(next_send + gap_ns, now - 10 * gap_ns)
                                raw = run.pool[position].render(
                                    codec.slot_value(p.next_frame), codec.slot_width
                                )
                                frame = LedgerFrame(p.next_frame, raw, now)
                                p.next_frame += 1
                                frames_left -= 1
                                position = (position + 1) % len(run.pool)
                                run.sent_frames += 1
                                run.sent_events += codec.batch
                            inflight.append(frame)
                            await ws.send(frame.payload, text=text)
                        if not inflight:
                            if nacked:  # every frame answered: resend the nacked ones
                                await asyncio.sleep(retry_ms / 1000)
                                pending.extendleft(reversed(nacked))
                                nacked, retry_ms = [], 0
                                continue
                            if not pending:
                                return
                            continue
                        message = decode(await ws.recv(decode=False))
                        if isinstance(message, Ack):
                            frame = inflight.popleft()
                            expected = frame.number * codec.M + last
                            rejected = len(message.rejected)
                            if message.seq != expected or (
                                message.accepted + message.duplicate + rejected != codec.batch
                            ):
                                run.bad_acks += 1
                                run.note(f"conn {index}: ack {message!r}, expected seq {expected}")
                            run.accepted += message.accepted
                            p.accepted += message.accepted
                            run.duplicate += message.duplicate
                            run.rejected += rejected
                            run.latencies_ns.append(time.perf_counter_ns() - frame.sent_ns)
                            stored(p, frame)
                        elif isinstance(message, Nack):
                            nacked.append(inflight.popleft())
                            run.nacks += 1
                            run.nack_codes[message.code] = run.nack_codes.get(message.code, 0) + 1
                            retry_ms = max(retry_ms, message.retry_after_ms)
                        else:  # an error: the close follows
                            run.note(f"conn {index}: {message!r}")
                            await ws.close()
                            raise ConnectionError(f"error {message!r}")
            except (OSError, ConnectionError, ConnectionClosed, InvalidHandshake, TimeoutError):
                # Oldest first: the nacked frames, then those in flight, then the rest.
                pending.extendleft(reversed([*nacked, *inflight]))
                run.reconnects += 1
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))

    tasks = [asyncio.create_task(one(i)) for i in range(a.conns)]
    try:
        pending_tasks = await wait_clients(
            run,
            tasks,
            (a.duration or 0) + a.timeout,
            "ledger client",
            "frames unanswered at the timeout",
        )
        if pending_tasks:
            await asyncio.wait(pending_tasks)
    finally:
        ledger.close()
    run.cpu_after = run.cpu.snapshot()
    return time.perf_counter_ns()


# -- CPU accounting from /proc ------------------------------------------------------

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

#: Per process name: its tree's ticks and each thread's ticks; the machine's
#: total and idle ticks; the monotonic time.
CpuSnapshot = tuple[dict[str, tuple[int, dict[int, int]]], tuple[int, int], float]


def _children() -> dict[int, list[int]]:
    """Every live process' children, by parent pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent = int(stat[stat.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def _ticks(path: str) -> int:
    """utime + stime of a /proc stat file (the command name may hold spaces and parentheses)."""
    stat = Path(path).read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def tree_ticks(root: int) -> tuple[int, dict[int, int]]:
    """CPU ticks of ``root`` and its live descendants, and of each of their threads.

    The busiest thread tells whether one event loop is the limit.
    """
    children = _children()
    total = 0
    threads: dict[int, int] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            total += _ticks(f"/proc/{pid}/stat")
            for tid in os.listdir(f"/proc/{pid}/task"):
                # A thread may end between the listing and the read.
                with contextlib.suppress(OSError, ValueError, IndexError):
                    threads[int(tid)] = _ticks(f"/proc/{pid}/task/{tid}/stat")
        except (OSError, ValueError, IndexError):
            pass
        stack.extend(children.get(pid, ()))
    return total, threads


def machine_ticks() -> tuple[int, int]:
    """The machine's total and idle (idle + iowait) ticks, all CPUs."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


class CpuWatch:
    """CPU% of this process and of named processes (with descendants) between two snapshots.

    Args:
        spec: ``name=pid,...`` (``--cpu-pids``).
    """

    def __init__(self, spec: str | None) -> None:
        self.pids = {"loadgen": os.getpid()}
        for item in filter(None, (spec or "").split(",")):
            name, _, pid = item.partition("=")
            self.pids[name] = int(pid)

    def snapshot(self) -> CpuSnapshot:
        """The ticks now."""
        trees = {name: tree_ticks(pid) for name, pid in self.pids.items()}
        return trees, machine_ticks(), time.monotonic()

    @staticmethod
    def between(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
        """CPU% per name, of its busiest thread (``NAME_top_thread``) and of the machine."""
        trees0, (total0, idle0), wall0 = before
        trees1, (total1, idle1), wall1 = after
        wall = wall1 - wall0

        def share(ticks: int) -> float:
            return round(100.0 * ticks / CLOCK_TICKS / wall, 1)

        out: dict[str, float] = {}
        for name in trees0:
            threads0, threads1 = trees0[name][1], trees1[name][1]
            out[name] = share(trees1[name][0] - trees0[name][0])
            busiest = max((t - threads0.get(tid, 0) for tid, t in threads1.items()), default=0)
            out[name + "_top_thread"] = share(busiest)
        spent = total1 - total0
        busy = 1 - (idle1 - idle0) / spent if spent else 0.0
        out["system_busy"] = round(100.0 * (os.cpu_count() or 1) * busy, 1)
        return out


# -- verifying the stream ----------------------------------------------------------


def entries_added(r: redis.Redis, key: str) -> int:
    """The stream's ``entries-added`` (which counts trimmed entries too); 0 if absent."""
    if not r.exists(key):
        return 0
    info = r.xinfo_stream(key)
    return int(info.get("entries-added", info.get("length", 0)))


@dataclass
class Mark:
    """Where the stream stood before the run."""

    last_id: str | None
    added: int


def stream_mark(r: redis.Redis, key: str) -> Mark:
    """The stream's last entry id and entries added so far."""
    last = r.xrevrange(key, "+", "-", count=1)
    return Mark(last[0][0].decode() if last else None, entries_added(r, key))


@dataclass
class Scan:
    """What one pass over the run's new entries found."""

    seqs: dict[str, list[int]]
    scanned: int = 0
    server_made: int = 0
    other: int = 0
    bad_shape: int = 0
    problems: list[str] = field(default_factory=list)

    def bad(self, text: str) -> None:
        """Count an entry of the wrong shape; keep the first few."""
        self.bad_shape += 1
        if self.bad_shape <= 3:
            self.problems.append(text)


def scan_stream(r: redis.Redis, key: str, site: str, run: Run, mark: Mark) -> Scan:
    """Read every entry after ``mark`` and collect the seqs of this run's producers."""
    producers = {p.name: p for p in run.producers}
    scan = Scan(seqs={name: [] for name in producers})
    decoder = msgspec.json.Decoder(StoredEvent)
    start = "(" + mark.last_id if mark.last_id else "-"
    while True:
        chunk = r.xrange(key, start, "+", count=SCAN_COUNT)
        if not chunk:
            return scan
        for raw_id, fields in chunk:
            scan.scanned += 1
            entry = raw_id.decode()
            raw = fields.get(b"event")
            try:
                if raw is None or len(fields) != 1:
                    raise msgspec.ValidationError(f"fields {sorted(fields)}, want only 'event'")
                event = decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                scan.bad(f"entry {entry}: {exc}: {bytes(raw or b'')[:200]!r}")
                continue
            p = producers.get(event.producer)
            if p is None:
                if event.producer.startswith("srv:"):
                    scan.server_made += 1
                else:
                    scan.other += 1
                continue
            scan.seqs[event.producer].append(event.seq)
            wrong_session = p.session is not None and event.session != p.session
            if event.uuid != p.customer or event.site != site or wrong_session:
                scan.bad(f"entry {entry}: site/uuid/session mismatch {raw[:200]!r}")
        start = "(" + chunk[-1][0].decode()


def check_producers(run: Run, scan: Scan, trimmed: int) -> tuple[int, list[str]]:
    """Whether each producer's stored seqs are exactly its acked ones; (duplicates, problems)."""
    codec = run.codec
    problems: list[str] = []
    duplicates = wrong = 0
    for p in run.producers:
        stored = scan.seqs[p.name]
        twice = len(stored) - len(set(stored))
        duplicates += twice
        frames = range(p.first_frame, p.next_frame)
        if p.accepted == len(frames) * codec.batch:  # all accepted: the exact seq list
            expected = [f * codec.M + i for f in frames for i in range(codec.batch)]
            # MAXLEN ~ trims the oldest entries: then only a suffix can be left.
            good = sorted(stored) == (
                expected[len(expected) - len(stored) :] if trimmed else expected
            )
        else:
            low = frames.start * codec.M
            high = (frames.stop - 1) * codec.M + codec.batch - 1
            count_ok = len(stored) <= p.accepted if trimmed else len(stored) == p.accepted
            good = not twice and count_ok and all(low <= s <= high for s in stored)
        if not good:
            wrong += 1
            if wrong <= 3:
                problems.append(
                    f"producer {p.name}: {len(stored)} stored ({twice} twice), "
                    f"{p.accepted} acked accepted, seqs not the acked ones"
                )
    return duplicates, problems


def verify_stream(a: argparse.Namespace, run: Run, mark: Mark) -> dict[str, Any]:
    """Compare what the stream holds for this run's producers with what was acked."""
    r = redis.Redis(host=a.redis_host, port=a.redis_port)
    out: dict[str, Any] = {"verify": a.verify}
    problems: list[str] = []
    try:
        added = entries_added(r, a.stream) - mark.added
        out["stream_added"] = added
        if a.verify == "count":
            if added != run.accepted:
                problems.append(f"stream grew by {added}, acked accepted {run.accepted}")
        else:
            scan = scan_stream(r, a.stream, a.site, run, mark)
            ours = sum(len(s) for s in scan.seqs.values())
            out.update(stream_ours=ours, stream_server_made=scan.server_made)
            out["stream_other"] = scan.other
            trimmed = added - scan.scanned
            if trimmed < 0:
                problems.append(f"stream rewritten: {added} added, {scan.scanned} present")
            elif trimmed:
                out["verify"] = "scan-partial"
                run.note(
                    f"stream trimmed by MAXLEN: {trimmed} oldest entries gone, checked the "
                    f"{scan.scanned} left (shorten DURATION or raise the server's MAXLEN)"
                )
            problems += scan.problems
            if scan.bad_shape:
                problems.append(f"{scan.bad_shape} entries with a bad shape")
            duplicates, wrong = check_producers(run, scan, max(trimmed, 0))
            out["stream_dup"] = duplicates
            problems += wrong
            if not ours <= run.accepted <= ours + max(trimmed, 0):
                problems.append(
                    f"{ours} events of this run in the stream, acked accepted {run.accepted}"
                )
    finally:
        r.close()
    out["verify_ok"] = not problems
    out["verify_problems"] = problems[:6]
    return out


# -- results -------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """The q-quantile (0-1) of sorted values; NaN if there are none."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def result(a: argparse.Namespace, run: Run, t_end: int, verdict: dict[str, Any]) -> dict[str, Any]:
    """The run's record, as printed and as ``--json``."""
    elapsed = ((run.t_last_ack or t_end) - run.t0) / 1e9 if run.t0 else 0
    latencies = sorted(run.latencies_ns)
    cpu: dict[str, float] = {}
    if run.cpu_before is not None and run.cpu_after is not None:
        cpu = CpuWatch.between(run.cpu_before, run.cpu_after)
    record: dict[str, Any] = {
        "server": a.label,
        "round": a.round,
        "impl": a.impl,
        "encoding": a.encoding,
        "C": a.conns,
        "B": a.batch,
        "W": a.window,
        "N_per_conn": a.events,
        "avg_event_bytes": round(a.average_event_bytes, 1),
        "elapsed_s": round(elapsed, 3),
        "sent_events": run.sent_events,
        "sent_frames": run.sent_frames,
        "acked_frames": run.acked_frames,
        "accepted": run.accepted,
        "duplicate": run.duplicate,
        "rejected": run.rejected,
        "nacks": run.nacks,
        "nack_codes": run.nack_codes,
        "reconnects": run.reconnects,
        "resumed_frames": run.resumed,
        "bad_acks": run.bad_acks,
        "events_per_s": round(run.accepted / elapsed) if elapsed > 0 else 0,
        "frames_per_s": round(run.acked_frames / elapsed) if elapsed > 0 else 0,
        "lat_p50_ms": round(percentile(latencies, 0.50) / 1e6, 3),
        "lat_p99_ms": round(percentile(latencies, 0.99) / 1e6, 3),
        "lat_max_ms": round(latencies[-1] / 1e6, 3) if latencies else None,
        **verdict,
        "cpu_pct": cpu,
        "errors": run.errors[:5],
        "n_errors": len(run.errors),
        "notes": run.notes[:5],
    }
    record["ok"] = (
        not run.errors
        and run.sent_frames > 0
        and run.acked_frames == run.sent_frames
        and run.accepted + (run.duplicate if a.ledger else 0) == run.sent_events
        and (a.ledger is not None or not run.nacks)
        and not run.bad_acks
        and verdict.get("verify_ok", True)
    )
    return record


def summary(record: dict[str, Any]) -> str:
    """The one-line human summary of a record."""
    stored = record.get("stream_ours", record.get("stream_added", "-"))
    return (
        f"[{record['server'] or 'server'}] C={record['C']} B={record['B']} W={record['W']} "
        f"impl={record['impl']} enc={record['encoding']} "
        f"avg_event={record['avg_event_bytes']:.0f}B  {record['events_per_s']:,} ev/s  "
        f"{record['frames_per_s']:,} frames/s  "
        f"p50={record['lat_p50_ms']}ms p99={record['lat_p99_ms']}ms  "
        f"sent={record['sent_events']} accepted={record['accepted']} "
        f"dup={record['duplicate']} rejected={record['rejected']} nacks={record['nacks']} "
        f"stored={stored}  ok={record['ok']}  cpu%={record['cpu_pct']}"
    )


def table(path: Path) -> tuple[str, bool]:
    """The markdown table of the records in ``path`` (``--json`` lines and
    ``raw_redis.sh``'s), and whether every row passed its check.

    "stored" is what the stream holds for the run's producers (``--verify
    scan``) or the entries added (``count``, redis-benchmark); ok means every
    frame acked in order, accepted == sent, no nack, and the stream holds
    exactly the acked events (``yes*``: MAXLEN trimmed it, only the newest
    were checked).
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head = ["server", "C", "B", "W", "events/s", "frames/s", "p50 ms", "p99 ms", "sent"]
    head += ["accepted", "stored", "ok", "cpu% srv", "srv top thread", "cpu% redis"]
    head += ["cpu% loadgen", "cpu% all"]
    body: list[list[str]] = []
    for row in rows:
        cpu = row.get("cpu_pct") or {}
        name = row["server"]
        if name == "redis-benchmark":
            name = f"redis-benchmark {row['impl']}"
        ok = ("yes*" if row.get("verify") == "scan-partial" else "yes") if row["ok"] else "NO"
        cells = [name, row["C"], row["B"], row["W"], f"{row['events_per_s']:,}"]
        cells += [
            f"{row['frames_per_s']:,}",
            f"{row['lat_p50_ms']:.2f}",
            f"{row['lat_p99_ms']:.2f}",
        ]
        cells += [row["sent_events"], row["accepted"]]
        cells += [row.get("stream_ours", row.get("stream_added", "-")), ok]
        cells += [cpu.get(k, "-") for k in ("server", "server_top_thread", "redis", "loadgen")]
        cells.append(cpu.get("system_busy", "-"))
        body.append([str(c) for c in cells])
    widths = [max(len(c) for c in column) for column in zip(head, *body, strict=False)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [line(cells) for cells in body]
    if any(row.get("verify") == "scan-partial" for row in rows):
        lines.append(
            "\nyes* = the server's MAXLEN trimmed the stream; only the newest events were checked"
        )
    failed = [row for row in rows if not row["ok"]]
    for row in failed:
        why = (
            (row.get("errors") or [])
            + (row.get("verify_problems") or [])
            + (row.get("notes") or [])
        )
        setting = f"C={row['C']} B={row['B']} W={row['W']}"
        lines.append(f"\nNOT OK: {row['server']} {setting}: " + "; ".join(why[:4]))
    if failed:
        lines.append(f"\nWARNING: {len(failed)} run(s) failed the correctness check")
    return "\n".join(lines), not failed


def other_cpu(row: dict[str, Any]) -> float | None:
    """The other jobs' CPU% during a row: the machine's busy CPU minus the benchmark's own.

    The benchmark's own processes are the server (with its children), Redis
    and the load generator, read from their ``/proc/PID/stat`` trees.
    """
    cpu = row.get("cpu_pct") or {}
    if "system_busy" not in cpu:
        return None
    ours = sum(cpu.get(k, 0.0) for k in ("server", "redis", "loadgen"))
    return max(0.0, round(cpu["system_busy"] - ours, 1))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _spread(values: Sequence[float], fmt: str) -> str:
    """``median (min-max)`` of values, each formatted with ``fmt``."""
    if not values:
        return "-"
    med = format(_median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def rounds_table(path: Path) -> tuple[str, bool]:
    """Medians over rounds (``bench/run.sh`` with ROUNDS > 1), and whether every row verified.

    Per setting (C:B:W) and server: events/s, p50 and p99 as median (min-max)
    over the rounds, and the ratio of events/s and of p99 to the row of
    ``node-dedup`` (else the first server) of the same round (its median and
    range: the ratio is taken round by round, so both sides of each ratio
    shared the machine's state).
    Then the other jobs' CPU per round (:func:`other_cpu`), and ``ok`` only if
    every round's row passed the stream scan and the de-duplication check.
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("round") is not None]
    if not rows:
        return "no rounds in " + str(path), False
    settings: dict[tuple[int, int, int], dict[str, dict[int, dict[str, Any]]]] = {}
    servers: list[str] = []
    for r in rows:
        by_server = settings.setdefault((r["C"], r["B"], r["W"]), {})
        by_server.setdefault(r["server"], {})[r["round"]] = r
        if r["server"] not in servers:
            servers.append(r["server"])
    base = "node-dedup" if "node-dedup" in servers else servers[0]
    rounds = sorted({r["round"] for r in rows})
    head = ["C:B:W", "server", "events/s", "p50 ms", "p99 ms", f"x {base} ev/s"]
    head += [f"x {base} p99", "server CPU%", "Redis CPU%", "other jobs' CPU% per round"]
    head += ["rounds", "verified"]
    body: list[list[str]] = []
    all_ok = True
    for (c, b, w), by_server in settings.items():
        for name in servers:
            runs = by_server.get(name, {})
            eps = [float(r["events_per_s"]) for r in runs.values()]
            ratios, p99_ratios = [], []
            for rnd, r in runs.items():
                ref = by_server.get(base, {}).get(rnd)
                if ref is not None and ref["events_per_s"] and name != base:
                    ratios.append(r["events_per_s"] / ref["events_per_s"])
                    if ref["lat_p99_ms"]:
                        p99_ratios.append(r["lat_p99_ms"] / ref["lat_p99_ms"])
            others = [other_cpu(runs[k]) for k in sorted(runs)]
            ok = len(runs) == len(rounds) and all(r["ok"] for r in runs.values())
            all_ok = all_ok and ok
            bad = [str(k) for k in sorted(runs) if not runs[k]["ok"]]
            body.append(
                [
                    f"{c}:{b}:{w}",
                    name,
                    _spread(eps, ",.0f"),
                    _spread([float(r["lat_p50_ms"]) for r in runs.values()], ".2f"),
                    _spread([float(r["lat_p99_ms"]) for r in runs.values()], ".2f"),
                    _spread(ratios, ".2f") if ratios else "-",
                    _spread(p99_ratios, ".2f") if p99_ratios else "-",
                    _spread(
                        [float((r.get("cpu_pct") or {}).get("server", 0)) for r in runs.values()],
                        ".0f",
                    ),
                    _spread(
                        [float((r.get("cpu_pct") or {}).get("redis", 0)) for r in runs.values()],
                        ".0f",
                    ),
                    " ".join("-" if o is None else f"{o:.0f}" for o in others),
                    str(len(runs)),
                    "yes" if ok else "NO" + (f" (round {', '.join(bad)})" if bad else ""),
                ]
            )
    widths = [max(len(c) for c in column) for column in zip(head, *body, strict=False)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [
        f"Medians (min-max) over {len(rounds)} alternating rounds; ratios taken round by round",
        "",
        line(head),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [line(cells) for cells in body]
    lines.append(
        "\nserver CPU%: the server's processes (all of them with --workers); 100 is one core"
    )
    lines.append(
        "other jobs' CPU%: the machine's busy CPU (of 200 on 2 cores) minus the server's, "
        "Redis' and the load generator's, during each round's measured row"
    )
    lines.append(
        "verified: every round's row acked in order, its stream held exactly the acked events, "
        "and check_dedup.py passed against the same server"
    )
    if not all_ok:
        lines.append("\nWARNING: a row failed its check (see the table of every run above)")
    return "\n".join(lines), all_ok


# -- command line --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the load generator."""
    p = argparse.ArgumentParser(
        prog="loadgen.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--site", default="bench", help="the site of /v1/track/{site}")
    p.add_argument("--origin", default="http://localhost", help="Origin header ('' = none)")
    p.add_argument("--encoding", choices=["json", "msgpack"], default="json")
    p.add_argument("-c", "--conns", type=int, default=50, help="C: connections")
    p.add_argument("-n", "--events", type=int, default=2000, help="N: events per connection")
    p.add_argument(
        "-b", "--batch", type=int, default=1, help=f"B: events per frame (1..{MAX_BATCH})"
    )
    p.add_argument("-w", "--window", type=int, default=1, help="W: unacknowledged frames at most")
    p.add_argument(
        "--duration", type=float, default=0, help="seconds of new frames (0: send all N)"
    )
    p.add_argument("--timeout", type=float, default=120, help="fail if acks are missing by then")
    p.add_argument("--impl", choices=["raw", "websockets"], default="raw")
    p.add_argument(
        "--ledger",
        default=None,
        metavar="FILE",
        help="chaos mode (websockets client): resend nacked frames and reconnect with the "
        "same producer; write each stored event's 'producer seq' to FILE",
    )
    p.add_argument(
        "--rate", type=float, default=0, help="ledger mode: events/s per connection (0: no cap)"
    )
    p.add_argument("--pool", type=int, default=0, help="distinct encoded frames (default: auto)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=None, help="verify the stream on this Redis")
    p.add_argument("--key-prefix", default="ew")
    p.add_argument("--stream", default=None, help="stream key (default {prefix}:{{site}}:events)")
    p.add_argument(
        "--verify",
        choices=["scan", "count", "none"],
        default="scan",
        help="scan: the run's entries are exactly the acked ones; count: entries added == "
        "acked accepted; none (both need --redis-port)",
    )
    p.add_argument("--cpu-pids", default=None, help="name=pid,... whose CPU%% is reported")
    p.add_argument("--label", default="", help="the server's name in the record")
    p.add_argument("--json", default=None, help="append the record as one JSON line to this file")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    p.add_argument("--table", type=Path, metavar="RESULTS", help="print the table of JSON lines")
    p.add_argument("--round", type=int, default=None, help="the round number, kept in the record")
    p.add_argument(
        "--rounds-table",
        type=Path,
        metavar="RESULTS",
        help="print per setting and server the medians (min-max) over the records' rounds",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the load (or print a table); returns the exit code."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.table is not None:
        text, ok = table(a.table)
        print(text)
        return 0 if ok else 1
    if a.rounds_table is not None:
        text, ok = rounds_table(a.rounds_table)
        print(text)
        return 0 if ok else 1
    if not 1 <= a.batch <= MAX_BATCH:
        parser.error(f"B must be 1..{MAX_BATCH} (max_batch)")
    if a.events % a.batch:
        a.events -= a.events % a.batch
        print(f"note: N rounded down to {a.events} (a multiple of B)", file=sys.stderr)
    if a.stream is None:
        a.stream = f"{a.key_prefix}:{{{a.site}}}:events"

    codec = Codec(a.encoding, a.batch)
    frames = a.pool or max(16, min(4096, 8192 // a.batch))
    if a.ledger is not None:
        a.impl = "ledger"
    pool, event_bytes = build_pool(codec, frames, a.seed, masked=a.impl == "raw")
    a.average_event_bytes = event_bytes / (frames * a.batch)
    run = Run(a, codec, pool)

    mark: Mark | None = None
    if a.redis_port is not None and a.verify != "none":
        r = redis.Redis(host=a.redis_host, port=a.redis_port)
        try:
            mark = stream_mark(r, a.stream)
        finally:
            r.close()

    runner: Callable[[Any], Any] = asyncio.run
    if not a.no_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    load = {"raw": run_raw, "websockets": run_websockets, "ledger": run_ledger}[a.impl]
    try:
        t_end = runner(load(run))
    except (TimeoutError, OSError, ConnectionError) as exc:
        run.errors.append(f"could not connect: {type(exc).__name__} {exc}")
        t_end = time.perf_counter_ns()
    verdict = verify_stream(a, run, mark) if mark is not None else {"verify": "none"}
    record = result(a, run, t_end, verdict)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(summary(record), flush=True)
    for text in run.errors[:5]:
        print("  error:", text, file=sys.stderr)
    for text in run.notes[:5]:
        print("  note:", text, file=sys.stderr)
    for text in verdict.get("verify_problems", []):
        print("  verify:", text, file=sys.stderr)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
