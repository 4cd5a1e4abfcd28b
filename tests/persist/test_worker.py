"""The persistence worker and activity feed: real Redis, server, client and stores."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
import structlog
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError

from eventwire.client import EventwireClient
from eventwire.commands.stats import site_stats
from eventwire.core.config import Settings, load_settings
from eventwire.core.errors import ConfigError
from eventwire.core.rules import SitesBook, load_sites
from eventwire.gateway import EventwireServer
from eventwire.persist.sinks import EventRow, PostgresSink, Sink, SqliteSink, open_sink
from eventwire.persist.worker import GROUP, READ_COUNT, PersistOptions, Worker
from eventwire.store import Keys
from tests.conftest import SITES_TOML, MakeServer
from tests.procs import UNIT, RedisProcess
from tests.wire import now_ms

PG_URL = os.environ.get("EVENTWIRE_TEST_PG", "postgresql://postgres@127.0.0.1/test")
ROOT = Path(__file__).resolve().parents[2]
#: The test sites plus ``big``, whose events are split over four partitions.
P = 4
SPLIT_SITES = SITES_TOML + f"\n[sites.big]\nallow_no_origin = true\npartitions = {P}\n"
BIG_STREAMS = [f"ew:{{big:{p}}}:events" for p in range(P)]


@pytest.fixture(params=["sqlite", "postgres"])
async def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh store: a SQLite file, or a private schema of the local PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'events.db'}"
        return
    import asyncpg  # type: ignore[import-untyped]

    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} ({exc!r}); set EVENTWIRE_TEST_PG")
    schema = f"ew_test_{secrets.token_hex(6)}"
    await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?search_path={schema}"
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


@pytest.fixture
def sqlite_dsn(tmp_path: Path) -> str:
    """A SQLite store in a fresh file."""
    return f"sqlite:///{tmp_path / 'events.db'}"


def settings_for(redis_proc: RedisProcess) -> Settings:
    """Worker settings pointing at the test Redis."""
    return msgspec.convert({"redis_url": redis_proc.url}, Settings)


async def start_worker(
    redis_proc: RedisProcess,
    sites_file: Path,
    dsn: str,
    sink: Sink | None = None,
    **options: Any,
) -> Worker:
    """An in-process worker, started."""
    worker = Worker(
        settings_for(redis_proc),
        SitesBook(sites_file, load_sites(sites_file)),
        PersistOptions(dsn=dsn, **options),
        sink=sink,
    )
    await worker.start()
    return worker


async def ingest(server: EventwireServer, n: int, uuid: str = "cust-1", site: str = "app") -> None:
    """Send n events through the server with the Python client and wait for their acks."""
    async with EventwireClient(f"{server.url}/v1/track/{site}", uuid, batch_size=500) as client:
        for i in range(n):
            client.track("product.view", {"sku": f"S{i}"}, f"Viewed S{i}")
        await client.flush(timeout=60 * UNIT)
        assert client.accepted == n


async def wait_rows(sink: Sink, n: int, within: float = 30) -> None:
    """Wait until the store holds n event rows."""
    deadline = time.monotonic() + within * UNIT
    while (got := await sink.count()) < n:
        assert time.monotonic() < deadline, f"{got} rows of {n} after {within} s"
        await asyncio.sleep(0.02)


async def pending(redis: aioredis.Redis, site: str = "app") -> int:
    """Entries of a site's stream delivered to the group but not acked."""
    try:
        summary = await redis.xpending(f"ew:{{{site}}}:events", GROUP)
    except ResponseError:  # no group yet
        return 0
    return int(summary["pending"])


async def wait_acked(redis: aioredis.Redis, within: float = 10 * UNIT) -> None:
    """Until the persist group of app has nothing pending."""
    deadline = time.monotonic() + within
    while await pending(redis):
        assert time.monotonic() < deadline, "entries left unacked"
        await asyncio.sleep(0.02)


