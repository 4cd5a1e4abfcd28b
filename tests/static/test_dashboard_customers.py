"""The dashboard's customer timeline follows merges (issue 17), in headless Chromium."""

from __future__ import annotations

import json

import aiohttp
from playwright.async_api import Page

from eventwire.gateway import EventwireServer
from tests.static.test_dashboard import MS, open_dashboard, wait_rows
from tests.wire import event, peer


async def test_timeline_includes_every_alias_with_its_recorded_uuid(
    server: EventwireServer, page: Page
) -> None:
    """Browse as A, identify as K: K's timeline holds A's events too, each row marked with the
    uuid it was recorded under; the customers route names the alias."""
    await open_dashboard(page, server)
    async with peer(server.url, "shop") as p:
        await p.hello("anon-d1")
        assert (await p.track(event(1, "product.view")))["accepted"] == 1
        await p.send({"type": "identify", "uuid": "cust-d1"})
        assert (await p.track(event(2, "cart.add")))["accepted"] == 1
    # session.start, product.view, client.identify, session.end, session.start, cart.add
    await wait_rows(page, "#feed tr.event", 6, within=2 * MS)
    await page.locator('#feed button.who[data-uuid="cust-d1"]').first.click()
    await page.wait_for_selector("#timeline:not([hidden])", timeout=1 * MS)
    await page.wait_for_function(
        "() => document.querySelectorAll('#timeline-list li').length === 6", timeout=2 * MS
    )
    whats = await page.locator("#timeline-list li .what").all_inner_texts()
    assert whats == [
        "cart.add", "session.start", "session.end", "client.identify", "product.view",
        "session.start",
    ]  # fmt: skip
    recorded = await page.eval_on_selector_all(
        "#timeline-list li", "ls => ls.map(l => l.dataset.uuid || '')"
    )
    assert recorded == ["", "", "anon-d1", "", "anon-d1", "anon-d1"]
    assert "1 merged uuid" in await page.inner_text("#timeline-note")
    url = f"{server.admin_url}/v1/sites/shop/customers/cust-d1"
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert json.loads(await r.read()) == {
            "uuid": "cust-d1",
            "alias_of": None,
            "aliases": ["anon-d1"],
        }
