"""Every Redis reply eventwire reads, parsed here and only here.

redis-py's reply shapes differ by version and protocol (RESP2 or RESP3: a
list or a dict, str or bytes keys, entries one level deeper), so each reply
is turned into a small typed value once, in this module, and the rooms read
only those: stream entries (XREAD, XREADGROUP, XRANGE, XAUTOCLAIM), XINFO
STREAM, GROUPS and CONSUMERS, XPENDING (summary and range), TIME, the error
answers that mean something (no such key, NOGROUP, BUSYGROUP, a function
missing), and the replies of the functions of ``store.lua``. The shapes are
pinned by the redis-py version in ``pyproject.toml`` and tested against a
real Redis.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, NamedTuple, overload

__all__ = [
    "LAG_COUNTED",
    "AliasReply",
    "Claimed",
    "ConsumerInfo",
    "FrameResult",
    "GroupInfo",
    "LeaveReply",
    "OpenReply",
    "PendingSummary",
    "PublishReply",
    "ReadEntries",
    "ReapReply",
    "SiteSnapshot",
    "StreamEntry",
    "StreamInfo",
    "busy_group",
    "counted_lag",
    "group_lag",
    "merge_stream_info",
    "missing_function",
    "missing_group",
    "no_such_key",
    "parse_alias",
    "parse_autoclaim",
    "parse_consumers",
    "parse_groups",
    "parse_leave",
    "parse_open",
    "parse_pending_range",
    "parse_pending_summary",
    "parse_publish",
    "parse_reap",
    "parse_stream_info",
    "raw_xread_entries",
    "reply_field",
    "reply_text",
    "stream_entries",
    "stream_id",
    "time_ms",
    "trimmed_after",
    "xread_entries",
]


# -- values ---------------------------------------------------------------------------


def reply_text(value: Any) -> str:
    """A Redis reply value as text (redis-py gives bytes or str by version and protocol)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_id(value: Any) -> tuple[int, int]:
    """A stream entry id (``ms-seq``, bytes or str) as a comparable pair."""
    ms, _, seq = reply_text(value).partition("-")
    return int(ms), int(seq or 0)


def reply_field(reply: Mapping[Any, Any], name: str) -> Any:
    """A field of a redis-py reply dict, whose keys are str or bytes by version and protocol."""
    if name in reply:
        return reply[name]
    return reply.get(name.encode())


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def time_ms(reply: Sequence[Any]) -> int:
    """``TIME``'s reply (seconds, microseconds) in milliseconds."""
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


# -- error answers ----------------------------------------------------------------------


def no_such_key(error: BaseException | Any) -> bool:
    """Whether an error answer says the key does not exist (XINFO of a missing stream)."""
    return isinstance(error, Exception) and "no such key" in str(error).lower()


def missing_group(error: BaseException | Any) -> bool:
    """Whether an error answer says the stream or its consumer group is gone (NOGROUP)."""
    return isinstance(error, Exception) and "NOGROUP" in str(error)


def busy_group(error: BaseException | Any) -> bool:
    """Whether an error answer says the consumer group exists already (BUSYGROUP)."""
    return isinstance(error, Exception) and "BUSYGROUP" in str(error)


def missing_function(error: BaseException | Any) -> bool:
    """Whether an FCALL's answer says the function is not loaded (Redis lost the library)."""
    return isinstance(error, Exception) and "Function not found" in str(error)


# -- stream entries ---------------------------------------------------------------------


class StreamEntry(NamedTuple):
    """One stream entry: its id and its ``event`` field (None if it has none)."""

    id: str
    event: bytes | None


def stream_entries(raw: Any) -> list[StreamEntry]:
    """Entries of XRANGE, or one key's of :func:`xread_entries`, as :class:`StreamEntry` values."""
    out: list[StreamEntry] = []
    for entry_id, fields in raw or ():
        value = reply_field(fields, "event") if fields else None
        if isinstance(value, str):
            value = value.encode()
        out.append(StreamEntry(reply_text(entry_id), value))
    return out


def xread_entries(reply: Any) -> list[tuple[str, list[tuple[Any, Any]]]]:
    """XREAD's (or XREADGROUP's) reply as ``[(key, [(id, fields), ...]), ...]``.

    RESP2 answers a list of ``[key, entries]``, RESP3 a dict whose entries
    sit one level deeper (a list holding the list of entries); both come out
    the same. An entry's first element is its id, never a list.
    """
    if not reply:
        return []
    items: list[Any] = list(reply.items()) if isinstance(reply, Mapping) else list(reply)
    out: list[tuple[str, list[tuple[Any, Any]]]] = []
    for key, entries in items:
        if entries and entries[0] and isinstance(entries[0][0], list | tuple):
            entries = entries[0]
        out.append((reply_text(key), [(e[0], e[1] or {}) for e in entries or ()]))
    return out


