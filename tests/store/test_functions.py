"""eventwire/store/functions.py and store.lua: one argument layout, server-made records.

The typed layouts are the only place Python knows a position; these tests
hold them to the names ``store.lua`` unpacks, then call every function in a
real Redis with builder output, and decode the records Lua completes with
the strict :class:`StoredEvent` decoder.
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

import eventwire.store as store
from eventwire.core.records import StoredEvent
from eventwire.store import (
    COUNT_ONLY,
    EVENT,
    FN_ALIAS,
    FN_HEARTBEAT,
    FN_LEAVE,
    FN_OPEN,
    FN_PUBLISH,
    FN_REAP,
    LAYOUTS,
    LIBRARY,
    LIBRARY_VERSION,
    REJECT,
    REJECT_ALWAYS,
    AliasArgs,
    AliasKeys,
    CustomerKeys,
    HeartbeatArgs,
    HeartbeatKeys,
    Keys,
    LeaveArgs,
    LeaveKeys,
    OpenArgs,
    PublishArgs,
    PublishFrameKeys,
    PublishItem,
    PublishKeys,
    ReapArgs,
    ReapKeys,
    RecordHole,
    call_keys,
    fill_template,
    frame_args,
    identify_record,
    identify_refused_record,
    parse_alias,
    parse_leave,
    parse_open,
    parse_publish,
    parse_reap,
    session_end_record,
    session_start_record,
)
from eventwire.store.functions import record_template
from tests.procs import UNIT

LUA = (Path(store.__file__).parent / "store.lua").read_text()
#: ``local a, b, c = unpack(keys)`` or ``= unpack(args, 1, 3)``, over one or more lines.
UNPACK = re.compile(r"local\s+([\w\s,]+?)\s*=\s*unpack\((keys|args)(?:,\s*([^,)]+),\s*([^)]+))?\)")
#: The fields every stored event of the old hand-written Lua records had.
RECORD_FIELDS = {
    "site", "uuid", "session", "producer", "seq", "action", "label", "time", "received", "params",
}  # fmt: skip
strict = msgspec.json.Decoder(StoredEvent)


def lua_functions() -> dict[str, str]:
    """The body of each ``local function name(keys, args)`` of store.lua."""
    parts = re.split(r"^local function (\w+)\(keys, args\)$", LUA, flags=re.M)
    return {
        name: body.split("\nend\n")[0] for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def test_lua_unpacks_the_layouts_fields_in_order() -> None:
    """Each function's unpack lines name the fields of its typed layouts, in the same order."""
    bodies = lua_functions()
    assert set(bodies) == set(LAYOUTS)
    for name, layouts in LAYOUTS.items():
        found = UNPACK.findall(bodies[name])
        assert len(found) == len(layouts), name
        for (names, source, first, last), layout in zip(found, layouts, strict=True):
            fields = [n.strip() for n in names.split(",")]
            assert fields == list(layout._fields), f"{name}: {layout.__name__}"
            assert source == ("keys" if layout.__name__.endswith("Keys") else "args")
            if first == "1":  # a fixed part: exactly its fields
                assert int(last) == len(fields), f"{name}: {layout.__name__}"


def test_every_layout_function_is_registered_under_its_name() -> None:
    """The FN_* names are the functions store.lua registers, with this library's version."""
    names = {"publish": FN_PUBLISH, "open": FN_OPEN, "leave": FN_LEAVE}
    names |= {"heartbeat": FN_HEARTBEAT, "reap": FN_REAP, "alias": FN_ALIAS}
    assert set(names) == set(LAYOUTS)
    for name, fn in names.items():
        assert fn == f"ew_{LIBRARY_VERSION}_{name}"
        assert f"redis.register_function('ew_VERSION_{name}', {name})" in LUA
        assert f"redis.register_function('{fn}', {name})" in LIBRARY


def test_the_header_names_every_key_of_keys() -> None:
    """store.lua's key map shows every key Keys makes, dead streams included."""
    keys = Keys("ew")
    made = [
        keys.events("site"),
        keys.rejected("site"),
        keys.producer("site", "<p>"),
        keys.session("site", "<uuid>"),
        keys.conns("site", "<uuid>"),
        keys.live("site"),
        keys.due("site"),
        keys.dead("site"),
        keys.alias("site", "<uuid>"),
        keys.aliases("site", "<uuid>"),
        keys.suppressed("site"),
    ]
    header = LUA.split("local function")[0]
    for key in made:
        assert f"--   {key}" in header, key


