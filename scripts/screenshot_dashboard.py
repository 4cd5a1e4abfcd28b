"""Screenshot of the live dashboard under load, for docs/ and the README.

Starts a private ``redis-server`` (free loopback port, no persistence), an
in-process eventwire server (free ports; sites ``shop`` and ``blog``) and
Debian's Chromium (``/usr/bin/chromium``) through Playwright; opens the
dashboard on ``shop`` and drives load with the Python client for
``--seconds``: customers arrive, browse, search, add to carts, some buy, then
leave (their sessions end after a 5 s grace); the rate rises and falls; a
few events are rejected (a missing url, a malformed action, a form submitted
without a token). At the end it opens one customer's timeline and one row's
params, saves ``docs/dashboard.png``, and checks the page's figures against
the stream (total, top actions, events/s), printing both.

A persist worker runs beside the server into a SQLite store that already
holds a synthetic day of the shop (rows written straight through the sink,
``received`` spread over the last 24 hours on a daily curve); at the end the
page switches to the **24 h** range and saves ``docs/dashboard-24h.png``,
checking the page's total against the store's view.

usage: .venv/bin/python scripts/screenshot_dashboard.py [--seconds 90] [--out docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import redis.asyncio as aioredis
import structlog
from playwright.async_api import async_playwright

from eventwire.client import EventwireClient
from eventwire.core.config import Settings
from eventwire.core.rules import SitesBook, load_sites
from eventwire.gateway import EventwireServer
from eventwire.persist.ranges import RollupReader
from eventwire.persist.sinks import EventRow, open_sink
from eventwire.persist.worker import PersistOptions, Worker
from tests.procs import RedisProcess

CHROMIUM: Final = "/usr/bin/chromium"
CHROMIUM_ARGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
]
SITES: Final = """
[sites.shop]
origins = []
allow_no_origin = true

[sites.blog]
origins = []
allow_no_origin = true
"""
#: The most customers browsing at once (each one client, one connection).
MAX_CUSTOMERS: Final = 60
PAGES: Final = ["/", "/new", "/sale", "/men", "/women", "/kids", "/about"]
#: How customers arrive: the landing page's query and the referrer, weighted by repeats.
ARRIVALS: Final = [
    ("", "https://www.google.com/"),
    ("", "https://www.google.com/"),
    ("", "https://www.google.de/"),
    ("", "https://duckduckgo.com/"),
    ("", ""),
    ("", ""),
    ("?utm_source=newsletter&utm_medium=email&utm_campaign=winter", ""),
    ("?gclid=Cj0KCQ", "https://www.google.com/"),
    ("", "https://l.facebook.com/"),
    ("", "https://t.co/x"),
    ("", "https://blog.example.org/best-shoes"),
]
SEARCHES: Final = ["red shoes", "rain jacket", "gift card", "linen shirt", "backpack"]


def target_rate(t: float) -> float:
    """Customers arriving per second at ``t`` seconds: a slow wave and two bursts."""
    wave = 2.2 + 1.6 * math.sin(t / 9.0)
    burst = 3.0 if 25 < t % 60 < 31 else 0.0
    return max(0.3, wave + burst)


async def journey(url: str, rng: random.Random) -> None:
    """One customer's visit: a handful of realistic events, a few seconds apart."""
    uuid = f"cust-{secrets.token_hex(3)}"
    page = rng.choice(PAGES)
    landing, referrer = rng.choice(ARRIVALS)
    landing = f"https://shop.example{page}{landing}"
    # The landing page and referrer: the session's attribution ("Where from").
    context = {"url": landing, "referrer": referrer, "title": page.strip("/") or "Home"}
    async with EventwireClient(url, uuid=uuid, linger=0.02, context=context) as ew:

        async def step(action: str, params: dict[str, Any] | None = None, **kw: Any) -> None:
            ew.track(action, params, **kw)
            await asyncio.sleep(rng.uniform(0.2, 1.6))

        await step(
            "page.visit",
            {"url": landing, "title": page.strip("/") or "Home", "referrer": referrer},
        )
        if rng.random() < 0.4:
            await step("search.query", {"query": rng.choice(SEARCHES)})
        for _ in range(rng.randint(1, 5)):
            sku = f"SKU-{rng.randint(100, 140)}"
            await step("product.view", {"sku": sku, "price": round(rng.uniform(9, 180), 2)})
            if rng.random() < 0.35:
                await step("cart.add", {"sku": sku, "quantity": rng.randint(1, 3)})
        if rng.random() < 0.05:
            await step("page.visit", {"title": "broken link"})  # no url: missing_param
        if rng.random() < 0.03:
            await step("addToCart", {"sku": "SKU-1"})  # not word.word: invalid_action
        if rng.random() < 0.04:
            await step("form.submit", {"form": "newsletter"})  # anonymous: unauthorized
        if rng.random() < 0.3:
            await step("checkout.start", {"items": rng.randint(1, 4)})
            if rng.random() < 0.7:
                await step("purchase.complete", {"order_id": f"o-{secrets.token_hex(4)}"})
        await ew.flush(10)


