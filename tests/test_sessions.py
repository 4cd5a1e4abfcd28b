"""eventwire/sessions.py: sessions from connection lifecycles (docs/protocol.md section 6).

Timings are short here (a grace of a few tenths of a second); every wait is
a multiple of tests.procs.UNIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from prometheus_client import REGISTRY

from eventwire.core.errors import StoreUnavailable
from eventwire.sessions import LEAVE_CONCURRENCY
from eventwire.store import FN_LEAVE, REDIS_POOL_SIZE
from tests.conftest import MakeServer
from tests.procs import UNIT, RedisProcess, ServerProcess
from tests.wire import client_events, event, peer, producer_id, stream

#: The session grace of these tests (s); every other timing is scaled like it.
GRACE = 0.3 * UNIT
FAST = {"session_grace": GRACE, "reap_interval": 0.05}


async def made(redis: aioredis.Redis, site: str = "app") -> list[dict[str, Any]]:
    """The server-made events of a site's stream."""
    return [
        e for e in await stream(redis, f"ew:{{{site}}}:events") if e["producer"].startswith("srv:")
    ]


async def wait_for(
    redis: aioredis.Redis, action: str, count: int, wait: float = 3
) -> list[dict[str, Any]]:
    """Wait until the stream holds ``count`` server-made events of ``action``."""
    deadline = asyncio.get_running_loop().time() + wait * UNIT
    while True:
        found = [e for e in await made(redis) if e["action"] == action]
        if len(found) >= count or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.02)


