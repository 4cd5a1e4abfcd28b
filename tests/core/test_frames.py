"""eventwire.core.frames: a frame's items, rejected records, records rebuilt for a new session."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest

from eventwire.core.frames import (
    EVENT,
    RAW_LIMIT,
    REJECT,
    encode_for_session,
    judge_events,
    undecodable_record,
)
from eventwire.core.protocol import JSON_CODEC, MSGPACK_CODEC, WireEvent
from eventwire.core.records import (
    RejectedRecord,
    StoredEvent,
    StoredHead,
    StoredTail,
    record_encoder,
)
from eventwire.core.rules import SiteConfig, SiteRules, Verdict
from eventwire.core.validation import Identity, Limits, judge_event

NOW = 1_764_160_000_000
LIMITS = Limits(max_event_bytes=32 * 1024, max_clock_skew_ms=300_000, max_event_age_ms=86_400_000)
TAKEN = Verdict(denied=False, needs_auth=False, required=())


def who(session: str, authenticated: bool = False) -> Identity:
    """The sender, in ``session``."""
    return Identity(
        site="app", uuid="u-1", session=session, producer="p-12345678", authenticated=authenticated
    )


def verdict(action: str) -> Verdict:
    """A site that takes every action."""
    return TAKEN


#: Events whose records must come out of a rebuild byte for byte as judged anew.
TRICKY: list[dict[str, Any]] = [
    {
        "seq": 1,
        "action": "page.visit",
        "params": {"url": 'https://a/é?q="x"', "title": "Ünïcode ✓"},
    },
    {"seq": 2, "action": "product.view", "params": {"price": 0.1, "big": 2**62, "neg": -1.5e-300}},
    {
        "seq": 3,
        "action": "product.view",
        "time": NOW + 3_600_000,
        "params": {"nest": {"a": [1, {"b": None}]}},
    },
    {
        "seq": 4,
        "action": "form.submit",
        "label": "line\nbreak\ttab\u2028",
        "params": {"": "", "z": [True, False]},
    },
    {"seq": 5, "action": "product.view"},
]


@pytest.mark.parametrize("authenticated", [False, True])
def test_rebuilt_records_equal_records_judged_for_the_new_session(authenticated: bool) -> None:
    """encode_for_session gives exactly the records a frame judged in the new session gets."""
    events = [msgspec.convert(e, WireEvent) for e in TRICKY]
    old, _, _ = judge_events(
        events, who("s-old", authenticated), NOW, LIMITS, verdict, JSON_CODEC, None
    )
    new, _, _ = judge_events(
        events, who("s-new", authenticated), NOW, LIMITS, verdict, JSON_CODEC, None
    )
    assert old != new
    assert [old[i] for i in range(1, len(old), 3)] == [EVENT] * len(TRICKY)
    encode_for_session(old, "s-new")
    assert old == new


def test_rebuild_leaves_rejections_alone() -> None:
    """Rejected records name no session and are not touched by a rebuild."""
    events = [msgspec.convert({"seq": 1, "action": "nodot"}, WireEvent)]
    items, rejections, denied = judge_events(
        events, who("s"), NOW, LIMITS, verdict, JSON_CODEC, None
    )
    assert (items[1], rejections[0].code, denied) == (REJECT, "invalid_action", 0)
    before = list(items)
    encode_for_session(items, "s-new")
    assert items == before


def test_schema_misfit_event_is_recorded_raw_as_json() -> None:
    """A MessagePack event that does not match the schema is recorded invalid, its raw as JSON."""
    data = msgspec.msgpack.encode(
        {"type": "track", "events": [{"seq": 7, "action": "a.b", "label": 42}]}
    )
    split = MSGPACK_CODEC.split_track(data)
    assert isinstance(split, list)
    items, rejections, _ = judge_events(split, who("s"), NOW, LIMITS, verdict, MSGPACK_CODEC, None)
    assert (rejections[0].seq, rejections[0].code) == (7, "invalid")
    record = msgspec.json.decode(items[2], type=RejectedRecord)
    assert msgspec.json.decode(record.raw) == {"seq": 7, "action": "a.b", "label": 42}


def test_undecodable_record_keeps_text_and_base64s_binary() -> None:
    """An undecodable frame's raw: text cut to 4 KiB, non-UTF-8 bytes as base64 of 3 KiB."""
    text = msgspec.json.decode(
        undecodable_record("app", None, "bad", "x" * 10_000, NOW), type=RejectedRecord
    )
    assert (text.raw, text.raw_base64, text.uuid) == ("x" * RAW_LIMIT, False, None)
    binary = b"\xff" * 10_000
    record = msgspec.json.decode(
        undecodable_record("app", who("s"), "bad", binary, NOW), type=RejectedRecord
    )
    assert record.raw_base64 is True
    assert base64.b64decode(record.raw) == binary[:3072]
    assert len(record.raw) <= RAW_LIMIT
    assert (record.uuid, record.producer, record.seq) == ("u-1", "p-12345678", None)