def _event_field(fields: Any) -> bytes | None:
    """The ``event`` value of an entry's flat ``[field, value, ...]`` list (None: none)."""
    if not fields:
        return None
    for i in range(0, len(fields) - 1, 2):
        if reply_text(fields[i]) == "event":
            value = fields[i + 1]
            return value.encode() if isinstance(value, str) else bytes(value)
    return None


class ReadEntries(Sequence[StreamEntry]):
    """One stream's entries of a read, kept as two lists: their ids as Redis sent
    them (bytes) and their ``event`` fields (None: none).

    Read as a sequence, an entry is a :class:`StreamEntry` (its id as text),
    made when it is looked at: the persist worker's hot path reads the two
    lists (it decodes the events in one call and acks the ids as they came),
    so a read of 5,000 entries makes no per-entry object beyond what hiredis
    made, and decodes no id.
    """

    __slots__ = ("events", "ids")

    def __init__(self, ids: list[bytes], events: list[bytes | None]) -> None:
        self.ids = ids
        self.events = events

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> StreamEntry: ...

    @overload
    def __getitem__(self, index: slice) -> list[StreamEntry]: ...

    def __getitem__(self, index: int | slice) -> StreamEntry | list[StreamEntry]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self.ids))[index]]
        return StreamEntry(self.ids[index].decode(), self.events[index])

    def __iter__(self) -> Iterator[StreamEntry]:
        return map(StreamEntry, (i.decode() for i in self.ids), self.events)

    def __repr__(self) -> str:
        return f"ReadEntries({list(self)!r})"


def raw_xread_entries(reply: Any) -> list[tuple[str, ReadEntries]]:
    """XREADGROUP's reply as Redis sent it (no redis-py response callback: see
    :meth:`~eventwire.store.ConsumerGroup.read_new`), as entries by stream key.

    RESP2 answers ``[[key, [[id, [field, value, ...]], ...]], ...]``, RESP3 a
    dict of key to that list of entries. The persist worker's hot path: the
    ids and payloads hiredis made are kept as they are (:class:`ReadEntries`),
    and an ``event`` field first (as the server writes it) is taken without a
    search.
    """
    if not reply:
        return []
    items: Any = reply.items() if isinstance(reply, Mapping) else reply
    out: list[tuple[str, ReadEntries]] = []
    for key, entries in items:
        entries = entries or ()
        ids = [entry[0] for entry in entries]
        if ids and not isinstance(ids[0], bytes):  # a client that decodes replies
            ids = [reply_text(i).encode() for i in ids]
        events = [
            fields[1] if fields and fields[0] == b"event" else _event_field(fields)
            for _, fields in entries
        ]
        out.append((reply_text(key), ReadEntries(ids, events)))
    return out


class Claimed(NamedTuple):
    """What one ``XAUTOCLAIM`` took over."""

    #: Where the next call starts; ``0-0`` once the whole pending list was scanned.
    cursor: str
    #: The entries taken over, oldest first.
    entries: list[StreamEntry]
    #: Pending entries that were trimmed from the stream (Redis dropped them
    #: from the pending list; Redis 6.2 gives them as entries without fields).
    deleted: int


def parse_autoclaim(reply: Sequence[Any]) -> Claimed:
    """``XAUTOCLAIM``'s reply as :class:`Claimed`."""
    gone = list(reply[2]) if len(reply) > 2 and reply[2] else []
    kept = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
    return Claimed(reply_text(reply[0]), stream_entries(kept), len(gone))


# -- XINFO ------------------------------------------------------------------------------


class StreamInfo(NamedTuple):
    """The parts of ``XINFO STREAM`` a reader needs."""

    length: int
    entries_added: int
    first_id: str | None
    last_generated_id: str
    #: The highest id deleted (XDEL); Redis 7.0 does not move it on trimming.
    max_deleted_id: str = "0-0"


def parse_stream_info(reply: Mapping[Any, Any]) -> StreamInfo:
    """``XINFO STREAM``'s reply (RESP2 or RESP3 shape) as a :class:`StreamInfo`."""
    first = reply_field(reply, "first-entry")
    return StreamInfo(
        length=int(reply_field(reply, "length")),
        entries_added=int(reply_field(reply, "entries-added") or 0),
        first_id=reply_text(first[0]) if first else None,
        last_generated_id=reply_text(reply_field(reply, "last-generated-id") or "0-0"),
        max_deleted_id=reply_text(reply_field(reply, "max-deleted-entry-id") or "0-0"),
    )


