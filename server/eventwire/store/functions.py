"""The Redis function library (``store.lua``) and the typed arguments of its functions.

Every step that must be atomic is a function of one library, loaded with
``FUNCTION LOAD REPLACE`` (again whenever Redis lost it). Each function's
KEYS and ARGV are a :class:`~typing.NamedTuple` here, whose fields are the
names ``store.lua`` unpacks them into, in the same order: these classes are
the only place in Python that knows a position, and
``tests/store/test_functions.py`` holds them to the Lua text. Parts a call
repeats follow the fixed arguments: a publish call's frames (a class of
their own, then one payload per item: :func:`frame_args`), a heartbeat's
members.

The server-made events whose values only Redis knows (``session.end``:
which session ends, when and why; ``client.identify``: the session's seq
and time) are still written by :class:`~eventwire.core.records.StoredEvent`:
it encodes them here as templates, JSON text in which a :class:`RecordHole`
byte marks each value Lua fills in (see :func:`record_template`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec

from eventwire.core.records import StoredEvent, record_encoder
from eventwire.core.validation import default_label

# -- the library ----------------------------------------------------------------------

_LIBRARY_TEXT: Final = (Path(__file__).parent / "store.lua").read_text()
#: A hash of the library's text: its functions carry it in their names, so
#: processes of two versions sharing one Redis each call their own code.
LIBRARY_VERSION: Final = hashlib.sha1(_LIBRARY_TEXT.encode()).hexdigest()[:12]
LIBRARY: Final = _LIBRARY_TEXT.replace("VERSION", LIBRARY_VERSION)
#: The command that (re)loads the library.
LOAD_LIBRARY: Final = ("FUNCTION", "LOAD", "REPLACE", LIBRARY)
FN_PUBLISH: Final = f"ew_{LIBRARY_VERSION}_publish"
FN_OPEN: Final = f"ew_{LIBRARY_VERSION}_open"
FN_LEAVE: Final = f"ew_{LIBRARY_VERSION}_leave"
FN_HEARTBEAT: Final = f"ew_{LIBRARY_VERSION}_heartbeat"
FN_REAP: Final = f"ew_{LIBRARY_VERSION}_reap"
FN_ALIAS: Final = f"ew_{LIBRARY_VERSION}_alias"


# -- publish ----------------------------------------------------------------------------


class PublishKeys(NamedTuple):
    """KEYS of ``publish`` before the frames': the site's (or partition's) streams and due set."""

    events: str
    rejected: str
    due: str


class PublishArgs(NamedTuple):
    """ARGV of ``publish`` before the frames': one site's limits and rules."""

    events_maxlen: int
    rejected_maxlen: int
    producer_ttl_ms: int
    #: Session timings: a session found past one of them ends before the frame.
    idle_ms: int
    max_ms: int
    #: The server-made events the site's rules take: letters s, e, i.
    taken: str
    #: :func:`session_end_record` of the site.
    end_record: bytes
    #: Unacknowledged entries of the persist group at which frames are refused
    #: (status full), and below which nothing unacknowledged is trimmed; 0 for
    #: ``on_backlog = "trim"``: ``MAXLEN ~ events_maxlen`` whatever was persisted.
    max_backlog: int


class PublishFrameKeys(NamedTuple):
    """KEYS of one frame of a ``publish`` call."""

    producer: str
    session: str


class PublishFrameArgs(NamedTuple):
    """ARGV of one frame of a ``publish`` call, followed by one payload per item.

    :func:`frame_args` makes the last two fields and the payloads from the
    frame's items.
    """

    #: The session the events were encoded for ('' for server-made frames: not
    #: checked). The uuid, needed only when the session ends, is read from the
    #: session key.
    session_id: str
    #: One kind letter per item (``core.frames``), in the items' order.
    kinds: bytes
    #: The items' seqs comma-separated, or only the first when each is the
    #: one before plus 1 (nearly every frame: Redis then takes no seq per item).
    seqs: bytes


class PublishItem(NamedTuple):
    """One item of a frame, as a frame holds its items (flat, in a row; :func:`frame_args`)."""

    seq: int
    kind: bytes
    payload: bytes


def frame_seqs(seqs: list[int]) -> bytes:
    """:attr:`PublishFrameArgs.seqs` of a frame whose items have these seqs."""
    if not seqs:
        return b""
    first = seqs[0]
    if len(seqs) == 1 or seqs == list(range(first, first + len(seqs))):
        return b"%d" % first
    return b",".join([b"%d" % seq for seq in seqs])


def frame_args(session_id: str, items: list[Any]) -> list[Any]:
    """A frame's ARGV of ``publish``: :class:`PublishFrameArgs`, then its payloads.

    ``items`` are :class:`PublishItem` fields in a row (a frame's ``args``).
    """
    head = PublishFrameArgs(session_id, b"".join(items[1::3]), frame_seqs(items[0::3]))
    return [*head, *items[2::3]]


# -- open, leave --------------------------------------------------------------------------


class CustomerKeys(NamedTuple):
    """KEYS of ``open``: a customer's keys in its partition."""

    session: str
    conns: str
    live: str
    due: str
    events: str
    producer: str
    #: The partition's set of suppressed customers' keyed hashes.
    suppressed: str
    #: The customer's set of aliases (uuids merged into it).
    aliases: str


class LeaveKeys(NamedTuple):
    """KEYS of ``leave``: a customer's keys in its partition, and the merge's.

    ``producer`` is optional (None: its stored seq is not asked for) and last.
    """

    session: str
    conns: str
    live: str
    due: str
    events: str
    #: ``alias:<uuid>`` of the uuid left: the customer it merged into.
    alias_key: str
    #: ``aliases:<uuid>`` of the uuid left: if it exists, that uuid is a customer.
    own_aliases: str
    suppressed: str
    producer: str | None


class OpenArgs(NamedTuple):
    """ARGV of ``open``: a hello joins its customer's session or opens one."""

    uuid: str
    member: str
    #: The id of the session opened if none is open.
    session_id: str
    #: :func:`session_start_record` of that session.
    start_record: bytes
    heartbeat_ms: int
    grace_ms: int
    idle_ms: int
    max_ms: int
    events_maxlen: int
    taken: str
    end_record: bytes
    #: A stored seq of the producer in another partition (identify), or 0.
    carry: int
    producer_ttl_ms: int
    #: The uuid's keyed hash: in the suppressed set, nothing is opened.
    subject: str
    #: The anonymous uuid an identify merged into this customer, or ''.
    alias: str
    #: How long the customer's aliases set lives after that merge (the site's
    #: ``retain_days``; 0: no expiry), as the merge's alias key does.
    alias_ttl_ms: int


class LeaveArgs(NamedTuple):
    """ARGV of ``leave``: a connection ends, or moves to another customer."""

    uuid: str
    member: str
    grace_ms: int
    events_maxlen: int
    taken: str
    end_record: bytes
    #: :func:`identify_record` of the move (merged), or ``b""`` for a close.
    identify_record: bytes
    #: :func:`identify_refused_record` of the move (not merged: its reason a hole), or ``b""``.
    refused_record: bytes
    #: Why the caller refuses the merge ('' when it allows it).
    refused: str
    #: The keyed hash of the uuid left.
    subject: str
    #: The customer the connection moves to ('' for a close).
    to: str
    #: How long a merge's alias key lives (ms): the site's ``retain_days``, as
    #: long as the store keeps the merge; 0 (no ``retain_days``): no expiry.
    alias_ttl_ms: int


class AliasKeys(NamedTuple):
    """KEYS of ``alias``: the merge keys of the anonymous uuid (its partition)."""

    alias_key: str
    own_aliases: str
    suppressed: str


class AliasArgs(NamedTuple):
    """ARGV of ``alias``: a merge without a connection (Segment ``alias``, ``identify``)."""

    #: The keyed hash of the anonymous uuid.
    subject: str
    #: The customer it merges into.
    to: str
    #: Why the caller refuses the merge ('' when it allows it).
    refused: str
    #: As :attr:`LeaveArgs.alias_ttl_ms`.
    alias_ttl_ms: int


# -- heartbeat, reap ----------------------------------------------------------------------


class HeartbeatKeys(NamedTuple):
    """KEYS of ``heartbeat``."""

    live: str


class HeartbeatArgs(NamedTuple):
    """ARGV of ``heartbeat`` before the members whose deadlines it renews."""

    heartbeat_ms: int
    #: :meth:`Keys.site_prefix` of the tag.
    site_prefix: str


class ReapKeys(NamedTuple):
    """KEYS of ``reap``."""

    live: str
    due: str
    events: str


class ReapArgs(NamedTuple):
    """ARGV of ``reap``."""

    site_prefix: str
    grace_ms: int
    idle_ms: int
    max_ms: int
    #: Dead connections, and due sessions, handled per call (each).
    limit: int
    events_maxlen: int
    taken: str
    end_record: bytes


#: Each function's parts, in the order ``store.lua`` unpacks them.
LAYOUTS: Final[Mapping[str, tuple[type[tuple[Any, ...]], ...]]] = {
    "publish": (PublishKeys, PublishArgs, PublishFrameKeys, PublishFrameArgs),
    "open": (CustomerKeys, OpenArgs),
    "leave": (LeaveKeys, LeaveArgs),
    "heartbeat": (HeartbeatKeys, HeartbeatArgs),
    "reap": (ReapKeys, ReapArgs),
    "alias": (AliasKeys, AliasArgs),
}


def call_keys(keys: CustomerKeys | LeaveKeys) -> list[str]:
    """A customer's keys as a call sends them: an optional producer key left out."""
    return [k for k in keys if k is not None]


# -- server-made records ---------------------------------------------------------------------


class RecordHole(bytes, Enum):
    """A value of a record template that Lua fills in (``store.lua``, ``fill``).

    Each is one byte from 1 to 8: JSON text holds no raw control byte (they
    are escaped inside strings), so a hole can never be taken for text.
    Strings are filled with ``cjson.encode`` (a JSON string), integers with
    ``%d``.
    """

    UUID = b"\x01"
    SESSION = b"\x02"
    PRODUCER = b"\x03"
    SEQ = b"\x04"
    TIME = b"\x05"  # ``time`` and ``received``: Redis' clock when the event is made
    REASON = b"\x06"
    DURATION_MS = b"\x07"
    EVENTS = b"\x08"


#: Which holes are filled with a JSON string (the others with an integer).
_STRING_HOLES: Final = frozenset(
    {RecordHole.UUID, RecordHole.SESSION, RecordHole.PRODUCER, RecordHole.REASON}
)


def _mark(hole: RecordHole) -> str:
    """A hole's placeholder: a string no real value of a template holds (a NUL byte first)."""
    return f"\x00eventwire-hole-{hole.value[0]}"


def record_template(event: StoredEvent) -> bytes:
    """Encode a stored event whose placeholder values (``_mark``) become hole bytes.

    A placeholder's JSON text is replaced only after a ``:``, a value's
    place (inside a JSON string a quote is always escaped, so ``:"`` never
    occurs there). One left anywhere else is an error: the NUL byte it
    starts with shows, escaped, in the encoded text.

    Raises:
        ValueError: a placeholder was not a whole value of the record.
    """
    encoded = record_encoder.encode(event)
    for hole in RecordHole:
        encoded = encoded.replace(b":" + record_encoder.encode(_mark(hole)), b":" + hole.value)
    if b"\x00" in encoded or b"\\u0000" in encoded:
        raise ValueError("a placeholder of a record template was not in a value's place")
    return encoded


def fill_template(template: bytes, values: Mapping[RecordHole, str | int]) -> bytes:
    """A template filled as ``store.lua``'s ``fill`` does (tests compare the two)."""
    out = template
    for hole, value in values.items():
        text = record_encoder.encode(value) if hole in _STRING_HOLES else b"%d" % int(value)
        out = out.replace(hole.value, text)
    return out


SESSION_START: Final = "session.start"
SESSION_END: Final = "session.end"
CLIENT_IDENTIFY: Final = "client.identify"


def session_start_record(
    site: str,
    uuid: str,
    session: str,
    producer: str,
    context: dict[str, Any],
    now: int,
    client: Any = None,
    source: Any = None,
    bot: bool = False,
) -> bytes:
    """The ``session.start`` of a session ``open`` may open (it knows every value itself).

    ``client`` and ``source`` (docs/protocol.md section 18) are added to its
    params when given; ``bot`` flags the record.
    """
    params: dict[str, Any] = {"session": session, "producer": producer, "context": context}
    if client is not None:
        params["client"] = client
    if source is not None:
        params["source"] = source
    return record_encoder.encode(
        StoredEvent(
            site=site,
            uuid=uuid,
            session=session,
            producer=f"srv:{session}",
            seq=1,
            action=SESSION_START,
            label=default_label(SESSION_START, {}),
            time=now,
            received=now,
            params=params,
            bot=bot,
        )
    )


def _server_event(site: str, uuid: str, action: str, params: dict[str, Any]) -> StoredEvent:
    """A server-made event whose session, producer, seq and times are holes."""
    event = StoredEvent(
        site=site,
        uuid=uuid,
        session="",
        producer="",
        seq=0,
        action=action,
        label=default_label(action, {}),
        time=0,
        received=0,
        params=params,
    )
    # The holes of integer fields carry a placeholder string until encoded.
    return msgspec.structs.replace(
        event,
        session=_mark(RecordHole.SESSION),
        producer=_mark(RecordHole.PRODUCER),
        seq=_mark(RecordHole.SEQ),
        time=_mark(RecordHole.TIME),
        received=_mark(RecordHole.TIME),
    )


@functools.lru_cache(maxsize=4096)
def session_end_record(site: str) -> bytes:
    """The ``session.end`` template of a site: uuid, session, reason, duration, count are holes."""
    params = {
        "session": _mark(RecordHole.SESSION),
        "reason": _mark(RecordHole.REASON),
        "duration_ms": _mark(RecordHole.DURATION_MS),
        "events": _mark(RecordHole.EVENTS),
    }
    event = _server_event(site, _mark(RecordHole.UUID), SESSION_END, params)
    return record_template(event)


def identify_record(site: str, uuid: str, previous_uuid: str) -> bytes:
    """The ``client.identify`` template of a move from ``previous_uuid`` to ``uuid`` that merged.

    ``params.merged`` is true: ``previous_uuid`` is now an alias of ``uuid``.
    """
    params = {"previous_uuid": previous_uuid, "merged": True}
    return record_template(_server_event(site, uuid, CLIENT_IDENTIFY, params))


def identify_refused_record(site: str, uuid: str, previous_uuid: str) -> bytes:
    """The ``client.identify`` template of a move that did not merge: the reason is a hole."""
    params = {"previous_uuid": previous_uuid, "merged": False, "reason": _mark(RecordHole.REASON)}
    return record_template(_server_event(site, uuid, CLIENT_IDENTIFY, params))