async def load(url: str, seconds: float, rng: random.Random) -> int:
    """Run customer journeys for ``seconds``; returns how many customers came."""
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    came = 0
    while (now := time.monotonic() - started) < seconds:
        if len(tasks) < MAX_CUSTOMERS and rng.random() < target_rate(now) / 10:
            task = asyncio.create_task(journey(url, rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            came += 1
        await asyncio.sleep(0.1)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    return came


def main() -> int:
    """Start Redis, run the server, the load and the browser, stop everything."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="load duration (90)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for dashboard.png")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    args.out.mkdir(parents=True, exist_ok=True)
    redis_proc = RedisProcess().start()
    folder = Path(tempfile.mkdtemp(prefix="ew-shot-"))
    try:
        sites_path = folder / "sites.toml"
        sites_path.write_text(SITES)
        settings = msgspec.convert(
            {
                "listen": "127.0.0.1:0",
                "admin": "127.0.0.1:0",
                "redis_url": redis_proc.url,
                "session_grace": 5,
                "persist_dsn": f"sqlite:///{folder / 'events.db'}",
            },
            Settings,
        )
        server = EventwireServer(settings, load_sites(sites_path), sites_path)
        book = SitesBook(sites_path, load_sites(sites_path))
        worker = Worker(settings, book, PersistOptions(dsn=settings.persist_dsn))
        return asyncio.run(run(server, worker, redis_proc.url, args))
    finally:
        redis_proc.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def a_day_stored(dsn: str, rng: random.Random) -> int:
    """A synthetic day of the shop in the store: events on a daily curve; their number."""
    now = int(time.time() * 1000)
    rows: list[EventRow] = []
    pages = ["/", "/sale", "/c/shoes", "/c/bags", "/p/A-1", "/p/B-7", "/cart", "/checkout"]
    seq = 0
    for minute in range(24 * 60, 3, -1):
        t0 = now - minute * 60_000
        hour = time.localtime(t0 / 1000).tm_hour + time.localtime(t0 / 1000).tm_min / 60
        per_minute = int(40 + 160 * max(0.0, math.sin((hour - 7) / 15 * math.pi)) ** 2)
        for _ in range(per_minute):
            seq += 1
            uuid = f"cust-{int(400 * rng.random() ** 2)}"
            t = t0 + rng.randrange(60_000)
            action = rng.choices(
                ["page.visit", "product.view", "cart.add", "order.purchase", "session.start"],
                [50, 30, 10, 3, 7],
            )[0]
            params = json.dumps({"url": f"https://shop.example{rng.choice(pages)}"})
            rows.append(
                EventRow(
                    site="shop", producer="p-history", seq=seq, uuid=uuid, session=f"s-{uuid}",
                    action=action, label=action, time=t, received=t,
                    params=msgspec.Raw((params if action == "page.visit" else "{}").encode()),
                )
            )  # fmt: skip
    sink = open_sink(dsn)
    await sink.open()
    try:
        for start in range(0, len(rows), 2000):
            await sink.write(rows[start : start + 2000])
    finally:
        await sink.close()
    return len(rows)


async def run(
    server: EventwireServer, worker: Worker, redis_url: str, args: argparse.Namespace
) -> int:
    """Load the server with the dashboard open; screenshot under load; compare the figures."""
    rng = random.Random(args.seed)
    client = aioredis.Redis.from_url(redis_url)
    try:
        history = await a_day_stored(server.settings.persist_dsn, rng)
        print(f"stored history: {history} events over 24 hours")
        await server.start()
        await worker.start()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            page = await browser.new_page(viewport={"width": 1440, "height": 1000})
            await page.goto(server.admin_url + "/dashboard#site=shop")
            await page.wait_for_selector('#status[data-state="live"]', timeout=10_000)
            started = time.monotonic()
            loading = asyncio.create_task(load(f"{server.url}/v1/track/shop", args.seconds, rng))
            # Under load: pause the feed, open a row's params and a customer's timeline.
            await asyncio.sleep(max(0.0, args.seconds - 6))
            await page.click("#pause")
            await page.locator('#feed tr.event[data-action="product.view"]').nth(1).click()
            await page.locator('#feed tr.event[data-action="cart.add"] button.who').first.click()
            await asyncio.sleep(2.5)
            shot = args.out / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"saved {shot}")
            await page.click("#pause")
            came = await loading
            print(f"load: {came} customers in {time.monotonic() - started:.0f} s")
            # The last session.end events land after the grace (5 s) and the next reap
            # (1 s), then the page's next tick; then compare.
            await asyncio.sleep(7.5)
            ok = await check(page, client)
            ok = await range_shot(page, server, args.out) and ok
            await browser.close()
    finally:
        await worker.stop()
        await server.stop()
        await client.aclose()
    return 0 if ok else 1


async def range_shot(page: Any, server: EventwireServer, out: Path) -> bool:
    """The 24 h range (once the worker stored the load): screenshot, and its total checked."""
    await asyncio.sleep(2)  # the worker's last batch
    await page.click("#timeline-close")
    await page.click('#range button[data-range="24h"]')
    await page.wait_for_selector('#total[data-complete="true"]', state="attached")
    await asyncio.sleep(0.5)
    shot = out / "dashboard-24h.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"saved {shot}")
    reader = RollupReader(server.settings.persist_dsn)
    try:
        view = await reader.view("shop", "24h", int(time.time() * 1000))
    finally:
        await reader.close()
    shown = int(await page.get_attribute("#total", "data-count") or -1)
    print(f"24 h: page total {shown}, store {view.totals.accepted}")
    return shown == view.totals.accepted


async def check(page: Any, client: aioredis.Redis) -> bool:
    """Print the page's figures beside the stream's."""
    entries = await client.xrange("ew:{shop}:events")
    rejected = await client.xlen("ew:{shop}:rejected")
    actions = Counter(json.loads(f[b"event"])["action"] for _, f in entries)
    total = int(await page.get_attribute("#total", "data-count") or -1)
    shown_rejected = int(await page.get_attribute("#total-rejected", "data-count") or -1)
    top = await page.eval_on_selector_all(
        "#top tbody tr", "rs => rs.map(r => [r.dataset.action, Number(r.dataset.count)])"
    )
    rate = await page.eval_on_selector("#rate", "e => ({...e.dataset})")
    in_rate = sum(
        1 for i, _ in entries if int(rate["from"]) <= int(i.split(b"-")[0]) < int(rate["to"])
    )
    print(f"events in the stream: {len(entries)}, page total: {total}")
    print(f"rejected in the stream: {rejected}, page: {shown_rejected}")
    print(f"events/s window: stream {in_rate}, page {rate['count']}")
    print("top actions (page):", top)
    print("top actions (stream):", actions.most_common(len(top)))
    ok = total == len(entries) and shown_rejected == rejected and int(rate["count"]) == in_rate
    ok = ok and all(actions[a] == n for a, n in top)
    print("figures match the stream" if ok else "FIGURES DIFFER FROM THE STREAM")
    return ok


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