def merge_stream_info(infos: Sequence[StreamInfo | None]) -> StreamInfo | None:
    """The streams of a partitioned site summed as one: lengths and counts added,
    the oldest first entry and the newest ids (None when no stream exists)."""
    found = [i for i in infos if i is not None]
    if len(found) <= 1:
        return found[0] if found else None
    firsts = [i.first_id for i in found if i.first_id is not None]
    return StreamInfo(
        length=sum(i.length for i in found),
        entries_added=sum(i.entries_added for i in found),
        first_id=min(firsts, key=stream_id) if firsts else None,
        last_generated_id=max((i.last_generated_id for i in found), key=stream_id),
        max_deleted_id=max((i.max_deleted_id for i in found), key=stream_id),
    )


def trimmed_after(position: str, info: StreamInfo | None) -> bool:
    """Whether the stream lost entries at or after ``position`` (exclusive) by trimming.

    XREAD and XRANGE from an id older than the stream's first entry start at
    that first entry without a word, so a reader must ask. Trimming (``MAXLEN
    ~``, ``XTRIM MINID``) removes a prefix of the stream, and Redis 7.0 does
    not move ``max-deleted-entry-id`` when it does: what is left to compare
    is the first entry. The answer is True when entries were removed
    (``entries-added`` above ``length``) and ``position`` is older than the
    first entry still there. It may be True when every removed entry was older
    than ``position`` (Redis keeps no record of the last trimmed id), never
    False when entries after ``position`` were trimmed.

    Args:
        position: an entry id; the reader has seen everything up to it.
        info: the stream's info read together with the entries (None: no stream).
    """
    if info is None or info.entries_added <= info.length:
        return False
    if info.first_id is None:  # everything was trimmed
        return stream_id(info.last_generated_id) > stream_id(position)
    return stream_id(position) < stream_id(info.first_id)


class GroupInfo(NamedTuple):
    """One consumer group of ``XINFO GROUPS``."""

    name: str
    #: Entries delivered and not acknowledged.
    pending: int
    last_delivered_id: str
    #: Entries the group has read (None: Redis cannot tell, after some deletions).
    entries_read: int | None
    #: Entries not yet read (None: Redis cannot tell).
    lag: int | None


def parse_groups(reply: Sequence[Mapping[Any, Any]]) -> list[GroupInfo]:
    """``XINFO GROUPS``'s reply as :class:`GroupInfo` values."""
    return [
        GroupInfo(
            name=reply_text(reply_field(g, "name")),
            pending=int(reply_field(g, "pending") or 0),
            last_delivered_id=reply_text(reply_field(g, "last-delivered-id") or "0-0"),
            entries_read=_int_or_none(reply_field(g, "entries-read")),
            lag=_int_or_none(reply_field(g, "lag")),
        )
        for g in reply
    ]


def group_lag(group: GroupInfo, newest_id: str | None) -> int | None:
    """A group's lag, not trusting Redis' counter where it is known to be wrong.

    After an AOF reload Redis' ``lag`` can stay thousands too high with every
    entry delivered (found by scripts/chaos; docs/protocol.md): when the
    group has delivered the stream's newest entry, nothing is unread,
    whatever the counter says.

    Args:
        group: the group as ``XINFO GROUPS`` gave it.
        newest_id: the stream's ``last-generated-id`` (or newest entry's id); None: unknown.
    """
    if newest_id is not None and stream_id(group.last_delivered_id) >= stream_id(newest_id):
        return 0
    return group.lag


#: Up to how many undelivered entries a reader counts itself (one bounded XRANGE,
#: as store.lua's publish does) rather than taking Redis' lag counter.
LAG_COUNTED: Final = 2000


def counted_lag(group: GroupInfo, undelivered: int) -> int | None:
    """The lag from a count of the entries after the group's last delivered one
    (an XRANGE of at most :data:`LAG_COUNTED` + 1): exact below that bound; at
    it, Redis' counter if that says more, else the bound."""
    if undelivered <= LAG_COUNTED:
        return undelivered
    return max(undelivered, group.lag or 0)


class ConsumerInfo(NamedTuple):
    """One consumer of ``XINFO CONSUMERS``."""

    name: str
    pending: int


def parse_consumers(reply: Sequence[Mapping[Any, Any]]) -> list[ConsumerInfo]:
    """``XINFO CONSUMERS``'s reply as :class:`ConsumerInfo` values."""
    return [
        ConsumerInfo(reply_text(reply_field(c, "name")), int(reply_field(c, "pending") or 0))
        for c in reply
    ]


# -- XPENDING ---------------------------------------------------------------------------


class PendingSummary(NamedTuple):
    """``XPENDING key group``: how many entries are pending, and the oldest one's id."""

    pending: int
    #: The oldest pending entry's id (None: nothing pending).
    min_id: str | None


