"""Customers (issue 17): one history across log-in, forget, suppress, export, retention.

Real server on port 0, real sockets, the real persist worker into SQLite and
PostgreSQL, the real commands as child processes. "Every trace" is searched
for literally: every key of the test Redis (``SCAN``), its name and its whole
value by type (string, hash fields and values, set and sorted set members,
every field of every stream entry), and every column of every row of every
table of the store, for each uuid as bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from eventwire.core.connection import FORGOTTEN_DETAIL
from eventwire.core.rules import SitesBook, load_sites
from eventwire.gateway import EventwireServer
from eventwire.persist.sinks import Sink, SqliteSink
from eventwire.persist.upkeep import RETAINED_DELETED, RETENTION_RUNS
from eventwire.persist.worker import Worker
from eventwire.store import Keys
from tests.conftest import MakeServer
from tests.keys import SECRET, SECRET_ENV, token
from tests.persist.test_worker import dsn, settings_for  # noqa: F401 (a fixture)
from tests.procs import UNIT, RedisProcess, eventwire_command
from tests.store.test_cluster import cluster  # noqa: F401 (a fixture)
from tests.wire import event, now_ms, peer

WRITE_KEY = "segment-write-key-0123456789"
OLD_WRITE_KEY = "segment-write-key-of-old-site"
SITES = f"""
[sites.shop]
allow_no_origin = true
authenticated = []
keys = [{{ alg = "HS256", secret_env = "{SECRET_ENV}" }}]

[sites.open]
allow_no_origin = true
write_keys = [{{ secret_env = "EW_TEST_CUSTOMERS_WRITE_KEY" }}]

[sites.big]
allow_no_origin = true
authenticated = []
partitions = 4
keys = [{{ alg = "HS256", secret_env = "{SECRET_ENV}" }}]

[sites.old]
allow_no_origin = true
retain_days = 1
write_keys = [{{ secret_env = "EW_TEST_CUSTOMERS_OLD_WRITE_KEY" }}]

[sites.idle]
allow_no_origin = true
session_idle = 0.3
"""
KEYS = Keys("ew")


@pytest.fixture
def env() -> Iterator[None]:
    """The token secret and the Segment write key in the environment (children inherit it)."""
    os.environ[SECRET_ENV] = SECRET
    os.environ["EW_TEST_CUSTOMERS_WRITE_KEY"] = WRITE_KEY
    os.environ["EW_TEST_CUSTOMERS_OLD_WRITE_KEY"] = OLD_WRITE_KEY
    yield
    del os.environ["EW_TEST_CUSTOMERS_WRITE_KEY"]
    del os.environ["EW_TEST_CUSTOMERS_OLD_WRITE_KEY"]


@pytest.fixture
def sites_file(tmp_path: Path) -> Path:
    """The sites of these tests in a file (for the worker and the commands)."""
    path = tmp_path / "customers-sites.toml"
    path.write_text(SITES)
    return path


@pytest.fixture
async def srv(make_server: MakeServer, env: None, tmp_path: Path) -> EventwireServer:
    """A server with the test sites, its store where the worker writes (SQLite)."""
    return await make_server(sites=SITES, persist_dsn=f"sqlite:///{tmp_path / 'events.db'}")


@pytest.fixture
async def worker(
    srv: EventwireServer, redis_proc: RedisProcess, sites_file: Path, tmp_path: Path
) -> AsyncIterator[Worker]:
    """The real persist worker into the server's SQLite store."""
    from eventwire.persist.worker import PersistOptions

    w = Worker(
        settings_for(redis_proc),
        SitesBook(sites_file, load_sites(sites_file)),
        PersistOptions(dsn=srv.settings.persist_dsn),
    )
    await w.start()
    yield w
    await w.stop()


async def wait_for(check: Any, what: str, within: float = 20) -> Any:
    """Poll an async check until it returns something true."""
    deadline = time.monotonic() + within * UNIT
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"waited {within} s for {what}"
        await asyncio.sleep(0.05)


