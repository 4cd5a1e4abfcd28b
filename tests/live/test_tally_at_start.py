"""``live_tally_at_start``: every site's rollups run from the server's start, viewers or not."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from eventwire.live import relay as live_relay
from tests.conftest import MakeServer, build_sites
from tests.live.test_live import viewer
from tests.live.test_rollups import _known_stream, totals
from tests.procs import UNIT


async def test_tallies_run_from_the_start_and_stay(
    make_server: MakeServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A viewer that comes later gets complete counts at once (no backfill of its own), of
    what came before it; the tallies outlive the linger time without viewers."""
    monkeypatch.setattr(live_relay, "LINGER_S", 0.0)  # an unpinned tally would go at once
    accepted, _, codes = await _known_stream(redis)
    srv = await make_server(live_tally_at_start=True)
    relay = srv.admin_routes.relay
    sites = len(build_sites())
    assert relay.readers == 2 * sites  # events and rejected of each site
    await asyncio.sleep(3 * live_relay.TICK_S)  # ticks with no viewer: nothing lingers out
    assert relay.readers == 2 * sites
    async with viewer(srv, "site=shop&stream=summary") as v:
        await v.until(lambda m: m["type"] == "ready")
        snap = v.of("snapshot")[0]
    assert "backfilling" not in snap  # counted before the viewer came
    assert totals(v.messages) == (accepted, codes, 6)
    assert relay.readers == 2 * sites


async def test_without_the_setting_a_tally_lingers_out(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default no tally runs before a viewer, and none outlives the linger time."""
    monkeypatch.setattr(live_relay, "LINGER_S", 0.0)
    srv = await make_server()
    relay = srv.admin_routes.relay
    assert relay.readers == 0
    async with viewer(srv, "site=shop&stream=summary") as v:
        await v.until(lambda m: m["type"] == "ready")
    deadline = asyncio.get_running_loop().time() + 10 * UNIT
    while relay.readers:
        assert asyncio.get_running_loop().time() < deadline, "the tally never stopped"
        await asyncio.sleep(0.05)
