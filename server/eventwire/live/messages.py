"""The live relay's messages: their Structs, and stream entries encoded as relay frames.

Each message is a JSON text frame with a ``type`` (the wire is drawn in
:mod:`eventwire.live`). ``omit_defaults``: the fields partitions add (``partitions``, ``p``)
are left out at their defaults, so a site of one partition keeps the wire it
had.

An :class:`Entry` is one stream entry decoded once for the filters and
encoded once as its frame, which the relay hands to every viewer as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

from eventwire.store import StreamEntry, stream_id

StreamName = Literal["events", "rejected"]
STREAMS: Final = ("events", "rejected")


class Hello(Struct, tag="hello", tag_field="type", kw_only=True, omit_defaults=True):
    """First message: where the viewer starts (a cursor), and Redis' clock."""

    site: str
    stream: str
    id: str
    now: int
    queue: int
    partitions: int = 1


class Event(Struct, tag="event", tag_field="type", kw_only=True, omit_defaults=True):
    """One entry of a site's events stream (of partition ``p``)."""

    id: str
    event: msgspec.Raw
    p: int | None = None


class Rejected(Struct, tag="rejected", tag_field="type", kw_only=True, omit_defaults=True):
    """One entry of a site's rejected stream (of partition ``p``)."""

    id: str
    event: msgspec.Raw
    p: int | None = None


class Trimmed(Struct, tag="trimmed", tag_field="type", kw_only=True, omit_defaults=True):
    """The stream (of partition ``p``) no longer holds ``from``; up to ``first`` is gone."""

    from_: str = msgspec.field(name="from")
    first: str | None
    id: str
    p: int | None = None


class Ready(Struct, tag="ready", tag_field="type", kw_only=True):
    """The backlog is sent; live events follow. ``id`` is the viewer's cursor."""

    id: str


class Lagged(Struct, tag="lagged", tag_field="type", kw_only=True, omit_defaults=True):
    """``missed`` matching events (of partition ``p``), ``first`` to ``id``, were dropped."""

    missed: int
    first: str
    id: str
    p: int | None = None


class Second(Struct, kw_only=True, omit_defaults=True):
    """The exact counts of one second of stream id time ``t`` (s since the epoch)."""

    t: int
    accepted: int = 0
    rejected: dict[str, int] = {}
    started: int = 0
    ended: int = 0
    #: Of ``accepted``: entries stored with ``"bot": true`` (docs/protocol.md section 18).
    bots: int = 0


class Count(Struct, array_like=True):
    """One row of a top table: the key, its count, and how much the count may exceed the truth."""

    key: str
    count: int
    error: int


class Top(Struct, kw_only=True):
    """A top table: the exact number of entries counted, and its leading rows."""

    total: int
    rows: list[Count]


class Snapshot(Struct, tag="snapshot", tag_field="type", kw_only=True, omit_defaults=True):
    """[ext] A summary viewer's first load: the window's exact counts and the top tables.

    ``id`` is the events stream's position counted up to (a cursor), ``now``
    Redis' clock (ms), ``window`` the seconds covered, ``since`` the first
    stream id time (ms) counted, ``feed_every`` the feed's current sampling;
    ``backfilling``: the window's past is still being counted (ticks bring
    its seconds as they are counted).
    """

    id: str
    now: int
    window: int
    since: int
    seconds: list[Second]
    top: dict[str, Top]
    feed_every: int
    backfilling: bool = False


class Tick(Struct, tag="tick", tag_field="type", kw_only=True, omit_defaults=True):
    """[ext] Once a second: the whole counts of each second that changed, and the top tables."""

    id: str
    now: int
    seconds: list[Second]
    top: dict[str, Top]
    feed_every: int
    backfilling: bool = False


LiveMessage = Hello | Event | Rejected | Trimmed | Ready | Lagged | Snapshot | Tick

_encoder: Final = msgspec.json.Encoder()


def encode(message: LiveMessage) -> bytes:
    """A message as the JSON of its text frame."""
    return _encoder.encode(message)


def trimmed(at: str, first: str | None, part: int | None) -> bytes:
    """The ``trimmed`` frame of a position ``at`` the stream no longer holds.

    Args:
        at: the position (the id last read).
        first: the oldest entry left (None: the stream is empty).
        part: the partition of a partitioned site; None for one partition.
    """
    return _encoder.encode(Trimmed(from_=at, first=first, id=at, p=part))