async def client_rows(dsn: str) -> tuple[int, int]:
    """(all event rows, rows from client producers) in a store."""
    sink = open_sink(dsn)
    await sink.open()
    try:
        total = await sink.count()
        feed = await sink.activity("app", "cust-1", 1_000_000)
        return total, sum(1 for a in feed if not a.action.startswith("session."))
    finally:
        await sink.close()


def worker_flags(sites_file: Path, redis_proc: RedisProcess, dsn: str) -> list[str]:
    """The flags of a worker process on the test sites, Redis and store."""
    return ["--sites", str(sites_file), "--redis", redis_proc.url, "--dsn", dsn]


def spawn(args: list[str]) -> subprocess.Popen[bytes]:
    """Start ``python -m eventwire ARGS`` (no config file)."""
    return subprocess.Popen(
        [sys.executable, "-m", "eventwire", *args],
        cwd=ROOT,
        env={**os.environ, "EVENTWIRE_CONFIG": os.devnull},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


def add_site(sites_file: Path, site: str) -> None:
    """Append a site to a sites file and move its modification time forward."""
    sites_file.write_text(sites_file.read_text() + f"\n[sites.{site}]\nallow_no_origin = true\n")
    os.utime(sites_file, (time.time() + 5, time.time() + 5))


def stored_event(seq: int, uuid: str = "cust-1", site: str = "app", **extra: Any) -> bytes:
    """The JSON of a stored event as the server writes it (docs/protocol.md section 7)."""
    t = now_ms()
    return json.dumps(
        {
            "site": site,
            "uuid": uuid,
            "session": "sess-1",
            "producer": "p-direct",
            "seq": seq,
            "action": "product.view",
            "label": f"Viewed {seq}",
            "time": t,
            "received": t,
            "params": {"sku": f"S{seq}"},
        }
        | extra
    ).encode()


async def add_events(redis: aioredis.Redis, n: int) -> None:
    """Seqs 1 to n of cust-1 into app's stream, 1000 a pipeline."""
    for start in range(0, n, 1000):
        pipe = redis.pipeline(transaction=False)
        for seq in range(start + 1, min(n, start + 1000) + 1):
            pipe.xadd("ew:{app}:events", {"event": stored_event(seq)})
        await pipe.execute()


async def test_n_events_become_n_rows(
    server: EventwireServer,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    dsn: str,
) -> None:
    """5000 events sent through the server become exactly 5000 rows; nothing stays pending."""
    n = 5000
    await ingest(server, n)
    length = await redis.xlen("ew:{app}:events")
    worker = await start_worker(redis_proc, sites_file, dsn)
    started = time.perf_counter()
    try:
        await wait_rows(worker.sink, length)
        elapsed = time.perf_counter() - started
        print(
            f"\npersist {dsn.split(':')[0]}: {length} rows in {elapsed:.3f} s = "
            f"{length / elapsed:.0f} rows/s"
        )
    finally:
        await worker.stop()
    assert await pending(redis) == 0
    total, from_client = await client_rows(dsn)
    assert (total, from_client) == (length, n)
    # Redelivery writes nothing twice: a second worker re-reading everything adds no row.
    await redis.xgroup_setid("ew:{app}:events", GROUP, "0")
    again = await start_worker(redis_proc, sites_file, dsn)
    try:
        deadline = time.monotonic() + 10 * UNIT
        while (await redis.xinfo_groups("ew:{app}:events"))[0]["lag"] != 0 or await pending(redis):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert again.rows_written == 0
    finally:
        await again.stop()
    assert await client_rows(dsn) == (length, n)


async def test_sigkill_mid_batch_then_second_worker(
    server: EventwireServer,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    sqlite_dsn: str,
) -> None:
    """A worker process SIGKILLed holding a batch: a second worker reclaims it; exactly N rows."""
    n = 20_000
    await ingest(server, n)
    length = await redis.xlen("ew:{app}:events")
    flags = worker_flags(sites_file, redis_proc, sqlite_dsn)
    proc = spawn(["persist", *flags, "--claim-idle", "60"])
    try:
        deadline = time.monotonic() + 20 * UNIT
        while await pending(redis) == 0:
            assert proc.poll() is None, "the worker process exited"
            assert time.monotonic() < deadline, "the worker never read a batch"
            await asyncio.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    held = await pending(redis)
    assert held > 0, "the kill did not land while a batch was in hand"
    total_before, _ = await client_rows(sqlite_dsn)
    assert total_before < length
    worker = await start_worker(redis_proc, sites_file, sqlite_dsn, claim_idle=0.3)
    try:
        await wait_rows(worker.sink, length)
        deadline = time.monotonic() + 10 * UNIT
        while await pending(redis):
            assert time.monotonic() < deadline, "entries left pending"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    assert await client_rows(sqlite_dsn) == (length, n)
    assert await pending(redis) == 0


async def test_sigterm_finishes_and_exits_zero(
    server: EventwireServer,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    sqlite_dsn: str,
) -> None:
    """SIGTERM: the worker process acks the batch in hand and exits 0, leaving nothing pending."""
    await ingest(server, 3000)
    proc = spawn(["persist", *worker_flags(sites_file, redis_proc, sqlite_dsn)])
    deadline = time.monotonic() + 20 * UNIT
    while await pending(redis) == 0 and (await client_rows(sqlite_dsn))[0] == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15 * UNIT) == 0
    assert await pending(redis) == 0


