"""Open-loop load generator: ack latency of a PROTOCOL.md v1 server at a fixed event rate.

This module owns the open-loop measurement: a schedule of track frames that
does not wait for the server, the latency of each frame measured from the
time it was *scheduled* (not sent) to its ack, and the check that Redis holds
exactly the acked events. It speaks v1 JSON with the plain ``websockets``
client and imports nothing from ``server/``, so it drives any v1 server
(eventwire or the reference peers in ``bench/peers/``).

A closed-loop generator (W frames in flight, the next one sent when an ack
comes back) slows down with the server, so a slow ack delays the frames that
would have measured the slowness (coordinated omission). Here each of C
connections owns a fixed timetable: frame k of connection i is due at
``t0 + (i / C + k) * C * B / R`` seconds, so the C connections together send
R events/s evenly spread. Due times are absolute: a frame sent late does not
push the later ones back, and its latency includes the lateness (a frame a
timer sent early counts from its real send instead).

Each connection says hello (its own producer, unique per run and connection;
``Origin: http://localhost``; the site from the URL), waits for welcome, then
follows its timetable: ``--warmup`` seconds unmeasured, then ``--duration``
seconds measured. A frame is counted *late* when it leaves more than
``--late-ms`` after its due time (the generator, or the socket's write buffer,
could not keep up) and *dropped* when its connection already has
``--max-inflight`` frames unacknowledged: it is then not sent at all, and the
timetable goes on. Late and dropped frames of the measured window together are
the "late/dropped schedule"; a run where they exceed ``OVERLOAD_FRACTION`` of
the scheduled frames, where a nack came back, or whose achieved rate falls
below ``UNDERRUN_FRACTION`` of the target is flagged ``overload``: its
percentiles describe a server that did not keep up, not one at that rate.

Printed: achieved events/s (events acked during the measured window / its
length), ack latency p50/p90/p99/p99.9 of the acked frames due in the window
(nacked frames are counted, not timed), the p99 of each measured second, the
send lag p99 (how late the generator itself sent), late/dropped counts,
nacks, errors, and CPU% of the generator, of ``--server-pid`` /
``--redis-pid`` (with their descendants) and of the whole machine (``other``:
what the processes measured here do not explain, i.e. other jobs competing
for the cores). ``--json`` adds one JSON line.

With ``--redis-url`` it then verifies, like ``bench/loadgen.py``: the entries
added to ``{prefix}:{site}:events`` during the run hold, for this run's
producers, exactly the acked (accepted) seqs, none twice, each entry one field
``event`` with the section 7 JSON and the right site, uuid and session.
Server-made entries (producer ``srv:...``) are counted apart. If ``MAXLEN ~``
trimmed the stream, only what is left is checked (``yes*``).

``openloop.py --table RESULTS.jsonl`` prints the markdown table of ``--json``
lines (used by ``scripts/bench --peers --half-rate``).

Exit code: 0 when the run is ok (no error, every ack well-formed, every frame
answered, verification passed), 1 otherwise. Overload alone does not fail a
run: it is a measurement, flagged in the output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.typing import Origin, Subprotocol

from bench import (  # scripts/bench.py beside this file, not the bench/ folder
    Verdict,
    cpu_seconds,
    site_of,
    stream_position,
)

SUBPROTOCOL: Final = Subprotocol("eventwire.v1.json")

#: How long all C connections may take to be welcomed; a server that needs more is broken.
CONNECT_TIMEOUT: Final = 15.0

#: Opening handshakes at once; more would only queue in the server's accept backlog.
CONNECT_CONCURRENCY: Final = 50

#: Default cap on a connection's unacknowledged frames. Below eventwire's
#: ``max_inflight_frames`` (64), above which it stops reading the socket; at a
#: rate the server sustains a connection has one or two frames out.
MAX_INFLIGHT: Final = 32

#: Default: a frame leaving this much after its due time is late. Above the
#: event loop's timer jitter on a busy 2-core machine, well below the p99s compared.
LATE_MS: Final = 10.0

#: Late + dropped frames above this share of the scheduled ones flag an overload.
OVERLOAD_FRACTION: Final = 0.01

#: Achieved events/s below this share of the target rate flags an overload.
UNDERRUN_FRACTION: Final = 0.95

#: After the last due time, how long the acks of frames still out may take.
DRAIN_TIMEOUT: Final = 10.0

#: Delay between "everyone is welcomed" and the first due time, so that no frame
#: starts late because the timetable was laid out before the senders started.
START_DELAY: Final = 0.1

#: Entries read per XRANGE call while verifying (about 400 bytes each).
SCAN_COUNT: Final = 5000

#: Distinct event bodies cycled through; frames differ without encoding per send.
BODY_POOL: Final = 64


# -- wire messages (server -> client) --------------------------------------------------


class Rejection(msgspec.Struct):
    """One rejected event of an ack."""

    seq: int
    code: str = ""


class Welcome(msgspec.Struct, tag_field="type", tag="welcome"):
    """The answer to hello."""

    session: str = ""
    acked: int = 0


class Ack(msgspec.Struct, tag_field="type", tag="ack"):
    """The answer to one track frame: its events are stored (or rejected)."""

    seq: int
    accepted: int = 0
    duplicate: int = 0
    rejected: list[Rejection] = []


class Nack(msgspec.Struct, tag_field="type", tag="nack"):
    """Nothing of the frame was stored."""

    seq: int = 0
    code: str = ""
    retry_after_ms: int = 0


class Error(msgspec.Struct, tag_field="type", tag="error"):
    """The server closes the connection after this."""

    code: str = ""
    detail: str = ""


DECODE_SERVER: Final = msgspec.json.Decoder(Welcome | Ack | Nack | Error)


class StoredEvent(msgspec.Struct):
    """The fields of a stored event (PROTOCOL.md section 7) that verification reads."""

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


DECODE_STORED: Final = msgspec.json.Decoder(StoredEvent)


# -- frames ----------------------------------------------------------------------------


def event_bodies(count: int, now_ms: int) -> list[bytes]:
    """``count`` realistic events (about 250 bytes of JSON each) without their seq.

    Each is its JSON object minus the opening brace, ready to follow ``{"seq":N,``.
    """
    pages = [("/", "Home"), ("/sale", "Summer Sale"), ("/account", "My Account")]
    products = [
        ("Blue Running Shoes", "shoes", 89.95),
        ("Merino Wool Sweater", "knitwear", 129.0),
        ("Cast Iron Skillet 28cm", "kitchen", 44.5),
        ("Wireless Earbuds Pro", "audio", 159.0),
    ]
    base = "https://shop.example.com"
    out: list[bytes] = []
    for n in range(count):
        kind = n % 4
        name, category, price = products[n % len(products)]
        slug = name.lower().replace(" ", "-")
        event: dict[str, Any]
        if kind == 0:
            path, title = pages[n % len(pages)]
            event = {
                "action": "page.visit",
                "label": f"Visited page {title} - Example Shop",
                "params": {
                    "url": f"{base}{path}?utm_source=newsletter&utm_campaign=c{n}",
                    "title": f"{title} - Example Shop",
                    "referrer": "https://www.google.com/",
                },
            }
        elif kind in (1, 2):
            event = {
                "action": "product.view" if kind == 1 else "cart.add",
                "label": name,
                "params": {
                    "url": f"{base}/p/{slug}-{10000 + n}",
                    "title": f"{name} - Example Shop",
                    "product_id": str(10000 + n),
                    "category": category,
                    "price": price,
                    "currency": "EUR",
                },
            }
        else:
            query = ["running shoes", "wool sweater", "skillet", "earbuds"][n % 4]
            event = {
                "action": "search.query",
                "label": query,
                "params": {
                    "url": f"{base}/search?q={query.replace(' ', '+')}",
                    "title": f"Search: {query}",
                    "query": query,
                    "results": 7 * n % 240,
                },
            }
        event["time"] = now_ms - 37 * n
        out.append(msgspec.json.encode(event)[1:])
    return out


def track_frame(first_seq: int, bodies: Sequence[bytes]) -> bytes:
    """A track frame whose events have seqs ``first_seq``, ``first_seq + 1``, ..."""
    events = b",".join(b'{"seq":%d,%s' % (first_seq + i, body) for i, body in enumerate(bodies))
    return b'{"type":"track","events":[' + events + b"]}"


def hello_frame(uuid: str, producer: str) -> bytes:
    """The hello that opens a connection."""
    return msgspec.json.encode(
        {"type": "hello", "uuid": uuid, "producer": producer, "client": "eventwire-openloop/1"}
    )


# -- the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The timetable shared by all connections, in `time.perf_counter` seconds.

    Not the event loop's clock: uvloop's `loop.time()` has millisecond steps, too coarse
    for the latencies measured here.
    """

    conns: int
    batch: int
    rate: float
    max_inflight: int
    late: float
    #: Seconds between two frames of one connection.
    interval: float
    #: First due time, start and end of the measured window (due times stop at ``end``).
    t0: float
    start: float
    end: float

    def due(self, conn: int, k: int) -> float:
        """When frame k of connection ``conn`` is due: connections are evenly phase-shifted."""
        return self.t0 + (conn / self.conns + k) * self.interval

    def measured(self, t: float) -> bool:
        """Whether time t lies in the measured window."""
        return self.start <= t < self.end


@dataclass
class Tally:
    """Counters shared by every connection."""

    #: Ack latency (s) of frames due in the measured window, from their due time.
    latencies: list[float] = field(default_factory=list)
    #: The same, by whole second of the window their frame was due in (bursts show here).
    by_second: dict[int, list[float]] = field(default_factory=dict)
    #: How late (s) the frames due in the measured window were sent.
    send_lags: list[float] = field(default_factory=list)
    #: Events accepted by acks that arrived in the measured window.
    window_accepted: int = 0
    scheduled: int = 0
    late: int = 0
    dropped: int = 0
    sent_frames: int = 0
    acked_frames: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    nacks: int = 0
    bad_acks: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        """Record an error; the first few are kept for the report."""
        if len(self.errors) < 20:
            self.errors.append(text)

    def note(self, text: str) -> None:
        """Record something worth reading that is not an error."""
        if len(self.notes) < 10:
            self.notes.append(text)


@dataclass
class Flow:
    """One connection: its identity, frames out, and what its acks confirmed."""

    index: int
    uuid: str
    producer: str
    ws: ClientConnection | None = None
    session: str = ""
    #: (due time, latency origin, first seq) of each frame out, in send order.
    inflight: deque[tuple[float, float, int]] = field(default_factory=deque)
    #: The seq the next frame starts with; seqs run 1, 2, ... with no gaps.
    next_seq: int = 1
    #: (first, last) seqs of each acked frame.
    acked: list[tuple[int, int]] = field(default_factory=list)
    #: Seqs that acks reported rejected (not stored).
    rejected: set[int] = field(default_factory=set)
    #: Set while no frame is out, or once the connection is gone (nothing more will come).
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False

    def __post_init__(self) -> None:
        self.idle.set()


async def open_flow(flow: Flow, url: str, origin: str, tally: Tally) -> None:
    """Connect, say hello and wait for welcome.

    Raises:
        ConnectionError: the server did not answer hello with welcome.
    """
    ws = await connect(
        url,
        origin=Origin(origin) if origin else None,
        subprotocols=[SUBPROTOCOL],
        compression=None,
        max_queue=None,
        ping_interval=None,
        proxy=None,
        open_timeout=CONNECT_TIMEOUT,
    )
    flow.ws = ws
    if ws.subprotocol not in (SUBPROTOCOL, None):
        raise ConnectionError(f"server chose subprotocol {ws.subprotocol!r}")
    await ws.send(hello_frame(flow.uuid, flow.producer), text=True)
    message = DECODE_SERVER.decode(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT))
    if not isinstance(message, Welcome):
        raise ConnectionError(f"conn {flow.index}: expected welcome, got {message!r}")
    flow.session = message.session
    if message.acked:
        tally.note(f"conn {flow.index}: welcome.acked={message.acked} for a new producer")