def test_a_placeholder_out_of_a_value_place_is_refused() -> None:
    """A hole inside a list is not a whole value: the template is refused."""
    bad = StoredEvent(
        site="x", uuid="u", session="s", producer="p", seq=1, action="a", label="a",
        time=1, received=1, params={"list": ["\x00eventwire-hole-1"]},
    )  # fmt: skip
    with pytest.raises(ValueError, match="placeholder"):
        record_template(bad)


def test_templates_filled_are_the_structs_records() -> None:
    """Filled, a template decodes strictly to the record the Struct would have written."""
    values: dict[RecordHole, str | int] = {
        RecordHole.UUID: 'odd "uuid" \\ é',
        RecordHole.SESSION: "s-1",
        RecordHole.PRODUCER: "srv:s-1",
        RecordHole.SEQ: 7,
        RecordHole.TIME: 1_796_230_019_306,
        RecordHole.REASON: "closed",
        RecordHole.DURATION_MS: 1234,
        RecordHole.EVENTS: 5,
    }
    end = strict.decode(fill_template(session_end_record("shop"), values))
    assert end == StoredEvent(
        site="shop", uuid='odd "uuid" \\ é', session="s-1", producer="srv:s-1", seq=7,
        action="session.end", label="Session end", time=1_796_230_019_306,
        received=1_796_230_019_306,
        params={"session": "s-1", "reason": "closed", "duration_ms": 1234, "events": 5},
    )  # fmt: skip
    moved = strict.decode(fill_template(identify_record("shop", "new", "old"), values))
    assert (moved.uuid, moved.session, moved.seq, moved.params) == (
        "new",
        "s-1",
        7,
        {"previous_uuid": "old", "merged": True},
    )
    assert (moved.action, moved.label) == ("client.identify", "client.identify")


# -- through a real Redis ---------------------------------------------------------------


KEYS = Keys("ew")
TAG = "fn"


async def call(redis: aioredis.Redis, fn: str, keys: Any, args: Any) -> Any:
    """FCALL with builder output, as Store.call sends it."""
    return await redis.fcall(fn, len(keys), *keys, *args)  # type: ignore[no-untyped-call]


def customer(uuid: str, producer: str = "p-1") -> CustomerKeys:
    """The ``open`` keys of ``uuid`` under the test tag."""
    return CustomerKeys(
        session=KEYS.session(TAG, uuid),
        conns=KEYS.conns(TAG, uuid),
        live=KEYS.live(TAG),
        due=KEYS.due(TAG),
        events=KEYS.events(TAG),
        producer=KEYS.producer(TAG, producer),
        suppressed=KEYS.suppressed(TAG),
        aliases=KEYS.aliases(TAG, uuid),
    )


def leaving(uuid: str, producer: str | None = "p-1") -> LeaveKeys:
    """The ``leave`` keys of ``uuid`` under the test tag."""
    return LeaveKeys(
        session=KEYS.session(TAG, uuid),
        conns=KEYS.conns(TAG, uuid),
        live=KEYS.live(TAG),
        due=KEYS.due(TAG),
        events=KEYS.events(TAG),
        alias_key=KEYS.alias(TAG, uuid),
        own_aliases=KEYS.aliases(TAG, uuid),
        suppressed=KEYS.suppressed(TAG),
        producer=KEYS.producer(TAG, producer) if producer else None,
    )


def open_args(uuid: str, member: str, session: str, idle_ms: int = 60_000) -> OpenArgs:
    """``open`` arguments for a session of the test site."""
    return OpenArgs(
        uuid=uuid,
        member=member,
        session_id=session,
        start_record=session_start_record(TAG, uuid, session, "p-1", {"title": "t"}, 1),
        heartbeat_ms=60_000,
        grace_ms=60_000,
        idle_ms=idle_ms,
        max_ms=3_600_000,
        events_maxlen=1000,
        taken="sei",
        end_record=session_end_record(TAG),
        carry=0,
        producer_ttl_ms=60_000,
        subject=f"h-{uuid}",
        alias="",
        alias_ttl_ms=0,
    )


