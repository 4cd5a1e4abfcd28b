"""Property tests (hypothesis) of eventwire.core.protocol and .validation, without I/O.

For arbitrary bytes, for byte mutations of valid frames and for frames whose
fields hold arbitrary values, in both subprotocols: decoding gives a message,
a schema error with a path, or ``UndecodableFrame`` with a detail, never
another exception; every decoded event judged gives the stored JSON or a
reject code of docs/protocol.md; encoding and decoding round trip. The examples
are few per test (``FUZZ``) so the suite stays quick; ``scripts/fuzz`` runs
the same kind of input for as long as you like.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventwire.core.errors import UndecodableFrame
from eventwire.core.protocol import (
    JSON_CODEC,
    MAX_SEQ,
    MAX_TIME,
    MSGPACK_CODEC,
    Ack,
    ClientMessage,
    Codec,
    Error,
    Hello,
    Identify,
    Nack,
    Rejection,
    Track,
    Welcome,
    WireEvent,
)
from eventwire.core.records import RejectedRecord, StoredEvent, event_text
from eventwire.core.rules import Verdict
from eventwire.core.validation import (
    FrameJudge,
    Identity,
    Limits,
    Rejected,
    action_problem,
    judge_event,
)
from eventwire.ingest import undecodable_record
from scripts.fuzz import SPECIAL_BYTES

ROOT = Path(__file__).resolve().parents[2]
#: Reject codes of docs/protocol.md section 3.
REJECT_CODES = frozenset(
    {"invalid", "invalid_action", "missing_param", "too_large", "too_old", "denied", "unauthorized"}
)
#: The customer reference and producer id as docs/protocol.md section 2 words them.
UUID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PRODUCER_RE = re.compile(r"[!-~]{8,64}")
NOW = 1_764_160_000_000
DAY = 86_400_000
LIMITS = Limits(max_event_bytes=4096, max_clock_skew_ms=300_000, max_event_age_ms=7 * DAY)
CODECS = [JSON_CODEC, MSGPACK_CODEC]
BOTH = pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])

#: Few examples per test: the suite runs these on every change. For a deeper
#: run: EVENTWIRE_FUZZ_EXAMPLES=5000 pytest tests/core/test_fuzz.py
FUZZ = settings(
    max_examples=int(os.environ.get("EVENTWIRE_FUZZ_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- strategies ---------------------------------------------------------------

names = st.sampled_from(["url", "title", "sku", "type", "events", "seq", "x"]) | st.text(max_size=8)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers()
    | st.floats()
    | st.text(max_size=24)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(names, kids, max_size=4),
    max_leaves=12,
)
#: Values both formats carry alike: finite floats, 64-bit integers.
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(names, kids, max_size=4),
    max_leaves=12,
)
#: What MessagePack carries beyond JSON: bytes, extension types, timestamps,
#: map keys that are numbers, nil or arrays. Integers stay in its 64-bit range.
msgpack_keys = names | st.integers(-5, 5) | st.none() | st.tuples(st.integers(0, 3))
msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=24)
    | st.binary(max_size=16)
    | st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary(max_size=8))
    | st.datetimes(timezones=st.just(dt.UTC))
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(msgpack_keys, kids, max_size=4),
    max_leaves=12,
)

good_actions = st.sampled_from(
    ["page.visit", "product.view", "form.submit", "a.b"]
) | st.from_regex(r"[A-Za-z0-9_-]{1,10}(\.[A-Za-z0-9_-]{1,10}){1,2}", fullmatch=True)
uuids = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
producers = st.from_regex(r"[!-~]{8,64}", fullmatch=True)
times = st.integers(NOW - 10 * DAY, NOW + 10 * DAY)


def valid_event(seq: st.SearchStrategy[int]) -> st.SearchStrategy[dict[str, Any]]:
    """A wire event that decodes (it may still be rejected by the rules)."""
    return st.fixed_dictionaries(
        {"seq": seq, "action": good_actions},
        optional={
            "label": st.text(max_size=256),
            "time": times,
            "params": st.dictionaries(names, plain_values, max_size=4),
        },
    )


valid_frames = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("hello"), "uuid": uuids, "producer": producers},
        optional={
            "token": st.text(max_size=64),
            "client": st.text(max_size=128),
            "context": st.dictionaries(names, plain_values, max_size=3),
        },
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "events": st.lists(valid_event(st.integers(1, MAX_SEQ)), max_size=5),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("identify"), "uuid": uuids}, optional={"token": st.text(max_size=64)}
    ),
)


def fuzzed_frames(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Frames whose fields are each valid, arbitrary, missing or extra."""

    def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return valid | values

    event = st.fixed_dictionaries(
        {"seq": field(st.integers(1, 50) | st.integers(-(2**63), 2**64 - 1))},
        optional={
            "action": field(good_actions | st.text(max_size=40)),
            "label": field(st.none() | st.text(max_size=300)),
            "time": field(st.none() | times | st.integers(-(2**63), 2**64 - 1)),
            "params": field(st.none() | st.dictionaries(names, values, max_size=4)),
            "extra": values,
        },
    )
    return (
        st.fixed_dictionaries(
            {"type": field(st.sampled_from(["track", "hello", "identify", "ack", "welcome"]))},
            optional={
                "events": field(st.lists(event | values, max_size=5)),
                "uuid": field(uuids | uuids.map(lambda u: u + "\n") | st.text(max_size=70)),
                "producer": field(producers | producers.map(lambda p: p + "\n")),
                "token": field(st.text(max_size=16)),
                "context": values,
            },
        )
        | values
    )


