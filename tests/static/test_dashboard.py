"""The live dashboard (eventwire/static/dashboard.*) in headless Chromium, against a real server."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from playwright.async_api import ConsoleMessage, Page, Request, Response

from eventwire.client import EventwireClient
from eventwire.gateway import EventwireServer
from tests.conftest import MakeServer
from tests.procs import UNIT, free_port
from tests.test_admin import TOKEN

EVENTS = "ew:{shop}:events"
REJECTED = "ew:{shop}:rejected"
#: Playwright timeouts are in ms.
MS = 1000 * UNIT


async def stream(redis: aioredis.Redis, key: str = EVENTS) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of a stream as (id, decoded record)."""
    return [(i.decode(), json.loads(f[b"event"])) for i, f in await redis.xrange(key)]


def id_ms(entry_id: str) -> int:
    """The millisecond part of a stream id."""
    return int(entry_id.split("-")[0])


class Watch:
    """What the page did that it must not: console errors (CSP), requests elsewhere."""

    def __init__(self, page: Page, origin: str) -> None:
        self.errors: list[str] = []
        self.elsewhere: list[str] = []
        self.origin = origin
        page.on("console", self._console)
        page.on("request", self._request)
        page.on("response", self._response)

    def _console(self, msg: ConsoleMessage) -> None:
        # A refused WebSocket while the server restarts is expected noise.
        if msg.type == "error" and "WebSocket" not in msg.text and "Failed to load" not in msg.text:
            self.errors.append(msg.text)

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.errors.append(f"{response.status} {response.url}")

    def _request(self, request: Request) -> None:
        if not request.url.startswith(self.origin):
            self.elsewhere.append(request.url)


@asynccontextmanager
async def customer(server: EventwireServer, uuid: str) -> AsyncIterator[EventwireClient]:
    """One customer of the shop, with the Python client."""
    async with EventwireClient(f"{server.url}/v1/track/shop", uuid=uuid) as client:
        yield client


async def open_dashboard(page: Page, server: EventwireServer) -> None:
    """Open the dashboard on the shop and wait until both streams are live."""
    await page.goto(server.admin_url + "/dashboard#site=shop")
    await page.wait_for_selector('#status[data-state="live"]', timeout=5 * MS)


async def feed_ids(page: Page) -> list[str]:
    """The ids of the feed's rows, newest first."""
    ids: list[str] = await page.eval_on_selector_all(
        "#feed tr.event", "rows => rows.map(r => r.dataset.id)"
    )
    return ids


async def wait_rows(page: Page, selector: str, n: int, within: float) -> None:
    """Wait until ``selector`` matches ``n`` elements, at most ``within`` ms."""
    await page.wait_for_function(
        "([s, n]) => document.querySelectorAll(s).length === n", arg=[selector, n], timeout=within
    )


async def wait_count(page: Page, selector: str, n: int) -> None:
    """Wait until ``selector``'s data-count is ``n``: the server's counts come once a second."""
    await page.wait_for_function(
        "([s, n]) => document.querySelector(s).dataset.count === String(n)",
        arg=[selector, n],
        timeout=3 * MS,
    )