class ForwardingSink:
    """A sink that hands every call to a real one: faulty sinks override what they break."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner

    async def open(self) -> None:
        await self.inner.open()

    async def write(self, rows: Sequence[EventRow]) -> int:
        return await self.inner.write(rows)

    async def ping(self) -> None:
        await self.inner.ping()

    async def activity(self, site: str, uuid: str, limit: int) -> list[Any]:
        return await self.inner.activity(site, uuid, limit)

    async def count(self, site: str | None = None) -> int:
        return await self.inner.count(site)

    async def close(self) -> None:
        await self.inner.close()


class FailingSink(ForwardingSink):
    """A sink that refuses every batch holding a given seq (a row the store cannot take)."""

    def __init__(self, inner: Sink, bad_seq: int) -> None:
        super().__init__(inner)
        self.bad_seq = bad_seq
        self.refused = 0

    async def write(self, rows: Sequence[EventRow]) -> int:
        if any(r.seq == self.bad_seq for r in rows):
            self.refused += 1
            raise RuntimeError("store refuses this row")
        return await self.inner.write(rows)


async def test_poisoned_entries_go_to_dead_stream(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path, sqlite_dsn: str
) -> None:
    """A non-JSON entry is dead-lettered at once; one the store refuses, after max_deliveries."""
    stream = "ew:{shop}:events"
    good1 = await redis.xadd(stream, {"event": stored_event(1, site="shop")})
    poison = await redis.xadd(stream, {"event": b"not json{"})
    refused = await redis.xadd(stream, {"event": stored_event(2, site="shop")})
    good2 = await redis.xadd(stream, {"event": stored_event(3, site="shop")})
    sink = FailingSink(open_sink(sqlite_dsn), bad_seq=2)
    worker = await start_worker(
        redis_proc, sites_file, sqlite_dsn, sink=sink, claim_idle=0.2, max_deliveries=2
    )
    try:
        deadline = time.monotonic() + 10 * UNIT
        while await redis.xlen("ew:{shop}:dead") < 2:
            assert time.monotonic() < deadline, "nothing dead-lettered"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    dead: Any = await redis.xrange("ew:{shop}:dead")
    by_id = {f[b"id"]: f for _id, f in dead}
    assert set(by_id) == {poison, refused}
    assert by_id[poison][b"event"] == b"not json{"
    assert b"undecodable" in by_id[poison][b"error"]
    assert b"store refuses this row" in by_id[refused][b"error"]
    assert sink.refused >= 2  # the batch, then the row alone, then again after the reclaim
    assert await pending(redis, "shop") == 0
    total, _ = await client_rows(sqlite_dsn)
    assert total == 2
    assert good1
    assert good2


async def test_activity_feed_newest_first(
    server: EventwireServer, redis_proc: RedisProcess, sites_file: Path, sqlite_dsn: str
) -> None:
    """The activity command lists a customer's events with labels, newest first, as JSON lines."""
    base = now_ms() - 10_000
    async with EventwireClient(f"{server.url}/v1/track/app", "cust-7") as client:
        client.track("page.visit", {"url": "https://shop.example/"}, "Home", time=base)
        client.track("product.view", {"sku": "A-1"}, "Viewed A-1", time=base + 1000)
        client.track("cart.add", {"sku": "A-1"}, "Added A-1", time=base + 2000)
        await client.flush(timeout=10 * UNIT)
        session = client.welcome.session if client.welcome else None
    async with EventwireClient(f"{server.url}/v1/track/app", "someone-else") as other:
        other.track("page.visit", {"url": "https://shop.example/x"}, "Other")
        await other.flush(timeout=10 * UNIT)
    worker = await start_worker(redis_proc, sites_file, sqlite_dsn)
    try:
        await wait_rows(worker.sink, 6)  # 4 + 2 session.start
    finally:
        await worker.stop()
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "eventwire",
            "activity",
            "--dsn",
            sqlite_dsn,
            "--site",
            "app",
            "--uuid",
            "cust-7",
            "--limit",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30 * UNIT,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    # The session started at the hello, after the (back-dated) events' times.
    assert [(r["label"], r["action"]) for r in lines] == [
        ("Started session", "session.start"),
        ("Added A-1", "cart.add"),
        ("Viewed A-1", "product.view"),
        ("Home", "page.visit"),
    ]
    assert [r["time"] for r in lines[1:]] == [base + 2000, base + 1000, base]
    assert {r["session"] for r in lines} == {session}


