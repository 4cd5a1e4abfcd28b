"""Benchmark driver: load an eventwire server with the Python client, then verify Redis.

Opens C :class:`~eventwire.client.EventwireClient` instances (each its own random
producer), and each keeps exactly W frames of B events in flight: a
semaphore of W per client is taken before tracking B events and given back
when the ack of those B events arrives. After ``--warmup`` seconds (not
measured) it measures ``--duration`` seconds: events/s and frames/s from the
acks received in that window, p50/p99 ack latency, and the CPU% of the
driver itself (and of the server and Redis when their PIDs are given).

Then it stops tracking, flushes every client (bounded by ``--flush-timeout``)
and reads the run's new entries of ``{prefix}:{SITE}:events``: every client's
producer must hold the seqs 1..N it tracked, each exactly once, and every entry
must be one field ``event`` holding the stored event's JSON. Server-made
entries (producer ``srv:...``) are counted apart. The exit code is 1 when
anything does not hold.

The driver is pure Python and single-threaded: on a small machine it can be
the bottleneck itself. Its own CPU% is printed so a reader can tell (near
100 % means the figures measure the driver, not the server).

``bench.py --table RESULTS.jsonl`` prints the markdown table of ``--json``
result lines instead (used by ``scripts/bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import redis
import structlog

from eventwire.client import EventwireClient
from eventwire.core.protocol import Ack

#: How long all clients may take to get their first welcome.
CONNECT_TIMEOUT: Final = 15.0

#: Entries read per XRANGE call while verifying.
SCAN_COUNT: Final = 5000

#: A handful of realistic events (about 250 bytes of JSON each), used in turn.
_EVENTS: Final[list[tuple[str, str, dict[str, Any]]]] = [
    (
        "page.visit",
        "Visited page Home - Example Shop",
        {
            "url": "https://shop.example.com/?utm_source=newsletter&utm_campaign=c42",
            "title": "Home - Example Shop",
            "referrer": "https://www.google.com/",
        },
    ),
    (
        "product.view",
        "Blue Running Shoes",
        {
            "url": "https://shop.example.com/p/blue-running-shoes-48213",
            "title": "Blue Running Shoes - Example Shop",
            "product_id": "48213",
            "category": "shoes",
            "price": 89.95,
            "currency": "EUR",
        },
    ),
    (
        "cart.add",
        "Merino Wool Sweater",
        {
            "url": "https://shop.example.com/p/merino-wool-sweater-19342",
            "title": "Merino Wool Sweater - Example Shop",
            "product_id": "19342",
            "category": "knitwear",
            "price": 129.0,
            "currency": "EUR",
            "qty": 2,
        },
    ),
    (
        "search.query",
        "running shoes",
        {
            "url": "https://shop.example.com/search?q=running+shoes",
            "title": "Search: running shoes",
            "query": "running shoes",
            "results": 117,
        },
    ),
]

#: Fields every stored event must have (README "Redis layout"; PROTOCOL.md section 7).
_REQUIRED: Final = ("site", "uuid", "session", "producer", "seq")


# -- measuring ------------------------------------------------------------------


@dataclass
class Window:
    """What the acks say during the measured window (shared by all clients)."""

    measuring: bool = False
    events: int = 0
    frames: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)


class Driver:
    """One client's load: keeps exactly W frames of B events in flight.

    Args:
        url: the track URL.
        encoding: ``json`` or ``msgpack``.
        batch: B, events per frame.
        window: W, frames in flight.
        stats: the shared measured-window counters.
    """

    def __init__(
        self, url: str, encoding: Literal["json", "msgpack"], batch: int, window: int, stats: Window
    ) -> None:
        self.batch = batch
        self.stats = stats
        self.slots = asyncio.Semaphore(window)
        #: The last seq tracked (events are numbered 1..tracked).
        self.tracked = 0
        #: The highest seq acked so far.
        self.acked = 0
        self.next_event = 0
        # Its own random producer; linger 0: B events tracked at once go as one frame.
        self.client = EventwireClient(
            url,
            encoding=encoding,
            batch_size=batch,
            max_inflight=window,
            linger=0,
            max_buffer=max(100_000, 4 * batch * window),
            on_ack=self.on_ack,
        )

    def on_ack(self, ack: Ack, latency: float) -> None:
        """Count the ack and give back one slot per block of B events it completes.

        Counting completed blocks by seq rather than one slot per ack stays
        right even if the client re-batches events after a reconnect.
        """
        stats = self.stats
        if stats.measuring:
            stats.events += ack.accepted + ack.duplicate
            stats.frames += 1
            stats.rejected += len(ack.rejected)
            stats.latencies.append(latency)
        done = ack.seq // self.batch - self.acked // self.batch
        self.acked = max(self.acked, ack.seq)
        for _ in range(done):
            self.slots.release()

    async def run(self) -> None:
        """Track B events each time a slot is free, until cancelled."""
        track = self.client.track
        batch = self.batch
        n = len(_EVENTS)
        while True:
            await self.slots.acquire()
            for _ in range(batch):
                action, label, params = _EVENTS[self.next_event % n]
                self.next_event += 1
                self.tracked = track(action, params, label=label)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live descendants (``serve --workers N``
    is a supervisor and N children), from /proc; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    total = (utime + stime) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = task.read_text().split()
        except OSError:
            continue
        total += sum(cpu_seconds(int(child)) or 0.0 for child in children)
    return total


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, nearest rank; 0.0 if empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


# -- verifying ------------------------------------------------------------------


@dataclass
class Verdict:
    """What the stream holds for the run, compared with what was tracked (or acked).

    Shared by this driver and ``scripts/openloop.py``.
    """

    stored: int = 0
    missing: int = 0
    duplicate: int = 0
    #: Seqs in the stream that were never tracked (this driver).
    unexpected: int = 0
    #: Seqs in the stream whose frame was never acked (openloop.py).
    unacked: int = 0
    server_made: int = 0
    foreign: int = 0
    malformed: int = 0
    trimmed: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check held."""
        return not self.problems

    def problem(self, text: str) -> None:
        """Record a problem; the first few are kept for the report."""
        if len(self.problems) < 10:
            self.problems.append(text)