async def test_lifecycle(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """hello starts a session; its events carry it; the close ends it once after the grace."""
    srv = await make_server(**FAST)
    producer = producer_id()
    async with peer(srv.url) as p:
        welcome = await p.hello("u-1", producer, context={"title": "Home"})
        await p.track(event(1), event(2))
    session = welcome["session"]
    assert welcome["resumed"] is False
    assert await wait_for(redis, "session.end", 0, wait=0) == []  # not before the grace
    (end,) = await wait_for(redis, "session.end", 1)
    (start,) = [e for e in await made(redis) if e["action"] == "session.start"]
    assert start["session"] == session
    assert start["producer"] == f"srv:{session}"
    assert start["label"] == "Started session"
    assert start["params"] == {
        "session": session,
        "producer": producer,
        "context": {"title": "Home"},
        # No User-Agent: a client of a site that takes clients without an Origin.
        "client": {"bot": False, "device": "other", "ip": "127.0.0.0"},
    }
    assert end["session"] == session
    assert end["label"] == "Session end"
    assert end["params"]["reason"] == "closed"
    assert end["params"]["events"] == 2
    assert 0 <= end["params"]["duration_ms"] < 1000 * UNIT
    assert end["time"] - start["time"] >= GRACE * 1000 - 50
    assert {e["session"] for e in await client_events(redis)} == {session}


async def test_reload_keeps_session(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """A close then a hello within the grace (a page reload) keeps one session."""
    srv = await make_server(**FAST)
    async with peer(srv.url) as p:
        first = await p.hello("u-reload")
        await p.track(event(1))
    await asyncio.sleep(GRACE / 3)
    async with peer(srv.url) as p:
        second = await p.hello("u-reload")
        await p.track(event(1))
    assert second["resumed"] is True
    assert second["session"] == first["session"]
    ends = await wait_for(redis, "session.end", 1)
    await asyncio.sleep(GRACE)
    assert [e["action"] for e in await made(redis)] == ["session.start", "session.end"]
    assert ends[0]["params"]["events"] == 2


async def test_two_tabs_share_a_session(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """Two tabs share one session; it ends once, after the grace, when both are closed."""
    srv = await make_server(**FAST)
    async with peer(srv.url) as a:
        wa = await a.hello("u-tabs")
        async with peer(srv.url) as b:
            wb = await b.hello("u-tabs")
            assert wb["resumed"] is True
            assert wb["session"] == wa["session"]
            await b.track(event(1))
        await asyncio.sleep(GRACE * 2)
        assert await wait_for(redis, "session.end", 0, wait=0) == []  # one tab is still open
        await a.track(event(1))
    (end,) = await wait_for(redis, "session.end", 1)
    await asyncio.sleep(GRACE)
    assert len([e for e in await made(redis) if e["action"] == "session.end"]) == 1
    assert end["params"]["reason"] == "closed"
    assert end["params"]["events"] == 2


async def test_idle_ends_while_connected(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """No event for session_idle ends the session (idle); the next event starts a new one."""
    srv = await make_server(session_idle=0.3 * UNIT, **FAST)
    async with peer(srv.url) as p:
        welcome = await p.hello("u-idle")
        assert (await p.track(event(1)))["accepted"] == 1
        (end,) = await wait_for(redis, "session.end", 1)
        assert end["params"]["reason"] == "idle"
        assert end["session"] == welcome["session"]
        assert (await p.track(event(2)))["accepted"] == 1
    events = await client_events(redis)
    assert events[0]["session"] == welcome["session"]
    assert events[1]["session"] != welcome["session"]
    starts = [e for e in await made(redis) if e["action"] == "session.start"]
    assert [s["session"] for s in starts] == [welcome["session"], events[1]["session"]]


async def test_idle_found_by_the_event_itself(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """An event after session_idle, before any reaper ran, ends the old session and opens one."""
    srv = await make_server(session_idle=0.2 * UNIT, session_grace=GRACE, reap_interval=60)
    async with peer(srv.url) as p:
        welcome = await p.hello("u-late")
        await p.track(event(1))
        await asyncio.sleep(0.4 * UNIT)
        for f in range(2, 6):  # pipelined: every frame comes back to the new session
            await p.send({"type": "track", "events": [event(f)]})
        acks = [await p.recv() for _ in range(4)]
    assert [a["accepted"] for a in acks] == [1, 1, 1, 1]
    events = await client_events(redis)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert len({e["session"] for e in events[1:]}) == 1
    assert events[1]["session"] != welcome["session"]
    server_made = await made(redis)
    actions = [(e["action"], e["params"].get("reason")) for e in server_made]
    assert actions == [("session.start", None), ("session.end", "idle"), ("session.start", None)]
    # The end publish made names the customer (Lua reads it from the session key).
    assert {e["uuid"] for e in server_made} == {"u-late"}


async def test_max_ends_a_busy_session(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """A session ends at session_max even while events flow; the next events start another."""
    srv = await make_server(session_max=0.4 * UNIT, **FAST)
    async with peer(srv.url) as p:
        await p.hello("u-max")
        for seq in range(1, 9):
            assert (await p.track(event(seq)))["accepted"] == 1
            await asyncio.sleep(0.1 * UNIT)
    ends = await wait_for(redis, "session.end", 1)
    assert ends[0]["params"]["reason"] == "max"
    assert len({e["session"] for e in await client_events(redis)}) >= 2


def sessions_by_id(events: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """For each session id, how many of each server-made action it has."""
    out: dict[str, Counter[str]] = {}
    for e in events:
        if e["producer"].startswith("srv:"):
            out.setdefault(e["session"], Counter())[e["action"]] += 1
    return out


FAST_ENV = {
    "EVENTWIRE_SESSION_GRACE": str(0.5 * UNIT),
    "EVENTWIRE_HEARTBEAT_TTL": str(0.6 * UNIT),
    "EVENTWIRE_REAP_INTERVAL": "0.05",
}


async def test_two_processes(
    redis_proc: RedisProcess, sites_file: Path, redis: aioredis.Redis
) -> None:
    """Two server processes: one session per customer; 200 customers: one start and end each."""
    procs = [ServerProcess(redis_proc.url, sites_file, FAST_ENV).start() for _ in range(2)]
    urls = [f"ws://127.0.0.1:{p.port}" for p in procs]
    try:
        async with peer(urls[0]) as a, peer(urls[1]) as b:
            wa = await a.hello("both")
            wb = await b.hello("both")
        assert wb["session"] == wa["session"]
        assert wb["resumed"] is True
        rng = random.Random(7)

        async def customer(i: int) -> None:
            for _ in range(rng.randint(1, 3)):
                async with peer(rng.choice(urls)) as p:
                    await p.hello(f"c-{i}")
                    await p.track(event(rng.randint(1, 1000)))
                    await asyncio.sleep(rng.random() * 0.05 * UNIT)
                # Sometimes back within the grace, sometimes long after it.
                await asyncio.sleep(rng.choice([0.05, 0.8]) * UNIT)

        await asyncio.gather(*(customer(i) for i in range(200)))
        await asyncio.sleep(1.5 * UNIT)
    finally:
        for p in procs:
            p.terminate()
    counts = sessions_by_id(await stream(redis, "ew:{app}:events"))
    assert len(counts) >= 201
    bad = {s: c for s, c in counts.items() if c["session.start"] != 1 or c["session.end"] != 1}
    assert not bad, f"sessions without exactly one start and one end: {bad}"


@pytest.fixture
def victim_and_survivor(
    redis_proc: RedisProcess, sites_file: Path
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two server processes on one Redis; the first is to be killed."""
    victim = ServerProcess(redis_proc.url, sites_file, FAST_ENV).start()
    survivor = ServerProcess(redis_proc.url, sites_file, FAST_ENV).start()
    yield victim, survivor
    victim.kill()
    survivor.terminate()


async def test_process_killed(
    victim_and_survivor: tuple[ServerProcess, ServerProcess], redis: aioredis.Redis
) -> None:
    """SIGKILL of the process with the only connection: the survivor ends the session."""
    victim, _ = victim_and_survivor
    async with peer(f"ws://127.0.0.1:{victim.port}") as p:
        welcome = await p.hello("u-crash")
        await p.track(event(1))
        victim.kill()
        await p.ws.wait_closed()
    killed_at = asyncio.get_running_loop().time()
    (end,) = await wait_for(redis, "session.end", 1, wait=5)
    waited = asyncio.get_running_loop().time() - killed_at
    assert end["session"] == welcome["session"]
    assert end["params"]["reason"] == "closed"
    assert end["params"]["events"] == 1
    assert waited <= (0.5 + 0.6 + 0.5) * UNIT  # grace + heartbeat ttl + slack


async def test_process_killed_client_moves(
    victim_and_survivor: tuple[ServerProcess, ServerProcess], redis: aioredis.Redis
) -> None:
    """After a SIGKILL, a client back on the survivor within the grace keeps its session."""
    victim, survivor = victim_and_survivor
    async with peer(f"ws://127.0.0.1:{victim.port}") as p:
        welcome = await p.hello("u-move")
        victim.kill()
        await p.ws.wait_closed()
    async with peer(f"ws://127.0.0.1:{survivor.port}") as p:
        again = await p.hello("u-move")
        await asyncio.sleep(1.5 * UNIT)  # past grace + ttl: the dead connection is reaped
        assert await wait_for(redis, "session.end", 0, wait=0) == []
        await p.track(event(1))
    assert again["resumed"] is True
    assert again["session"] == welcome["session"]
    (end,) = await wait_for(redis, "session.end", 1)
    assert end["params"]["events"] == 1


async def _drop_many(srv: Any, n: int) -> None:
    """``n`` connections of ``n`` customers, each after its welcome, then all their TCP
    connections reset at once (a network blip): the server sees them all end together."""
    async with contextlib.AsyncExitStack() as stack:

        async def one(i: int) -> Any:
            p = await stack.enter_async_context(peer(srv.url))
            await p.hello(f"many-{i}")
            return p

        for p in await asyncio.gather(*(one(i) for i in range(n))):
            p.ws.transport.abort()


async def test_mass_disconnect_leaves_bounded(
    make_server: MakeServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many connections closing at once: at most LEAVE_CONCURRENCY leave steps in flight, none
    failing for want of a pooled connection, and every session ends after its grace."""
    srv = await make_server(**FAST)
    assert srv.sessions is not None
    store = srv.sessions.store
    real_call = store.call
    flying = peak = 0

    async def counted(function: str, keys: Any, args: Any) -> Any:
        nonlocal flying, peak
        if function != FN_LEAVE:
            return await real_call(function, keys, args)
        flying += 1
        peak = max(peak, flying)
        try:
            return await real_call(function, keys, args)
        finally:
            flying -= 1

    monkeypatch.setattr(store, "call", counted)
    n = 4 * REDIS_POOL_SIZE
    with structlog.testing.capture_logs() as logs:
        await _drop_many(srv, n)
        ends = await wait_for(redis, "session.end", n, wait=10)
    assert len(ends) == n
    assert {e["params"]["reason"] for e in ends} == {"closed"}
    assert 1 < peak <= LEAVE_CONCURRENCY
    assert not [e for e in logs if e["event"] == "leave_failed"]


async def test_leaves_fail_fast_in_an_outage(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a leave finds Redis away, the leaves waiting fail at once (not each after
    store_timeout), are counted, and the log has one line for them all."""
    srv = await make_server(**FAST)
    assert srv.sessions is not None
    store = srv.sessions.store
    real_call = store.call
    reached = 0

    async def away(function: str, keys: Any, args: Any) -> Any:  # fault injection
        nonlocal reached
        if function != FN_LEAVE:
            return await real_call(function, keys, args)
        reached += 1
        await asyncio.sleep(0.05)
        raise StoreUnavailable("redis unreachable: injected")

    monkeypatch.setattr(store, "call", away)
    failed = "eventwire_session_leaves_failed_total"
    before = REGISTRY.get_sample_value(failed) or 0.0
    n = 3 * LEAVE_CONCURRENCY
    with structlog.testing.capture_logs() as logs:
        await _drop_many(srv, n)
        deadline = asyncio.get_running_loop().time() + 5 * UNIT
        while (REGISTRY.get_sample_value(failed) or 0.0) - before < n:
            assert asyncio.get_running_loop().time() < deadline, reached
            await asyncio.sleep(0.02)
    assert reached <= LEAVE_CONCURRENCY  # the first batch in flight; the rest failed at once
    lines = [e for e in logs if e["event"] == "leave_failed"]
    assert len(lines) == 1, lines
    assert (lines[0]["count"], lines[0]["log_level"]) == (1, "warning")
    assert lines[0]["error"] == "redis unreachable: injected"
