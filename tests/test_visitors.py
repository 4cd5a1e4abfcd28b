"""Visitors through real connections: client on session.start, ip policy, bots, source, limits."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.datastructures import HeadersLike
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from eventwire.commands.stats import site_stats
from eventwire.core.config import Settings
from eventwire.core.rules import SitesBook, load_sites
from eventwire.gateway import HANDSHAKE_DONE, EventwireServer
from eventwire.persist.worker import PersistOptions, Worker
from eventwire.store import Keys
from tests.conftest import SITES_TOML, MakeServer
from tests.procs import UNIT, RedisProcess, ServerProcess
from tests.wire import Peer, client_events, producer_id, stream

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
SAFARI_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
HEADLESS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/131.0.0.0 Safari/537.36"
)
CURL = "curl/8.5.0"

#: A well-known public address (Google's resolver) and a documentation address.
PUBLIC_IP = "8.8.8.8"
RAW_IP = "203.0.113.77"

#: The test sites, with one site per bots mode and per ip policy.
SITES = (
    SITES_TOML
    + """
[sites.flagged]
origins = ["https://shop.example"]
allow_no_origin = true

[sites.dropped]
origins = ["https://shop.example"]
allow_no_origin = true
bots = "drop"

[sites.kept]
origins = ["https://shop.example"]
allow_no_origin = true
bots = "keep"
ip = "keep"