def stream_position(r: redis.Redis, key: str) -> tuple[str, int]:
    """The stream's last generated id and entries added so far (``0-0``, 0 if absent)."""
    try:
        info = r.xinfo_stream(key)
    except redis.ResponseError:
        return "0-0", 0
    last = info["last-generated-id"]
    return (last.decode() if isinstance(last, bytes) else str(last)), int(
        info.get("entries-added", info["length"])
    )


def _scan(
    r: redis.Redis,
    key: str,
    start: str,
    site: str,
    verdict: Verdict,
    mine: dict[str, Driver],
    counts: dict[str, bytearray],
    decode: Any,
) -> int:
    """Count one stream's entries from ``start`` into ``counts``; returns how many were read."""
    scanned = 0
    while True:
        entries = r.xrange(key, min=start, max="+", count=SCAN_COUNT)
        if not entries:
            return scanned
        for raw_id, fields in entries:
            scanned += 1
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            fields = fields or {}
            if set(fields) != {b"event"}:
                verdict.malformed += 1
                verdict.problem(f"{entry_id}: fields {sorted(fields)!r}, want only 'event'")
                continue
            try:
                event = decode(fields[b"event"])
            except msgspec.DecodeError as exc:
                verdict.malformed += 1
                verdict.problem(f"{entry_id}: event is not JSON ({exc})")
                continue
            if not isinstance(event, dict) or any(k not in event for k in _REQUIRED):
                verdict.malformed += 1
                verdict.problem(f"{entry_id}: event lacks one of {_REQUIRED}")
                continue
            producer = event["producer"]
            if isinstance(producer, str) and producer.startswith("srv:"):
                verdict.server_made += 1
                continue
            driver = mine.get(producer)
            if driver is None:
                verdict.foreign += 1
                continue
            verdict.stored += 1
            seq = event["seq"]
            count = counts[producer]
            if not isinstance(seq, int) or not 1 <= seq < len(count):
                verdict.unexpected += 1
                verdict.problem(f"{producer}: seq {seq!r} was never tracked")
                continue
            if count[seq] < 255:
                count[seq] += 1
            client = driver.client
            if event["site"] != site or event["uuid"] != client.uuid:
                verdict.problem(
                    f"{producer} seq {seq}: site/uuid {event['site']!r}/{event['uuid']!r}, "
                    f"want {site!r}/{client.uuid!r}"
                )
            welcome = client.welcome
            if client.connects == 1 and welcome is not None and event["session"] != welcome.session:
                verdict.problem(
                    f"{producer} seq {seq}: session {event['session']!r}, want {welcome.session!r}"
                )
        last_id = entries[-1][0]
        start = "(" + (last_id.decode() if isinstance(last_id, bytes) else str(last_id))