async def made(redis: aioredis.Redis) -> list[StoredEvent]:
    """The server-made records of the test tag's events stream, decoded strictly."""
    raw = [f[b"event"] for _, f in await redis.xrange(KEYS.events(TAG))]
    return [strict.decode(r) for r in raw if b'"srv:' in r]


@pytest.fixture
async def lib(redis: aioredis.Redis) -> aioredis.Redis:
    """The test Redis with this version's library loaded."""
    await redis.function_load(LIBRARY, replace=True)
    return redis


async def test_open_publish_leave_with_identify(lib: aioredis.Redis) -> None:
    """open, publish (two frames), heartbeat and leave with identify, all from builders."""
    first = open_args("u-1", "m:1:u-1", "s-1")
    opened = parse_open(await call(lib, FN_OPEN, call_keys(customer("u-1")), first))
    assert (opened.session, opened.resumed, opened.acked) == ("s-1", False, 0)
    head = PublishKeys(KEYS.events(TAG), KEYS.rejected(TAG), KEYS.due(TAG))
    args = PublishArgs(1000, 1000, 60_000, 60_000, 3_600_000, "sei", session_end_record(TAG), 10)
    frames = [("p-1", "s-1", [1, 2]), ("p-2", "gone", [1])]
    keys: list[Any] = [*head]
    argv: list[Any] = [*args]
    for producer, session, seqs in frames:
        keys += PublishFrameKeys(KEYS.producer(TAG, producer), KEYS.session(TAG, "u-1"))
        items = [x for seq in seqs for x in PublishItem(seq, EVENT, b'{"seq":%d}' % seq)]
        argv += frame_args(session, items)
    done = parse_publish(await call(lib, FN_PUBLISH, keys, argv), len(frames))
    assert [(d.added, d.duplicate, d.gone) for d in done.frames] == [(2, 0, False), (0, 0, True)]
    assert done.backlog is None  # no persist group: not watched
    back = await call(lib, FN_HEARTBEAT, HeartbeatKeys(KEYS.live(TAG)), [
        *HeartbeatArgs(60_000, KEYS.site_prefix(TAG)), "m:1:u-1", "m:2:u-1",
    ])  # fmt: skip
    assert back == 1  # m:2 was not registered: it is now
    await lib.zrem(KEYS.live(TAG), "m:2:u-1")
    await lib.srem(KEYS.conns(TAG, "u-1"), "m:2:u-1")
    leave = LeaveArgs(
        uuid="u-1",
        member="m:1:u-1",
        grace_ms=60_000,
        events_maxlen=1000,
        taken="sei",
        end_record=session_end_record(TAG),
        identify_record=identify_record(TAG, "c-42", "u-1"),
        refused_record=identify_refused_record(TAG, "c-42", "u-1"),
        refused="",
        subject="h-u-1",
        to="c-42",
        alias_ttl_ms=0,
    )
    left = parse_leave(await call(lib, FN_LEAVE, call_keys(leaving("u-1")), leave))
    assert (left.ended, left.stored, left.merged) == (True, 2, True)
    assert await lib.get(KEYS.alias(TAG, "u-1")) == b"c-42"
    assert await lib.pttl(KEYS.alias(TAG, "u-1")) == -1  # no retain_days: no expiry
    start, moved, end = [r for r in await made(lib) if r.producer == "srv:s-1"]
    assert start.action == "session.start"
    assert moved == StoredEvent(
        site=TAG, uuid="c-42", session="s-1", producer="srv:s-1", seq=2,
        action="client.identify", label="client.identify", time=moved.time,
        received=moved.time, params={"previous_uuid": "u-1", "merged": True},
    )  # fmt: skip
    assert end == StoredEvent(
        site=TAG, uuid="u-1", session="s-1", producer="srv:s-1", seq=3,
        action="session.end", label="Session end", time=moved.time, received=moved.time,
        params={"session": "s-1", "reason": "identify", "duration_ms": end.params["duration_ms"],
                "events": 2},
    )  # fmt: skip
    assert 0 <= end.params["duration_ms"] < 10_000 * UNIT
    raw = [f[b"event"] for _, f in await lib.xrange(KEYS.events(TAG))]
    assert all(set(msgspec.json.decode(r)) == RECORD_FIELDS for r in raw if b"srv:" in r)