@st.composite
def mutated(draw: st.DrawFn, frames: st.SearchStrategy[bytes]) -> bytes:
    """An encoded frame with a few bytes flipped, inserted, deleted, or cut off."""
    data = bytearray(draw(frames))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(SPECIAL_BYTES))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def encode_with(codec: Codec, obj: Any) -> bytes:
    """Encode a value in a codec's format."""
    return msgspec.msgpack.encode(obj) if codec.binary else msgspec.json.encode(obj)


def encoded(codec: Codec, values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Values encoded for a codec; values its format cannot hold are left out."""

    def enc(obj: Any) -> bytes | None:
        try:
            return encode_with(codec, obj)
        except (TypeError, ValueError, OverflowError):  # e.g. a nil map key in JSON
            return None

    return values.map(enc).filter(lambda b: b is not None)  # type: ignore[return-value]


def frames_for(codec: Codec) -> st.SearchStrategy[bytes]:
    """Frames for a codec: valid, fuzzed field by field, and mutated byte by byte."""
    values = msgpack_values if codec.binary else json_values
    good = encoded(codec, valid_frames)
    return st.one_of(good, encoded(codec, fuzzed_frames(values)), mutated(good))


# ---- what ingest does with a frame, without a socket ---------------------------


def decode_after_hello(codec: Codec, data: bytes) -> Any:
    """Decode a frame as ingest does after the hello: strictly, then event by event.

    Returns the message, a list of events (a track frame with some bad
    events), or an ``UndecodableFrame``.
    """
    try:
        try:
            return codec.decode(data)
        except msgspec.ValidationError:
            return codec.split_track(data)
    except UndecodableFrame as exc:
        return exc


def check_stored(raw: bytes, event: WireEvent, who: Identity, verdict: Verdict | None) -> None:
    """An accepted event's stored JSON is what docs/protocol.md section 7 says."""
    stored = msgspec.json.decode(raw, type=StoredEvent)
    assert len(raw) <= LIMITS.max_event_bytes
    assert (stored.site, stored.uuid, stored.session, stored.producer) == (
        who.site,
        who.uuid,
        who.session,
        who.producer,
    )
    assert (stored.seq, stored.action, stored.received) == (event.seq, event.action, NOW)
    assert action_problem(stored.action) is None
    if event.label is not None:
        assert stored.label == event.label
    params = event.params or {}
    assert stored.params == msgspec.json.decode(msgspec.json.encode(params))
    if event.time is None:
        assert stored.time == NOW
        assert stored.original_time is None
    elif event.time > NOW + LIMITS.max_clock_skew_ms:
        assert (stored.time, stored.original_time) == (NOW, event.time)
    else:
        assert stored.time == event.time >= NOW - LIMITS.max_event_age_ms
    assert stored.authenticated == who.authenticated
    if verdict is not None:
        assert not verdict.denied
        assert who.authenticated or not verdict.needs_auth
        for name in verdict.required:
            assert params.get(name) not in (None, "")
    if event.action == "page.visit":
        assert isinstance(params.get("url"), str)
        assert params["url"]


def check_frame(codec: Codec, data: bytes, who: Identity, verdict: Verdict | None) -> None:
    """Decode one frame and judge its events; every outcome is one the protocol allows."""
    out = decode_after_hello(codec, data)
    if isinstance(out, UndecodableFrame):
        assert out.detail
        assert out.close_code == 1007
        record = msgspec.json.decode(
            undecodable_record("app", who, out.detail, data, NOW), type=RejectedRecord
        )
        assert record.code == "undecodable"
        raw = base64.b64decode(record.raw) if record.raw_base64 else record.raw.encode()
        assert data.startswith(raw)
        return
    if isinstance(out, Hello | Identify):
        assert UUID_RE.fullmatch(out.uuid), out.uuid
        if isinstance(out, Hello):
            assert PRODUCER_RE.fullmatch(out.producer), out.producer
            msgspec.json.encode(out.context)  # session.start carries it as JSON
        return
    events = out.events if isinstance(out, Track) else out
    assert isinstance(events, list)
    for event in events:
        if isinstance(event, tuple):
            seq, detail, raw = event
            assert 1 <= seq <= MAX_SEQ
            assert "$.events[" in detail
            assert isinstance(codec.to_json_text(raw), str)
            continue
        assert isinstance(event, WireEvent)
        result = judge_event(event, who, NOW, LIMITS, verdict)
        if isinstance(result, Rejected):
            assert result.code in REJECT_CODES
            assert result.detail
        else:
            check_stored(result, event, who, verdict)


identities = st.builds(
    Identity,
    site=st.just("app"),
    uuid=uuids,
    session=st.just("s-1"),
    producer=producers,
    authenticated=st.booleans(),
)
verdicts = st.none() | st.builds(
    Verdict,
    denied=st.booleans(),
    needs_auth=st.booleans(),
    required=st.lists(st.sampled_from(["url", "title", "sku"]), max_size=2).map(tuple),
)


# ---- properties ------------------------------------------------------------------


@BOTH
@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes(codec: Codec, data: bytes) -> None:
    """Arbitrary bytes decode to a message, or raise a schema error or UndecodableFrame."""
    try:
        codec.decode(data)
    except (msgspec.ValidationError, UndecodableFrame) as exc:
        problem = str(exc)
        assert problem
    check_frame(
        codec, data, Identity(site="app", uuid="u", session="s", producer="p-1234567"), None
    )


@BOTH
@FUZZ
@given(data=st.data(), who=identities, verdict=verdicts)
def test_fuzzed_and_mutated_frames(
    codec: Codec, data: st.DataObject, who: Identity, verdict: Verdict | None
) -> None:
    """Fuzzed and mutated frames: undecodable, a message, or events accepted or rejected by code."""
    check_frame(codec, data.draw(frames_for(codec)), who, verdict)


@BOTH
@FUZZ
@given(obj=st.one_of(valid_frames), who=identities)
def test_valid_frames_are_messages(codec: Codec, obj: dict[str, Any], who: Identity) -> None:
    """A valid frame decodes strictly to its message, the same in both subprotocols."""
    msg = codec.decode(encode_with(codec, obj))
    assert msg.__struct_config__.tag == obj["type"]
    other = MSGPACK_CODEC if codec is JSON_CODEC else JSON_CODEC
    assert other.decode(encode_with(other, obj)) == msg
    assert codec.decode(codec.encode_client(msg)) == msg


client_messages: st.SearchStrategy[ClientMessage] = st.one_of(
    st.builds(
        Hello,
        uuid=uuids,
        producer=producers,
        token=st.none() | st.text(max_size=64),
        client=st.none() | st.text(max_size=128),
        context=st.none() | st.dictionaries(st.text(max_size=8), plain_values, max_size=3),
    ),
    st.builds(
        Track,
        events=st.lists(
            st.builds(
                WireEvent,
                seq=st.integers(1, MAX_SEQ),
                action=st.text(max_size=40),
                label=st.none() | st.text(max_size=256),
                time=st.none() | st.integers(-MAX_TIME, MAX_TIME),
                params=st.none() | st.dictionaries(st.text(max_size=8), plain_values, max_size=3),
            ),
            max_size=4,
        ),
    ),
    st.builds(Identify, uuid=uuids, token=st.none() | st.text(max_size=64)),
)
server_messages = st.one_of(
    st.builds(
        Welcome,
        session=st.text(max_size=32),
        resumed=st.booleans(),
        acked=st.integers(0, MAX_SEQ),
        server_time=times,
        max_batch=st.integers(1, 10_000),
    ),
    st.builds(
        Ack,
        seq=st.integers(1, MAX_SEQ),
        accepted=st.integers(0, 500),
        duplicate=st.integers(0, 500),
        rejected=st.lists(
            st.builds(
                Rejection,
                seq=st.integers(1, MAX_SEQ),
                code=st.sampled_from(sorted(REJECT_CODES)),
                detail=st.text(max_size=64),
            ),
            max_size=3,
        ),
    ),
    st.builds(
        Nack,
        seq=st.integers(1, MAX_SEQ),
        code=st.sampled_from(["unavailable", "rate_limited"]),
        retry_after_ms=st.integers(0, 60_000),
    ),
    st.builds(Error, code=st.text(max_size=16), detail=st.text(max_size=64)),
)


@BOTH
@FUZZ
@given(msg=client_messages)
def test_client_messages_round_trip(codec: Codec, msg: ClientMessage) -> None:
    """Every client message the schema allows encodes and decodes back to itself."""
    assert codec.decode(codec.encode_client(msg)) == msg


@BOTH
@FUZZ
@given(msg=server_messages)
def test_server_messages_round_trip(codec: Codec, msg: Any) -> None:
    """Every server message encodes and decodes back to itself."""
    assert codec.decode_server(codec.encode(msg)) == msg


@FUZZ
@given(
    event=st.builds(
        WireEvent,
        seq=st.integers(1, MAX_SEQ),
        action=good_actions | st.text(max_size=40),
        label=st.none() | st.text(max_size=256),
        time=st.none() | st.integers(-MAX_TIME, MAX_TIME),
        params=st.none() | st.dictionaries(msgpack_keys, msgpack_values, max_size=4),
    ),
    who=identities,
    verdict=verdicts,
)
def test_judge_any_event(event: WireEvent, who: Identity, verdict: Verdict | None) -> None:
    """Any event, even with params JSON cannot hold, is stored or rejected; its text is JSON."""
    assert msgspec.json.decode(event_text(event))["seq"] == event.seq
    result = judge_event(event, who, NOW, LIMITS, verdict)
    if isinstance(result, Rejected):
        assert result.code in REJECT_CODES
    else:
        check_stored(result, event, who, verdict)


def reference_judge(
    event: WireEvent, who: Identity, received: int, limits: Limits, verdict: Verdict | None
) -> bytes | Rejected:
    """judge_event as it was written before FrameJudge: the whole StoredEvent encoded at once."""
    from eventwire.core import validation as v

    action = event.action
    problem = action_problem(action)
    if problem is not None:
        return Rejected(v.INVALID_ACTION, problem)
    required: tuple[str, ...] = ()
    if verdict is not None:
        if verdict.denied or (verdict.needs_auth and not who.authenticated):
            return v.site_refusal(action, verdict)
        required = verdict.required
    params = event.params if event.params is not None else {}
    if required or action in v.BUILTIN_REQUIRED:
        problem = v.missing_params(action, params, required)
        if problem is not None:
            return Rejected(v.MISSING_PARAM, problem)
    if action == "page.visit" and who.hosts is not None:
        referrer = params.get("referrer")
        params["source"] = v.source_json(
            params["url"], referrer if type(referrer) is str else "", who.hosts
        )
    time = event.time
    original_time = None
    if time is None:
        time = received
    elif time > received + limits.max_clock_skew_ms:
        original_time, time = time, received
    elif time < received - limits.max_event_age_ms:
        return v.too_old(time, limits)
    stored = StoredEvent(
        site=who.site,
        uuid=who.uuid,
        session=who.session,
        producer=who.producer,
        seq=event.seq,
        action=action,
        label=event.label if event.label is not None else v.default_label(action, params),
        time=time,
        received=received,
        params=params,
        original_time=original_time,
        authenticated=who.authenticated,
        bot=who.bot,
    )
    return v.encode_stored(stored, limits.max_event_bytes)


@FUZZ
@given(
    events=st.lists(
        st.builds(
            WireEvent,
            seq=st.integers(1, MAX_SEQ),
            action=st.sampled_from(["page.visit", "product.view", "a.b", "ab"]) | good_actions,
            label=st.none() | st.text(max_size=256),
            time=st.none() | times | st.integers(-MAX_TIME, MAX_TIME),
            params=st.none()
            | st.dictionaries(msgpack_keys, msgpack_values, max_size=4)
            | st.fixed_dictionaries(
                {"url": st.text(max_size=40)},
                optional={"referrer": st.text(max_size=40) | st.integers(), "pad": st.text()},
            ),
        ),
        min_size=1,
        max_size=8,
    ),
    who=identities,
    bot=st.booleans(),
    hosts=st.none() | st.just(frozenset({"shop.example.com"})),
    verdict=verdicts,
)
def test_frame_judge_is_the_whole_record(
    events: list[WireEvent],
    who: Identity,
    bot: bool,
    hosts: frozenset[str] | None,
    verdict: Verdict | None,
) -> None:
    """One judge for a frame's events answers each as the whole-record judge did, byte for byte."""
    who = msgspec.structs.replace(who, bot=bot, hosts=hosts)
    limits = msgspec.structs.replace(LIMITS, max_event_bytes=400)  # some events too large
    judge = FrameJudge(who, NOW, limits, verdict)
    for event in events:
        expected = reference_judge(copy.deepcopy(event), who, NOW, limits, verdict)
        assert judge(copy.deepcopy(event)) == expected


@FUZZ
@given(data=st.binary(max_size=256))
def test_msgpack_raw_text(data: bytes) -> None:
    """Any raw MessagePack value renders as text for the rejected stream (JSON, else hex)."""
    text = MSGPACK_CODEC.to_json_text(data)
    if text != data.hex():
        msgspec.json.decode(text)


# ---- hostile shapes the strategies rarely reach ------------------------------------


def nested(depth: int, leaf: bytes, codec: Codec) -> bytes:
    """A value nested ``depth`` arrays deep."""
    if codec.binary:
        return b"\x91" * depth + leaf
    return b"[" * depth + leaf + b"]" * depth


@BOTH
@pytest.mark.parametrize("where", ["params", "unknown_field", "context"])
def test_deep_nesting_is_undecodable(codec: Codec, where: str) -> None:
    """Nesting deeper than the decoder recurses is UndecodableFrame, not a RecursionError."""
    deep = nested(5000, encode_with(codec, 1), codec)
    head = {
        "params": {"type": "track", "events": [{"seq": 1, "action": "a.b", "params": {"x": 0}}]},
        "unknown_field": {"type": "track", "events": [{"seq": 1, "action": "a.b"}], "x": 0},
        "context": {"type": "hello", "uuid": "u", "producer": "p-12345678", "context": {"x": 0}},
    }[where]
    # Encode with a 0 placeholder, then put the deep value in its place.
    frame = encode_with(codec, head)
    zero = encode_with(codec, 0)
    at = frame.rindex(zero)
    frame = frame[:at] + deep + frame[at + len(zero) :]
    out = decode_after_hello(codec, frame)
    assert isinstance(out, UndecodableFrame)
    assert "nested deeper" in out.detail
    if codec.binary:
        assert MSGPACK_CODEC.to_json_text(deep) == deep.hex()


def test_deep_params_are_rejected_not_raised() -> None:
    """Params nested past the encoder's recursion: rejected invalid, shown as a short repr."""
    value: Any = 0
    for _ in range(5000):
        value = [value]
    event = WireEvent(seq=1, action="a.b", params={"x": value})
    who = Identity(site="app", uuid="u", session="s", producer="p-1234567")
    result = judge_event(event, who, NOW, LIMITS)
    assert isinstance(result, Rejected)
    assert result.code == "invalid"
    assert "[[[[" in msgspec.json.decode(event_text(event))["params"]["repr"]


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"track","events":[{"seq":1,"action":"a.b","label":"\xff"}]}',
        b'{"type":"track","events":[{"seq":1,"action":"a.b","label":5},{"seq":2,"label":"\xc3"}]}',
        b'{"type":"hello","uuid":"u","producer":"p-12345678","client":"\xed\xa0\x80"}',
    ],
    ids=["label", "split", "surrogate"],
)
def test_invalid_utf8_json_is_undecodable(frame: bytes) -> None:
    """A JSON frame with bad UTF-8 inside a string is UndecodableFrame, not a UnicodeDecodeError."""
    out = decode_after_hello(JSON_CODEC, frame)
    assert isinstance(out, UndecodableFrame)
    assert "UTF-8" in out.detail


