"""The Segment tracking API with the real, unmodified Segment and RudderStack Python SDKs."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import re
import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import rudderstack.analytics.client as rudder
import segment.analytics.request as segment_request
from segment.analytics.client import Client as SegmentClient

from eventwire.core.errors import ConfigError
from eventwire.core.rules import load_sites
from eventwire.gateway import EventwireServer
from eventwire.http.segment import NAMESPACE, event_time, parse_time, segment_action
from tests.conftest import MakeServer
from tests.procs import UNIT
from tests.wire import stream

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
KEY = "seg-write-key-0123456789abcdef"
OLD_KEY = "seg-write-key-older-0123456789"

SITES = """
[sites.shop]
allow_no_origin = true
write_keys = [{ secret_env = "EW_TEST_WRITE_KEY" }, { secret_env = "EW_TEST_OLD_WRITE_KEY" }]

[sites.shop.segment_actions]
"Signed Up Twice" = "account.signup"
"""


@pytest.fixture
def write_keys() -> Iterator[None]:
    """The write keys in the environment (secrets come from there only)."""
    os.environ["EW_TEST_WRITE_KEY"] = KEY
    os.environ["EW_TEST_OLD_WRITE_KEY"] = OLD_KEY
    yield
    del os.environ["EW_TEST_WRITE_KEY"], os.environ["EW_TEST_OLD_WRITE_KEY"]


@pytest.fixture
async def shop(make_server: MakeServer, write_keys: None) -> EventwireServer:
    """A server whose site shop takes two write keys."""
    return await make_server(sites=SITES)


async def client_events(redis: aioredis.Redis) -> list[dict[str, Any]]:
    """The shop's events that are not the server's own."""
    return [e for e in await stream(redis, "ew:{shop}:events") if e["producer"].startswith("sg-")]


def test_mapping_rules() -> None:
    """Event names, customer ids and times map as protocol section 15 says."""
    assert segment_action("Order Completed", {}) == "order.completed"
    assert segment_action("Product List Viewed", {}) == "product.list_viewed"
    assert segment_action("Signup", {}) == "track.signup"
    assert segment_action("cart.add", {}) == "cart.add"
    assert segment_action("Signup", {"Signup": "account.signup"}) == "account.signup"
    t = parse_time("2026-01-01T00:00:10.000Z")
    assert t is not None
    # The device clock is 60 s fast: the interval to sentAt is kept, not the clock.
    msg = {"timestamp": "2026-01-01T00:01:00Z", "sentAt": "2026-01-01T00:01:05Z"}
    assert event_time(msg, None, t) == t - 5000


async def test_real_segment_sdk(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """Every call type of the real SDK (gzip on) lands in the events stream as mapped."""
    errors: list[Any] = []
    client = SegmentClient(
        KEY,
        host=shop.http_url,
        sync_mode=True,
        gzip=True,
        on_error=lambda e, batch: errors.append(e),
        max_retries=0,
    )

    def calls() -> None:
        client.track("user-1", "Order Completed", {"revenue": 12.5}, context={"locale": "fr"})
        client.track("user-1", "Signed Up Twice")
        client.page("user-1", name="Home", properties={"url": "https://shop.example/"})
        client.screen("user-1", name="Cart")
        client.identify("alice@example.com", {"plan": "pro"})
        client.alias("user-0", "user-1")
        client.group("user-1", "org-7", {"size": 3})

    await asyncio.to_thread(calls)
    assert errors == []
    found = await client_events(redis)
    got = [(e["uuid"], e["action"], e.get("label")) for e in found]
    email_uuid = str(uuidlib.uuid5(NAMESPACE, "shop:alice@example.com"))
    assert got == [
        ("user-1", "order.completed", "Order Completed"),
        ("user-1", "account.signup", "Signed Up Twice"),
        ("user-1", "page.visit", "Visited page Home"),
        ("user-1", "screen.view", "Viewed screen Cart"),
        (email_uuid, "client.identify", "client.identify"),
        ("user-1", "client.alias", "client.alias"),
        ("user-1", "client.group", "client.group"),
    ]
    order, _, page, _, ident, alias, group = found
    assert order["params"]["revenue"] == 12.5
    assert order["params"]["context"]["locale"] == "fr"
    assert order["params"]["context"]["library"]["name"] == "analytics-python"
    assert page["params"]["url"] == "https://shop.example/"
    assert ident["params"]["traits"] == {"plan": "pro"}
    assert ident["params"]["user_id"] == "alice@example.com"
    assert alias["params"]["previous_id"] == "user-0"
    assert (group["params"]["group_id"], group["params"]["traits"]) == ("org-7", {"size": 3})
    assert all(e["session"] for e in found)


async def test_same_batch_twice_stored_once(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """The SDK's own request posted twice (a retry) stores its calls once, by messageId."""
    batch = [
        {"type": "track", "userId": "u-2", "event": "Cart Viewed", "messageId": "m-1"},
        {"type": "track", "userId": "u-2", "event": "Cart Viewed"},  # no messageId: by content
    ]

    def post() -> Any:
        res = segment_request.post(
            OLD_KEY, shop.http_url, gzip=True, batch=[dict(m) for m in batch]
        )
        return res.json()

    first = await asyncio.to_thread(post)
    second = await asyncio.to_thread(post)
    assert first == {"success": True, "accepted": 2, "duplicate": 0, "rejected": 0}
    assert second == {"success": True, "accepted": 0, "duplicate": 2, "rejected": 0}
    assert [e["action"] for e in await client_events(redis)] == ["cart.viewed", "cart.viewed"]


