"""Wire messages of docs/protocol.md (v1 and its extensions), and their codecs.

This module owns the schema: every message is a msgspec ``Struct``, client
messages form a tagged union on ``type``, and each subprotocol has one
:class:`Codec` built once at import time. Nothing here does I/O or applies a
rule beyond types and bounds; ``validation`` and ``ingest`` do that.

Unknown fields are ignored on purpose: a newer client may send more than v1
says, and a v1 server must not refuse it.

Every frame a client can send gets one of three outcomes from a codec, never
another exception: a message, a :class:`msgspec.ValidationError` naming the
JSON path of what does not match the schema, or
:class:`~eventwire.core.errors.UndecodableFrame` (not a message at all: bad syntax,
bad UTF-8, nesting deeper than the decoder recurses). ``tests/test_fuzz.py``
and ``scripts/fuzz`` hold it to that.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

from eventwire.core.errors import UndecodableFrame

JSON_SUBPROTOCOL: Final = "eventwire.v1.json"
MSGPACK_SUBPROTOCOL: Final = "eventwire.v1.msgpack"
SUBPROTOCOLS: Final = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)

#: Seqs travel through Lua, whose numbers are doubles: stay exact below 2**53.
MAX_SEQ: Final = 2**53 - 1
#: Event times (ms since the epoch) stay exact as doubles and in a SQL BIGINT,
#: like seqs: +-285,000 years. A larger time is refused ``invalid`` at its path
#: rather than stored as a number that readers (the persist worker) cannot hold.
MAX_TIME: Final = 2**53 - 1

# Patterns end in \Z, not $: msgspec searches them, and $ also matches before a
# trailing newline, which would let "u-1\n" through.
Uuid = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+\Z")]
#: Printable ASCII without spaces: it becomes part of a Redis key.
Producer = Annotated[str, Meta(min_length=8, max_length=64, pattern=r"^[!-~]+\Z")]
Seq = Annotated[int, Meta(ge=1, le=MAX_SEQ)]
Token = Annotated[str, Meta(max_length=8192)]
Time = Annotated[int, Meta(ge=-MAX_TIME, le=MAX_TIME)]


# ---- client -> server -------------------------------------------------------


class Hello(Struct, tag="hello", tag_field="type", kw_only=True):
    """First message of a connection: who the customer and the producer are."""

    uuid: Uuid
    producer: Producer
    token: Token | None = None
    client: Annotated[str, Meta(max_length=128)] | None = None
    context: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # The context is copied into the session.start event, which is JSON
        # (docs/protocol.md section 7). MessagePack can carry what JSON cannot
        # (extension types, array or nil map keys): such a hello is not a
        # message of the protocol, and msgspec turns this ValueError into a
        # ValidationError, so the client hears ``bad_hello``. Cost: one
        # encode of the context per hello, which session.start does anyway.
        if self.context is not None:
            problem = json_problem(self.context)
            if problem is not None:
                raise ValueError(f"context {problem} - at `$.context`")


class WireEvent(Struct, kw_only=True):
    """One event as a client sends it; ``validation`` turns it into a :class:`StoredEvent`.

    ``action`` is only typed here: its form is a per-event rule answered with
    ``invalid_action``, not a frame-level decode error.
    """

    seq: Seq
    action: str
    label: Annotated[str, Meta(max_length=256)] | None = None
    time: Time | None = None
    params: dict[str, Any] | None = None


class Track(Struct, tag="track", tag_field="type", kw_only=True):
    """A batch of events; answered by exactly one ack or nack."""

    events: list[WireEvent]


class Identify(Struct, tag="identify", tag_field="type", kw_only=True):
    """Switch the connection to another customer."""

    uuid: Uuid
    token: Token | None = None
    #: [ext] False: never merge the uuid left into this one (a log-out, the
    #: tracker's reset()); docs/protocol.md section 17.
    merge: bool = True


ClientMessage = Hello | Track | Identify


class _LooseTrack(Struct, tag="track", tag_field="type"):
    """A track frame whose events are kept raw, to judge them one by one."""

    events: list[msgspec.Raw]


class _SeqOnly(Struct):
    seq: Seq


# ---- server -> client -------------------------------------------------------


class Welcome(Struct, tag="welcome", tag_field="type", kw_only=True):
    """Answer to hello."""

    session: str
    resumed: bool
    acked: int
    server_time: int
    max_batch: int


class Rejection(Struct, kw_only=True):
    """One rejected event inside an ack; final, the client must not resend it."""

    seq: int
    code: str
    detail: str


class Ack(Struct, tag="ack", tag_field="type", kw_only=True):
    """Answer to a track frame, sent after its accepted events are in Redis."""

    seq: int
    accepted: int
    duplicate: int
    rejected: list[Rejection] = []


NackCode = Literal["unavailable", "rate_limited"]


class Nack(Struct, tag="nack", tag_field="type", kw_only=True):
    """Nothing of the frame was stored; resend it after ``retry_after_ms``."""

    seq: int
    code: NackCode
    retry_after_ms: int


class Error(Struct, tag="error", tag_field="type", kw_only=True):
    """Sent just before the server closes the connection."""

    code: str
    detail: str


ServerMessage = Welcome | Ack | Nack | Error


# ---- codecs -----------------------------------------------------------------

#: msgspec recurses once per level of nesting, inside Python's recursion limit
#: (``sys.getrecursionlimit()``, 1000 by default, shared with the caller's
#: stack): a frame nested deeper raises RecursionError, which is the frame's
#: fault, not the server's. Each level costs one C stack frame while decoding.
_TOO_DEEP: Final = f"nested deeper than about {sys.getrecursionlimit()} levels"
#: Tries a value's JSON form: records are JSON whatever the subprotocol.
_JSON_FORM: Final = msgspec.json.Encoder()


def json_problem(value: Any) -> str | None:
    """Say why a decoded value has no JSON form, or None when it has one.

    MessagePack values may hold extension types or map keys that are arrays or
    nil; docs/protocol.md stores every message part as JSON.
    """
    try:
        _JSON_FORM.encode(value)
    except RecursionError:
        return f"is {_TOO_DEEP}"
    except (TypeError, ValueError) as exc:
        return f"has no JSON form: {exc}"
    return None


def _undecodable(exc: BaseException) -> UndecodableFrame:
    """The UndecodableFrame for an error a decoder raised on a bad frame."""
    if isinstance(exc, RecursionError):
        return UndecodableFrame(f"the frame is {_TOO_DEEP}")
    if isinstance(exc, UnicodeDecodeError):
        return UndecodableFrame(f"invalid UTF-8 in a string: {exc.reason} at byte {exc.start}")
    return UndecodableFrame(str(exc))


class Codec:
    """Encoder and decoders of one subprotocol, built once.

    Args:
        name: the subprotocol name.
        binary: whether messages travel in binary frames.
    """

    def __init__(self, name: str, binary: bool) -> None:
        self.name = name
        self.binary = binary
        mod: Any = msgspec.msgpack if binary else msgspec.json
        self._mod = mod
        self._client = mod.Decoder(ClientMessage)
        self._loose = mod.Decoder(_LooseTrack | Hello | Identify)
        self._event = mod.Decoder(WireEvent)
        self._seq = mod.Decoder(_SeqOnly)
        self._any = mod.Decoder()
        self._server = mod.Decoder(ServerMessage)
        self._encoder = mod.Encoder()

    def decode(self, data: bytes | str) -> ClientMessage:
        """Decode one client frame, strictly typed.

        Raises:
            msgspec.ValidationError: the frame is well-formed but some part
                does not match the schema; :meth:`split_track` can judge a
                track frame's events one by one.
            UndecodableFrame: the frame is not a message at all.
        """
        try:
            msg: ClientMessage = self._client.decode(data)
        except msgspec.ValidationError:
            raise
        # UnicodeError: bad UTF-8 inside a string (msgspec raises it as it is),
        # or a str argument holding lone surrogates.
        except (msgspec.DecodeError, UnicodeError, RecursionError) as exc:
            raise _undecodable(exc) from None
        return msg

    def split_track(
        self, data: bytes | str
    ) -> list[WireEvent | tuple[int, str, bytes]] | ClientMessage:
        """Decode a frame that failed strict decoding, event by event.

        Returns:
            For a track frame, one entry per event: the decoded event, or
            ``(seq, detail, raw)`` for an event that does not match the
            schema. Any other message is returned decoded.

        Raises:
            UndecodableFrame: the frame, or the seq of one of its events, does
                not decode; no event of it can be answered by seq.
        """
        try:
            loose: _LooseTrack | Hello | Identify = self._loose.decode(data)
        except (msgspec.DecodeError, UnicodeError, RecursionError) as exc:
            raise _undecodable(exc) from None
        if not isinstance(loose, _LooseTrack):
            return loose
        out: list[WireEvent | tuple[int, str, bytes]] = []
        for i, raw in enumerate(loose.events):
            try:
                out.append(self._event.decode(raw))
            except msgspec.ValidationError as exc:
                try:
                    seq = self._seq.decode(raw).seq
                except (msgspec.DecodeError, UnicodeError, RecursionError):
                    raise UndecodableFrame(f"{exc} - in `$.events[{i}]`") from None
                detail = str(exc)
                # msgspec names no path for an error at the root of what it
                # decodes (a missing field): the event's own path is that root.
                if "`$" in detail:
                    detail = detail.replace("`$", f"`$.events[{i}]", 1)
                else:
                    detail = f"{detail} - at `$.events[{i}]`"
                out.append((seq, detail, bytes(raw)))
            # msgspec.Raw skips a value without checking its strings' UTF-8.
            except (msgspec.DecodeError, UnicodeError, RecursionError) as exc:
                raise _undecodable(exc) from None
        return out

    def to_json_text(self, raw: bytes) -> str:
        """Render one raw encoded value as JSON text, for the rejected stream."""
        if not self.binary:
            return raw.decode("utf-8", "replace")
        try:
            return msgspec.json.encode(self._any.decode(raw), enc_hook=repr).decode()
        except (TypeError, ValueError, RecursionError):  # DecodeError is a ValueError
            return raw.hex()

    def encode(self, msg: ServerMessage) -> bytes:
        """Encode one server message (UTF-8 JSON, or MessagePack)."""
        out: bytes = self._encoder.encode(msg)
        return out

    def encode_client(self, msg: ClientMessage) -> bytes:
        """Encode one client message (used by the Python client)."""
        out: bytes = self._encoder.encode(msg)
        return out

    def decode_server(self, data: bytes | str) -> ServerMessage:
        """Decode one server message (used by the Python client).

        Raises:
            msgspec.DecodeError: the frame is not a server message.
        """
        msg: ServerMessage = self._server.decode(data)
        return msg


JSON_CODEC: Final = Codec(JSON_SUBPROTOCOL, binary=False)
MSGPACK_CODEC: Final = Codec(MSGPACK_SUBPROTOCOL, binary=True)
CODECS: Final = {JSON_SUBPROTOCOL: JSON_CODEC, MSGPACK_SUBPROTOCOL: MSGPACK_CODEC}