def parse_pending_summary(reply: Any) -> PendingSummary:
    """``XPENDING``'s summary reply (a dict, or a ``[count, min, max, consumers]`` list)."""
    if isinstance(reply, Mapping):
        count, smallest = reply_field(reply, "pending"), reply_field(reply, "min")
    else:
        count, smallest = reply[0], reply[1]
    return PendingSummary(int(count or 0), reply_text(smallest) if smallest else None)


def parse_pending_range(reply: Sequence[Mapping[Any, Any]]) -> dict[str, int]:
    """``XPENDING key group min max count``'s reply: times delivered, by entry id."""
    return {
        reply_text(reply_field(p, "message_id")): int(reply_field(p, "times_delivered"))
        for p in reply
    }


# -- the functions of store.lua -----------------------------------------------------


class FrameResult(NamedTuple):
    """How ``publish`` ended for one frame."""

    added: int
    duplicate: int
    #: The session the frame was encoded for has ended; nothing was stored.
    gone: bool
    #: The persist group's backlog was at ``max_backlog``; nothing was stored.
    full: bool = False


class PublishReply(NamedTuple):
    """``publish``'s whole reply: each frame's result, and the stream's backlog after the call."""

    frames: list[FrameResult]
    #: Entries the persist group has not acknowledged; None when not watched
    #: (no persist group, or ``on_backlog = "trim"``).
    backlog: int | None


#: ``publish``'s status of a frame (:func:`publish_counts`).
PUBLISH_STORED: Final = 0
PUBLISH_GONE: Final = 1
PUBLISH_FULL: Final = 2


def publish_counts(reply: Sequence[Any], frames: int) -> tuple[list[int], int | None]:
    """``publish``'s reply as flat ``[added, duplicate, status, ...]`` ints, and the backlog.

    The publisher's form of :func:`parse_publish`: no object per frame.
    Status :data:`PUBLISH_STORED`, :data:`PUBLISH_GONE` or :data:`PUBLISH_FULL`.

    Raises:
        ValueError: the reply does not hold ``frames`` results and a backlog.
    """
    if len(reply) != 3 * frames + 1:
        raise ValueError(f"publish answered {len(reply)} values for {frames} frames")
    counts = list(map(int, reply))
    backlog = counts.pop()
    return counts, None if backlog < 0 else backlog


def parse_publish(reply: Sequence[Any], frames: int) -> PublishReply:
    """``publish``'s reply: ``{added, duplicate, status}`` per frame, then the backlog.

    Status 0 is stored, 1 gone, 2 full.
    """
    counts, backlog = publish_counts(reply, frames)
    results = [
        FrameResult(counts[i], counts[i + 1], counts[i + 2] == 1, counts[i + 2] == 2)
        for i in range(0, 3 * frames, 3)
    ]
    return PublishReply(results, backlog)


class OpenReply(NamedTuple):
    """What ``open`` answers a hello: its session, whether it joined one, the acked seq.

    ``suppressed``: the customer was forgotten and asked to stay so; nothing
    was registered or opened (``session`` is empty).
    """

    session: str
    resumed: bool
    acked: int
    suppressed: bool = False


def parse_open(reply: Sequence[Any]) -> OpenReply:
    """``open``'s reply ``{session id, resumed, acked, suppressed}``."""
    session, resumed, acked, suppressed = reply
    return OpenReply(reply_text(session), bool(resumed), int(acked), bool(suppressed))


class LeaveReply(NamedTuple):
    """What ``leave`` answers."""

    #: The session ended now (identify from its last connection).
    ended: bool
    #: The producer's stored seq in the customer's partition (0 without its key).
    stored: int
    #: The identify merged the uuid left into the new customer.
    merged: bool = False
    #: The customer left had a session (else no client.identify was stored).
    found: bool = True


def parse_leave(reply: Sequence[Any]) -> LeaveReply:
    """``leave``'s reply ``{ended, stored seq, merged, found}``."""
    ended, stored, merged, found = reply
    return LeaveReply(bool(ended), int(stored), bool(merged), bool(found))


class AliasReply(NamedTuple):
    """What ``alias`` answers: whether the merge was recorded, and why not."""

    merged: bool
    reason: str


def parse_alias(reply: Sequence[Any]) -> AliasReply:
    """``alias``'s reply ``{merged, reason}``."""
    merged, reason = reply
    return AliasReply(bool(merged), reply_text(reason))


class ReapReply(NamedTuple):
    """What one ``reap`` call did."""

    dead_connections: int
    sessions_ended: int


def parse_reap(reply: Sequence[Any]) -> ReapReply:
    """``reap``'s reply ``{dead connections, sessions ended}``."""
    dead, ended = reply
    return ReapReply(int(dead), int(ended))


class SiteSnapshot(NamedTuple):
    """A site's numbers at one moment of Redis' clock (see :meth:`Store.site_summary`)."""

    now_ms: int
    open_sessions: int
    events: StreamInfo | None
    rejected: StreamInfo | None
