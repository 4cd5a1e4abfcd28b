"""The dashboard's range selector in headless Chromium: 5 minutes live, 1 h / 24 h / 7 d stored."""

from __future__ import annotations

from pathlib import Path

import msgspec
from playwright.async_api import Page

from eventwire.persist.sinks import EventRow, open_sink
from tests.conftest import MakeServer
from tests.procs import UNIT
from tests.static.test_dashboard import MS, Watch, customer, open_dashboard, wait_count
from tests.wire import now_ms

HOUR = 3_600_000
HOURS = [*range(24), 26, 27, 28, 29]


def shop_row(seq: int, received: int, action: str, uuid: str, params: str = "{}") -> EventRow:
    """An events row of the shop, received at ``received`` (ms)."""
    return EventRow(
        site="shop", producer="p-old", seq=seq, uuid=uuid, session=f"s-{uuid}", action=action,
        label=action, time=received, received=received, params=msgspec.Raw(params.encode()),
    )  # fmt: skip


async def stored_hours(dsn: str, now: int) -> None:
    """What a persist worker stored over 30 hours: per hour a session and 4 visits, but none
    24-26 hours ago (where the 24 h view's first whole hour starts, by the clock)."""
    sink = open_sink(dsn)
    await sink.open()
    try:
        rows = []
        for h in HOURS:
            t = now - h * HOUR - 120_000
            rows.append(shop_row(10 * h, t, "session.start", f"c{h % 3}"))
            page = f'{{"url": "https://shop.example/{"home" if h % 2 else "sale"}"}}'
            rows += [shop_row(10 * h + i, t, "page.visit", f"c{h % 3}", page) for i in (1, 2, 3, 4)]
        assert await sink.write(rows) == 5 * len(HOURS)
    finally:
        await sink.close()


async def test_range_selector_reads_the_store(
    make_server: MakeServer, page: Page, tmp_path: Path
) -> None:
    """24 h and 1 h show the stored counts, sessions, chart and top pages; 7 d from the
    address; 5 min is live again; nothing is asked of another origin, no console error."""
    dsn = f"sqlite:///{tmp_path / 'events.db'}"
    now = now_ms()
    await stored_hours(dsn, now)
    server = await make_server(persist_dsn=dsn)
    watch = Watch(page, server.admin_url)
    await open_dashboard(page, server)
    assert await page.get_attribute('#range button[data-range="5m"]', "aria-pressed") == "true"

    await page.click('#range button[data-range="24h"]')
    await wait_count(page, "#total", 24 * 5)  # the hours within 23.75-24 h of now
    assert await page.get_attribute("body", "data-range") == "24h"
    assert "range=24h" in page.url
    assert await page.text_content("#total-title") == "Last 24 hours"
    assert await page.get_attribute("#sessions-flow", "data-started") == "24"
    assert await page.text_content("#rate-rejected") == "–"
    pages = await page.eval_on_selector_all(
        "#top-pages tbody tr", "rows => rows.map(r => [r.dataset.page, r.dataset.count])"
    )
    home, sale = "https://shop.example/home", "https://shop.example/sale"
    assert sorted(pages) == [[home, "48"], [sale, "48"]]
    assert await page.locator("#chart rect.a").count() == 24
    assert await page.locator("#axis span").all_inner_texts() == [
        "−24 h",
        "−18",
        "−12",
        "−6",
        "now",
    ]

    await page.click('#range button[data-range="1h"]')
    await wait_count(page, "#total", 5)
    assert await page.get_attribute("#sessions-flow", "data-started") == "1"
    assert await page.locator("#chart rect.a").count() == 1

    # The live view again: the relay's five minutes (nothing stored shows there).
    await page.click('#range button[data-range="5m"]')
    async with customer(server, "live-1") as live:
        live.track("product.view", {"sku": "L-1"})
        await live.flush(5 * UNIT)
    await wait_count(page, "#total", 2)  # session.start and the view
    assert await page.is_visible("#total-rejected")

    await page.goto(server.admin_url + "/dashboard#site=shop&range=7d")
    await page.reload()
    await wait_count(page, "#total", 5 * len(HOURS))
    assert await page.get_attribute('#range button[data-range="7d"]', "aria-pressed") == "true"
    assert await page.locator("#chart rect.a").count() == len(HOURS)
    assert watch.errors == []
    assert watch.elsewhere == []


async def test_range_selector_says_when_the_store_is_missing(
    make_server: MakeServer, page: Page, tmp_path: Path
) -> None:
    """No store yet: a notice says why; the live view still works."""
    server = await make_server(persist_dsn=f"sqlite:///{tmp_path / 'none.db'}")
    await open_dashboard(page, server)
    await page.click('#range button[data-range="24h"]')
    notice = page.locator('.notice[data-key="stored"]')
    await notice.wait_for(timeout=5 * MS)
    assert "persist worker creates it" in await notice.inner_text()
    await page.click('#range button[data-range="5m"]')
    assert await notice.count() == 0