async def rows(sink: Sink, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on the store (SQLite or PostgreSQL), each as a tuple."""
    if isinstance(sink, SqliteSink):
        out: list[tuple[Any, ...]] = await sink.run(
            lambda db: [tuple(r) for r in db.execute(sql).fetchall()]
        )
        return out

    async def pg(conn: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await conn.fetch(sql)]

    found: list[tuple[Any, ...]] = await sink.run(pg)
    return found


async def persisted(sink: Sink, redis: aioredis.Redis) -> bool:
    """Whether the worker has written everything in every events stream."""
    total = 0
    async for key in redis.scan_iter(match="ew:*:events"):
        total += await redis.xlen(key)
    async for key in redis.scan_iter(match="ew:*:dead"):
        total -= await redis.xlen(key)  # dead letters make no row
    return await sink.count() >= total


async def redis_traces(redis: aioredis.Redis, needles: list[str]) -> list[str]:
    """Every key of the test Redis whose name or value holds one of the needles (see the module)."""
    wanted = [n.encode() for n in needles]
    found = []
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        parts: list[bytes] = [key]
        if kind == "string":
            parts.append(await redis.get(key) or b"")
        elif kind == "hash":
            for f, v in (await redis.hgetall(key)).items():
                parts += [f, v]
        elif kind == "set":
            parts += list(await redis.smembers(key))
        elif kind == "zset":
            parts += list(await redis.zrange(key, 0, -1))
        elif kind == "stream":
            for _id, fields in await redis.xrange(key):
                for f, v in fields.items():
                    parts += [f, v]
        blob = b"\0".join(parts)
        found += [f"{key.decode()} ({kind})" for n in wanted if n in blob]
    return found


async def store_traces(sink: Sink, needles: list[str]) -> list[str]:
    """Every row of every table whose text holds one of the needles."""
    found = []
    for table in ("events", "sessions", "aliases"):
        for row in await rows(sink, f"SELECT * FROM {table}"):
            text = json.dumps([str(c) for c in row])
            found += [f"{table}: {text[:120]}" for n in needles if n in text]
    return found


async def browse_then_log_in(
    url: str, site: str, anon: str, customer: str, with_token: bool = True
) -> None:
    """An anonymous visit (two events), identify as the customer, two events more."""
    async with peer(url, site) as p:
        await p.hello(anon)
        assert (await p.track(event(1, "page.visit", params={"url": "https://s/1"})))["accepted"]
        assert (await p.track(event(2, "product.view")))["accepted"] == 1
        ident: dict[str, Any] = {"type": "identify", "uuid": customer}
        if with_token:
            ident["token"] = token(customer, site)
        await p.send(ident)
        assert (await p.track(event(3, "cart.add")))["accepted"] == 1
        assert (await p.track(event(4, "order.purchase")))["accepted"] == 1


async def identify_events(redis: aioredis.Redis, site: str) -> list[dict[str, Any]]:
    """The client.identify events of every stream of a site."""
    out = []
    async for key in redis.scan_iter(match=f"ew:{{{site}*}}:events"):
        for _id, fields in await redis.xrange(key):
            e = json.loads(fields[b"event"])
            if e["action"] == "client.identify":
                out.append(e)
    return out


async def run(*args: str) -> tuple[int, str, str]:
    """Run an eventwire command to its end: exit code, stdout, stderr."""
    proc = await eventwire_command(*args)
    out, err = await asyncio.wait_for(proc.communicate(), 60 * UNIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- one history --------------------------------------------------------------------


async def test_log_in_with_a_token_merges_the_anonymous_history(
    srv: EventwireServer,
    worker: Worker,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
) -> None:
    """Browse as A, identify as K with a token: K's activity holds both parts in order,
    each row with the uuid it was recorded under; the alias is in Redis and in the store."""
    await browse_then_log_in(srv.url, "shop", "anon-a1", "cust-k1")
    (moved,) = await identify_events(redis, "shop")
    assert moved["params"] == {"previous_uuid": "anon-a1", "merged": True}
    assert await redis.get(KEYS.alias("shop", "anon-a1")) == b"cust-k1"
    assert await redis.pttl(KEYS.alias("shop", "anon-a1")) == -1  # no retain_days: kept
    assert await redis.smembers(KEYS.aliases("shop", "cust-k1")) == {b"anon-a1"}
    sink = worker.sink
    await wait_for(lambda: persisted(sink, redis), "the worker")
    assert await rows(sink, "SELECT site, alias, uuid FROM aliases") == [
        ("shop", "anon-a1", "cust-k1")
    ]
    code, out, err = await run(
        "activity", "--dsn", srv.settings.persist_dsn, "--site", "shop", "--uuid", "cust-k1",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    feed = [json.loads(line) for line in out.splitlines()][::-1]  # oldest first
    client = [(r["action"], r["uuid"]) for r in feed if not r["action"].startswith("session.")]
    assert client == [
        ("page.visit", "anon-a1"),
        ("product.view", "anon-a1"),
        ("client.identify", "cust-k1"),
        ("cart.add", "cust-k1"),
        ("order.purchase", "cust-k1"),
    ]
    times = [r["time"] for r in feed]
    assert times == sorted(times)


async def test_an_anonymous_uuid_merges_into_one_customer_only(
    srv: EventwireServer, worker: Worker, redis: aioredis.Redis
) -> None:
    """A second identify of the same anonymous uuid to another customer does not merge:
    client.identify says merged false with the reason, and K2's feed has none of A."""
    await browse_then_log_in(srv.url, "shop", "anon-a2", "cust-k2")
    await browse_then_log_in(srv.url, "shop", "anon-a2", "cust-k3")
    first, second = sorted(await identify_events(redis, "shop"), key=lambda e: e["time"])
    assert first["params"]["merged"] is True
    assert second["params"] == {
        "previous_uuid": "anon-a2",
        "merged": False,
        "reason": "the anonymous uuid is already merged into another customer",
    }
    assert await redis.get(KEYS.alias("shop", "anon-a2")) == b"cust-k2"
    await wait_for(lambda: persisted(worker.sink, redis), "the worker")
    feed = await worker.sink.activity("shop", "cust-k3", 100)
    assert {a.uuid for a in feed} == {"cust-k3"}
    assert {a.uuid for a in await worker.sink.activity("shop", "cust-k2", 100)} == {
        "cust-k2",
        "anon-a2",
    }


async def test_a_keyed_site_merges_only_a_proven_customer(
    srv: EventwireServer, redis: aioredis.Redis
) -> None:
    """On a site with token keys, an identify without a valid token does not merge."""
    await browse_then_log_in(srv.url, "shop", "anon-a3", "cust-k4", with_token=False)
    (moved,) = await identify_events(redis, "shop")
    assert moved["params"]["merged"] is False
    assert moved["params"]["reason"].startswith("the new uuid was not proven by a token")
    assert await redis.exists(KEYS.alias("shop", "anon-a3")) == 0


async def test_a_site_without_keys_merges_on_any_identify(
    srv: EventwireServer, worker: Worker, redis: aioredis.Redis
) -> None:
    """A site without token keys merges on an identify without a token."""
    await browse_then_log_in(srv.url, "open", "anon-a4", "cust-k5", with_token=False)
    (moved,) = await identify_events(redis, "open")
    assert moved["params"] == {"previous_uuid": "anon-a4", "merged": True}
    await wait_for(lambda: persisted(worker.sink, redis), "the worker")
    feed = await worker.sink.activity("open", "cust-k5", 100)
    assert {"anon-a4", "cust-k5"} <= {a.uuid for a in feed}


async def test_alias_keys_expire_with_the_sites_retain_days(
    srv: EventwireServer, redis: aioredis.Redis
) -> None:
    """On a site with retain_days the merge's alias key and the customer's aliases set live
    that long, as the store's row."""
    await browse_then_log_in(srv.url, "old", "anon-a9", "cust-k9", with_token=False)
    (moved,) = await identify_events(redis, "old")
    assert moved["params"] == {"previous_uuid": "anon-a9", "merged": True}
    assert await redis.get(KEYS.alias("old", "anon-a9")) == b"cust-k9"
    assert 86_400_000 - 60_000 < await redis.pttl(KEYS.alias("old", "anon-a9")) <= 86_400_000
    # ... and so does the customer's aliases set, renewed by each merge.
    assert await redis.smembers(KEYS.aliases("old", "cust-k9")) == {b"anon-a9"}
    assert 86_400_000 - 60_000 < await redis.pttl(KEYS.aliases("old", "cust-k9")) <= 86_400_000
    # A Segment alias records its merge the same way.
    basic = "Basic " + base64.b64encode(f"{OLD_WRITE_KEY}:".encode()).decode()
    body = {"type": "alias", "userId": "seg-k9", "previousId": "seg-a9", "messageId": "m9"}
    async with (
        aiohttp.ClientSession(headers={"Authorization": basic}) as http,
        http.post(f"{srv.http_url}/v1/batch", json={"batch": [body]}) as r,
    ):
        assert (r.status, (await r.json())["accepted"]) == (200, 1)
    assert await redis.smembers(KEYS.aliases("old", "seg-k9")) == {b"seg-a9"}
    assert 86_400_000 - 60_000 < await redis.pttl(KEYS.aliases("old", "seg-k9")) <= 86_400_000


async def test_a_merge_across_partitions_keeps_each_key_in_its_partition(
    srv: EventwireServer, redis: aioredis.Redis
) -> None:
    """On a partitioned site the alias lives in the anonymous uuid's partition, the
    customer's aliases set in the customer's (docs/protocol.md section 17)."""
    anon, cust = "anon-p1", "cust-p2"
    ta, tk = Keys.tag("big", anon, 4), Keys.tag("big", cust, 4)
    assert ta != tk
    await browse_then_log_in(srv.url, "big", anon, cust)
    assert await redis.get(KEYS.alias(ta, anon)) == cust.encode()
    assert await redis.smembers(KEYS.aliases(tk, cust)) == {anon.encode()}


async def test_segment_alias_and_identify_take_the_same_path(
    srv: EventwireServer, worker: Worker, redis: aioredis.Redis
) -> None:
    """Segment alias (previousId -> userId) and identify (anonymousId + userId) merge as an
    identify does, trusted by the write key; a second customer for the same id does not."""
    basic = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    async with aiohttp.ClientSession(headers={"Authorization": basic}) as http:
        for body in (
            {"type": "alias", "userId": "seg-k1", "previousId": "seg-a1", "messageId": "m1"},
            {"type": "identify", "userId": "seg-k1", "anonymousId": "seg-a2", "messageId": "m2"},
            {"type": "alias", "userId": "seg-k2", "previousId": "seg-a1", "messageId": "m3"},
        ):
            async with http.post(f"{srv.http_url}/v1/batch", json={"batch": [body]}) as r:
                assert (r.status, (await r.json())["accepted"]) == (200, 1)
    assert await redis.get(KEYS.alias("open", "seg-a1")) == b"seg-k1"
    assert await redis.get(KEYS.alias("open", "seg-a2")) == b"seg-k1"
    assert await redis.pttl(KEYS.aliases("open", "seg-k1")) == -1  # no retain_days: kept
    await wait_for(lambda: persisted(worker.sink, redis), "the worker")
    assert await rows(worker.sink, "SELECT alias, uuid FROM aliases ORDER BY alias") == [
        ("seg-a1", "seg-k1"),
        ("seg-a2", "seg-k1"),
    ]
    refused = [
        json.loads(f[b"event"])["params"]
        for _, f in await redis.xrange("ew:{open}:events")
        if b'"seg-k2"' in f[b"event"] and b'"client.alias"' in f[b"event"]
    ]
    assert [(p["merged"], p["previous_uuid"]) for p in refused] == [(False, "seg-a1")]


# -- forget, suppress, export ---------------------------------------------------------


async def dead_letter_for(redis: aioredis.Redis, site: str, uuid: str) -> None:
    """An entry the worker cannot store (no seq) naming the customer: it dead-letters it."""
    await redis.xadd(
        f"ew:{{{site}}}:events", {"event": json.dumps({"site": site, "uuid": uuid, "x": 1})}
    )


async def test_forget_removes_every_trace_and_counts_it(
    srv: EventwireServer, worker: Worker, redis: aioredis.Redis
) -> None:
    """forget over the admin route: a dry run changes nothing and counts what forget then
    deletes; afterwards no key, stream entry or row of Redis or the store names the customer
    or its alias, and another customer is untouched."""
    await browse_then_log_in(srv.url, "shop", "anon-f1", "cust-f1")
    await browse_then_log_in(srv.url, "shop", "anon-other", "cust-other")
    async with peer(srv.url, "shop") as p:  # a rejected event of the alias
        await p.hello("anon-f1")
        assert (await p.track(event(1, "page.visit")))["rejected"][0]["code"] == "missing_param"
    await dead_letter_for(redis, "shop", "cust-f1")
    sink = worker.sink
    await wait_for(lambda: redis.xlen("ew:{shop}:dead"), "the dead letter")
    await wait_for(lambda: persisted(sink, redis), "the worker")
    needles = ["anon-f1", "cust-f1"]
    assert await redis_traces(redis, needles)
    assert await store_traces(sink, needles)
    url = f"{srv.http_url}/v1/sites/shop/forget"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"uuid": "cust-f1", "dry_run": True}) as r:
            assert r.status == 200
            dry = await r.json()
        traces_before = await redis_traces(redis, needles)
        assert traces_before
        assert await store_traces(sink, needles)
        async with http.post(url, json={"uuid": "cust-f1"}) as r:
            assert r.status == 200
            done = await r.json()
        async with http.post(url, json={"uuid": "bad uuid!"}) as r:
            assert r.status == 400
        async with http.post(f"{srv.http_url}/v1/sites/nowhere/forget", json={"uuid": "x"}) as r:
            assert r.status == 404
    assert dry["dry_run"] is True
    assert dry["audit"] is None
    for part in ("redis", "store"):
        assert dry[part] == done[part], part
    assert done["uuids"] == 2
    assert done["redis"]["events"] >= 6
    assert done["redis"]["rejected"] == 1
    assert done["redis"]["dead"] == 1
    assert done["redis"]["aliases"] == 2
    # Every events-stream entry of theirs was a row, but the dead letter.
    assert done["store"]["events"] == done["redis"]["events"] - 1
    assert done["store"]["aliases"] == 1
    assert done["store"]["sessions"] >= 1
    assert await redis_traces(redis, needles) == []
    assert await store_traces(sink, needles) == []
    # The other customer keeps its history; the audit names a keyed hash, never the uuid.
    assert {a.uuid for a in await sink.activity("shop", "cust-other", 100)} == {
        "cust-other",
        "anon-other",
    }
    ((_, audit),) = await redis.xrange("ew:{shop}:audit")
    assert audit[b"operation"] == b"forget"
    assert audit[b"subject"].decode() == done["subject"]
    assert len(done["subject"]) == 64
    assert json.loads(audit[b"counts"])["redis"] == done["redis"]


