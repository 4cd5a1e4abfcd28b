"""Positions in a stream: ids, ``since`` values, cursors and where a read starts.

A stream id is ``ms-seq`` on Redis' clock. Readers (``tail``, ``stats``, the
live relay) take a ``since``: ``now``, a duration back (``30s``, ``5m``,
``2h``, ``1d``), ``0`` (the start of the stream) or a stream id (entries
after it). This module turns one into the id an exclusive read (``XREAD``)
starts after.

A site of ``partitions = P`` keeps each stream as P streams with ids of their
own, so a reader's position there is one id per partition. On the wire it is
a *cursor*: the P ids in partition order joined by ``,`` (with P = 1, the
one id), which the live relay takes as ``since`` (see :mod:`eventwire.live`).
This module parses, checks and builds cursors; it does no I/O.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Final

#: The largest part of a stream id (Redis' unsigned 64-bit counters); as the
#: sequence part, it starts a read *at* a millisecond (XREAD is exclusive).
MAX_ID_PART: Final = 2**64 - 1
#: What joins a cursor's ids (one per partition).
CURSOR_SEP: Final = ","

_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_STREAM_ID_RE: Final = re.compile(r"\d+(-\d+)?")
#: One id of a cursor: bounded, as no stream id has more digits.
_CURSOR_ID_RE: Final = re.compile(r"\d{1,20}(-\d{1,20})?")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def start_id(since: str, now_ms: int | None = None) -> str:
    """The XREAD id to start after for ``--since``; ``$`` means the stream's current end.

    Raises:
        ValueError: ``since`` is none of now, a duration, 0 or a stream id.
    """
    if since == "now":
        return "$"
    if since == "0":
        return "0-0"
    m = _DURATION_RE.fullmatch(since)
    if m is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        ms = max(0, now - int(float(m.group(1)) * _UNIT_MS[m.group(2)]))
        # XREAD returns entries after the id: start just before millisecond ``ms``.
        return f"{ms - 1}-{MAX_ID_PART}" if ms > 0 else "0-0"
    if _STREAM_ID_RE.fullmatch(since) is not None:
        return since
    raise ValueError(f"--since: expected now, 30s/5m/2h/1d, 0 or a stream id, got {since!r}")


def check_since(since: str, partitions: int) -> str | None:
    """Why ``since`` cannot start a reader of a site of ``partitions``, or None if it can.

    ``since`` is a cursor (several ids: exactly one per partition) or any
    value :func:`start_id` takes; every id part fits Redis' counters.
    """
    ids = since.split(CURSOR_SEP)
    if len(ids) > 1:
        if len(ids) != partitions:
            return (
                f"since: a cursor of {len(ids)} ids, but the site has {partitions} "
                f"partition{'s' if partitions > 1 else ''}"
            )
        if not all(_CURSOR_ID_RE.fullmatch(i) for i in ids):
            return "since: a cursor holds stream ids joined by ','"
    else:
        try:
            start = start_id(since, 0)
        except ValueError:
            return "since must be now, a duration (30s, 5m, 2h), 0 or a stream id"
        ids = [] if start == "$" else [start]
    if any(int(part) > MAX_ID_PART for i in ids for part in i.split("-")):
        return "since: not a stream id"
    return None


def resolve_since(since: str, now_ms: int, partitions: int = 1) -> list[str] | None:
    """The id each partition starts after, on Redis' clock; None for ``now`` (the streams' ends).

    A cursor gives one id per partition; any other ``since`` gives the same
    id to every partition (a cut in time). ``since`` is one that
    :func:`check_since` accepts.
    """
    if CURSOR_SEP in since:
        return [full_id(i) for i in since.split(CURSOR_SEP)]
    start = start_id(since, now_ms)
    if start == "$":
        return None
    return [full_id(start)] * partitions


def cursor(ids: Sequence[str]) -> str:
    """A position (one id per partition, in partition order) as a cursor."""
    return CURSOR_SEP.join(ids)


def full_id(entry_id: str) -> str:
    """A stream id with its sequence part (``17`` is ``17-0``)."""
    return entry_id if "-" in entry_id else f"{entry_id}-0"


def id_text(key: tuple[int, int]) -> str:
    """A stream id parsed as ``(ms, seq)`` back as text."""
    return f"{key[0]}-{key[1]}"