def take_answer(flow: Flow, plan: Plan, tally: Tally, message: object, now: float) -> bool:
    """Match one server message with the oldest frame out and count it.

    Returns:
        False when the message breaks the protocol (the connection is then abandoned).
    """
    if not isinstance(message, Ack | Nack) or not flow.inflight:
        tally.error(f"conn {flow.index}: unexpected {message!r}"[:300])
        return False
    due, origin, first = flow.inflight.popleft()
    if not flow.inflight:
        flow.idle.set()
    last = first + plan.batch - 1
    if isinstance(message, Nack):
        # Not resent: a nack at the measured rate is itself the finding (overload).
        tally.nacks += 1
        tally.note(f"conn {flow.index}: nack {message.code} seq={message.seq}")
        return True
    tally.acked_frames += 1
    if plan.measured(due):
        tally.latencies.append(now - origin)
        tally.by_second.setdefault(int(due - plan.start), []).append(now - origin)
    counted = message.accepted + message.duplicate + len(message.rejected)
    if message.seq != last or counted != plan.batch:
        tally.bad_acks += 1
        tally.error(
            f"conn {flow.index}: ack seq={message.seq} counting {counted} events "
            f"for the frame {first}..{last}"
        )
    tally.accepted += message.accepted
    tally.duplicate += message.duplicate
    tally.rejected += len(message.rejected)
    if plan.measured(now):
        tally.window_accepted += message.accepted
    flow.acked.append((first, last))
    flow.rejected.update(r.seq for r in message.rejected)
    if message.rejected:
        tally.note(f"conn {flow.index}: rejected {message.rejected[:2]!r}"[:300])
    return True