def verify(
    r: redis.Redis,
    keys: Sequence[str],
    site: str,
    since: Sequence[str],
    added_before: int,
    drivers: Sequence[Driver],
) -> Verdict:
    """Read each stream's entries after its ``since`` and check them against what each
    driver tracked (a partitioned site has one stream per partition)."""
    verdict = Verdict()
    mine = {d.client.producer: d for d in drivers}
    counts = {d.client.producer: bytearray(d.tracked + 1) for d in drivers}
    decode = msgspec.json.decode
    scanned = 0
    for key, start in zip(keys, (f"({s}" for s in since), strict=True):
        scanned += _scan(r, key, start, site, verdict, mine, counts, decode)
    added_after = sum(stream_position(r, key)[1] for key in keys)
    # MAXLEN ~ trims the oldest entries of every producer alike, so what is left of
    # each producer is a suffix of its seqs: only seqs below the lowest seen may be gone.
    verdict.trimmed = added_after - added_before > scanned
    for producer, count in counts.items():
        lowest = 1
        if verdict.trimmed:
            lowest = next((s for s in range(1, len(count)) if count[s]), len(count))
        missing = count.count(0, lowest) if lowest < len(count) else 0
        dup = sum(c - 1 for c in count[lowest:] if c > 1)
        verdict.missing += missing
        verdict.duplicate += dup
        if missing:
            verdict.problem(f"{producer}: {missing} of seqs {lowest}..{len(count) - 1} missing")
        if dup:
            verdict.problem(f"{producer}: {dup} seqs stored more than once")
    return verdict


# -- the run --------------------------------------------------------------------


@dataclass
class Result:
    """One run's figures, as printed and as ``--json``."""

    C: int
    B: int
    W: int
    encoding: str
    P: int
    duration_s: float
    events_per_s: int
    frames_per_s: int
    lat_p50_ms: float
    lat_p99_ms: float
    driver_cpu: float
    server_cpu: float | None
    redis_cpu: float | None
    tracked: int
    rejected: int
    nacks: int
    reconnects: int
    flushed: bool
    verify: Verdict

    def line(self) -> str:
        """The one-line human summary."""

        def pct(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f}%"

        v = self.verify
        state = ("ok*" if v.trimmed else "ok") if v.ok and self.flushed else "FAILED"
        extra = ""
        if self.nacks or self.reconnects or self.rejected:
            extra = f" nacks={self.nacks} reconnects={self.reconnects} rejected={self.rejected}"
        return (
            f"C={self.C} B={self.B} W={self.W} enc={self.encoding} P={self.P}: "
            f"{self.events_per_s:,} events/s {self.frames_per_s:,} frames/s "
            f"p50={self.lat_p50_ms:.1f}ms p99={self.lat_p99_ms:.1f}ms "
            f"driver_cpu={pct(self.driver_cpu)} server_cpu={pct(self.server_cpu)} "
            f"redis_cpu={pct(self.redis_cpu)}{extra} "
            f"verify={state} ({v.stored:,} stored, {v.missing} missing, {v.duplicate} dup)"
        )

    def as_json(self) -> dict[str, Any]:
        """The result as one JSON-ready object."""
        out = {k: v for k, v in self.__dict__.items() if k != "verify"}
        v = self.verify
        out["ok"] = v.ok and self.flushed
        out["verify"] = {
            "stored": v.stored,
            "missing": v.missing,
            "duplicate": v.duplicate,
            "unexpected": v.unexpected,
            "server_made": v.server_made,
            "foreign": v.foreign,
            "malformed": v.malformed,
            "trimmed": v.trimmed,
            "problems": v.problems,
        }
        return out