[sites.private]
origins = ["https://shop.example"]
allow_no_origin = true
ip = "drop"
"""
)


@asynccontextmanager
async def visitor(
    url: str,
    site: str = "app",
    user_agent: str | None = None,
    headers: HeadersLike | None = None,
    origin: str | None = None,
) -> AsyncIterator[Peer]:
    """A raw peer sending the given User-Agent (None: no User-Agent header) and headers."""
    async with connect(
        f"{url}/v1/track/{site}",
        subprotocols=[Subprotocol("eventwire.v1.json")],
        additional_headers=headers,
        user_agent_header=user_agent,
        origin=Origin(origin) if origin else None,
        compression=None,
        proxy=None,
        open_timeout=5 * UNIT,
    ) as ws:
        yield Peer(ws, False)


async def session_start(redis: aioredis.Redis, site: str, uuid: str) -> dict[str, Any]:
    """The session.start of ``uuid`` on ``site`` (waits for it a little)."""
    for _ in range(50):
        starts = [
            e
            for e in await stream(redis, f"ew:{{{site}}}:events")
            if e["action"] == "session.start" and e["uuid"] == uuid
        ]
        if starts:
            return starts[-1]
        await asyncio.sleep(0.02 * UNIT)
    raise AssertionError(f"no session.start of {uuid} on {site}")


async def client_of(url: str, redis: aioredis.Redis, uuid: str, ua: str | None, **kw: Any) -> Any:
    """Say hello as ``uuid`` with a User-Agent; the ``client`` of its session.start."""
    site = kw.pop("site", "app")
    context = kw.pop("context", None)
    async with visitor(url, site, ua, **kw) as p:
        await p.hello(uuid, context=context) if context else await p.hello(uuid)
    return (await session_start(redis, site, uuid))["params"]["client"]


async def test_client_of_real_user_agents(server: EventwireServer, redis: aioredis.Redis) -> None:
    """Desktop Chrome, iPhone Safari, Googlebot, HeadlessChrome and curl are told apart."""
    chrome = await client_of(server.url, redis, "v-chrome", CHROME_WINDOWS)
    assert chrome == {
        "device": "desktop",
        "bot": False,
        "ip": "127.0.0.0",
        "browser": "Chrome",
        "browser_version": "131.0.0",
        "os": "Windows",
        "os_version": "10",
    }
    iphone = await client_of(
        server.url, redis, "v-iphone", SAFARI_IPHONE, headers={"Accept-Language": "fr-CH, fr;q=0.9"}
    )
    assert iphone["device"] == "mobile"
    assert (iphone["browser"], iphone["os"], iphone["os_version"]) == (
        "Mobile Safari",
        "iOS",
        "17.5",
    )
    assert iphone["language"] == "fr-CH"
    assert iphone["bot"] is False
    for uuid, ua, match in (
        ("v-googlebot", GOOGLEBOT, "Googlebot"),
        ("v-headless", HEADLESS, "Headless"),
        ("v-curl", CURL, "curl"),
    ):
        bot = await client_of(server.url, redis, uuid, ua)
        assert bot["bot"] is True, ua
        assert bot["device"] == "bot"
        assert match in bot["bot_reason"]
    # A site that takes browsers only: no User-Agent is a bot; webdriver is one anywhere.
    bare = await client_of(
        server.url, redis, "v-bare", None, site="web", origin="https://web.example"
    )
    assert bare["bot"] is True
    assert "no User-Agent" in bare["bot_reason"]
    driven = await client_of(
        server.url, redis, "v-driven", CHROME_WINDOWS, context={"webdriver": True}
    )
    assert (driven["bot"], driven["device"]) == (True, "bot")
    assert "webdriver" in driven["bot_reason"]


async def test_open_connections_keep_no_handshake(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """An open connection drops its request headers and visitor; each still gets its own client.

    The connections share one empty stand-in request (never written to): a
    connection opened after them still has its own headers read.
    """
    async with (
        visitor(server.url, "app", CHROME_WINDOWS, {"Accept-Language": "de-CH"}) as human,
        visitor(server.url, "app", GOOGLEBOT) as bot,
    ):
        await human.hello("v-kept-human")
        await bot.hello("v-kept-bot")
        assert len(server._connections) == 2
        for ws, ingest in server._connections.items():
            assert ws.request is HANDSHAKE_DONE
            assert ws.response is None
            assert ws.visitor is None
            assert ingest.protocol.visitor is None
            assert ingest.protocol.start is not None
            # The protocol state in slots; the gateway's own attributes too.
            assert not hasattr(ingest.protocol, "__dict__")
            assert not {"site", "address", "visitor", "inbox", "reader"} & set(ws.__dict__)
        assert len(HANDSHAKE_DONE.headers) == 0
        ack = await human.track({"seq": 1, "action": "page.visit", "params": {"url": "/a"}})
        assert (ack["type"], ack["accepted"]) == ("ack", 1), ack
    human_client = (await session_start(redis, "app", "v-kept-human"))["params"]["client"]
    bot_client = (await session_start(redis, "app", "v-kept-bot"))["params"]["client"]
    assert (human_client["browser"], human_client["language"]) == ("Chrome", "de-CH")
    assert human_client["bot"] is False
    assert (bot_client["bot"], bot_client["device"]) == (True, "bot")
    assert "language" not in bot_client
    later = await client_of(
        server.url, redis, "v-later", SAFARI_IPHONE, headers={"Accept-Language": "it"}
    )
    assert (later["browser"], later["language"], later["device"]) == (
        "Mobile Safari",
        "it",
        "mobile",
    )
    assert len(HANDSHAKE_DONE.headers) == 0


async def test_forwarded_for_believed_from_trusted_proxies_only(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """X-Forwarded-For names the client only when the peer is a trusted proxy."""
    trusting = await make_server(trusted_proxies=["127.0.0.0/8"])
    hops = {"X-Forwarded-For": f"{PUBLIC_IP}, 10.1.2.3"}
    # 10.1.2.3 is not trusted: it is the client as far as the trusted proxy knows.
    near = await client_of(trusting.url, redis, "v-near", CHROME_WINDOWS, headers=hops)
    assert near["ip"] == "10.1.2.0"
    both = await make_server(trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"])
    far = await client_of(both.url, redis, "v-far", CHROME_WINDOWS, headers=hops)
    assert far["ip"] == "8.8.8.0"  # truncated to its /24
    assert far["country"] == "US"
    untrusting = await make_server()
    forged = await client_of(untrusting.url, redis, "v-forged", CHROME_WINDOWS, headers=hops)
    assert forged["ip"] == "127.0.0.0"
    assert "country" not in forged
    rfc = await client_of(
        both.url,
        redis,
        "v-rfc",
        CHROME_WINDOWS,
        headers={"Forwarded": 'for="[2001:4860::8888]:443"'},
    )
    assert rfc["ip"] == "2001:4860::"  # a /48
    assert rfc["country"] == "US"


async def test_ip_policies(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """keep stores the address, drop none (the country is still looked up)."""
    srv = await make_server(sites=SITES, trusted_proxies=["127.0.0.0/8"])
    hops = {"X-Forwarded-For": PUBLIC_IP}
    kept = await client_of(srv.url, redis, "v-kept", CHROME_WINDOWS, site="kept", headers=hops)
    assert (kept["ip"], kept["country"]) == (PUBLIC_IP, "US")
    dropped = await client_of(
        srv.url, redis, "v-priv", CHROME_WINDOWS, site="private", headers=hops
    )
    assert "ip" not in dropped
    assert dropped["country"] == "US"


async def send_visit(p: Peer, seq: int, url: str, referrer: str = "") -> dict[str, Any]:
    """Track one page.visit; its ack."""
    params = {"url": url, "title": "Page", "referrer": referrer}
    return await p.track({"seq": seq, "action": "page.visit", "params": params})


async def test_bots_flag_drop_keep(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """flag stores a bot's events with bot true; drop stores none, acked denied; keep as any."""
    srv = await make_server(sites=SITES)
    for site in ("flagged", "dropped", "kept"):
        async with visitor(srv.url, site, GOOGLEBOT) as p:
            await p.hello(f"bot-{site}", producer_id())
            ack = await send_visit(p, 1, "https://shop.example/")
            if site == "dropped":
                assert ack["accepted"] == 0
                (rejected,) = ack["rejected"]
                assert rejected["code"] == "denied"
                assert "bot" in rejected["detail"]
                assert "Googlebot" in rejected["detail"]
            else:
                assert ack["accepted"] == 1
        async with visitor(srv.url, site, CHROME_WINDOWS) as p:
            await p.hello(f"human-{site}", producer_id())
            assert (await send_visit(p, 1, "https://shop.example/"))["accepted"] == 1
    flagged = await stream(redis, "ew:{flagged}:events")
    assert {e["uuid"]: e.get("bot", False) for e in flagged if e["action"] == "page.visit"} == {
        "bot-flagged": True,
        "human-flagged": False,
    }
    start = next(
        e for e in flagged if e["action"] == "session.start" and e["uuid"] == "bot-flagged"
    )
    assert start["bot"] is True
    # eventwire stats: bots/s of the last minute, from the entries flagged bot.
    stats = await site_stats(redis, Keys("ew"), "flagged")
    assert stats["bots_per_s"] == round(2 / 60, 3)  # the bot's session.start and its visit
    assert stats["events_per_s"] > stats["bots_per_s"]
    kept = await stream(redis, "ew:{kept}:events")
    assert not any(e.get("bot") for e in kept)
    assert any(e["uuid"] == "bot-kept" and e["action"] == "page.visit" for e in kept)
    # Dropped: nothing of the bot anywhere, not its session.start, not its session.end.
    assert srv.sessions is not None
    await srv.sessions.reap_once()
    await srv.sessions.flush_dropped_bots()
    assert (await site_stats(redis, Keys("ew"), "dropped"))["bots_dropped"] == 1
    dropped = await stream(redis, "ew:{dropped}:events")
    assert [e for e in dropped if e["uuid"] == "bot-dropped"] == []
    assert await redis.hget("ew:{dropped}:sess:bot-dropped", "quiet") == b"1"
    assert "human-dropped" in {e["uuid"] for e in dropped}
    assert await stream(redis, "ew:{dropped}:rejected") == []
    async with aiohttp.ClientSession() as http, http.get(f"{srv.admin_url}/metrics") as r:
        text = await r.text()
    assert 'eventwire_bot_events_total{outcome="dropped",site="dropped"} 1.0' in text
    assert 'eventwire_bot_events_total{outcome="flagged",site="flagged"} 1.0' in text