async def test_session_start_and_end_make_a_sessions_row(
    make_server: MakeServer, redis_proc: RedisProcess, sites_file: Path, dsn: str
) -> None:
    """session.start and session.end become one sessions row with start, end, reason, count."""
    server = await make_server(session_grace=0.2, reap_interval=0.05)
    async with EventwireClient(f"{server.url}/v1/track/app", "cust-s") as client:
        client.track("page.visit", {"url": "https://shop.example/"}, "Home")
        await client.flush(timeout=10 * UNIT)
        assert client.welcome is not None
        session = client.welcome.session
    worker = await start_worker(redis_proc, sites_file, dsn)
    try:
        await wait_rows(worker.sink, 3, within=10)  # start, visit, end
    finally:
        await worker.stop()
    rows = await session_rows(dsn)
    assert len(rows) == 1
    site, sess, uuid, started, ended, reason, duration_ms, events = rows[0]
    assert (site, sess, uuid, reason) == ("app", session, "cust-s", "closed")
    assert started is not None
    assert ended >= started
    assert duration_ms is not None
    assert events == 1


async def session_rows(dsn: str) -> list[tuple[Any, ...]]:
    """Every row of the sessions table."""
    sql = "SELECT site, session, uuid, started, ended, reason, duration_ms, events FROM sessions"
    if dsn.startswith("sqlite"):
        import sqlite3

        from eventwire.persist.sinks import sqlite_path

        with sqlite3.connect(sqlite_path(dsn)) as db:
            return list(db.execute(sql).fetchall())
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_new_site_picked_up_without_restart(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path, sqlite_dsn: str
) -> None:
    """A site added to the sites file is read without a restart."""
    worker = await start_worker(redis_proc, sites_file, sqlite_dsn)
    try:
        await asyncio.sleep(0.1)
        add_site(sites_file, "fresh")
        await redis.xadd("ew:{fresh}:events", {"event": stored_event(1, site="fresh")})
        await wait_rows(worker.sink, 1, within=10)
        assert await worker.sink.count("fresh") == 1
    finally:
        await worker.stop()


async def test_trimmed_before_read_is_reported(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path, sqlite_dsn: str
) -> None:
    """Entries trimmed before the group read them raise a warning with their count."""
    stream = "ew:{web}:events"
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for seq in range(1, 11):
        await redis.xadd(stream, {"event": stored_event(seq, site="web")})
    await redis.xtrim(stream, maxlen=4, approximate=False)
    with structlog.testing.capture_logs() as logs:
        worker = await start_worker(redis_proc, sites_file, sqlite_dsn)
        try:
            await wait_rows(worker.sink, 4, within=10)
        finally:
            await worker.stop()
    warnings = [e for e in logs if e["event"] == "persist_entries_trimmed_unread"]
    assert len(warnings) == 1, logs
    assert warnings[0]["count"] == 6
    assert warnings[0]["log_level"] == "warning"


