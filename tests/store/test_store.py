"""eventwire/store: key names, the function library, packing, ordering after failures."""

from __future__ import annotations

import redis.asyncio as aioredis
from hiredis import pack_command

from eventwire.gateway import EventwireServer
from eventwire.store import (
    COUNT_ONLY,
    EVENT,
    LIBRARY_VERSION,
    REJECT_ALWAYS,
    Keys,
    pack_args,
    pack_fcall,
    pack_items,
)
from tests.wire import client_events, event, peer


def test_keys_share_the_site_hash_tag() -> None:
    """Every key of a site carries {site}, so one function call stays in one cluster slot."""
    keys = Keys("ew")
    names = [
        keys.events("shop"),
        keys.rejected("shop"),
        keys.producer("shop", "p-1"),
        keys.session("shop", "u:1"),
        keys.conns("shop", "u:1"),
        keys.live("shop"),
        keys.due("shop"),
        keys.dead("shop"),
    ]
    assert all(name.startswith("ew:{shop}:") for name in names)
    assert keys.dead("shop:2") == "ew:{shop:2}:dead"
    assert Keys.PERSIST_GROUP == "persist"
    assert keys.events("shop") == "ew:{shop}:events"
    assert keys.rejected("shop") == "ew:{shop}:rejected"


async def test_another_version_in_the_same_redis(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """A library left by another version of eventwire does not stand in for ours."""
    stale = "#!lua name=eventwire_old\nredis.register_function('ew_old_publish', function() end)"
    await redis.function_load(stale)
    async with peer(server.url) as p:
        await p.hello()
        assert (await p.track(event(1)))["accepted"] == 1
    # RESP2 replies: each library is a flat [name, value, ...] list.
    libraries = {
        dict(zip(lib[::2], lib[1::2], strict=True))[b"library_name"]
        for lib in await redis.function_list()
    }
    assert {b"eventwire_old", f"eventwire_{LIBRARY_VERSION}".encode()} <= libraries
    await redis.function_delete("eventwire_old")


async def test_library_reloaded_when_redis_lost_it(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """After FUNCTION FLUSH (a Redis restart without persistence) frames are still stored."""
    async with peer(server.url) as p:
        await p.hello()
        assert (await p.track(event(1)))["accepted"] == 1
        await redis.function_flush()
        assert (await p.track(event(2)))["accepted"] == 1
    assert [e["seq"] for e in await client_events(redis)] == [1, 2]


def test_packing_matches_hiredis() -> None:
    """Commands packed by the store are byte for byte what hiredis packs."""
    keys = ["ew:{shop}:events", "ew:{shop}:producer:p-1"]
    args = ["sess-1", 12, b"raw\r\nbytes"]
    items = [5, EVENT, b'{"a":"\xc3\xa9"}', 7, COUNT_ONLY, b"", 9, REJECT_ALWAYS, b"x"]
    packed = pack_fcall("ew_fn", keys, args, [pack_items(items)], len(items))
    assert b"".join(packed) == pack_command(("FCALL", "ew_fn", len(keys), *keys, *args, *items))
    assert b"".join(pack_args(("FUNCTION", "LOAD", "REPLACE", "#!lua"))) == pack_command(
        ("FUNCTION", "LOAD", "REPLACE", "#!lua")
    )
