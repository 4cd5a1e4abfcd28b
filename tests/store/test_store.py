"""eventwire/store: key names, the function library, packing, ordering after failures."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from hiredis import pack_command

from eventwire.core.config import Settings
from eventwire.core.ordering import FrameOwner
from eventwire.core.rules import SitesBook
from eventwire.gateway import EventwireServer
from eventwire.store import (
    COUNT_ONLY,
    EVENT,
    FN_PUBLISH,
    LIBRARY_VERSION,
    REJECT_ALWAYS,
    Frame,
    Keys,
    Store,
    connect_redis,
    frame_args,
    frame_count,
    pack_args,
    pack_bulks,
    pack_fcall,
    pack_frame_ids,
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
    for items, seqs in [
        ([5, EVENT, b'{"a":"\xc3\xa9"}', 7, COUNT_ONLY, b"", 9, REJECT_ALWAYS, b"x"], b"5,7,9"),
        ([5, EVENT, b"{}", 6, EVENT, b"", 7, REJECT_ALWAYS, b"x"], b"5"),  # consecutive
        ([12, EVENT, b"{}"], b"12"),
        ([3, EVENT, b"{}", 2, REJECT_ALWAYS, b"x", 4, EVENT, b"{}"], b"3,2,4"),
    ]:
        tail = frame_args("s", items)[1:]
        assert tail[:2] == [b"".join(items[1::3]), seqs]
        packed = pack_fcall(
            "ew_fn", keys, args, [pack_items(items)], frame_count(len(items) // 3) - 1
        )
        assert b"".join(packed) == pack_command(("FCALL", "ew_fn", len(keys), *keys, *args, *tail))
    for bad in ([1, b"x", b""], [1, EVENT, b"", 2, b"x", b""]):
        with pytest.raises(KeyError):
            pack_items(bad)  # an unknown kind never reaches Lua
    assert b"".join(pack_args(("FUNCTION", "LOAD", "REPLACE", "#!lua"))) == pack_command(
        ("FUNCTION", "LOAD", "REPLACE", "#!lua")
    )
    ids = [b"1764870000000-0", b"1764870000000-12", b"9-9"]
    acked = pack_args(("XACK", keys[0], "persist"), [pack_bulks(ids)], len(ids))
    assert b"".join(acked) == pack_command(("XACK", keys[0], "persist", *ids))
    assert pack_bulks([]) == b""


def test_publish_batch_matches_hiredis() -> None:
    """A batch's publish call (frame ids packed once per connection) is what hiredis packs.

    Two frames of one connection (the second with a new session: its ids
    are packed again) and one of another, in one call.
    """
    settings = Settings()
    store = Store(connect_redis("redis://127.0.0.1:1/0", settings), settings, SitesBook(None, {}))
    keys = store.keys
    owner = FrameOwner()

    def frame(uuid: str, session: str, items: list[object]) -> Frame:
        tag = "shop"
        f = Frame(
            "shop",
            tag,
            keys.producer(tag, "p-" + uuid),
            keys.session(tag, uuid),
            session,
            items,
            None,  # type: ignore[arg-type]
            None,
            owner,
            1,
        )
        return f

    a1 = frame("u-1", "s-1", [1, EVENT, b'{"a":1}'])
    a1.ids = pack_frame_ids(a1.producer_key, a1.session_key, "s-1")
    a2 = frame("u-1", "s-2", [2, EVENT, b"{}", 3, COUNT_ONLY, b""])
    a2.ids = a1.ids  # packed for s-1: the batch packs them again for s-2
    b1 = frame("u-\u00e9", "s-9", [7, REJECT_ALWAYS, b"x" * 300])
    (call,), routes = store._pack_batch({"shop": [a1, a2, b1]})
    head = [keys.events("shop"), keys.rejected("shop"), keys.due("shop")]
    fkeys = [k for f in (a1, a2, b1) for k in (f.producer_key, f.session_key)]
    fargs = list(store._publish_args("shop"))
    tail = [x for f in (a1, a2, b1) for x in frame_args(f.session, f.args)]
    expected = pack_command(
        ("FCALL", FN_PUBLISH, len(head) + len(fkeys), *head, *fkeys, *fargs, *tail)
    )
    assert b"".join(call) == expected
    assert routes == [keys.events("shop")]
    assert a2.ids.session == "s-2"