@pytest.mark.parametrize("trimmed", [0, 2])
async def test_forgotten_before_read_is_not_reported_as_trimmed(
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    sqlite_dsn: str,
    trimmed: int,
) -> None:
    """A forget deleting entries the group had not read yet is no loss: no
    ``persist_entries_trimmed_unread`` for them; entries trimmed unread besides are
    still reported, with their own count only."""
    from eventwire.store.privacy import forget_customers

    stream = "ew:{web}:events"
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for seq in range(1, 11):
        uuid = "cust-gone" if seq in (5, 7, 10) else "cust-kept"
        await redis.xadd(stream, {"event": stored_event(seq, uuid=uuid, site="web")})
    if trimmed:
        await redis.xtrim(stream, maxlen=10 - trimmed, approximate=False)
    counts, _ = await forget_customers(redis, Keys("ew"), "web", 1, ["cust-gone"])
    assert counts["events"] == 3
    with structlog.testing.capture_logs() as logs:
        worker = await start_worker(redis_proc, sites_file, sqlite_dsn)
        try:
            await wait_rows(worker.sink, 7 - trimmed, within=10)
            await worker._check_streams()  # once more, the entries read: still nothing
            assert await worker.sink.count("web") == 7 - trimmed
        finally:
            await worker.stop()
    warnings = [e for e in logs if e["event"] == "persist_entries_trimmed_unread"]
    if not trimmed:
        assert warnings == [], warnings
    else:
        assert len(warnings) == 1, logs
        assert warnings[0]["count"] == trimmed


class DownSink(FailingSink):
    """A sink whose store is down (writes and pings fail) while ``down`` is set."""

    def __init__(self, inner: Sink) -> None:
        super().__init__(inner, bad_seq=-1)
        self.down = True

    async def write(self, rows: Sequence[EventRow]) -> int:
        if self.down:
            raise ConnectionRefusedError("store down")
        return await self.inner.write(rows)

    async def ping(self) -> None:
        if self.down:
            raise ConnectionRefusedError("store down")
        await self.inner.ping()


async def test_store_outage_dead_letters_nothing(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path, sqlite_dsn: str
) -> None:
    """A store outage longer than max_deliveries reclaims sends nothing to the dead stream."""
    for seq in range(1, 6):
        await redis.xadd("ew:{app}:events", {"event": stored_event(seq)})
    sink = DownSink(open_sink(sqlite_dsn))
    await sink.inner.open()  # the worker's open() goes to the inner store
    worker = await start_worker(
        redis_proc, sites_file, sqlite_dsn, sink=sink, claim_idle=0.2, max_deliveries=2
    )
    try:
        await asyncio.sleep(2 * UNIT)  # ten claim_idle periods while down
        sink.down = False
        await wait_rows(sink.inner, 5, within=10)
    finally:
        await worker.stop()
    assert await redis.exists("ew:{app}:dead") == 0
    assert await pending(redis) == 0


async def test_trims_only_what_is_stored(
    server: EventwireServer,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    sqlite_dsn: str,
) -> None:
    """With no retention, the worker trims acknowledged entries; stats' lag falls to zero."""
    await ingest(server, 1000)
    length = await redis.xlen("ew:{app}:events")
    worker = await start_worker(redis_proc, sites_file, sqlite_dsn, retain=0)
    try:
        await wait_rows(worker.sink, length)
        await worker._check_streams()  # the worker's periodic look, now
        trimmed = await redis.xlen("ew:{app}:events")
        stats = await site_stats(redis, Keys("ew"), "app")
    finally:
        await worker.stop()
    assert trimmed < length
    assert stats["persist_lag"] == 0
    assert stats["persist_pending"] == 0
    _, mine = await client_rows(sqlite_dsn)
    assert mine == 1000


