"""Positions in a stream: ids, ``since`` values and where a read starts.

A stream id is ``ms-seq`` on Redis' clock. Readers (``tail``, ``stats``, the
live relay) take a ``since``: ``now``, a duration back (``30s``, ``5m``,
``2h``, ``1d``), ``0`` (the start of the stream) or a stream id (entries
after it). This module turns one into the id an exclusive read (``XREAD``)
starts after; it does no I/O.
"""

from __future__ import annotations

import re
import time
from typing import Final

#: The largest stream id sequence part, to start *at* a millisecond (XREAD is exclusive).
MAX_ID_SEQ: Final = 18446744073709551615

_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_STREAM_ID_RE: Final = re.compile(r"\d+(-\d+)?")
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
        return f"{ms - 1}-{MAX_ID_SEQ}" if ms > 0 else "0-0"
    if _STREAM_ID_RE.fullmatch(since) is not None:
        return since
    raise ValueError(f"--since: expected now, 30s/5m/2h/1d, 0 or a stream id, got {since!r}")
