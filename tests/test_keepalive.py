"""The shared keepalive: every connection pinged from one task; a late pong fails it 1011."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from eventwire.gateway import EventwireServer
from tests.procs import UNIT
from tests.wire import peer


async def wait_until(check: Callable[[], bool], wait: float = 10.0) -> None:
    """Return once ``check()`` holds; fail after ``wait`` seconds (times UNIT)."""
    deadline = asyncio.get_running_loop().time() + wait * UNIT
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_pings_keep_a_client_that_answers(make_server) -> None:  # type: ignore[no-untyped-def]
    """A client that answers pings stays open over several intervals, and is pinged."""
    srv: EventwireServer = await make_server(ping_interval=0.2, ping_timeout=0.2)
    async with peer(srv.url) as p:
        await p.hello()
        await asyncio.sleep(1.0)
        assert p.ws.state.name == "OPEN"
        (server_side,) = srv._connections
        assert server_side.latency > 0  # its pongs came back to the server's pings
        ack = await p.track({"seq": 1, "action": "page.visit", "params": {"url": "https://x/"}})
        assert ack["accepted"] == 1
    assert srv.keepalive is not None
    assert srv.keepalive.timed_out == 0


async def test_a_late_pong_fails_the_connection_1011(make_server) -> None:  # type: ignore[no-untyped-def]
    """A client that reads nothing (so answers no ping) is failed: 1011 keepalive ping timeout."""
    srv: EventwireServer = await make_server(ping_interval=0.2, ping_timeout=0.2)
    async with peer(srv.url) as p:
        await p.hello()
        p.ws.transport.pause_reading()
        assert srv.keepalive is not None
        await wait_until(lambda: srv.keepalive.timed_out == 1)
        p.ws.transport.resume_reading()
        await p.ws.wait_closed()
        assert p.ws.close_code == 1011
        assert p.ws.close_reason == "keepalive ping timeout"
    await wait_until(lambda: srv.open_connections == 0)