@pytest.fixture
def split_sites(tmp_path: Path) -> Path:
    """A sites file with the test sites and ``big``, of four partitions."""
    path = tmp_path / "split-sites.toml"
    path.write_text(SPLIT_SITES)
    return path


async def pending_big(redis: aioredis.Redis) -> list[int]:
    """Pending entries of each partition of ``big``."""
    out = []
    for key in BIG_STREAMS:
        try:
            out.append(int((await redis.xpending(key, GROUP))["pending"]))
        except ResponseError:  # no group yet
            out.append(0)
    return out


async def lag_big(redis: aioredis.Redis) -> list[int]:
    """The group's lag on each partition of ``big``."""
    return [int((await redis.xinfo_groups(key))[0]["lag"]) for key in BIG_STREAMS]


async def test_partitioned_site_every_event_once(
    make_server: MakeServer,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    split_sites: Path,
    dsn: str,
) -> None:
    """A 4-partition site: every event of every customer becomes exactly one row, all acked."""
    server = await make_server(sites=SPLIT_SITES)
    uuids = [f"cust-{n}" for n in range(24)]
    assert {Keys.tag("big", u, P) for u in uuids} == set(Keys.tags("big", P))
    for uuid in uuids:
        await ingest(server, 25, uuid=uuid, site="big")
    lengths = [await redis.xlen(key) for key in BIG_STREAMS]
    assert all(lengths)
    worker = await start_worker(redis_proc, split_sites, dsn)
    try:
        await wait_rows(worker.sink, sum(lengths))
        assert await worker.sink.count("big") == sum(lengths)
        for uuid in uuids:
            feed = await worker.sink.activity("big", uuid, 1000)
            assert sorted(a.label for a in feed if a.action == "product.view") == sorted(
                f"Viewed S{i}" for i in range(25)
            )
        deadline = time.monotonic() + 10 * UNIT
        while any(await pending_big(redis)):
            assert time.monotonic() < deadline, "entries left pending"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    for key in BIG_STREAMS:  # one group per partition, which has read everything
        groups = await redis.xinfo_groups(key)
        assert [(g["name"], g["lag"], g["pending"]) for g in groups] == [(b"persist", 0, 0)]
    # Redelivery of every partition writes nothing twice.
    for key in BIG_STREAMS:
        await redis.xgroup_setid(key, GROUP, "0")
    again = await start_worker(redis_proc, split_sites, dsn)
    try:
        deadline = time.monotonic() + 10 * UNIT
        while any(await pending_big(redis)) or any(await lag_big(redis)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert again.rows_written == 0
        assert await again.sink.count() == sum(lengths)
    finally:
        await again.stop()


async def test_equal_ids_in_two_partitions_are_two_rows(
    redis: aioredis.Redis, redis_proc: RedisProcess, split_sites: Path, sqlite_dsn: str
) -> None:
    """Entries of two partitions with the same stream ids are distinct rows, each acked."""
    ms = now_ms()
    for part, producer in ((0, "p-zero"), (3, "p-three")):
        for seq in (1, 2):
            body = stored_event(seq, uuid=f"c-{part}", site="big", producer=producer)
            await redis.xadd(BIG_STREAMS[part], {"event": body}, id=f"{ms}-{seq}")
    worker = await start_worker(redis_proc, split_sites, sqlite_dsn)
    try:
        await wait_rows(worker.sink, 4, within=10)
        deadline = time.monotonic() + 10 * UNIT
        while any(await pending_big(redis)):
            assert time.monotonic() < deadline, "entries left pending"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    assert worker.rows_written == 4
    assert await client_rows(sqlite_dsn) == (4, 0)


async def test_partition_dead_letters_and_reclaims(
    redis: aioredis.Redis, redis_proc: RedisProcess, split_sites: Path, sqlite_dsn: str
) -> None:
    """In partition 2: a dead consumer's entries are reclaimed; poison goes to {big:2}:dead."""
    stream = BIG_STREAMS[2]
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    held = [await redis.xadd(stream, {"event": stored_event(s, site="big")}) for s in (1, 2)]
    # A consumer that read these and died: only a reclaim brings them to the store.
    await redis.xreadgroup(GROUP, "dead-consumer", {stream: ">"})
    poison = await redis.xadd(stream, {"event": b"not json{"})
    refused = await redis.xadd(stream, {"event": stored_event(3, site="big")})
    # Partition 1 holds an entry of the same id as the refused one, which is fine.
    twin = await redis.xadd(
        BIG_STREAMS[1], {"event": stored_event(9, site="big", producer="p-twin")}, id=refused
    )
    sink = FailingSink(open_sink(sqlite_dsn), bad_seq=3)
    worker = await start_worker(
        redis_proc, split_sites, sqlite_dsn, sink=sink, claim_idle=0.2, max_deliveries=2
    )
    try:
        deadline = time.monotonic() + 10 * UNIT
        while await redis.xlen("ew:{big:2}:dead") < 2 or await sink.count() < 3:
            assert time.monotonic() < deadline, "nothing dead-lettered or reclaimed"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    dead: Any = await redis.xrange("ew:{big:2}:dead")
    by_id = {f[b"id"]: f for _id, f in dead}
    assert set(by_id) == {poison, refused}
    assert b"undecodable" in by_id[poison][b"error"]
    assert b"store refuses this row" in by_id[refused][b"error"]
    for other in ("ew:{big}:dead", "ew:{big:0}:dead", "ew:{big:1}:dead", "ew:{big:3}:dead"):
        assert await redis.exists(other) == 0, other
    assert await pending_big(redis) == [0, 0, 0, 0]
    assert worker.dead_lettered == 2
    assert twin == refused
    assert await client_rows(sqlite_dsn) == (3, 0)  # the two reclaimed, the twin
    assert len(held) == 2


async def test_partitions_lag_gauge_and_trimming(
    make_server: MakeServer,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    split_sites: Path,
    sqlite_dsn: str,
) -> None:
    """The lag gauge is the site's sum over partitions; each partition is trimmed once stored."""
    for key in BIG_STREAMS:
        await redis.xgroup_create(key, GROUP, id="0", mkstream=True)
    for part, n in ((1, 3), (2, 4)):
        for seq in range(1, n + 1):
            body = stored_event(seq, site="big", producer=f"p-{part}")
            await redis.xadd(BIG_STREAMS[part], {"event": body})
    idle = Worker(
        settings_for(redis_proc),
        SitesBook(split_sites, load_sites(split_sites)),
        PersistOptions(dsn=sqlite_dsn),
    )
    try:
        idle._use(idle._layout())  # the worker's streams, without starting its loop
        await idle._check_streams()
    finally:
        await idle.groups.aclose()
    assert REGISTRY.get_sample_value("eventwire_persist_lag", {"site": "big"}) == 7
    server = await make_server(sites=SPLIT_SITES)
    for uuid in ("cust-1", "cust-2", "cust-3", "cust-4", "cust-5"):
        await ingest(server, 200, uuid=uuid, site="big")
    lengths = [await redis.xlen(key) for key in BIG_STREAMS]
    worker = await start_worker(redis_proc, split_sites, sqlite_dsn, retain=0)
    try:
        await wait_rows(worker.sink, sum(lengths))
        await worker._check_streams()  # the worker's periodic look, now
        trimmed = [await redis.xlen(key) for key in BIG_STREAMS]
        stats = await site_stats(redis, Keys("ew"), "big", partitions=P)
    finally:
        await worker.stop()
    assert REGISTRY.get_sample_value("eventwire_persist_lag", {"site": "big"}) == 0
    # XTRIM ~ removes whole stream nodes (100 entries): look at partitions holding more.
    full = [(t, n) for t, n in zip(trimmed, lengths, strict=True) if n > 100]
    assert full
    assert all(t < n for t, n in full)
    assert stats["persist_lag"] == 0
    assert stats["persist_pending"] == 0


class SlowSink(ForwardingSink):
    """A sink that says it writes two batches at once and takes its time over each,
    noting how many of its writes were running together at most."""

    writers = 2

    def __init__(self, inner: Sink) -> None:
        super().__init__(inner)
        self.running = self.most = 0

    async def write(self, rows: Sequence[EventRow]) -> int:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.2 * UNIT)
            return await self.inner.write(rows)
        finally:
            self.running -= 1