class Visitor(Struct, frozen=True, gc=False):
    """What the "where from" tables count of one session.start (None: not told)."""

    medium: str | None = None
    source: str | None = None
    country: str | None = None
    device: str | None = None
    browser: str | None = None
    bot: bool = False


class _Source(Struct):
    medium: Any = None
    name: Any = None


class _Client(Struct):
    country: Any = None
    device: Any = None
    browser: Any = None
    bot: Any = False


class _StartParams(Struct):
    """The params of a session.start the rollups look at (any JSON: checked where used)."""

    client: _Client | None = None
    source: _Source | None = None


_start_decoder: Final = msgspec.json.Decoder(_StartParams)


def _text(value: Any) -> str | None:
    return value[:100] if isinstance(value, str) and value else None


def _visitor(head: _Head) -> Visitor | None:
    """A session.start's visitor, when its params carry a ``client`` or a ``source``."""
    if head.action != "session.start" or not head.params:
        return None
    try:
        params = _start_decoder.decode(head.params)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    client, source = params.client, params.source
    if client is None and source is None:
        return None
    return Visitor(
        medium=_text(source.medium) if source else None,
        source=_text(source.name) if source else None,
        country=_text(client.country) if client else None,
        device=_text(client.device) if client else None,
        browser=_text(client.browser) if client else None,
        bot=client is not None and client.bot is True,
    )


class _Params(Struct):
    """The one param the rollups look at: a page's ``url`` (any JSON: checked where used)."""

    url: Any = None


class _Head(Struct):
    """The fields of a stored record the filters and rollups look at; the rest is passed on."""

    action: str = ""
    uuid: str | None = None
    #: Any JSON, so a foreign record of another shape is still relayed.
    code: Any = None
    params: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    bot: Any = False


_head_decoder: Final = msgspec.json.Decoder(_Head)
_params_decoder: Final = msgspec.json.Decoder(_Params)


def _page(head: _Head) -> str | None:
    """A page.visit's ``params.url`` when it is a string (params are decoded for pages only)."""
    if head.action != "page.visit" or not head.params:
        return None
    try:
        url = _params_decoder.decode(head.params).url
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return url if isinstance(url, str) else None


class Entry:
    """One decoded stream entry and its relay frame, encoded once for every viewer.

    ``part`` is the index of the partition whose stream holds it (0 for a
    site of one partition).
    """

    __slots__ = ("action", "bot", "code", "frame", "id", "key", "page", "part", "uuid", "visitor")

    def __init__(
        self,
        entry_id: str,
        action: str,
        uuid: str | None,
        frame: bytes,
        part: int = 0,
        code: str | None = None,
        page: str | None = None,
        bot: bool = False,
        visitor: Visitor | None = None,
    ) -> None:
        self.id = entry_id
        #: A rejected entry's reject code; a page.visit's ``params.url``.
        self.code = code
        self.page = page
        self.key = stream_id(entry_id)
        self.action = action
        self.uuid = uuid
        self.frame = frame
        self.part = part
        #: Stored with ``"bot": true``.
        self.bot = bot
        #: A session.start's visitor (its ``client`` and ``source``), for the "where from" tables.
        self.visitor = visitor


def merge_order(entry: Entry) -> tuple[tuple[int, int], int]:
    """Where an entry goes among entries of several partitions: by id, ties by partition."""
    return entry.key, entry.part


def decode_entries(
    raw: Sequence[StreamEntry], stream: StreamName, part: int | None = None, frames: bool = True
) -> list[Entry]:
    """Stream entries as relay entries; entries that are not eventwire records are skipped.

    Args:
        raw: entries of one stream, oldest first.
        stream: which of the site's streams they come from.
        part: the partition of a partitioned site (written in each frame as
            ``p``); None for a site of one partition.
        frames: encode each entry's frame; False for counting only (the
            frame is then empty), which costs about half as much.
    """
    out: list[Entry] = []
    message = Rejected if stream == "rejected" else Event
    for entry in raw:
        if entry.event is None:
            continue
        try:
            # Decoding the head also proves the record is JSON: it is sent on as it is.
            head = _head_decoder.decode(entry.event)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        frame = (
            _encoder.encode(message(id=entry.id, event=msgspec.Raw(entry.event), p=part))
            if frames
            else b""
        )
        code = head.code if isinstance(head.code, str) else None
        out.append(
            Entry(
                entry.id,
                head.action,
                head.uuid,
                frame,
                part or 0,
                code,
                _page(head),
                head.bot is True,
                _visitor(head),
            )
        )
    return out