def test_invalid_utf8_msgpack_is_undecodable() -> None:
    """A MessagePack string holding bad UTF-8 is UndecodableFrame."""
    frame = msgspec.msgpack.encode({"type": "hello", "uuid": "u", "producer": "p-12345678"})
    frame = frame.replace(b"\xa1u", b"\xa1\xff")
    with pytest.raises(UndecodableFrame, match="UTF-8"):
        MSGPACK_CODEC.decode(frame)


@pytest.mark.parametrize(
    "context",
    [{"x": msgspec.msgpack.Ext(1, b"")}, {"x": {(1, 2): 3}}, {"x": {None: 1}}],
    ids=["ext", "array_key", "nil_key"],
)
def test_hello_context_must_have_a_json_form(context: dict[str, Any]) -> None:
    """A MessagePack hello whose context JSON cannot hold is a schema error at $.context."""
    frame = msgspec.msgpack.encode(
        {"type": "hello", "uuid": "u", "producer": "p-12345678", "context": context}
    )
    with pytest.raises(msgspec.ValidationError, match=r"\$\.context"):
        MSGPACK_CODEC.decode(frame)


@BOTH
@pytest.mark.parametrize(
    ("uuid", "producer"),
    [
        ("u-1\n", "p-12345678"),
        ("u-1\r\n", "p-12345678"),
        ("u 1", "p-12345678"),
        ("", "p-12345678"),
        ("u" * 65, "p-12345678"),
        ("u-1", "p-12345678\n"),
        ("u-1", "p-1234 5678"),
        ("u-1", "p-12345"),
    ],
)
def test_ids_are_exactly_the_protocol_form(codec: Codec, uuid: str, producer: str) -> None:
    """A uuid or producer outside its form (a trailing newline too) is a schema error."""
    hello = {"type": "hello", "uuid": uuid, "producer": producer}
    with pytest.raises(msgspec.ValidationError):
        codec.decode(encode_with(codec, hello))
    if not UUID_RE.fullmatch(uuid):
        with pytest.raises(msgspec.ValidationError):
            codec.decode(encode_with(codec, {"type": "identify", "uuid": uuid}))


