"""The query of ``/v1/live``: which site and stream a viewer watches, its filters, its start.

``/v1/live?site=S[&stream=events|rejected][&action=GLOB][&uuid=U][&since=...]``,
or ``/v1/live?site=S&stream=summary`` (the rollups, :mod:`eventwire.live.tally`),
is checked here, before the WebSocket handshake, so a bad query is refused
with an HTTP status and a line of text. ``since`` is checked against the
site's partitions by :func:`eventwire.core.positions.check_since`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qsl

from msgspec import Struct

from eventwire.core.positions import check_since
from eventwire.live.messages import STREAMS, StreamName

_GLOB_RE: Final = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,64}$")
_UUID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: [ext] The stream value of a summary viewer.
SUMMARY: Final = "summary"
_QUERY_KEYS: Final = frozenset({"site", "stream", "action", "uuid", "since"})


class LiveQuery(Struct, frozen=True, kw_only=True):
    """What a viewer asked for in the URL, and the site's partitions it was checked against."""

    site: str
    stream: StreamName = "events"
    action: str | None = None
    uuid: str | None = None
    since: str = "now"
    partitions: int = 1
    #: [ext] ``stream=summary``: the site's rollups and a sampled feed of both streams.
    summary: bool = False


def _one_partition(_site: str) -> int:
    return 1


def parse_query(
    query: str,
    known: Callable[[str], bool],
    partitions: Callable[[str], int] = _one_partition,
) -> LiveQuery | tuple[HTTPStatus, str]:
    """Check the query string of ``/v1/live``.

    Args:
        query: the part of the path after ``?``.
        known: tells whether a site is configured.
        partitions: a configured site's ``partitions`` (a cursor in ``since``
            must hold that many ids).

    Returns:
        The query, or the HTTP status and text to refuse it with.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        return HTTPStatus.BAD_REQUEST, "malformed query string"
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in _QUERY_KEYS:
            return HTTPStatus.BAD_REQUEST, f"unknown parameter {name[:32]!r}; use {_keys_text()}"
        if name in values:
            return HTTPStatus.BAD_REQUEST, f"parameter {name!r} given twice"
        values[name] = value
    site = values.get("site")
    if not site:
        return HTTPStatus.BAD_REQUEST, "site=S is required"
    if not known(site):
        return HTTPStatus.NOT_FOUND, f"unknown site {site[:64]!r}"
    stream = values.get("stream", "events")
    if stream == SUMMARY:
        if values.keys() - {"site", "stream"}:
            return HTTPStatus.BAD_REQUEST, "stream=summary takes no action, uuid or since"
        return LiveQuery(site=site, summary=True, partitions=partitions(site))
    if stream not in STREAMS:
        return HTTPStatus.BAD_REQUEST, "stream must be events, rejected or summary"
    action = values.get("action") or None
    if action is not None:
        if stream == "rejected":
            return HTTPStatus.BAD_REQUEST, "action filters the events stream only"
        if not _GLOB_RE.match(action):
            return HTTPStatus.BAD_REQUEST, "action must be a glob of 1-64 [A-Za-z0-9_.-*?[]!]"
    uuid = values.get("uuid") or None
    if uuid is not None and not _UUID_RE.match(uuid):
        return HTTPStatus.BAD_REQUEST, "uuid must be 1-64 characters of [A-Za-z0-9._:-]"
    since = values.get("since") or "now"
    count = partitions(site)
    refusal = check_since(since, count)
    if refusal is not None:
        return HTTPStatus.BAD_REQUEST, refusal
    return LiveQuery(
        site=site,
        stream="rejected" if stream == "rejected" else "events",
        action=action,
        uuid=uuid,
        since=since,
        partitions=count,
    )


def _keys_text() -> str:
    return ", ".join(sorted(_QUERY_KEYS))
