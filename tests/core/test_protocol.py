"""eventwire/core/protocol.py: messages and codecs of both subprotocols."""

from __future__ import annotations

import msgspec
import pytest

from eventwire.core.errors import UndecodableFrame
from eventwire.core.protocol import (
    CODECS,
    JSON_CODEC,
    MAX_SEQ,
    MSGPACK_CODEC,
    Ack,
    Codec,
    Hello,
    Identify,
    Rejection,
    Track,
    Welcome,
    WireEvent,
)

BOTH = pytest.mark.parametrize("codec", [JSON_CODEC, MSGPACK_CODEC], ids=["json", "msgpack"])


def encode(codec: Codec, obj: object) -> bytes:
    return msgspec.msgpack.encode(obj) if codec.binary else msgspec.json.encode(obj)


@BOTH
def test_client_messages_decode(codec: Codec) -> None:
    """hello, track and identify decode to their Structs; unknown fields are ignored."""
    hello = codec.decode(
        encode(codec, {"type": "hello", "uuid": "u-1", "producer": "p-12345678", "new": 1})
    )
    assert hello == Hello(uuid="u-1", producer="p-12345678")
    track = codec.decode(
        encode(codec, {"type": "track", "events": [{"seq": 3, "action": "a.b", "params": {}}]})
    )
    assert track == Track(events=[WireEvent(seq=3, action="a.b", params={})])
    ident = codec.decode(encode(codec, {"type": "identify", "uuid": "c-42", "token": "t"}))
    assert ident == Identify(uuid="c-42", token="t")


@BOTH
def test_server_messages_round_trip(codec: Codec) -> None:
    """Server messages encode with their type tag and decode back."""
    ack = Ack(seq=9, accepted=1, duplicate=0, rejected=[Rejection(seq=8, code="x", detail="y")])
    welcome = Welcome(session="s", resumed=False, acked=4, server_time=1, max_batch=500)
    for msg in (ack, welcome):
        assert codec.decode_server(codec.encode(msg)) == msg
    assert b'"type":"ack"' in JSON_CODEC.encode(ack)


@pytest.mark.parametrize(
    "frame",
    [b"{", b"[]", b'{"type": "nope"}', b'{"no": "type"}', b"\xff\xfe", b""],
)
def test_undecodable_json(frame: bytes) -> None:
    """Frames that are not a client message raise UndecodableFrame (or a schema error)."""
    with pytest.raises((UndecodableFrame, msgspec.ValidationError)):
        JSON_CODEC.decode(frame)


def test_split_track_judges_events_one_by_one() -> None:
    """A frame with one bad event keeps the good ones and names the bad one's path."""
    frame = msgspec.json.encode(
        {
            "type": "track",
            "events": [
                {"seq": 1, "action": "a.b"},
                {"seq": 2, "action": "a.b", "label": 5},
                {"seq": 3, "action": "a.b", "params": [1]},
            ],
        }
    )
    with pytest.raises(msgspec.ValidationError):
        JSON_CODEC.decode(frame)
    parts = JSON_CODEC.split_track(frame)
    assert isinstance(parts, list)
    assert parts[0] == WireEvent(seq=1, action="a.b")
    assert isinstance(parts[1], tuple)
    assert parts[1][0] == 2
    assert "$.events[1].label" in parts[1][1]
    assert isinstance(parts[2], tuple)
    assert "$.events[2].params" in parts[2][1]


@pytest.mark.parametrize("seq", [0, -1, MAX_SEQ + 1, "7", None])
def test_event_without_usable_seq_makes_frame_undecodable(seq: object) -> None:
    """An event whose seq cannot be read cannot be answered: the frame is undecodable."""
    frame = msgspec.json.encode({"type": "track", "events": [{"seq": seq, "action": "a.b"}]})
    with pytest.raises(UndecodableFrame):
        JSON_CODEC.split_track(frame)


def test_codecs_by_subprotocol() -> None:
    """Both subprotocol names map to their codec."""
    assert CODECS["eventwire.v1.json"] is JSON_CODEC
    assert CODECS["eventwire.v1.msgpack"] is MSGPACK_CODEC
    assert MSGPACK_CODEC.to_json_text(msgspec.msgpack.encode({"a": 1})) == '{"a":1}'