async def test_two_batches_in_flight_each_acked_after_its_write(
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    dsn: str,
) -> None:
    """A sink that writes two batches at once gets two from the worker (never more), and
    every entry still becomes one row, acked."""
    n = 4 * 1000 + 7
    await add_events(redis, n)
    sink = SlowSink(open_sink(dsn))
    worker = await start_worker(redis_proc, sites_file, dsn, sink=sink, read_count=1000)
    try:
        await wait_rows(sink, n, within=60)
        await wait_acked(redis)
    finally:
        await worker.stop()
    assert sink.most == 2
    assert worker.rows_written == n
    assert (await client_rows(dsn))[0] == n


def test_pg_writers_is_a_setting(tmp_path: Path) -> None:
    """``persist_pg_writers`` (file, EVENTWIRE_PERSIST_PG_WRITERS) sets the PostgreSQL sink's
    writing connections and the batches the worker keeps in flight; 2 by default; SQLite
    keeps its one connection."""
    assert Settings().persist_pg_writers == PostgresSink.WRITERS == 2
    assert PersistOptions.from_settings(Settings()).pg_writers == 2
    loaded = load_settings(Path(os.devnull), env={"EVENTWIRE_PERSIST_PG_WRITERS": "3"})
    options = PersistOptions.from_settings(loaded.settings, dsn="postgresql://nobody@127.0.0.1/x")
    assert options.pg_writers == 3
    book = SitesBook(None, {})
    worker = Worker(loaded.settings, book, options)
    assert isinstance(worker.sink, PostgresSink)
    assert (worker.sink.writers, worker._depth) == (3, 3)
    sqlite = Worker(
        loaded.settings,
        book,
        PersistOptions.from_settings(loaded.settings, dsn=f"sqlite:///{tmp_path / 'e.db'}"),
    )
    assert isinstance(sqlite.sink, SqliteSink)
    assert sqlite._depth == 1
    with pytest.raises(ConfigError, match="pg_writers"):
        PersistOptions(pg_writers=0)
    assert PersistOptions().read_count == READ_COUNT
    for bad in (0, READ_COUNT + 1):
        with pytest.raises(ConfigError, match="read_count"):
            PersistOptions(read_count=bad)
    for bad in ("0", "33", "two"):
        with pytest.raises(ConfigError, match="persist_pg_writers"):
            load_settings(Path(os.devnull), env={"EVENTWIRE_PERSIST_PG_WRITERS": bad})


