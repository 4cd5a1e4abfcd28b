"""Site rules and customer authentication through a real server and Redis (protocol 1, 2, 5)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from eventwire import ingest
from eventwire.core.auth import LEEWAY
from eventwire.gateway import EventwireServer
from eventwire.sessions import now_ms as real_now_ms
from tests.conftest import MakeServer
from tests.keys import SECRET, SECRET_ENV, none_token, token, write_public_pem
from tests.procs import UNIT
from tests.wire import client_events, event, peer, stream

SHOP = """
[sites.shop]
allow_no_origin = true
allow = ["page.*", "product.*", "form.submit", "client.*", "session.*"]
deny = ["product.secret"]
keys = [{ alg = "HS256", secret_env = "EVENTWIRE_TEST_JWT_SECRET" },
        { alg = "RS256", public_key = "test.pem" }]

[sites.shop.required]
"product.*" = ["sku"]

[sites.vault]
allow_no_origin = true
auth = "token"
keys = [{ alg = "HS256", secret_env = "EVENTWIRE_TEST_JWT_SECRET" },
        { alg = "RS256", public_key = "test.pem" }]
"""


@pytest.fixture
def keys_ready(tmp_path: Path) -> Iterator[None]:
    """The HS256 secret in the environment and the RSA public key beside the sites file."""
    write_public_pem(tmp_path)
    os.environ[SECRET_ENV] = SECRET
    yield
    del os.environ[SECRET_ENV]


@pytest.fixture
async def shop(make_server: MakeServer, keys_ready: None) -> EventwireServer:
    """A server with the sites shop (allow/deny/required/keys) and vault (auth = token)."""
    return await make_server(sites=SHOP, session_grace=0.2, reap_interval=0.05)


async def test_deny_wins_and_allow_list(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """Deny wins over allow, unlisted actions are denied; denied events are stored nowhere."""
    async with peer(shop.url, site="shop") as p:
        await p.hello("u-1")
        ack = await p.track(
            event(1, action="page.visit", params={"url": "https://s/"}),
            event(2, action="product.view"),
            event(3, action="product.secret"),
            event(4, action="cart.add"),
        )
    assert ack["accepted"] == 2
    assert {r["seq"]: r["code"] for r in ack["rejected"]} == {3: "denied", 4: "denied"}
    assert [e["seq"] for e in await client_events(redis, "shop")] == [1, 2]
    assert await stream(redis, "ew:{shop}:rejected") == []


async def test_required_params(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """A site's required params are enforced on the actions its globs name."""
    async with peer(shop.url, site="shop") as p:
        await p.hello("u-1")
        ack = await p.track(
            {"seq": 1, "action": "product.view", "params": {"price": 3}},
            event(2, action="product.view"),
        )
    assert ack["rejected"] == [
        {"seq": 1, "code": "missing_param", "detail": "product.view requires params.sku"}
    ]
    assert ack["accepted"] == 1


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: None, "no token"),
        (lambda: token("u-1", "vault", ttl=-120), "expired"),
        (lambda: token("u-1", "vault", key="a-wrong-secret-that-is-long-enough!!"), "signature"),
        (lambda: token("u-1", "shop"), "audience"),
        (lambda: token("someone-else", "vault"), "subject"),
        (lambda: none_token("u-1", "vault"), "'none'"),
    ],
)
async def test_token_site_refuses(shop: EventwireServer, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    """On an auth = "token" site, a hello without a valid token is closed 1008 with the reason."""
    tok = make()
    async with peer(shop.url, site="vault") as p:
        await p.send({"type": "hello", "uuid": "u-1", "producer": "p-0000001", "token": tok})
        err = await p.recv()
        await p.ws.wait_closed()
    assert err["code"] == "unauthorized"
    assert reason in err["detail"]
    assert tok is None or tok not in err["detail"]
    assert p.ws.close_code == 1008


@pytest.mark.parametrize("alg", ["HS256", "RS256"])
async def test_token_site_accepts(shop: EventwireServer, redis: aioredis.Redis, alg: str) -> None:
    """Valid HS256 and RS256 tokens open the connection; its events say authenticated."""
    async with peer(shop.url, site="vault") as p:
        await p.hello("u-1", token=token("u-1", "vault", alg=alg))
        ack = await p.track(event(1, action="form.submit", params={"form": "signup"}))
    assert ack["accepted"] == 1
    (stored,) = await client_events(redis, "vault")
    assert stored["authenticated"] is True


async def test_authenticated_actions(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """An anonymous form.submit is rejected unauthorized; an authenticated one is stored."""
    async with peer(shop.url, site="shop") as p:
        await p.hello("u-anon")
        ack = await p.track(event(1, action="form.submit"), event(2, action="page.view"))
    assert [(r["code"], r["detail"]) for r in ack["rejected"]] == [
        ("unauthorized", "form.submit needs an authenticated customer; no token was given")
    ]
    async with peer(shop.url, site="shop") as p:
        await p.hello("u-known", token=token("u-known", "shop"))
        ack = await p.track(event(1, action="form.submit"))
    assert ack["accepted"] == 1
    events = await client_events(redis, "shop")
    assert [(e["uuid"], e["action"], e.get("authenticated")) for e in events] == [
        ("u-anon", "page.view", None),
        ("u-known", "form.submit", True),
    ]
    (rejected,) = await stream(redis, "ew:{shop}:rejected")
    assert rejected["code"] == "unauthorized"


async def test_identify_with_token(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """identify with a token switches customer, publishes client.identify, and authenticates."""
    async with peer(shop.url, site="shop") as p:
        await p.hello("anon-7")
        await p.send({"type": "identify", "uuid": "cust-7", "token": token("cust-7", "shop")})
        ack = await p.track(event(1, action="form.submit"))
    assert ack["accepted"] == 1
    made = [e for e in await stream(redis, "ew:{shop}:events") if e["producer"].startswith("srv:")]
    (ident,) = [e for e in made if e["action"] == "client.identify"]
    assert ident["uuid"] == "cust-7"
    assert ident["params"] == {"previous_uuid": "anon-7", "merged": True}
    (stored,) = await client_events(redis, "shop")
    assert (stored["uuid"], stored["authenticated"]) == ("cust-7", True)


class ConnectionClock:
    """The clock ingest reads per frame: the real one until ``at`` sets it."""

    def __init__(self) -> None:
        self.frozen: int | None = None

    def __call__(self) -> int:
        return real_now_ms() if self.frozen is None else self.frozen

    def at(self, unix_seconds: float, plus_ms: int = 0) -> None:
        """From now on, every frame is received at this time."""
        self.frozen = int(unix_seconds * 1000) + plus_ms


async def test_token_expiring_while_connected(
    shop: EventwireServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the token expires, authenticated actions are unauthorized until identify renews it."""
    clock = ConnectionClock()
    monkeypatch.setattr(ingest, "now_ms", clock)
    exp = int(time.time()) + 60
    async with peer(shop.url, site="shop") as p:
        await p.hello("u-exp", token=token("u-exp", "shop", exp=exp))
        assert (await p.track(event(1, action="form.submit")))["accepted"] == 1
        # The last millisecond of the leeway still counts; the next one does not.
        clock.at(exp + LEEWAY)
        assert (await p.track(event(2, action="form.submit")))["accepted"] == 1
        clock.at(exp + LEEWAY, plus_ms=1)
        ack = await p.track(event(3, action="form.submit"))
        assert ack["rejected"][0]["code"] == "unauthorized"
        assert "expired" in ack["rejected"][0]["detail"]
        await p.send(
            {"type": "identify", "uuid": "u-exp", "token": token("u-exp", "shop", ttl=3600)}
        )
        assert (await p.track(event(4, action="form.submit")))["accepted"] == 1


async def test_rate_limited_flood(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """Over the rate: nack rate_limited; a client that keeps flooding is closed 1008; no loss."""
    srv = await make_server(
        sites="""
[sites.app]
allow_no_origin = true
rate = { events_per_second = 50, burst = 10, close_after = 0.4 }
"""
    )
    answers = []
    async with peer(srv.url) as p:
        await p.hello("u-flood")
        # A polite client: it waits as told, then its resend is taken.
        assert (await p.track(*[event(i) for i in range(1, 11)]))["accepted"] == 10
        nack = await p.track(event(11), event(12))
        assert nack["type"] == "nack"
        assert nack["code"] == "rate_limited"
        assert nack["retry_after_ms"] > 0
        await asyncio.sleep(nack["retry_after_ms"] / 1000 + 0.01)
        assert (await p.track(event(11), event(12)))["accepted"] == 2
        # A flood: frames back to back, never waiting (but reading the answers).

        async def read() -> None:
            with contextlib.suppress(Exception):
                while True:
                    answers.append(await p.recv(wait=3))

        reader = asyncio.create_task(read())
        seq = 13
        with contextlib.suppress(Exception):
            for _ in range(400):
                await p.send({"type": "track", "events": [event(seq), event(seq + 1)]})
                seq += 2
                await asyncio.sleep(0.005)
        await reader
        await p.ws.wait_closed()
    assert p.ws.close_code == 1008
    assert answers[-1]["type"] == "error"
    assert answers[-1]["code"] == "rate_limited"
    assert any(a.get("code") == "rate_limited" for a in answers if a["type"] == "nack")
    acked = {12} | {a["seq"] for a in answers if a["type"] == "ack"}
    stored = [e["seq"] for e in await client_events(redis)]
    assert len(stored) == len(set(stored))
    assert max(acked) <= max(stored)
    assert set(range(1, max(acked) + 1)) <= set(stored), "an acked event is missing"


async def test_reload_under_live_connection(
    make_server: MakeServer, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A new deny list applies to open connections at their next frame; a broken file is refused."""
    srv = await make_server(sites="[sites.app]\nallow_no_origin = true\n")
    path = srv.book.path
    assert path is not None
    async with peer(srv.url) as p:
        await p.hello()
        assert (await p.track(event(1)))["accepted"] == 1
        path.write_text('[sites.app]\nallow_no_origin = true\ndeny = ["product.*"]\n')
        os.utime(path, (1, 1))  # a different mtime even within the same second
        for _ in range(int(40 * UNIT)):  # the watcher polls the file's mtime
            rules = srv.book.get("app")
            if rules is not None and rules.config.deny:
                break
            await asyncio.sleep(0.1)
        ack = await p.track(event(2))
        assert ack["rejected"][0]["code"] == "denied"
        path.write_text("[sites.app]\nallow_no_origin = maybe\n")
        assert srv.reload_sites() is False
        assert (await p.track(event(3)))["rejected"][0]["code"] == "denied"
        path.write_text("[sites.app]\nallow_no_origin = true\n")
        assert srv.reload_sites() is True
        assert (await p.track(event(4)))["accepted"] == 1
    assert [e["seq"] for e in await client_events(redis)] == [1, 4]


async def test_server_events_obey_deny(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """A site that denies session.* gets no session.start or session.end in its stream."""
    srv = await make_server(
        sites='[sites.app]\nallow_no_origin = true\ndeny = ["session.*"]\n',
        session_grace=0.1,
        reap_interval=0.05,
    )
    async with peer(srv.url) as p:
        await p.hello()
        await p.track(event(1))
    await asyncio.sleep(0.5)
    actions = [e["action"] for e in await stream(redis, "ew:{app}:events")]
    assert actions == ["product.view"]


async def test_authenticated_after_session_renewal(
    make_server: MakeServer, keys_ready: None, redis: aioredis.Redis
) -> None:
    """A new session opened on the connection (after idle) keeps the customer's proof."""
    srv = await make_server(sites=SHOP, session_idle=0.2, reap_interval=60)
    async with peer(srv.url, site="shop") as p:
        welcome = await p.hello("u-renew", token=token("u-renew", "shop"))
        await asyncio.sleep(0.4)
        assert (await p.track(event(1, action="form.submit")))["accepted"] == 1
        assert (await p.track(event(2, action="form.submit")))["accepted"] == 1
    first, second = await client_events(redis, "shop")
    assert first["session"] != welcome["session"]
    assert second["session"] == first["session"]
    assert first["authenticated"] is second["authenticated"] is True