#: (uuid, session id, producer, items): frames that share producers and
#: sessions, resend, carry out-of-order and denied items, and one frame for a
#: session that is not open.
FRAMES: list[tuple[str, str, str, list[tuple[int, bytes]]]] = [
    ("u-1", "s-1", "p-1", [(1, EVENT), (2, EVENT)]),
    ("u-1", "s-1", "p-1", [(3, EVENT), (2, REJECT_ALWAYS), (4, COUNT_ONLY)]),
    ("u-1", "s-1", "p-1", [(3, EVENT), (4, EVENT), (5, EVENT)]),  # a resend, then 5
    ("u-2", "s-2", "p-2", [(7, EVENT)]),
    ("u-1", "s-1", "p-1", [(1, EVENT), (2, EVENT)]),  # only duplicates
    ("u-1", "old", "p-3", [(1, EVENT)]),  # its session is not open: gone
    ("u-2", "s-2", "p-2", [(8, EVENT), (7, COUNT_ONLY)]),  # its last item is not its top
    ("u-1", "s-1", "p-1", [(9, COUNT_ONLY)]),
    ("u-1", "s-1", "p-1", [(8, EVENT)]),  # below the denied 9: a duplicate
    ("u-3", "", "p-4", [(1, REJECT_ALWAYS)]),  # server-made: no session; moves nothing
    ("u-2", "s-2", "p-2", [(8, EVENT), (9, EVENT), (11, EVENT)]),  # a resend, then a gap
]


def publish_call(tag: str, frames: list[tuple[str, str, str, list[tuple[int, bytes]]]]) -> Any:
    """One publish call's keys and arguments for ``frames`` under ``tag``."""
    head = PublishKeys(KEYS.events(tag), KEYS.rejected(tag), KEYS.due(tag))
    args = PublishArgs(1000, 1000, 60_000, 60_000, 3_600_000, "sei", session_end_record(tag), 0)
    keys: list[Any] = [*head]
    argv: list[Any] = [*args]
    for uuid, session, producer, items in frames:
        keys += PublishFrameKeys(KEYS.producer(tag, producer), KEYS.session(tag, uuid))
        p = producer.encode()
        flat = [
            x
            for seq, kind in items
            for x in PublishItem(seq, kind, b'{"p":"%b","seq":%d}' % (p, seq))
        ]
        argv += frame_args(session, flat)
    return keys, argv


async def test_one_call_of_many_frames_leaves_what_a_call_per_frame_leaves(
    lib: aioredis.Redis,
) -> None:
    """publish reads and writes each producer and session key once per call: same outcome.

    The frames run once as one call (tag ``one``) and once a call each (tag
    ``each``): the replies, stored seqs, streams and sessions' counts agree.
    """
    state = {}
    for tag in ("one", "each"):
        for uuid, sid in (("u-1", "s-1"), ("u-2", "s-2")):
            keys = customer(uuid)._replace(
                session=KEYS.session(tag, uuid), conns=KEYS.conns(tag, uuid),
                live=KEYS.live(tag), due=KEYS.due(tag), events=KEYS.events(tag),
                producer=KEYS.producer(tag, "p-1"), suppressed=KEYS.suppressed(tag),
                aliases=KEYS.aliases(tag, uuid),
            )  # fmt: skip
            await call(lib, FN_OPEN, call_keys(keys), open_args(uuid, f"m:1:{uuid}", sid))
        if tag == "one":
            keys, argv = publish_call(tag, FRAMES)
            reply = parse_publish(await call(lib, FN_PUBLISH, keys, argv), len(FRAMES))
            frames = reply.frames
        else:
            frames = []
            for frame in FRAMES:
                keys, argv = publish_call(tag, [frame])
                frames += parse_publish(await call(lib, FN_PUBLISH, keys, argv), 1).frames
        seqs = {p: await lib.get(KEYS.producer(tag, p)) for p in ("p-1", "p-2", "p-3", "p-4")}
        for p, seq in seqs.items():
            if seq is not None:
                assert 0 < await lib.pttl(KEYS.producer(tag, p)) <= 60_000, p
        streams = [
            [f[b"event"] for _, f in await lib.xrange(key) if b"srv:" not in f[b"event"]]
            for key in (KEYS.events(tag), KEYS.rejected(tag))
        ]
        sessions = [await lib.hmget(KEYS.session(tag, u), "id", "events") for u in ("u-1", "u-2")]
        last = int(await lib.hget(KEYS.session(tag, "u-1"), "last"))
        state[tag] = ([(f.added, f.duplicate, f.gone) for f in frames], seqs, streams, sessions)
        assert last >= int(await lib.hget(KEYS.session(tag, "u-1"), "first"))
    assert state["one"] == state["each"]
    replies, seqs, (events, rejected), sessions = state["one"]
    assert replies == [
        (2, 0, False), (1, 0, False), (1, 2, False), (1, 0, False), (0, 2, False),
        (0, 0, True), (1, 0, False), (0, 0, False), (0, 1, False), (0, 0, False),
        (2, 1, False),
    ]  # fmt: skip
    assert seqs == {"p-1": b"9", "p-2": b"11", "p-3": None, "p-4": None}
    assert [msgspec.json.decode(e)["seq"] for e in events] == [1, 2, 3, 5, 7, 8, 9, 11]
    assert [msgspec.json.decode(e)["seq"] for e in rejected] == [2, 1]
    assert sessions == [[b"s-1", b"4"], [b"s-2", b"4"]]