async def test_message_ids_kept_for_the_dedup_window(
    make_server: MakeServer, write_keys: None, redis: aioredis.Redis
) -> None:
    """A call's producer key lives message_dedup_window, a resend included; a native
    batch producer keeps producer_ttl."""
    shop = await make_server(sites=SITES, message_dedup_window=60)
    call = {"type": "track", "userId": "u-3", "event": "Cart Viewed", "messageId": "m-9"}
    native = {"uuid": "u-3", "producer": "tab-0001", "events": [{"seq": 1, "action": "cart.view"}]}
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # the resend is a duplicate and does not lengthen the key's life
            async with http.post(
                f"{shop.http_url}/v1/batch",
                json={"batch": [call]},
                headers={"Authorization": basic(KEY)},
            ) as res:
                assert res.status == 200
        async with http.post(f"{shop.http_url}/v1/track/shop", json=native) as res:
            assert res.status == 200, await res.text()
    (key,) = [k async for k in redis.scan_iter("ew:{shop}:producer:sg-*")]
    assert 0 < await redis.pttl(key) <= 60_000
    assert await redis.pttl("ew:{shop}:producer:tab-0001") > 60_000
    assert [e["action"] for e in await client_events(redis)] == ["cart.viewed"]


async def test_real_rudderstack_sdk(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """RudderStack's Python SDK, pointed at the listener, lands its calls too."""
    errors: list[Any] = []
    client = rudder.Client(
        KEY,
        host=shop.http_url,
        sync_mode=True,
        on_error=lambda e, batch: errors.append(e),
        max_retries=0,
    )
    await asyncio.to_thread(lambda: client.track("r-1", "Product Added", {"sku": "S1"}))
    assert errors == []
    (added,) = await client_events(redis)
    assert (added["uuid"], added["action"], added["params"]["sku"]) == (
        "r-1",
        "product.added",
        "S1",
    )


def basic(key: str) -> str:
    """An HTTP Basic header with the write key as user name."""
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


async def test_answers(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """401 for a wrong key, 400 for a body that is no Segment payload, 413 over the limits;
    an unmappable call is answered 200 and recorded in the rejected stream."""
    url = f"{shop.http_url}/v1"
    timeout = aiohttp.ClientTimeout(total=10 * UNIT)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def post(path: str, body: Any, key: str = KEY, **headers: str) -> tuple[int, Any]:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs = {"Authorization": basic(key), "Content-Type": "application/json", **headers}
            async with http.post(url + path, data=data, headers=hdrs) as r:
                return r.status, await r.json(content_type=None)

        assert (await post("/batch", {"batch": []}, key="wrong-key-0123456789"))[0] == 401
        async with http.post(url + "/track", data=b"{}") as r:
            assert r.status == 401
        assert (await post("/batch", {"nobatch": 1}))[0] == 400
        assert (await post("/batch", b"[1"))[0] == 400
        big = {"type": "track", "userId": "u", "event": "Big", "properties": {"x": "y" * 40_000}}
        assert (await post("/batch", {"batch": [big]}))[0] == 413
        status, answer = await post("/track", {"event": "No User"})
        assert (status, answer["success"], answer["rejected"]) == (200, True, 1)
        # Browser SDKs: the write key in a text/plain body, no preflight needed; CORS answered.
        body = {"writeKey": KEY, "anonymousId": "anon-1", "event": "Tab Opened"}
        headers = {"Content-Type": "text/plain", "Origin": "https://any.example"}
        async with http.post(url + "/track", data=json.dumps(body), headers=headers) as r:
            assert (r.status, (await r.json())["accepted"]) == (200, 1)
            assert r.headers["Access-Control-Allow-Origin"] == "https://any.example"
        async with http.options(url + "/batch", headers={"Origin": "https://any.example"}) as r:
            assert r.status == 204
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        # Write keys authenticate the sender, never a customer: authenticated actions fail.
        status, answer = await post("/track", {"userId": "u-8", "event": "form.submit"})
        assert (status, answer["accepted"], answer["rejected"]) == (200, 0, 1)
        status, answer = await post(
            "/track",
            gzip.compress(json.dumps({"userId": "u-9", "event": "Gz Sent"}).encode()),
            **{"Content-Encoding": "gzip"},
        )
        assert (status, answer["accepted"]) == (200, 1)
    rejected = await stream(redis, "ew:{shop}:rejected")
    assert [r["code"] for r in rejected] == ["undecodable", "unauthorized"]
    assert "userId or an anonymousId" in rejected[0]["detail"]


async def test_doc_curl(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """docs/protocol.md section 15's curl example, as written, is stored as its table says."""
    text = PROTOCOL_MD.read_text()
    section = text[text.index("## 15. The Segment tracking API") :]
    found = re.search(r"```sh\n(curl .*?)```", section, re.DOTALL)
    assert found is not None
    command = found.group(1).replace("http://127.0.0.1:8782", shop.http_url or "")
    out = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=10 * UNIT,
        check=True,
        env={**os.environ, "SHOP_WRITE_KEY": KEY},
    )
    assert json.loads(out.stdout) == {
        "success": True,
        "accepted": 1,
        "duplicate": 0,
        "rejected": 0,
    }
    (order,) = await client_events(redis)
    assert (order["uuid"], order["action"], order["params"]) == (
        "customer-42",
        "order.completed",
        {"revenue": 12.5},
    )


def test_write_key_comes_from_the_environment(tmp_path: Path) -> None:
    """A write key whose variable is unset or short stops the sites file with the key's name."""
    path = tmp_path / "sites.toml"
    path.write_text(SITES)
    with pytest.raises(ConfigError, match=r"write_keys\[0\].*EW_TEST_WRITE_KEY"):
        load_sites(path, env={"EW_TEST_OLD_WRITE_KEY": OLD_KEY})