async def read_answers(flow: Flow, plan: Plan, tally: Tally) -> None:
    """Take the server's answers until the connection closes or breaks the protocol."""
    ws = flow.ws
    assert ws is not None
    try:
        async for raw in ws:
            now = time.perf_counter()
            try:
                message = DECODE_SERVER.decode(raw)
            except msgspec.DecodeError as exc:
                tally.error(f"conn {flow.index}: undecodable message {str(raw)[:200]!r}: {exc}")
                return
            if not take_answer(flow, plan, tally, message, now):
                return
        if not flow.closing:
            tally.error(f"conn {flow.index}: the server closed the connection")
    except ConnectionClosed as exc:
        if not flow.closing:
            tally.error(f"conn {flow.index}: connection closed ({exc})")
    finally:
        # Nothing more will come on this connection: let the drain stop waiting for it.
        flow.idle.set()


async def follow_timetable(flow: Flow, plan: Plan, bodies: Sequence[bytes], tally: Tally) -> None:
    """Send this connection's frames at their due times until the measured window ends."""
    ws = flow.ws
    assert ws is not None
    batch, pool = plan.batch, len(bodies)
    k = 0
    while True:
        due = plan.due(flow.index, k)
        if due >= plan.end:
            return
        k += 1
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        measured = due >= plan.start
        tally.scheduled += measured
        if len(flow.inflight) >= plan.max_inflight:
            tally.dropped += measured
            continue
        now = time.perf_counter()
        lag = now - due
        if measured:
            tally.send_lags.append(lag)
            tally.late += lag > plan.late
        # Latency counts from the due time, so a late send is charged to the server's
        # side of the books (no coordinated omission). A timer may also fire up to
        # a millisecond early (uvloop rounds delays to milliseconds): then it counts
        # from the real send, so an early frame does not look faster than it was.
        origin = max(due, now)
        first = flow.next_seq
        flow.next_seq += batch
        at = first % pool
        frame = track_frame(first, [bodies[(at + i) % pool] for i in range(batch)])
        flow.inflight.append((due, origin, first))
        flow.idle.clear()
        tally.sent_frames += 1
        try:
            await ws.send(frame, text=True)
        except ConnectionClosed:
            return  # the reader reports why