def test_head_and_tail_are_the_stored_event_in_order() -> None:
    """StoredHead's and StoredTail's fields are StoredEvent's, in its order, with its defaults."""
    head, tail, whole = (msgspec.structs.fields(t) for t in (StoredHead, StoredTail, StoredEvent))
    assert [(f.name, f.type, f.default) for f in head + tail] == [
        (f.name, f.type, f.default) for f in whole
    ]
    assert StoredEvent.__struct_config__.omit_defaults
    assert StoredTail.__struct_config__.omit_defaults


@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize("bot", [False, True])
def test_frame_judge_writes_what_the_whole_record_encodes_to(
    authenticated: bool, bot: bool
) -> None:
    """A frame's stored events are byte for byte the StoredEvent's own JSON, event by event."""
    sender = msgspec.structs.replace(who('s-\u00e9"1', authenticated), bot=bot)
    events = [msgspec.convert(e, WireEvent) for e in TRICKY]
    items, rejections, _ = judge_events(events, sender, NOW, LIMITS, verdict, JSON_CODEC, None)
    assert not rejections
    for i, event in zip(range(0, len(items), 3), events, strict=True):
        stored = msgspec.json.decode(items[i + 2], type=StoredEvent)
        assert stored.authenticated is authenticated
        assert stored.bot is bot
        assert (stored.site, stored.uuid, stored.session, stored.producer) == (
            sender.site,
            sender.uuid,
            sender.session,
            sender.producer,
        )
        assert stored.seq == event.seq
        # msgspec writes what it read back unchanged: the bytes of the whole record.
        assert items[i + 2] == record_encoder.encode(stored)


def test_frame_judge_gives_each_event_what_judge_event_gives() -> None:
    """Repeated, malformed, denied and unauthorized actions: one judge per frame, one per event."""
    site = SiteRules(
        "app",
        SiteConfig(
            origins=["https://a"],
            deny=["spam.*"],
            authenticated=["account.*"],
            required={"cart.*": ["sku"]},
        ),
    )
    specs: list[dict[str, Any]] = [
        {"action": "cart.add", "params": {"sku": "A"}},
        {"action": "cart.add"},
        {"action": "spam.x"},
        {"action": "account.view"},
        {"action": "nodot"},
        {"action": "nodot"},
        {"action": "page.visit", "params": {"url": "https://a/x", "referrer": "https://b/"}},
        {"action": "page.visit", "params": {}},
        {"action": "cart.add", "params": {"sku": ""}},
        {"action": "cart.add", "params": {"sku": "B"}, "time": NOW - 2 * 86_400_000},
        {"action": "x.y", "params": {"pad": "z" * LIMITS.max_event_bytes}},
        {"action": "spam.x"},
    ]
    events = [msgspec.convert({"seq": i + 1, **s}, WireEvent) for i, s in enumerate(specs)]
    sender = msgspec.structs.replace(who("s-1"), hosts=frozenset({"a"}))
    asked: list[str] = []

    def lookup(action: str) -> Verdict:
        asked.append(action)
        return site.verdict(action)

    items, rejections, denied = judge_events(
        [msgspec.structs.replace(e) for e in events], sender, NOW, LIMITS, lookup, JSON_CODEC, None
    )
    # The site is asked once per well-formed name in a frame, never for a malformed one.
    assert sorted(asked) == sorted({"cart.add", "spam.x", "account.view", "page.visit", "x.y"})
    one_by_one = [
        judge_event(msgspec.structs.replace(e), sender, NOW, LIMITS, site.verdict) for e in events
    ]
    rejected = {r.seq: (r.code, r.detail) for r in rejections}
    assert denied == 2
    for i, (event, alone) in enumerate(zip(events, one_by_one, strict=True)):
        seq, kind, payload = items[3 * i : 3 * i + 3]
        assert seq == event.seq
        if isinstance(alone, bytes):
            assert (kind, payload) == (EVENT, alone)
        else:
            assert rejected[seq] == (alone.code, alone.detail)
    assert [r.code for r in rejections] == [
        "missing_param",
        "denied",
        "unauthorized",
        "invalid_action",
        "invalid_action",
        "missing_param",
        "missing_param",
        "too_old",
        "too_large",
        "denied",
    ]