async def test_forget_on_a_partitioned_site_searches_every_partition(
    srv: EventwireServer, redis: aioredis.Redis, sites_file: Path
) -> None:
    """eventwire forget (the command, Redis only: no store yet) on a site of 4 partitions."""
    await browse_then_log_in(srv.url, "big", "anon-p1", "cust-p2")
    needles = ["anon-p1", "cust-p2"]
    assert await redis_traces(redis, needles)
    nowhere = "sqlite:///" + str(sites_file.parent / "absent.db")
    code, out, err = await run(
        "forget", "--site", "big", "--uuid", "cust-p2", "--sites", str(sites_file),
        "--redis", srv.settings.redis_url, "--dsn", nowhere,
    )  # fmt: skip
    assert code == 0, err
    done = json.loads(out)
    assert done["store"] is None
    assert done["uuids"] == 2
    assert done["redis"]["events"] >= 6
    assert await redis_traces(redis, needles) == []
    assert not os.path.exists(nowhere[len("sqlite:///") :])  # noqa: ASYNC240 (one stat)


async def test_suppressed_customers_are_denied_and_stored_nowhere(
    srv: EventwireServer, redis: aioredis.Redis, sites_file: Path
) -> None:
    """forget --suppress: later events of the customer and its alias are denied with the
    detail, over a socket and over HTTP, open no session and store nothing; unsuppress
    lifts it."""
    await browse_then_log_in(srv.url, "shop", "anon-s1", "cust-s1")
    nowhere = "sqlite:///" + str(sites_file.parent / "absent.db")
    flags = ["--sites", str(sites_file), "--redis", srv.settings.redis_url]
    code, out, err = await run(
        "forget", "--site", "shop", "--uuid", "cust-s1", "--suppress", "--dsn", nowhere, *flags
    )
    assert code == 0, err
    assert json.loads(out)["suppressed"] == 2
    before = await redis.xlen("ew:{shop}:events")
    for uuid in ("cust-s1", "anon-s1"):
        async with peer(srv.url, "shop") as p:
            await p.hello(uuid)
            ack = await p.track(event(1, "product.view"), event(2, "cart.add"))
            assert ack["accepted"] == 0
            assert [(r["code"], r["detail"]) for r in ack["rejected"]] == [
                ("denied", FORGOTTEN_DETAIL)
            ] * 2
    async with peer(srv.url, "shop") as p:  # a new visitor logs in as the forgotten one
        await p.hello("anon-s9")
        assert (await p.track(event(1)))["accepted"] == 1
        await p.send({"type": "identify", "uuid": "cust-s1", "token": token("cust-s1", "shop")})
        ack = await p.track(event(2))
        assert [r["detail"] for r in ack["rejected"]] == [FORGOTTEN_DETAIL]
    before = await redis.xlen("ew:{shop}:events")
    body = {"uuid": "cust-s1", "producer": "backend-1", "events": [event(1, "order.purchase")]}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{srv.http_url}/v1/track/shop", json=body) as r,
    ):
        assert r.status == 200
        assert (await r.json())["rejected"][0]["detail"] == FORGOTTEN_DETAIL
    assert await redis.xlen("ew:{shop}:events") == before  # no session.start/end, nothing
    assert await redis_traces(redis, ["anon-s1", "cust-s1"]) == []
    suppressed = await redis.smembers(KEYS.suppressed("shop"))
    assert len(suppressed) == 2
    assert all(len(h) == 64 for h in suppressed)
    code, out, err = await run("unsuppress", "--site", "shop", "--uuid", "cust-s1", *flags)
    assert code == 0, err
    assert json.loads(out)["removed"] == 2
    async with peer(srv.url, "shop") as p:
        await p.hello("anon-s1")
        assert (await p.track(event(1, "product.view")))["accepted"] == 1