def random_frames(rng: random.Random, n: int) -> list[tuple[str, list[tuple[int, bytes]]]]:
    """Random frames of three producers, as ``judge_events`` and ``deny_all`` make them.

    Consecutive seqs, gaps, resends from below the stored seq, out-of-order
    (R) and denied items.
    """
    tops: dict[str, int] = {}
    frames = []
    for _ in range(n):
        producer = rng.choice(["p-1", "p-2", "p-3"])
        seq = max(1, tops.get(producer, 0) + rng.choice([-4, -1, 0, 1, 1, 1, 3]))
        items: list[tuple[int, bytes]] = []
        top = 0
        for _ in range(rng.choice([1, 1, 2, 3, 5, 8])):
            kind = rng.choice([EVENT] * 8 + [REJECT, COUNT_ONLY, REJECT_ALWAYS])
            if kind == REJECT_ALWAYS and top:
                items.append((max(1, top - rng.randrange(3)), kind))
                continue
            items.append((seq, kind))
            top = max(top, seq)
            seq += rng.choice([1, 1, 1, 1, 2, 5])
        tops[producer] = max(tops.get(producer, 0), top)
        frames.append((producer, items))
    return frames


async def test_publish_stores_what_per_item_dedup_stores(lib: aioredis.Redis) -> None:
    """Random frames in random calls: each item as a seq-by-seq model of the dedup says.

    An event is stored once, when its seq is above its producer's stored seq
    (else a duplicate); r is recorded then too, R always, n moves the seq only.
    """
    rng = random.Random(20)
    frames = random_frames(rng, 600)
    head = PublishKeys(KEYS.events(TAG), KEYS.rejected(TAG), KEYS.due(TAG))
    args = PublishArgs(10**6, 10**6, 60_000, 60_000, 3_600_000, "sei", session_end_record(TAG), 0)
    replies: list[tuple[int, int]] = []
    i = 0
    while i < len(frames):
        part = frames[i : i + rng.choice([1, 1, 2, 4, 16])]
        i += len(part)
        keys: list[Any] = [*head]
        argv: list[Any] = [*args]
        for producer, items in part:
            keys += PublishFrameKeys(KEYS.producer(TAG, producer), KEYS.session(TAG, "u-1"))
            payloads = [
                b'{"p":"%s","seq":%d,"k":"%s"}' % (producer.encode(), q, k) for q, k in items
            ]
            argv += frame_args(
                "", [x for (q, k), d in zip(items, payloads, strict=True) for x in (q, k, d)]
            )
        reply = parse_publish(await call(lib, FN_PUBLISH, keys, argv), len(part))
        replies += [(f.added, f.duplicate) for f in reply.frames]
    cur: dict[str, int] = {}
    expected, events, rejected = [], [], []
    for producer, items in frames:
        added = dup = 0
        for q, k in items:
            payload = b'{"p":"%s","seq":%d,"k":"%s"}' % (producer.encode(), q, k)
            if k == REJECT_ALWAYS:
                rejected.append(payload)
            elif q > cur.get(producer, 0):
                cur[producer] = q
                if k == EVENT:
                    events.append(payload)
                    added += 1
                elif k == REJECT:
                    rejected.append(payload)
            elif k == EVENT:
                dup += 1
        expected.append((added, dup))
    assert replies == expected
    for producer in ("p-1", "p-2", "p-3"):
        assert await lib.get(KEYS.producer(TAG, producer)) == b"%d" % cur[producer]
    for key, want in ((KEYS.events(TAG), events), (KEYS.rejected(TAG), rejected)):
        assert [f[b"event"] for _, f in await lib.xrange(key)] == want