@pytest.mark.parametrize(
    ("codec", "time"),
    [
        *((c, t) for c in CODECS for t in (MAX_TIME + 1, -MAX_TIME - 1, 2**63, 2**64 - 1)),
        (JSON_CODEC, 10**30),  # MessagePack integers stop at 64 bits
    ],
    ids=lambda v: v.name.rsplit(".", 1)[1] if isinstance(v, Codec) else str(v),
)
def test_time_beyond_bigint_is_rejected_invalid(codec: Codec, time: int) -> None:
    """A time no reader can hold is rejected invalid at its path, never stored."""
    obj = {"type": "track", "events": [{"seq": 3, "action": "a.b", "time": time}]}
    frame = encode_with(codec, obj)
    with pytest.raises(msgspec.ValidationError):
        codec.decode(frame)
    parts = codec.split_track(frame)
    assert isinstance(parts, list)
    (part,) = parts
    assert isinstance(part, tuple)
    seq, detail, _raw = part
    assert seq == 3
    assert "$.events[0].time" in detail


def test_verdict_asked_only_for_well_formed_actions() -> None:
    """A site's verdict lookup is not asked about a malformed action (it caches per name)."""
    asked: list[str] = []

    def lookup(action: str) -> Verdict:
        asked.append(action)
        return Verdict(denied=False, needs_auth=False, required=())

    who = Identity(site="app", uuid="u", session="s", producer="p-1234567")
    bad = judge_event(WireEvent(seq=1, action="x" * 100_000), who, NOW, LIMITS, lookup)
    assert isinstance(bad, Rejected)
    assert bad.code == "invalid_action"
    good = judge_event(WireEvent(seq=2, action="a.b"), who, NOW, LIMITS, lookup)
    assert isinstance(good, bytes)
    assert asked == ["a.b"]


# ---- the fuzzer entry point -----------------------------------------------------------


def test_fuzz_script_runs_clean() -> None:
    """scripts/fuzz.py runs random and mutated frames through both codecs and finds nothing."""
    out = subprocess.run(
        [sys.executable, "scripts/fuzz.py", "-n", "3000", "--seed", "7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "findings: 0" in out.stdout
    assert "frames: 3000" in out.stdout