async def test_http_batches_are_enriched_and_bots_dropped(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """An HTTP batch gets the request's visitor: a bot's batch on a drop site is denied."""
    srv = await make_server(sites=SITES)
    assert srv.http_url is not None
    visit = {"seq": 1, "action": "page.visit", "params": {"url": "https://shop.example/"}}
    async with aiohttp.ClientSession() as http:
        for uuid, ua in (("http-bot", GOOGLEBOT), ("http-human", SAFARI_IPHONE)):
            body = {"uuid": uuid, "producer": producer_id(), "events": [visit]}
            headers = {"User-Agent": ua}
            async with http.post(
                f"{srv.http_url}/v1/track/dropped", json=body, headers=headers
            ) as r:
                ack = await r.json()
            assert r.status == 200
            if uuid == "http-bot":
                assert ack["accepted"] == 0
                assert ack["rejected"][0]["code"] == "denied"
            else:
                assert ack["accepted"] == 1
    events = await stream(redis, "ew:{dropped}:events")
    assert "http-bot" not in {e["uuid"] for e in events}
    start = await session_start(redis, "dropped", "http-human")
    assert start["params"]["client"]["device"] == "mobile"


async def test_source_of_visits(server: EventwireServer, redis: aioredis.Redis) -> None:
    """page.visit gets params.source; session.start the hello page's source."""
    context = {"url": "https://shop.example/?utm_source=news&utm_medium=email", "referrer": ""}
    async with visitor(server.url, "shop", CHROME_WINDOWS) as p:
        await p.hello("v-source", producer_id(), context=context)
        await send_visit(p, 1, "https://shop.example/", "https://www.google.com/")
        await send_visit(
            p, 2, "https://shop.example/?utm_source=newsletter&utm_medium=email&utm_campaign=dec"
        )
        await send_visit(p, 3, "https://shop.example/")
        await send_visit(p, 4, "https://shop.example/cart", "https://shop.example/")
        await send_visit(p, 5, "https://shop.example/?gclid=abc", "https://www.google.com/")
    visits = [e["params"]["source"] for e in await client_events(redis, "shop")]
    assert visits == [
        {"medium": "search", "name": "Google", "referrer_host": "google.com"},
        {
            "medium": "email",
            "name": "newsletter",
            "utm_source": "newsletter",
            "utm_medium": "email",
            "utm_campaign": "dec",
        },
        {"medium": "direct"},
        {"medium": "internal", "referrer_host": "shop.example"},
        {"medium": "paid", "name": "Google", "referrer_host": "google.com"},
    ]
    start = await session_start(redis, "shop", "v-source")
    assert start["params"]["source"] == {
        "medium": "email",
        "name": "news",
        "utm_source": "news",
        "utm_medium": "email",
    }


async def test_enrichment_off(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """enrich_visitors = false: no client, no source, no bot check."""
    srv = await make_server(enrich_visitors=False)
    async with visitor(srv.url, "shop", GOOGLEBOT) as p:
        await p.hello("v-plain", producer_id())
        await send_visit(p, 1, "https://shop.example/", "https://www.google.com/")
    (visit,) = await client_events(redis, "shop")
    assert "source" not in visit["params"]
    assert "bot" not in visit
    assert "client" not in (await session_start(redis, "shop", "v-plain"))["params"]


async def test_per_ip_limits_answer_429(make_server: MakeServer) -> None:
    """Past max_connections_per_ip or the handshake burst: HTTP 429 with Retry-After."""
    srv = await make_server(max_connections_per_ip=2)
    async with (
        visitor(srv.url, user_agent=CHROME_WINDOWS),
        visitor(srv.url, user_agent=CHROME_WINDOWS),
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with visitor(srv.url, user_agent=CHROME_WINDOWS):
                pass
        assert refused.value.response.status_code == 429
        assert refused.value.response.headers["Retry-After"] == "1"
        assert b"max_connections_per_ip" in refused.value.response.body
    async with visitor(srv.url, user_agent=CHROME_WINDOWS):
        pass  # the connections closed: room again
    burst = await make_server(handshakes_per_ip=0.01, handshake_burst=2)
    for _ in range(2):
        async with visitor(burst.url):
            pass
    with pytest.raises(InvalidStatus) as refused:
        async with visitor(burst.url):
            pass
    assert refused.value.response.status_code == 429
    assert int(refused.value.response.headers["Retry-After"]) >= 60
    # The HTTP endpoints share the limits.
    assert burst.http_url is not None
    async with aiohttp.ClientSession() as http:
        body = {"uuid": "u-1", "producer": producer_id(), "events": [{"seq": 1, "action": "a.b"}]}
        async with http.post(f"{burst.http_url}/v1/track/app", json=body) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 60
            assert (await r.json())["code"] == "too_many_requests"


async def dump_redis(redis: aioredis.Redis, site: str) -> bytes:
    """Every key of a site with its value, as bytes to search."""
    out = bytearray()
    async for key in redis.scan_iter(match=f"*{{{site}}}*", count=1000):
        out += key + b"\n"
        kind = (await redis.type(key)).decode()
        if kind == "stream":
            for _id, fields in await redis.xrange(key):
                out += b"".join(k + v for k, v in fields.items())
        elif kind == "hash":
            out += b"".join(k + v for k, v in (await redis.hgetall(key)).items())
        elif kind == "string":
            out += await redis.get(key) or b""
        elif kind == "set":
            out += b"".join(await redis.smembers(key))
        elif kind == "zset":
            out += b"".join(m for m, _ in await redis.zrange(key, 0, -1, withscores=True))
    return bytes(out)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_raw_ip_reaches_no_redis_log_or_store(
    policy: str, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Under truncate and drop, the raw address is in no Redis key, log line or stored row."""
    sites = tmp_path / "sites.toml"
    sites.write_text(
        f'[sites.ip{policy}]\norigins = ["https://shop.example"]\nallow_no_origin = true\n'
        f'ip = "{policy}"\n'
    )
    site = f"ip{policy}"
    db = tmp_path / "events.db"
    env = {"EVENTWIRE_TRUSTED_PROXIES": "127.0.0.0/8", "EVENTWIRE_LOG_LEVEL": "debug"}
    srv = ServerProcess(redis_proc.url, sites, env=env).start()
    hops = {"X-Forwarded-For": RAW_IP, "Origin": "https://shop.example"}
    uuid = f"ip-{policy}"

    async def scenario() -> tuple[bytes, int]:
        url = f"ws://127.0.0.1:{srv.port}"
        async with visitor(url, site, CHROME_WINDOWS, headers=hops) as p:
            await p.hello(uuid, producer_id(), context={"url": "https://shop.example/"})
            assert (await send_visit(p, 1, "https://shop.example/"))["accepted"] == 1
        async with aiohttp.ClientSession() as http:
            visit = {"seq": 1, "action": "page.visit", "params": {"url": "https://x.example/"}}
            body = {"uuid": uuid, "producer": producer_id(), "events": [visit]}
            track = f"http://127.0.0.1:{srv.http_port}/v1/track/{site}"
            async with http.post(track, json=body, headers=hops) as r:
                assert r.status == 200, await r.text()
        client = aioredis.Redis.from_url(redis_proc.url)
        try:
            length = await client.xlen(f"ew:{{{site}}}:events")
            worker = Worker(
                msgspec.convert({"redis_url": redis_proc.url}, Settings),
                SitesBook(sites, load_sites(sites)),
                PersistOptions(dsn=f"sqlite:///{db}"),
            )
            await worker.start()
            try:
                for _ in range(500):
                    if await worker.sink.count() >= length:
                        break
                    await asyncio.sleep(0.02 * UNIT)
            finally:
                await worker.stop()
            return await dump_redis(client, site), length
        finally:
            await client.aclose()

    try:
        dumped, length = asyncio.run(scenario())
    finally:
        srv.terminate()
    logs = json.dumps(srv.read_rest())
    rows = sqlite3.connect(db).execute("SELECT * FROM events").fetchall()
    assert len(rows) == length >= 3  # session.start and two visits
    assert f'"uuid": "{uuid}"' in logs  # the connection's log line is there
    assert RAW_IP.encode() not in dumped
    assert RAW_IP not in logs
    assert RAW_IP not in repr(rows)
    truncated = "203.0.113.0"
    assert (truncated.encode() in dumped) == (policy == "truncate")
    assert (truncated in repr(rows)) == (policy == "truncate")
