"""Commands packed in RESP by hand, for the publish path and the persist worker's acks.

hiredis' ``pack_command`` costs ~0.4 µs per event in a 100-event call and
grows to ~1.7 µs in a 2,000-event call (it is not linear); packing here is
linear at ~0.3 µs per event, and a frame's items are packed in one
join. A packed command is a list of parts that are written to
the socket as they are (``writelines``), so a large call is never copied
whole. ``tests/test_store.py`` checks the bytes against hiredis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from eventwire.core.frames import COUNT_ONLY, EVENT, REJECT, REJECT_ALWAYS
from eventwire.store.functions import frame_seqs

#: Every item kind (an unknown one is a KeyError, never a bad argument to Lua).
_KINDS: Final = EVENT + REJECT + REJECT_ALWAYS + COUNT_ONLY
#: The kinds of a one-item frame, packed once.
_KIND_BULK: Final = {
    kind: b"$1\r\n" + kind + b"\r\n" for kind in (EVENT, REJECT, REJECT_ALWAYS, COUNT_ONLY)
}


def bulk(value: Any) -> bytes:
    """One argument (bytes, str or int) as a RESP bulk string."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int):
        data = b"%d" % value
    else:
        raise TypeError(f"cannot send {type(value).__name__} to Redis")
    return b"$%d\r\n%b\r\n" % (len(data), data)


class FrameIds(NamedTuple):
    """A frame's KEYS (producer, session) and first ARGV (session id) of ``publish``, packed.

    They change only with the connection's customer and session, so a
    connection packs them once and its frames carry them (:class:`~eventwire.store.Frame`).
    """

    #: The session id they were packed for.
    session: str
    keys: bytes
    args: bytes


def pack_frame_ids(producer_key: str, session_key: str, session: str) -> FrameIds:
    """:class:`FrameIds` of one frame: two keys and one argument, each a RESP bulk string.

    The layouts of :class:`~eventwire.store.functions.PublishFrameKeys` and
    the first field of :class:`~eventwire.store.functions.PublishFrameArgs`.
    """
    k1, k2, s = producer_key.encode(), session_key.encode(), session.encode()
    return FrameIds(
        session,
        b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(k1), k1, len(k2), k2),
        b"$%d\r\n%b\r\n" % (len(s), s),
    )


def pack_args(args: Sequence[Any], tail: Sequence[bytes] = (), tail_count: int = 0) -> list[bytes]:
    """One Redis command (str, bytes and int arguments) in RESP, in parts; then
    ``tail_count`` more arguments packed already in ``tail`` (:func:`bulk`,
    :func:`pack_items`, :func:`pack_bulks`)."""
    return [b"*%d\r\n" % (len(args) + tail_count), *(bulk(a) for a in args), *tail]


def pack_items(items: list[Any]) -> bytes:
    """A frame's flat ``[seq, kind, payload, ...]`` as its ARGV after the ids (no header).

    Each item is a :class:`~eventwire.store.functions.PublishItem`'s fields
    in a row; packed are the ``kinds`` and ``seqs`` of
    :class:`~eventwire.store.functions.PublishFrameArgs`, then one payload per
    item: ``2 + len(items) // 3`` bulk strings (:func:`frame_count`).
    """
    if len(items) == 3:  # one item: one formatting step
        seq, payload = b"%d" % items[0], items[2]
        return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            _KIND_BULK[items[1]],
            len(seq),
            seq,
            len(payload),
            payload,
        )
    kinds = b"".join(items[1::3])
    if kinds.translate(None, _KINDS):
        raise KeyError(f"an unknown item kind in {kinds!r}")
    seqs = frame_seqs(items[0::3])
    # Joined once from parts, each payload as it is: formatting each payload
    # into its bulk string, then the bulks into the frame, copied every
    # payload twice more (~0.2 µs an event of ~450 bytes).
    parts = [b"$%d\r\n%b\r\n$%d\r\n%b" % (len(kinds), kinds, len(seqs), seqs)]
    for payload in items[2::3]:
        parts += (b"\r\n$%d\r\n" % len(payload), payload)
    parts.append(b"\r\n")
    return b"".join(parts)


def frame_count(n: int) -> int:
    """The ARGV of a frame of ``n`` items: session id, kinds, seqs and ``n`` payloads."""
    return 3 + n


def pack_bulks(values: Sequence[bytes]) -> bytes:
    """Many bytes arguments as RESP bulk strings in one formatting step (no header).

    ~0.09 µs per value for stream entry ids; :func:`bulk` for each costs ~0.12,
    redis-py's encoding of an ``XACK`` of 5,000 ids ~0.4.
    """
    return b"".join([b"$%d\r\n%b\r\n" % (len(v), v) for v in values])


def pack_fcall(
    function: str,
    keys: Sequence[Any],
    args: Sequence[Any],
    tail: Sequence[bytes] = (),
    tail_count: int = 0,
) -> list[bytes]:
    """``FCALL function len(keys) *keys *args`` in RESP parts, then ``tail_count`` packed ones.

    ``tail`` holds arguments packed already (:func:`bulk`, :func:`pack_items`).
    """
    return pack_args(("FCALL", function, len(keys), *keys, *args), tail, tail_count)