async def test_dashboard_shows_the_streams(
    server: EventwireServer, redis: aioredis.Redis, page: Page
) -> None:
    """Events appear in the feed within a second; rates, totals, top actions match the stream."""
    watch = Watch(page, server.admin_url)
    await open_dashboard(page, server)
    assert await page.locator("#site option").all_inner_texts() == ["app", "shop", "web"]
    async with customer(server, "alice") as alice, customer(server, "bob") as bob:
        for i in range(6):
            alice.track("product.view", {"sku": f"A-{i}", "price": 10 + i}, label=f"Viewed A-{i}")
        for _ in range(3):
            bob.track("cart.add", {"sku": "B-1", "quantity": 1})
        bob.track("nodots")
        await alice.flush(5 * UNIT)
        await bob.flush(5 * UNIT)
        # Two session.start events come with the nine: eleven rows within a second.
        await wait_rows(page, "#feed tr.event", 11, within=1 * MS)
        entries = await stream(redis)
        assert await feed_ids(page) == [i for i, _ in reversed(entries)]

        # events/s: the average of the ten complete seconds it names, by stream id time.
        last = id_ms(entries[-1][0])
        # The server's counts of a second come with the next tick (once a second).
        await page.wait_for_function(
            "last => Number(document.getElementById('rate').dataset.to) > last"
            " && document.getElementById('rate').dataset.count === '11'",
            arg=last,
            timeout=3 * MS,
        )
        rate = await page.eval_on_selector("#rate", "e => ({...e.dataset, text: e.textContent})")
        counted = [i for i, _ in entries if int(rate["from"]) <= id_ms(i) < int(rate["to"])]
        assert int(rate["count"]) == len(counted) == 11
        assert rate["text"] == f"{11 / 10:.1f}"
        assert int(await page.get_attribute("#total", "data-count") or -1) == len(entries)

        # The chart's bars: per second of stream id time, accepted and rejected.
        bars = await page.eval_on_selector_all(
            "#chart rect.a", "rs => rs.map(r => [Number(r.dataset.s), Number(r.dataset.n)])"
        )
        assert dict(bars) == Counter(id_ms(i) // 1000 for i, _ in entries)
        rejected = await stream(redis, REJECTED)
        red = await page.eval_on_selector_all(
            "#chart rect.r", "rs => rs.map(r => [Number(r.dataset.s), Number(r.dataset.n)])"
        )
        assert dict(red) == Counter(id_ms(i) // 1000 for i, _ in rejected)

        # Top actions: the stream's counts, most first.
        top = await page.eval_on_selector_all(
            "#top tbody tr", "rs => rs.map(r => [r.dataset.action, Number(r.dataset.count)])"
        )
        assert top == [
            ["product.view", 6],
            ["cart.add", 3],
            ["session.start", 2],
        ]
        assert Counter(e["action"] for _, e in entries) == dict(top)

        # The rejected event, with its reason.
        assert len(rejected) == 1
        row = page.locator("#rejected tbody tr")
        await row.wait_for(timeout=1 * MS)
        assert await row.get_attribute("data-code") == "invalid_action"
        assert await row.locator("td.reason").inner_text() == rejected[0][1]["detail"]
        assert await row.locator("button.who").inner_text() == "bob"

        # The server's exact counts: rejected by code, customers by events, sessions.
        codes = await page.eval_on_selector_all(
            "#codes li", "ls => ls.map(l => [l.dataset.code, Number(l.dataset.count)])"
        )
        assert codes == [["invalid_action", 1]]
        customers = await page.eval_on_selector_all(
            "#top-customers tbody tr",
            "rs => rs.map(r => [r.dataset.uuid, Number(r.dataset.count)])",
        )
        assert customers == [["alice", 7], ["bob", 4]]
        assert await page.get_attribute("#sessions-flow", "data-started") == "2"

        # Filters narrow the feed: by action glob, then by customer.
        await page.fill("#filter-action", "cart.*")
        await wait_rows(page, "#feed tr.event", 3, within=1 * MS)
        actions = await page.eval_on_selector_all(
            "#feed tr.event", "rows => rows.map(r => r.dataset.action)"
        )
        assert actions == ["cart.add"] * 3
        await page.fill("#filter-action", "")
        await page.fill("#filter-uuid", "alice")
        await wait_rows(page, "#feed tr.event", 7, within=1 * MS)
        uuids = await page.eval_on_selector_all(
            "#feed tr.event", "rows => rows.map(r => r.dataset.uuid)"
        )
        assert set(uuids) == {"alice"}
        await page.fill("#filter-uuid", "")
        await wait_rows(page, "#feed tr.event", 11, within=1 * MS)

        # A row's params on click.
        await page.locator('#feed tr.event[data-action="product.view"]').first.click()
        params = json.loads(await page.locator("#feed tr.params pre").inner_text())
        assert params["params"] == {"sku": "A-5", "price": 15}

        # A customer's timeline: their events and rejections, newest first.
        await page.locator('#feed button.who[data-uuid="bob"]').first.click()
        await page.wait_for_selector("#timeline:not([hidden])", timeout=1 * MS)
        assert await page.inner_text("#timeline-uuid") == "bob"
        items = await page.locator("#timeline-list li .what").all_inner_texts()
        assert items == [
            "rejected: invalid_action",
            "cart.add",
            "cart.add",
            "cart.add",
            "session.start",
        ]

        # Pause holds the feed (and counts what came); resume shows it.
        await page.click("#pause")
        alice.track("purchase.complete", {"order_id": "o-1"})
        await alice.flush(5 * UNIT)
        await page.wait_for_function(
            "() => document.getElementById('paused-count').textContent === '1 new while paused'",
            timeout=2 * MS,
        )
        assert len(await feed_ids(page)) == 11
        await page.click("#pause")
        await wait_rows(page, "#feed tr.event", 12, within=1 * MS)
    assert watch.errors == []
    assert watch.elsewhere == []


async def test_dashboard_resumes_after_restart(
    make_server: MakeServer, redis: aioredis.Redis, page: Page
) -> None:
    """Across a server restart the page reconnects and resumes from its last id: no gap."""
    port = free_port()
    server = await make_server(admin=f"127.0.0.1:{port}")
    await open_dashboard(page, server)
    async with customer(server, "alice") as alice:
        for i in range(3):
            alice.track("page.visit", {"url": f"https://shop.example/{i}"})
        await alice.flush(5 * UNIT)
    await wait_rows(page, "#feed tr.event", 4, within=2 * MS)
    await server.stop()
    await page.wait_for_selector('#status:not([data-state="live"])', timeout=5 * MS)
    # Events stored while no relay answers on the page's port (another process took them).
    other = await make_server()
    async with customer(other, "carol") as carol:
        for i in range(5):
            carol.track("product.view", {"sku": f"C-{i}"})
        await carol.flush(5 * UNIT)
    await other.stop()
    again = await make_server(admin=f"127.0.0.1:{port}")
    await page.wait_for_selector('#status[data-state="live"]', timeout=10 * MS)
    async with customer(again, "dave") as dave:
        dave.track("cart.add", {"sku": "D-1", "quantity": 2})
        await dave.flush(5 * UNIT)
    entries = await stream(redis)
    await wait_rows(page, "#feed tr.event", len(entries), within=2 * MS)
    await asyncio.sleep(0.3)
    assert await feed_ids(page) == [i for i, _ in reversed(entries)]
    await wait_count(page, "#total", len(entries))
    assert await page.locator(".notice").count() == 0


async def test_dashboard_asks_for_the_token(
    make_server: MakeServer, redis: aioredis.Redis, page: Page
) -> None:
    """With admin_token set the page asks for it, then shows the data; never in a URL."""
    server = await make_server(admin_token=TOKEN)
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    await page.goto(server.admin_url + "/dashboard")
    await page.wait_for_selector("#login[open]", timeout=5 * MS)
    await page.fill("#token", "wrong-token-0123456789")
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#login[open]", timeout=5 * MS)
    assert await page.is_visible("#login-error")
    await page.fill("#token", TOKEN)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector('#status[data-state="live"]', timeout=5 * MS)
    async with customer(server, "erin") as erin:
        erin.track("page.visit", {"url": "https://shop.example/"})
        await erin.flush(5 * UNIT)
    await page.select_option("#site", "shop")
    await wait_rows(page, "#feed tr.event", 2, within=2 * MS)
    await page.wait_for_function(
        "() => document.getElementById('sessions').dataset.count === '1'", timeout=3 * MS
    )
    assert all(TOKEN not in u and "token" not in u for u in urls), urls


async def test_dashboard_warns_of_a_persist_backlog(
    make_server: MakeServer, redis: aioredis.Redis, page: Page
) -> None:
    """From 80 % of max_backlog the page warns that the store is behind; the warning
    leaves once the workers have caught up."""
    server = await make_server(max_backlog=10)
    await redis.xgroup_create(EVENTS, "persist", id="0", mkstream=True)  # a worker that is away
    await open_dashboard(page, server)
    async with customer(server, "erin") as erin:
        for i in range(8):  # with session.start: 9 entries of 10
            erin.track("page.visit", {"url": f"https://shop.example/{i}"})
        await erin.flush(5 * UNIT)
    warning = page.locator('.notice[data-key="backlog"]')
    await warning.wait_for(timeout=10 * MS)
    text = await warning.inner_text()
    assert "Persist backlog 9 of 10 (90 %)" in text
    assert "nack unavailable" in text
    # The worker is back: everything read and acknowledged.
    read = await redis.xreadgroup("persist", "w", {EVENTS: ">"})
    ids = [i for _, entries in read for i, _ in entries]
    await redis.xack(EVENTS, "persist", *ids)
    await warning.wait_for(state="detached", timeout=10 * MS)


async def test_dashboard_humans_by_default_bots_per_second_and_where_from(
    server: EventwireServer, redis: aioredis.Redis, page: Page
) -> None:
    """Bots are left out of counts and feed until asked for; bots/s and where-from are shown."""
    from tests.test_visitors import CHROME_WINDOWS, GOOGLEBOT, send_visit, visitor

    await open_dashboard(page, server)
    home = "https://shop.example/"
    async with visitor(server.url, "shop", CHROME_WINDOWS) as human:
        await human.hello("human-1", context={"url": home, "referrer": "https://www.google.com/"})
        await send_visit(human, 1, home, "https://www.google.com/")
    async with visitor(server.url, "shop", GOOGLEBOT) as bot:
        await bot.hello("bot-1", context={"url": home, "referrer": ""})
        for seq in range(1, 4):
            await send_visit(bot, seq, home)
    entries = await stream(redis)
    bots = [i for i, e in entries if e.get("bot") is True]
    assert len(bots) == 4  # its session.start and three visits
    humans = len(entries) - len(bots)
    await wait_count(page, "#total", humans)
    await wait_rows(page, "#feed tr.event", humans, within=3 * MS)
    assert await page.text_content("#rate-who") == " humans"
    await page.wait_for_function(
        "() => document.querySelector('#top-mediums tr[data-key=\"search\"]') !== null",
        timeout=3 * MS,
    )
    where = await page.eval_on_selector_all(
        ".where-from tbody tr",
        "rows => rows.map(r => [r.closest('table').id, r.dataset.key, r.dataset.count])",
    )
    assert sorted(where) == [
        ["top-browsers", "Chrome", "1"],
        ["top-devices", "desktop", "1"],
        ["top-mediums", "search", "1"],
        ["top-sources", "Google", "1"],
    ]
    # Bots/s: the bot's entries within the ten seconds it names.
    await page.wait_for_function(
        "n => Number(document.getElementById('rate-bots').dataset.count) === n",
        arg=len(bots),
        timeout=3 * MS,
    )
    await page.check("#show-bots")
    await wait_count(page, "#total", len(entries))
    await wait_rows(page, "#feed tr.event", len(entries), within=3 * MS)
    assert await page.text_content("#rate-who") == " humans and bots"