async def test_reap_writes_one_session_end_whatever_the_uuid(lib: aioredis.Redis) -> None:
    """reap ends an idle session; a uuid with quotes and backslashes still makes valid JSON."""
    uuid = 'we"ird\\uuid'
    await call(lib, FN_OPEN, call_keys(customer(uuid)), open_args(uuid, f"m:1:{uuid}", "s-2", 1))
    await asyncio.sleep(0.01)
    end_record = session_end_record(TAG)
    reap = ReapArgs(KEYS.site_prefix(TAG), 60_000, 1, 3_600_000, 500, 1000, "sei", end_record)
    keys = ReapKeys(KEYS.live(TAG), KEYS.due(TAG), KEYS.events(TAG))
    assert parse_reap(await call(lib, FN_REAP, keys, reap)).sessions_ended == 1
    assert parse_reap(await call(lib, FN_REAP, keys, reap)).sessions_ended == 0
    (end,) = [r for r in await made(lib) if r.action == "session.end"]
    assert (end.uuid, end.session, end.seq, end.params["reason"]) == (uuid, "s-2", 2, "idle")
    assert end.params["events"] == 0
    assert end.time == end.received


async def test_alias_merges_an_anonymous_uuid_into_one_customer_only(lib: aioredis.Redis) -> None:
    """alias records A -> K once; A to another customer, a customer, a refusal: not merged."""
    keys = AliasKeys(KEYS.alias(TAG, "a-1"), KEYS.aliases(TAG, "a-1"), KEYS.suppressed(TAG))
    first = parse_alias(await call(lib, FN_ALIAS, keys, AliasArgs("h-a-1", "k-1", "", 0)))
    assert first == (True, "")
    again = parse_alias(await call(lib, FN_ALIAS, keys, AliasArgs("h-a-1", "k-1", "", 0)))
    assert again.merged  # the same merge again (a retried call) is still merged
    other = parse_alias(await call(lib, FN_ALIAS, keys, AliasArgs("h-a-1", "k-2", "", 0)))
    assert not other.merged
    assert "already merged" in other.reason
    assert await lib.get(KEYS.alias(TAG, "a-1")) == b"k-1"
    refused = parse_alias(await call(lib, FN_ALIAS, keys, AliasArgs("h-a-1", "k-1", "no token", 0)))
    assert refused == (False, "no token")
    await lib.sadd(KEYS.aliases(TAG, "c-1"), "x")
    customer_keys = AliasKeys(
        KEYS.alias(TAG, "c-1"), KEYS.aliases(TAG, "c-1"), KEYS.suppressed(TAG)
    )
    owner = parse_alias(await call(lib, FN_ALIAS, customer_keys, AliasArgs("h-c-1", "k-1", "", 0)))
    assert not owner.merged
    assert "aliases of its own" in owner.reason
    await lib.sadd(KEYS.suppressed(TAG), "h-f-1")
    gone_keys = AliasKeys(KEYS.alias(TAG, "f-1"), KEYS.aliases(TAG, "f-1"), KEYS.suppressed(TAG))
    gone = parse_alias(await call(lib, FN_ALIAS, gone_keys, AliasArgs("h-f-1", "k-1", "", 0)))
    assert not gone.merged
    assert "forgotten" in gone.reason