def machine_ticks() -> tuple[int, int, int]:
    """(all, busy, steal) clock ticks of every CPU since boot, from /proc/stat.

    Busy is everything but idle and iowait. Steal is time the hypervisor gave to
    other guests: on a shared VM it explains latency that no process here shows.
    """
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    total = sum(ticks[:8])
    return total, total - ticks[3] - ticks[4], ticks[7] if len(ticks) > 7 else 0


@dataclass
class Outcome:
    """What the load phase leaves for the report and the verification."""

    flows: list[Flow]
    tally: Tally
    cpu: dict[str, float | None]
    unanswered: int


async def measure_cpu(
    plan: Plan, pids: dict[str, int | None], out: dict[str, float | None]
) -> None:
    """CPU% over the measured window, into ``out``: this process, ``pids``, the machine.

    ``machine`` is the busy share of all CPUs (up to 100 * cores) and
    ``steal`` the share taken by the hypervisor; ``other`` is ``machine`` minus
    the processes measured here: well above zero, something else competed.
    """
    await asyncio.sleep(max(0.0, plan.start - time.perf_counter()))
    before = {name: cpu_seconds(pid) if pid else None for name, pid in pids.items()}
    own0, wall0, machine0 = time.process_time(), time.perf_counter(), machine_ticks()
    await asyncio.sleep(max(0.0, plan.end - time.perf_counter()))
    wall = time.perf_counter() - wall0
    machine1 = machine_ticks()
    out["generator"] = round(100 * (time.process_time() - own0) / wall, 1)
    cores, elapsed = os.cpu_count() or 1, machine1[0] - machine0[0]
    if elapsed > 0:
        out["machine"] = round(100 * cores * (machine1[1] - machine0[1]) / elapsed, 1)
        out["steal"] = round(100 * cores * (machine1[2] - machine0[2]) / elapsed, 1)
    for name, pid in pids.items():
        after = cpu_seconds(pid) if pid else None
        b = before[name]
        out[name] = None if b is None or after is None else round(100 * (after - b) / wall, 1)
    if "machine" in out:
        ours = sum(v for k, v in out.items() if k not in ("machine", "steal") and v is not None)
        out["other"] = round(max(0.0, (out["machine"] or 0.0) - ours), 1)


