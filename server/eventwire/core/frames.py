"""One track frame judged: the items of the publish step and the rejected stream's records.

:func:`judge_events` turns the events of one ``track`` frame into the flat
``[seq, kind, payload, ...]`` items that the publish step of ``store.lua``
takes, and the rejections its ack carries (docs/protocol.md sections 3 and 7). The
item kinds are defined here, where items are made; the store reads them.

A frame whose session ended before it was stored is sent again for the new
session: :func:`encode_for_session` builds its events' records again from
their schema (:class:`~eventwire.core.records.StoredEvent`), never by editing
stored JSON as text.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Final

import msgspec

from eventwire.core.protocol import Codec, Rejection, WireEvent
from eventwire.core.records import RejectedRecord, StoredEvent, event_text, record_encoder
from eventwire.core.rules import Verdict
from eventwire.core.validation import (
    DENIED,
    INVALID,
    UNAUTHORIZED,
    FrameJudge,
    Identity,
    Limits,
    Rejected,
)

#: Kinds of item in one frame, as the Lua step reads them.
EVENT: Final = b"e"  # stored in the events stream once (seq above the stored seq)
REJECT: Final = b"r"  # recorded in the rejected stream once
REJECT_ALWAYS: Final = b"R"  # out-of-order seq: recorded, does not move the stored seq
COUNT_ONLY: Final = b"n"  # denied: moves the stored seq, stored nowhere

#: ``raw`` in the rejected stream is cut to this many characters (docs/protocol.md section 7).
RAW_LIMIT: Final = 4096
#: Bytes of an undecodable binary frame kept, before base64 (4 KiB of text once encoded).
RAW_BINARY_LIMIT: Final = 3072

#: One event of a frame: decoded, or ``(seq, detail, raw)`` when it did not match the schema.
FrameEvent = WireEvent | tuple[int, str, bytes]

_stored_decoder: Final = msgspec.json.Decoder(StoredEvent)


def judge_events(
    events: list[WireEvent] | list[FrameEvent],
    who: Identity,
    received: int,
    limits: Limits,
    verdict: Callable[[str], Verdict],
    codec: Codec,
    token_problem: str | None,
) -> tuple[list[Any], list[Rejection], int]:
    """Judge every event of one frame, in order.

    Args:
        events: the frame's events (:meth:`Codec.split_track` entries included).
        who: the sender as of the frame's receipt.
        received: the frame's receive time, ms since the epoch.
        limits: size and time limits.
        verdict: the site's lookup of what it says of an action.
        codec: the connection's codec, to render raw events for the rejected stream.
        token_problem: why the customer is not authenticated (added to the
            detail of ``unauthorized``), or None when a token proves them.

    Returns:
        The items for the publish step, the rejections for the ack, and how
        many of those are ``denied`` (counted, stored nowhere).
    """
    items: list[Any] = []
    rejections: list[Rejection] = []
    denied = 0
    top = 0
    # The bound method: CPython calls it inline, where an instance's __call__
    # goes through its type's slot and a C frame each time.
    judge = FrameJudge(who, received, limits, verdict).__call__
    for event in events:
        if isinstance(event, WireEvent):
            seq = event.seq
            outcome: bytes | Rejected = (
                # The verdict is looked up only for a well-formed action: a
                # frame of long junk actions must not fill the verdict cache.
                judge(event)
                if seq > top
                else Rejected(INVALID, f"seq {seq} is not above the seq before it ({top})")
            )
        else:
            seq, detail, raw = event
            outcome = Rejected(INVALID, detail)
        if isinstance(outcome, bytes):
            items += (seq, EVENT, outcome)
            top = seq
            continue
        detail = outcome.detail
        if outcome.code == UNAUTHORIZED and token_problem is not None:
            detail = f"{detail}; {token_problem}"
        rejections.append(Rejection(seq=seq, code=outcome.code, detail=detail))
        if outcome.code == DENIED:
            # A deny list exists to keep that data out: counted, stored nowhere.
            denied += 1
            items += (seq, COUNT_ONLY, b"")
            top = max(top, seq)
            continue
        raw_text = event_text(event) if isinstance(event, WireEvent) else codec.to_json_text(raw)
        record = rejected_record(who, seq, outcome.code, detail, received, raw_text)
        if seq > top:
            items += (seq, REJECT, record)
            top = seq
        else:
            items += (seq, REJECT_ALWAYS, record)
    return items, rejections, denied


def deny_all(
    events: list[WireEvent] | list[FrameEvent], detail: str
) -> tuple[list[Any], list[Rejection]]:
    """Every event of a frame ``denied`` with one detail: counted, stored nowhere.

    A bot on a site with ``bots = "drop"``: its seqs still move the
    producer's stored seq, so a resend is a duplicate as ever.
    """
    items: list[Any] = []
    rejections: list[Rejection] = []
    for event in events:
        seq = event.seq if isinstance(event, WireEvent) else event[0]
        items += (seq, COUNT_ONLY, b"")
        rejections.append(Rejection(seq=seq, code=DENIED, detail=detail))
    return items, rejections


def rejected_record(
    who: Identity, seq: int, code: str, detail: str, received: int, raw_text: str
) -> bytes:
    """The rejected-stream record of one event (``raw`` cut to :data:`RAW_LIMIT`)."""
    return record_encoder.encode(
        RejectedRecord(
            site=who.site,
            uuid=who.uuid,
            producer=who.producer,
            seq=seq,
            code=code,
            detail=detail,
            received=received,
            raw=raw_text[:RAW_LIMIT],
        )
    )


def undecodable_record(
    site: str, who: Identity | None, detail: str, data: bytes | str, received: int
) -> bytes:
    """The rejected-stream record of a frame that could not be decoded.

    Text is kept as it is (cut to :data:`RAW_LIMIT`); bytes that are not
    UTF-8 are kept as base64 of their first :data:`RAW_BINARY_LIMIT` bytes.
    """
    if isinstance(data, str):
        raw, b64 = data[:RAW_LIMIT], False
    else:
        try:
            raw, b64 = data.decode("utf-8")[:RAW_LIMIT], False
        except UnicodeDecodeError:
            raw, b64 = base64.b64encode(data[:RAW_BINARY_LIMIT]).decode(), True
    return record_encoder.encode(
        RejectedRecord(
            site=site,
            uuid=who.uuid if who else None,
            producer=who.producer if who else None,
            seq=None,
            code="undecodable",
            detail=detail,
            received=received,
            raw=raw,
            raw_base64=b64,
        )
    )


def encode_for_session(items: list[Any], session: str) -> None:
    """Build the stored events among ``items`` again for another session, in place.

    Each event's record is decoded into its schema, given the new session and
    encoded again: the same JSON :func:`~eventwire.core.validation.judge_event`
    makes for that session (msgspec writes what it read back unchanged).
    Rejections and denied events name no session and stay as they are. Costs
    one decode and one encode per event; only frames caught by the end of
    their session take this path.
    """
    for i in range(1, len(items), 3):
        if items[i] == EVENT:
            stored = _stored_decoder.decode(items[i + 1])
            stored.session = session
            items[i + 1] = record_encoder.encode(stored)