async def test_an_alias_key_lives_as_long_as_the_sites_retain_days(lib: aioredis.Redis) -> None:
    """With a ttl (the site's retain_days) leave's and alias's alias keys expire; again renews."""
    day = 86_400_000
    keys = AliasKeys(KEYS.alias(TAG, "a-7"), KEYS.aliases(TAG, "a-7"), KEYS.suppressed(TAG))
    assert parse_alias(await call(lib, FN_ALIAS, keys, AliasArgs("h-a-7", "k-7", "", day))).merged
    assert day - 60_000 < await lib.pttl(KEYS.alias(TAG, "a-7")) <= day
    await call(lib, FN_ALIAS, keys, AliasArgs("h-a-7", "k-7", "", 30 * day))
    assert 29 * day < await lib.pttl(KEYS.alias(TAG, "a-7")) <= 30 * day
    await call(lib, FN_OPEN, call_keys(customer("u-7")), open_args("u-7", "m:1:u-7", "s-7"))
    leave = LeaveArgs(
        uuid="u-7", member="m:1:u-7", grace_ms=60_000, events_maxlen=1000, taken="sei",
        end_record=session_end_record(TAG), identify_record=identify_record(TAG, "c-7", "u-7"),
        refused_record=identify_refused_record(TAG, "c-7", "u-7"), refused="",
        subject="h-u-7", to="c-7", alias_ttl_ms=2 * day,
    )  # fmt: skip
    assert parse_leave(await call(lib, FN_LEAVE, call_keys(leaving("u-7", None)), leave)).merged
    assert await lib.get(KEYS.alias(TAG, "u-7")) == b"c-7"
    assert day < await lib.pttl(KEYS.alias(TAG, "u-7")) <= 2 * day


async def test_a_customers_aliases_set_lives_as_long_as_the_sites_retain_days(
    lib: aioredis.Redis,
) -> None:
    """open with an alias adds it to the customer's aliases set; with a ttl (the site's
    retain_days) the set expires that long after its last merge, without one never."""
    day = 86_400_000
    args = open_args("c-8", "m:1:c-8", "s-8")._replace(alias="a-8", alias_ttl_ms=day)
    await call(lib, FN_OPEN, call_keys(customer("c-8")), args)
    assert await lib.smembers(KEYS.aliases(TAG, "c-8")) == {b"a-8"}
    assert day - 60_000 < await lib.pttl(KEYS.aliases(TAG, "c-8")) <= day
    again = open_args("c-8", "m:2:c-8", "s-8")._replace(alias="b-8", alias_ttl_ms=3 * day)
    await call(lib, FN_OPEN, call_keys(customer("c-8")), again)
    assert await lib.smembers(KEYS.aliases(TAG, "c-8")) == {b"a-8", b"b-8"}
    assert 2 * day < await lib.pttl(KEYS.aliases(TAG, "c-8")) <= 3 * day
    forever = open_args("c-9", "m:1:c-9", "s-9")._replace(alias="a-9")
    await call(lib, FN_OPEN, call_keys(customer("c-9")), forever)
    assert await lib.pttl(KEYS.aliases(TAG, "c-9")) == -1


async def test_a_refused_merge_says_why_in_client_identify(lib: aioredis.Redis) -> None:
    """leave with a refusal stores client.identify with merged false and the reason; no alias."""
    await call(lib, FN_OPEN, call_keys(customer("u-9")), open_args("u-9", "m:1:u-9", "s-9"))
    leave = LeaveArgs(
        uuid="u-9", member="m:1:u-9", grace_ms=60_000, events_maxlen=1000, taken="sei",
        end_record=session_end_record(TAG), identify_record=identify_record(TAG, "c-9", "u-9"),
        refused_record=identify_refused_record(TAG, "c-9", "u-9"),
        refused='the new uuid was not proven "by" a token', subject="h-u-9", to="c-9",
        alias_ttl_ms=0,
    )  # fmt: skip
    left = parse_leave(await call(lib, FN_LEAVE, call_keys(leaving("u-9", None)), leave))
    assert not left.merged
    (moved,) = [r for r in await made(lib) if r.action == "client.identify"]
    reason = 'the new uuid was not proven "by" a token'
    assert moved.params == {"previous_uuid": "u-9", "merged": False, "reason": reason}
    assert await lib.get(KEYS.alias(TAG, "u-9")) is None


async def test_open_of_a_suppressed_customer_registers_nothing(lib: aioredis.Redis) -> None:
    """A subject in the suppressed set: no session, no connection, no session.start."""
    await lib.sadd(KEYS.suppressed(TAG), "h-s-1")
    opened = parse_open(
        await call(lib, FN_OPEN, call_keys(customer("s-1")), open_args("s-1", "m:1:s-1", "x"))
    )
    assert opened.suppressed
    assert await lib.exists(KEYS.session(TAG, "s-1"), KEYS.conns(TAG, "s-1"), KEYS.live(TAG)) == 0
    assert await made(lib) == []
