"""``eventwire stats``: a per-site snapshot of the streams, sessions and the persist group.

This module owns the ``stats`` subcommand and :func:`site_stats`, the
per-site numbers: stream length, events/s and rejected/s over the last
minute, open sessions (one ``due`` entry per open session), and the
``persist`` consumer group's lag, pending count and oldest pending age. It
only reads Redis; times are Redis's own clock (``TIME``), the clock stream
ids come from. Output is a table on a terminal, one JSON object otherwise (or
with ``--json``); ``--watch`` refreshes every 2 s until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from typing import Any, Final

import redis.exceptions
from redis.exceptions import ResponseError

from server.config import add_source_flags, load_settings
from server.errors import ConfigError
from server.rules import load_sites
from server.store import (
    Keys,
    RedisClient,
    redis_client,
    redis_time_ms,
    reply_field,
    reply_text,
    stream_id,
)
from server.tail import operator_command

#: The consumer group whose progress is shown.
GROUP: Final = "persist"
#: The window of the rates (ms).
WINDOW_MS: Final = 60_000
#: Entries fetched per XREVRANGE while counting a window, and the most counted:
#: past that, the rate is measured over the newest MAX_COUNTED entries only.
CHUNK: Final = 500
MAX_COUNTED: Final = 5000
#: ``--watch`` refresh period (s).
WATCH_EVERY: Final = 2.0
CLEAR: Final = "\x1b[H\x1b[2J"

_REDIS_ERRORS: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``stats`` subcommand to ``sub``."""
    p = sub.add_parser(
        "stats",
        help="per-site stream, session and persist numbers",
        description="Per-site stream length, rates, open sessions and persist lag.",
    )
    add_source_flags(p)
    p.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    p.add_argument("--json", action="store_true", help="JSON (the default off a terminal)")


def id_ms(entry_id: Any) -> int:
    """The millisecond part of a stream id."""
    return stream_id(entry_id)[0]


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


async def rate(redis: RedisClient, key: str, now_ms: int) -> float:
    """Entries per second added to ``key`` over the last minute.

    Counts newest first in chunks of :data:`CHUNK`; beyond :data:`MAX_COUNTED`
    entries the rate is that many over the time they span, so a busy stream
    costs a bounded read.
    """
    low = f"{now_ms - WINDOW_MS}-0"
    high = "+"
    counted = 0
    oldest = now_ms
    while counted < MAX_COUNTED:
        chunk = await redis.xrevrange(key, high, low, count=CHUNK)
        if not chunk:
            break
        counted += len(chunk)
        oldest = id_ms(chunk[-1][0])
        if len(chunk) < CHUNK:
            break
        high = f"({reply_text(chunk[-1][0])}"
    if counted < MAX_COUNTED:
        return counted / (WINDOW_MS / 1000)
    return counted / max((now_ms - oldest) / 1000, 0.001)


async def group_info(redis: RedisClient, key: str, now_ms: int) -> dict[str, Any]:
    """The ``persist`` group's lag, pending and oldest pending age (None where unknown)."""
    out: dict[str, Any] = {"persist_lag": None, "persist_pending": None, "oldest_pending_s": None}
    try:
        groups = await redis.xinfo_groups(key)
    except ResponseError:  # no such stream
        return out
    group = next((g for g in groups if reply_text(reply_field(g, "name")) == GROUP), None)
    if group is None:
        return out
    out["persist_lag"] = _int_or_none(reply_field(group, "lag"))
    pending = _int_or_none(reply_field(group, "pending")) or 0
    out["persist_pending"] = pending
    if pending:
        summary = await redis.xpending(key, GROUP)
        smallest = reply_field(summary, "min") if isinstance(summary, Mapping) else summary[1]
        if smallest is not None:
            out["oldest_pending_s"] = round(max(0, now_ms - id_ms(smallest)) / 1000, 3)
    return out


async def site_stats(
    redis: RedisClient, keys: Keys, site: str, now: int | None = None
) -> dict[str, Any]:
    """One site's numbers, at ``now`` on Redis' clock (read here when None).

    Returns:
        ``length`` (XLEN of the events stream), ``rejected_length``,
        ``events_per_s`` and ``rejected_per_s`` over the last minute,
        ``open_sessions``, and for the ``persist`` group ``persist_lag``,
        ``persist_pending`` and ``oldest_pending_s`` (None: no such group, no
        pending entry, or a lag Redis cannot tell).
    """
    if now is None:
        now = await redis_time_ms(redis)
    events, rejected = keys.events(site), keys.rejected(site)
    out: dict[str, Any] = {
        "length": int(await redis.xlen(events)),
        "rejected_length": int(await redis.xlen(rejected)),
        "events_per_s": round(await rate(redis, events, now), 3),
        "rejected_per_s": round(await rate(redis, rejected, now), 3),
        "open_sessions": int(await redis.zcard(keys.due(site))),
    }
    out.update(await group_info(redis, events, now))
    return out


async def snapshot(redis: RedisClient, keys: Keys, sites: list[str]) -> dict[str, Any]:
    """``{"sites": {site: site_stats}, "time": ms}`` for every site."""
    now = await redis_time_ms(redis)
    return {"sites": {s: await site_stats(redis, keys, s, now) for s in sites}, "time": now}


COLUMNS: Final = (
    ("site", "site"),
    ("length", "length"),
    ("events/s", "events_per_s"),
    ("rejected/s", "rejected_per_s"),
    ("sessions", "open_sessions"),
    ("persist lag", "persist_lag"),
    ("pending", "persist_pending"),
    ("oldest pending", "oldest_pending_s"),
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(snap: Mapping[str, Any]) -> str:
    """The snapshot as an aligned text table, one row per site."""
    rows = [[title for title, _ in COLUMNS]]
    for site, numbers in snap["sites"].items():
        row = [site]
        for _, name in COLUMNS[1:]:
            cell = _cell(numbers.get(name))
            row.append(cell + ("s" if name == "oldest_pending_s" and cell != "-" else ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> int:
    """Run ``stats``: 0 on success or Ctrl-C, 1 when Redis is unreachable, 2 on a config error."""
    try:
        loaded = load_settings(
            args.config, overrides={"redis_url": args.redis_url, "sites": args.sites}
        )
        sites = list(load_sites(loaded.sites_path))
    except ConfigError as exc:
        print(f"eventwire stats: configuration error: {exc}", file=sys.stderr)
        return 2
    keys = Keys(loaded.settings.key_prefix)
    tty = sys.stdout.isatty()
    as_json = bool(args.json) or not tty
    client = redis_client(loaded.settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    code = 0
    down = False
    async with operator_command(client) as stopped:
        # stopped() too: a cancellation can be lost inside redis-py (server.tasks).
        while not stopped():
            try:
                snap = await snapshot(client, keys, sites)
            except _REDIS_ERRORS as exc:
                if not args.watch:
                    print(f"eventwire stats: Redis unavailable: {exc}", file=sys.stderr)
                    code = 1
                    break
                if not down:
                    print(f"eventwire stats: Redis unavailable ({exc}); retrying", file=sys.stderr)
                    down = True
            else:
                down = False
                if as_json:
                    text = json.dumps(snap, separators=(",", ":")) + "\n"
                else:
                    text = (CLEAR if args.watch and tty else "") + table(snap)
                sys.stdout.write(text)
                sys.stdout.flush()
            if not args.watch:
                break
            await asyncio.sleep(WATCH_EVERY)
    return code