def test_pg_writers_flag_is_checked_like_the_setting(tmp_path: Path) -> None:
    """``eventwire persist --pg-writers 0`` stops with exit 2, naming the setting and the flag."""
    out = subprocess.run(
        [sys.executable, "-m", "eventwire", "persist", "--pg-writers", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=False,
        env={**os.environ, "EVENTWIRE_CONFIG": os.devnull},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "persist_pg_writers" in out.stderr
    assert "command line" in out.stderr


@pytest.mark.parametrize("dsn", ["postgres"], indirect=True)
async def test_three_pg_writers_write_every_row_once(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path, dsn: str
) -> None:
    """With ``pg_writers = 3`` the worker writes on three connections, and every entry
    still becomes one row, acked."""
    n = 6 * 1000 + 3
    await add_events(redis, n)
    worker = await start_worker(redis_proc, sites_file, dsn, pg_writers=3, read_count=1000)
    sink = worker.sink
    assert isinstance(sink, PostgresSink)
    try:
        await wait_rows(sink, n, within=60)
        await wait_acked(redis)
        # Each batch takes the writer idle longest: seven batches used all three.
        used = sum(1 for writer in sink._pool if writer.conn is not None)
    finally:
        await worker.stop()
    assert used == 3
    assert worker.rows_written == n
    assert (await client_rows(dsn))[0] == n