async def wait_welcomed(drivers: Sequence[Driver], timeout: float) -> None:  # noqa: ASYNC109
    """Wait until every client got a welcome.

    Raises:
        TimeoutError: some did not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while any(d.client.welcome is None for d in drivers):
        if time.monotonic() > deadline:
            late = sum(d.client.welcome is None for d in drivers)
            raise TimeoutError(f"{late} of {len(drivers)} clients got no welcome in {timeout:g} s")
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> Result:
    """Connect, warm up, measure, flush, verify."""
    site = site_of(args.url)
    tags = [site] if args.partitions == 1 else [f"{site}:{p}" for p in range(args.partitions)]
    keys = [f"{args.key_prefix}:{{{tag}}}:events" for tag in tags]
    r = redis.Redis.from_url(args.redis_url)
    positions = [stream_position(r, key) for key in keys]
    since = [p[0] for p in positions]
    added_before = sum(p[1] for p in positions)

    stats = Window()
    drivers = [
        Driver(args.url, args.encoding, args.batch, args.window, stats)
        for _ in range(args.connections)
    ]

    tasks: list[asyncio.Task[None]] = []
    flushed = False
    try:
        for d in drivers:
            await d.client.start()
        await wait_welcomed(drivers, CONNECT_TIMEOUT)
        tasks = [asyncio.create_task(d.run()) for d in drivers]
        await asyncio.sleep(args.warmup)

        pids = {"server": args.server_pid, "redis": args.redis_pid}
        cpu0 = {name: cpu_seconds(pid) if pid else None for name, pid in pids.items()}
        proc0, wall0 = time.process_time(), time.perf_counter()
        stats.measuring = True
        await asyncio.sleep(args.duration)
        stats.measuring = False
        proc1, wall1 = time.process_time(), time.perf_counter()
        cpu1 = {name: cpu_seconds(pid) if pid else None for name, pid in pids.items()}

        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks = []
        try:
            async with asyncio.timeout(args.flush_timeout):
                await asyncio.gather(*(d.client.flush() for d in drivers))
            flushed = True
        except TimeoutError:
            pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(d.client.close(flush=False) for d in drivers), return_exceptions=True
        )

    wall = wall1 - wall0
    other: dict[str, float | None] = {}
    for name in pids:
        a, b = cpu0[name], cpu1[name]
        other[name] = None if a is None or b is None else 100 * (b - a) / wall
    lat = sorted(stats.latencies)
    verdict = await asyncio.to_thread(verify, r, keys, site, since, added_before, drivers)
    r.close()
    if not flushed:
        verdict.problem(f"flush did not finish within {args.flush_timeout:g} s")
    return Result(
        C=args.connections,
        B=args.batch,
        W=args.window,
        encoding=args.encoding,
        P=args.partitions,
        duration_s=round(wall, 3),
        events_per_s=round(stats.events / wall),
        frames_per_s=round(stats.frames / wall),
        lat_p50_ms=round(percentile(lat, 50) * 1000, 2),
        lat_p99_ms=round(percentile(lat, 99) * 1000, 2),
        driver_cpu=round(100 * (proc1 - proc0) / wall, 1),
        server_cpu=None if other["server"] is None else round(other["server"], 1),
        redis_cpu=None if other["redis"] is None else round(other["redis"], 1),
        tracked=sum(d.tracked for d in drivers),
        rejected=sum(len(d.client.rejections) for d in drivers),
        nacks=sum(d.client.nacks for d in drivers),
        reconnects=sum(max(0, d.client.connects - 1) for d in drivers),
        flushed=flushed,
        verify=verdict,
    )


def site_of(url: str) -> str:
    """The ``{site}`` of ``ws://HOST:PORT/v1/track/{site}``.

    Raises:
        SystemExit: the URL has no such path.
    """
    path = urlsplit(url).path
    prefix = "/v1/track/"
    if not path.startswith(prefix) or len(path) == len(prefix) or "/" in path[len(prefix) :]:
        raise SystemExit(f"--url must be ws://HOST:PORT/v1/track/SITE, got {url!r}")
    return path[len(prefix) :]


# -- report -----------------------------------------------------------------------


def table(path: Path) -> str:
    """The markdown table of the ``--json`` result lines in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    head = ["C", "B", "W", "enc", "P", "events/s", "frames/s", "p50 ms", "p99 ms"]
    head += ["cpu% driver", "cpu% server", "cpu% redis", "stored", "ok"]
    body: list[list[str]] = []
    for row in rows:

        def pct(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f}"

        v = row["verify"]
        ok = ("yes*" if v["trimmed"] else "yes") if row["ok"] else "NO"
        body.append(
            [
                str(row["C"]),
                str(row["B"]),
                str(row["W"]),
                row["encoding"],
                str(row.get("P", 1)),
                f"{row['events_per_s']:,}",
                f"{row['frames_per_s']:,}",
                f"{row['lat_p50_ms']:.2f}",
                f"{row['lat_p99_ms']:.2f}",
                pct(row["driver_cpu"]),
                pct(row["server_cpu"]),
                pct(row["redis_cpu"]),
                f"{v['stored']:,}",
                ok,
            ]
        )
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=False)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body
    ]
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number above zero (zero allowed for floats)."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value < (1 if kind is int else 0):
            raise argparse.ArgumentTypeError(f"{text} is too small")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the driver."""
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="ws://HOST:PORT/v1/track/SITE")
    p.add_argument("--redis-url", help="the server's Redis, for verification")
    p.add_argument("-c", "--connections", type=positive(int), default=50, help="clients (C)")
    p.add_argument("-b", "--batch", type=positive(int), default=1, help="events per frame (B)")
    p.add_argument("-w", "--window", type=positive(int), default=1, help="frames in flight (W)")
    p.add_argument("--duration", type=positive(float), default=8.0, help="measured seconds")
    p.add_argument("--warmup", type=positive(float), default=1.0, help="unmeasured seconds first")
    p.add_argument("--encoding", choices=["json", "msgpack"], default="json")
    p.add_argument("--key-prefix", default="ew", help="the server's key_prefix (ew)")
    p.add_argument("--partitions", type=positive(int), default=1, help="the site's partitions (1)")
    p.add_argument("--flush-timeout", type=positive(float), default=30.0, help="seconds")
    p.add_argument("--server-pid", type=int, help="report this process' CPU%% as the server's")
    p.add_argument("--redis-pid", type=int, help="report this process' CPU%% as Redis'")
    p.add_argument("--json", action="store_true", help="print one JSON result line too")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    p.add_argument("--table", type=Path, metavar="RESULTS", help="print the table of JSON lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or print a table); returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.table is not None:
        print(table(args.table))
        return 0
    if not args.url or not args.redis_url:
        build_parser().error("--url and --redis-url are needed")
    site_of(args.url)
    # The client logs through structlog; keep its debug lines out of the figures.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    use_uvloop = False
    if not args.no_uvloop:
        try:
            import uvloop

            use_uvloop = True
        except ImportError:
            pass
    try:
        result: Result = uvloop.run(run(args)) if use_uvloop else asyncio.run(run(args))
    except TimeoutError as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"bench.py: redis {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    print(result.line(), flush=True)
    for text in result.verify.problems:
        print(f"  verify: {text}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_json()), flush=True)
    return 0 if result.verify.ok and result.flushed else 1


if __name__ == "__main__":
    sys.exit(main())