async def test_a_connection_open_during_forget_suppress_is_denied_from_then_on(
    srv: EventwireServer, redis: aioredis.Redis
) -> None:
    """A socket open while its customer is forgotten with suppress: its next frame is denied
    (its session was removed, so the step finds it gone and the reopen finds the suppression)."""
    async with peer(srv.url, "open") as p:
        await p.hello("cust-live")
        assert (await p.track(event(1)))["accepted"] == 1
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{srv.http_url}/v1/sites/open/forget", json={"uuid": "cust-live", "suppress": True}
            ) as r,
        ):
            assert r.status == 200
        ack = await p.track(event(2), event(3))
        assert ack["accepted"] == 0
        assert {x["code"] for x in ack["rejected"]} == {"denied"}
    assert await redis_traces(redis, ["cust-live"]) == []


async def test_export_holds_exactly_the_customers_rows(
    srv: EventwireServer, worker: Worker, redis: aioredis.Redis, sites_file: Path, tmp_path: Path
) -> None:
    """eventwire export --out: the customer's and its alias' events, sessions and alias row,
    nothing of another customer; the same rows the store holds for them."""
    await browse_then_log_in(srv.url, "shop", "anon-e1", "cust-e1")
    await browse_then_log_in(srv.url, "shop", "anon-e2", "cust-e2")
    await wait_for(lambda: persisted(worker.sink, redis), "the worker")
    out = tmp_path / "export.jsonl"
    code, _, err = await run(
        "export", "--site", "shop", "--uuid", "cust-e1", "--dsn", srv.settings.persist_dsn,
        "--out", str(out), "--sites", str(sites_file), "--redis", srv.settings.redis_url,
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    mine = {"anon-e1", "cust-e1"}
    expected_events = await rows(
        worker.sink,
        "SELECT producer, seq FROM events WHERE site = 'shop' AND uuid IN ('anon-e1', 'cust-e1')",
    )
    got = {(r["producer"], r["seq"]) for r in lines if r["table"] == "events"}
    assert got == set(expected_events)
    assert all(r["uuid"] in mine for r in lines)
    assert [r for r in lines if r["table"] == "aliases"] == [
        {"table": "aliases", "site": "shop", "alias": "anon-e1", "uuid": "cust-e1",
         "since": lines[-1]["since"]},
    ]  # fmt: skip
    sessions = [r for r in lines if r["table"] == "sessions"]
    assert sessions
    assert {s["uuid"] for s in sessions} <= mine
    assert "anon-e2" not in out.read_text()
    assert "cust-e2" not in out.read_text()
    (audit,) = [f for _, f in await redis.xrange("ew:{shop}:audit")]
    assert audit[b"operation"] == b"export"


# -- retention --------------------------------------------------------------------------


def deleted_metric(site: str, table: str) -> float:
    """``eventwire_persist_retention_deleted_total{site, table}`` of this process (0 before)."""
    for family in RETAINED_DELETED.collect():
        for s in family.samples:
            if s.name.endswith("_total") and s.labels == {"site": site, "table": table}:
                return s.value
    return 0.0


def retention_runs() -> float:
    """``eventwire_persist_retention_runs_total`` of this process: passes ended."""
    for family in RETENTION_RUNS.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                return s.value
    return 0.0


async def test_retention_deletes_only_rows_older_than_retain_days(
    make_server: MakeServer,
    env: None,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    dsn: str,  # noqa: F811 (the fixture)
) -> None:
    """retain_days = 1 with retain_interval small: events two days old go, with their
    session; a day's events stay; the deletes are counted in the worker's metrics."""
    from eventwire.persist.worker import PersistOptions

    srv = await make_server(sites=SITES)
    old = now_ms() - 2 * 86_400_000
    async with peer(srv.url, "old") as p:
        await p.hello("cust-r1")
        ack = await p.track(event(1, time=old), event(2, time=old + 1), event(3))
        assert ack["accepted"] == 3
    before = deleted_metric("old", "events")
    settings = msgspec.structs.replace(settings_for(redis_proc), retain_interval=0.1)
    w = Worker(settings, SitesBook(sites_file, load_sites(sites_file)), PersistOptions(dsn=dsn))
    await w.start()
    try:
        sink = w.sink

        async def only_new() -> bool:
            times = await rows(sink, "SELECT time FROM events WHERE site = 'old'")
            return len(times) >= 2 and all(t > old + 1 for (t,) in times)

        await wait_for(only_new, "retention")
        # The pass that deleted the old rows counts them once its last table (aliases)
        # is done, after the events are gone: wait for a pass to end from here.
        runs = retention_runs()

        async def pass_ended() -> bool:
            return retention_runs() > runs

        await wait_for(pass_ended, "the retention pass to end")
        left = await rows(sink, "SELECT seq, action FROM events WHERE site = 'old' ORDER BY seq")
        assert (3, "product.view") in left
        assert all(a.startswith("session.") or s == 3 for s, a in left)
        assert deleted_metric("old", "events") - before == 2
        assert w.retention.deleted["events"] == 2
    finally:
        await w.stop()


async def test_an_identify_that_asks_not_to_merge_never_merges(
    srv: EventwireServer, redis: aioredis.Redis
) -> None:
    """identify with merge false (the tracker's reset, a log-out) on a site without keys:
    the customer left is not merged into the fresh uuid."""
    async with peer(srv.url, "open") as p:
        await p.hello("cust-out")
        assert (await p.track(event(1)))["accepted"] == 1
        await p.send({"type": "identify", "uuid": "anon-next", "merge": False})
        assert (await p.track(event(2)))["accepted"] == 1
    (moved,) = await identify_events(redis, "open")
    assert moved["params"]["merged"] is False
    assert moved["params"]["reason"] == "the client asked not to merge (a log-out or reset)"
    assert await redis.exists(KEYS.alias("open", "cust-out")) == 0


async def test_merge_forget_and_suppress_on_a_redis_cluster(
    make_server: MakeServer,
    env: None,
    redis_cluster_proc: Any,
    cluster: Any,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """On a 3-master Redis Cluster, a site of 4 partitions: a merge across partitions, then
    forget with suppress over the admin route; no key of any master names the customer."""
    sites = SITES.replace("[sites.old]", "[sites.none]")
    srv = await make_server(sites=sites, redis_url=redis_cluster_proc.url)
    anon, cust = "anon-p1", "cust-p2"
    await browse_then_log_in(srv.url, "big", anon, cust)
    ta = Keys.tag("big", anon, 4)
    assert await cluster.get(KEYS.alias(ta, anon)) == cust.encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{srv.http_url}/v1/sites/big/forget", json={"uuid": cust, "suppress": True}
        ) as r,
    ):
        assert r.status == 200, await r.text()
        done = await r.json()
    assert done["uuids"] == 2
    assert done["redis"]["events"] >= 6
    for node in redis_cluster_proc.nodes:
        client = aioredis.Redis(port=node.port)
        try:
            if (await client.info("replication"))["role"] == "master":
                assert await redis_traces(client, [anon, cust]) == [], node.port
        finally:
            await client.aclose()
    async with peer(srv.url, "big") as p:
        await p.hello(anon)
        ack = await p.track(event(1))
        assert [r["code"] for r in ack["rejected"]] == ["denied"]


async def test_an_identify_after_the_session_ended_idle_still_merges(
    make_server: MakeServer, env: None, redis: aioredis.Redis
) -> None:
    """The anonymous session ended idle under the open connection: the identify opens it
    again and stores the merge with its client.identify."""
    srv = await make_server(sites=SITES, reap_interval=0.05)
    async with peer(srv.url, "idle") as p:
        await p.hello("anon-idle")
        assert (await p.track(event(1)))["accepted"] == 1
        await wait_for(
            lambda: _gone(redis, KEYS.session("idle", "anon-idle")), "the idle end", within=10
        )
        await p.send({"type": "identify", "uuid": "cust-idle"})
        assert (await p.track(event(2)))["accepted"] == 1
    (moved,) = await identify_events(redis, "idle")
    assert moved["params"] == {"previous_uuid": "anon-idle", "merged": True}
    assert await redis.get(KEYS.alias("idle", "anon-idle")) == b"cust-idle"


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)