async def load(args: argparse.Namespace) -> Outcome:
    """Connect every flow, follow the timetable, wait for the last answers, close."""
    tally = Tally()
    run_id = os.urandom(4).hex()
    flows = [
        Flow(index=i, uuid=f"ol-customer-{run_id}-{i}", producer=f"ol-{run_id}-{i}")
        for i in range(args.connections)
    ]
    bodies = event_bodies(max(BODY_POOL, args.batch), int(time.time() * 1000))
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(flow: Flow) -> None:
        async with gate:
            await open_flow(flow, args.url, args.origin, tally)

    readers: list[asyncio.Task[None]] = []
    senders: list[asyncio.Task[None]] = []
    cpu: dict[str, float | None] = {}
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await asyncio.gather(*(open_one(f) for f in flows))
        t0 = time.perf_counter() + START_DELAY
        start = t0 + args.warmup
        plan = Plan(
            conns=args.connections,
            batch=args.batch,
            rate=args.rate,
            max_inflight=args.max_inflight,
            late=args.late_ms / 1000,
            interval=args.connections * args.batch / args.rate,
            t0=t0,
            start=start,
            end=start + args.duration,
        )
        readers = [asyncio.create_task(read_answers(f, plan, tally)) for f in flows]
        senders = [asyncio.create_task(follow_timetable(f, plan, bodies, tally)) for f in flows]
        pids = {"server": args.server_pid, "redis": args.redis_pid}
        await asyncio.gather(*senders, measure_cpu(plan, pids, cpu))
        try:
            async with asyncio.timeout(args.drain_timeout):
                await asyncio.gather(*(f.idle.wait() for f in flows))
        except TimeoutError:
            pass  # counted below as unanswered frames
    finally:
        for task in senders:
            task.cancel()
        for flow in flows:
            flow.closing = True
        await asyncio.gather(
            *(f.ws.close() for f in flows if f.ws is not None), return_exceptions=True
        )
        for task in readers:
            task.cancel()
        await asyncio.gather(*senders, *readers, return_exceptions=True)
    unanswered = sum(len(f.inflight) for f in flows)
    if unanswered:
        tally.error(f"{unanswered} frames got no answer within {args.drain_timeout:g} s")
    return Outcome(flows=flows, tally=tally, cpu=cpu, unanswered=unanswered)


# -- verifying -------------------------------------------------------------------------


def as_text(value: object) -> str:
    """A Redis reply item (bytes or str) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def verify(
    r: redis.Redis, key: str, site: str, since: tuple[str, int], flows: Sequence[Flow]
) -> Verdict:
    """Check the entries added after ``since`` against what each flow's acks confirmed.

    Only entries up to the stream's position at the start of the check are read:
    the server may keep adding its own (``session.end``) while this runs, and the
    entries-added counter read at the same moment tells whether ``MAXLEN ~`` trimmed any.
    """
    verdict = Verdict()
    until, added_until = stream_position(r, key)
    mine = {f.producer: f for f in flows}
    counts = {f.producer: bytearray(f.next_seq) for f in flows}
    start, scanned = f"({since[0]}", 0
    while until != "0-0":
        entries = r.xrange(key, min=start, max=until, count=SCAN_COUNT)
        if not entries:
            break
        for raw_id, raw_fields in entries:
            scanned += 1
            entry_id = as_text(raw_id)
            fields = raw_fields or {}
            if set(fields) != {b"event"}:
                verdict.malformed += 1
                verdict.problem(f"{entry_id}: fields {sorted(fields)!r}, want only 'event'")
                continue
            try:
                event = DECODE_STORED.decode(fields[b"event"])
            except msgspec.DecodeError as exc:
                verdict.malformed += 1
                verdict.problem(f"{entry_id}: not a section 7 event ({exc})")
                continue
            if event.producer.startswith("srv:"):
                verdict.server_made += 1
                continue
            flow = mine.get(event.producer)
            if flow is None:
                verdict.foreign += 1
                continue
            verdict.stored += 1
            count = counts[event.producer]
            if not 1 <= event.seq < len(count):
                verdict.unacked += 1
                verdict.problem(f"{event.producer}: seq {event.seq} was never sent")
                continue
            if count[event.seq] < 255:
                count[event.seq] += 1
            if event.site != site or event.uuid != flow.uuid:
                verdict.problem(f"{entry_id}: site/uuid {event.site!r}/{event.uuid!r}")
            elif flow.session and event.session != flow.session:
                verdict.problem(f"{entry_id}: session {event.session!r}, want {flow.session!r}")
        start = f"({as_text(entries[-1][0])}"
    # MAXLEN ~ drops the oldest entries of every producer alike, so what is left
    # of each producer is its newest seqs: only seqs below the lowest seen may be gone.
    verdict.trimmed = added_until - since[1] > scanned
    for producer, count in counts.items():
        flow = mine[producer]
        acked = bytearray(len(count))
        for first, last in flow.acked:
            acked[first : last + 1] = b"\1" * (last - first + 1)
        for seq in flow.rejected:
            if 0 < seq < len(acked):
                acked[seq] = 0
        lowest = 1
        if verdict.trimmed:
            lowest = next((s for s in range(1, len(count)) if count[s]), len(count))
        missing = sum(1 for s in range(lowest, len(count)) if acked[s] and not count[s])
        unacked = sum(1 for s in range(1, len(count)) if count[s] and not acked[s])
        dup = sum(c - 1 for c in count if c > 1)
        verdict.missing += missing
        verdict.unacked += unacked
        verdict.duplicate += dup
        if missing:
            verdict.problem(f"{producer}: {missing} acked events are not in the stream")
        if unacked:
            verdict.problem(f"{producer}: {unacked} stored events were never acked")
        if dup:
            verdict.problem(f"{producer}: {dup} events stored more than once")
    return verdict


# -- report ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, nearest rank; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def summarize(
    args: argparse.Namespace, outcome: Outcome, verdict: Verdict | None
) -> dict[str, Any]:
    """The run's figures as one JSON-ready object."""
    t = outcome.tally
    lat = sorted(t.latencies)
    p99_by_second = [
        round(percentile(sorted(t.by_second[s]), 99) * 1000, 1) for s in sorted(t.by_second)
    ]
    lags = sorted(t.send_lags)
    achieved = t.window_accepted / args.duration

    def ms(value: float) -> float | None:
        return None if math.isnan(value) else round(value * 1000, 2)

    off_schedule = t.late + t.dropped
    overload = (
        off_schedule > OVERLOAD_FRACTION * max(1, t.scheduled)
        or t.nacks > 0
        or achieved < UNDERRUN_FRACTION * args.rate
    )
    ok = not t.errors and not t.bad_acks and not outcome.unanswered and t.sent_frames > 0
    ok = ok and (verdict is None or verdict.ok)
    out: dict[str, Any] = {
        "server": args.label,
        "url": args.url,
        "C": args.connections,
        "B": args.batch,
        "rate": args.rate,
        "rate_name": args.rate_name,
        "peak_events_per_s": args.peak,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "events_per_s": round(achieved),
        "lat_p50_ms": ms(percentile(lat, 50)),
        "lat_p90_ms": ms(percentile(lat, 90)),
        "lat_p99_ms": ms(percentile(lat, 99)),
        "lat_p999_ms": ms(percentile(lat, 99.9)),
        "lat_max_ms": ms(lat[-1]) if lat else None,
        "lat_p99_by_s_ms": p99_by_second,
        "send_lag_p99_ms": ms(percentile(lags, 99)),
        "scheduled": t.scheduled,
        "late": t.late,
        "dropped": t.dropped,
        "overload": overload,
        "sent_frames": t.sent_frames,
        "acked_frames": t.acked_frames,
        "accepted": t.accepted,
        "duplicate": t.duplicate,
        "rejected": t.rejected,
        "nacks": t.nacks,
        "bad_acks": t.bad_acks,
        "unanswered": outcome.unanswered,
        "errors": t.errors[:5],
        "n_errors": len(t.errors),
        "notes": t.notes[:5],
        "cpu_pct": outcome.cpu,
        "verify": None,
        "ok": ok,
    }
    if verdict is not None:
        out["verify"] = {
            "ok": verdict.ok,
            "stored": verdict.stored,
            "missing": verdict.missing,
            "unacked": verdict.unacked,
            "duplicate": verdict.duplicate,
            "server_made": verdict.server_made,
            "foreign": verdict.foreign,
            "malformed": verdict.malformed,
            "trimmed": verdict.trimmed,
            "problems": verdict.problems,
        }
    return out


def verified_cell(row: dict[str, Any]) -> str:
    """``yes``, ``yes*`` (stream trimmed), ``NO`` or ``-`` (not verified)."""
    v = row.get("verify")
    if v is None:
        return "-" if row["ok"] else "NO"
    if not row["ok"]:
        return "NO"
    return "yes*" if v["trimmed"] else "yes"


def late_cell(row: dict[str, Any]) -> str:
    """Late + dropped frames of the measured window, with their share and the overload flag."""
    off = row["late"] + row["dropped"]
    text = f"{off:,}"
    if off:
        text += f" ({100 * off / max(1, row['scheduled']):.1f}%)"
    return text + (" overload" if row["overload"] else "")


def summary_line(row: dict[str, Any]) -> str:
    """The human summary of a run: one line, then the p99 of each measured second."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    cpu = row["cpu_pct"]
    cpus = " ".join(f"{k}={v:.0f}%" for k, v in cpu.items() if v is not None)
    v = row["verify"]
    stored = f" stored={v['stored']:,}" if v else ""
    return (
        f"[{row['server'] or 'server'}] C={row['C']} B={row['B']} rate={row['rate']:,.0f} ev/s: "
        f"achieved {row['events_per_s']:,} ev/s  p50={ms(row['lat_p50_ms'])} "
        f"p90={ms(row['lat_p90_ms'])} p99={ms(row['lat_p99_ms'])} "
        f"p99.9={ms(row['lat_p999_ms'])} max={ms(row['lat_max_ms'])} ms  "
        f"send_lag_p99={ms(row['send_lag_p99_ms'])} ms  late={row['late']} "
        f"dropped={row['dropped']} of {row['scheduled']:,}  nacks={row['nacks']} "
        f"errors={row['n_errors']}{stored}  cpu% {cpus}  verified={verified_cell(row)}"
        + ("  OVERLOAD" if row["overload"] else "")
        + "\n  p99 ms by second: "
        + " ".join(f"{v:g}" for v in row["lat_p99_by_s_ms"])
    )


def table(path: Path) -> str:
    """The markdown table of the ``--json`` lines in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    head = ["server", "peak ev/s", "rate ev/s", "achieved", "p50 ms", "p99 ms", "p99.9 ms"]
    head += ["late", "verified", "cpu% server", "cpu% gen", "cpu% other"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    body: list[list[str]] = []
    for row in rows:
        peak = row.get("peak_events_per_s")
        rate = f"{row['rate']:,.0f}" + (f" ({row['rate_name']})" if row.get("rate_name") else "")
        cpu = row.get("cpu_pct") or {}
        body.append(
            [
                row["server"] or "-",
                "-" if peak is None else f"{peak:,.0f}",
                rate,
                f"{row['events_per_s']:,}",
                ms(row["lat_p50_ms"]),
                ms(row["lat_p99_ms"]),
                ms(row["lat_p999_ms"]),
                late_cell(row),
                verified_cell(row),
                pct(cpu.get("server")),
                pct(cpu.get("generator")),
                pct(cpu.get("other")),
            ]
        )
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=False)]

    def line(cells: Sequence[str]) -> str:
        # The server name reads best left-aligned, figures right-aligned.
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    lines = [line(head), "|" + "|".join(rule) + "|"] + [line(r) for r in body]
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number above zero."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above zero")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of the generator."""
    p = argparse.ArgumentParser(
        prog="openloop.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", help="ws://HOST:PORT/v1/track/SITE")
    p.add_argument("-r", "--rate", type=positive(float), help="target events/s, all connections")
    p.add_argument("-c", "--connections", type=positive(int), default=50, help="C (50)")
    p.add_argument("-b", "--batch", type=positive(int), default=10, help="events per frame (10)")
    p.add_argument("--duration", type=positive(float), default=8.0, help="measured seconds (8)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    p.add_argument("--origin", default="http://localhost", help="Origin header ('' = none)")
    p.add_argument(
        "--max-inflight",
        type=positive(int),
        default=MAX_INFLIGHT,
        help=f"frames out per connection before due frames are dropped ({MAX_INFLIGHT})",
    )
    p.add_argument(
        "--late-ms",
        type=float,
        default=LATE_MS,
        help=f"a frame sent this much after its due time is late ({LATE_MS:g})",
    )
    p.add_argument(
        "--drain-timeout",
        type=positive(float),
        default=DRAIN_TIMEOUT,
        help=f"seconds the last acks may take ({DRAIN_TIMEOUT:g})",
    )
    p.add_argument("--redis-url", help="the server's Redis: verify the stream afterwards")
    p.add_argument("--key-prefix", default="ew", help="the server's key prefix (ew)")
    p.add_argument("--server-pid", type=int, help="report this process tree's CPU%%")
    p.add_argument("--redis-pid", type=int, help="report this process' CPU%%")
    p.add_argument("--label", default="", help="server name for the report")
    p.add_argument("--peak", type=float, help="the server's peak events/s, for the report")
    p.add_argument("--rate-name", default="", help="what the rate is, e.g. '1/2 own peak'")
    p.add_argument("--json", action="store_true", help="print one JSON result line too")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    p.add_argument("--table", type=Path, metavar="RESULTS", help="print the table of JSON lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the generator (or print a table); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(args.table))
        return 0
    if not args.url or not args.rate:
        parser.error("--url and --rate are needed")
    if args.batch > 500:
        parser.error("-b must be at most 500 (the protocol's default max_batch)")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    site = site_of(args.url)
    key = f"{args.key_prefix}:{{{site}}}:events"
    r = redis.Redis.from_url(args.redis_url) if args.redis_url else None
    since = stream_position(r, key) if r is not None else None

    runner = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    try:
        outcome = runner(load(args))
    except (OSError, TimeoutError, WebSocketException, ConnectionError) as exc:
        print(f"openloop.py: could not connect: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    verdict = None
    if r is not None and since is not None:
        verdict = verify(r, key, site, since, outcome.flows)
        r.close()
    row = summarize(args, outcome, verdict)
    print(summary_line(row), flush=True)
    for text in row["errors"]:
        print(f"  error: {text}", file=sys.stderr)
    for text in row["notes"]:
        print(f"  note: {text}", file=sys.stderr)
    for text in verdict.problems if verdict else []:
        print(f"  verify: {text}", file=sys.stderr)
    if args.json:
        print(json.dumps(row), flush=True)
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
