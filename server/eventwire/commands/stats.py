"""``eventwire stats``: a per-site snapshot of the streams, sessions and the persist group.

This module owns the ``stats`` subcommand and :func:`site_stats`, the
per-site numbers: stream length, events/s and rejected/s over the last
minute, open sessions (one ``due`` entry per open session), and the
``persist`` consumer group's lag, pending count and oldest pending age, its
backlog (lag + pending: what ``max_backlog`` caps), the persist rate (acked
entries/s between two looks, ``RATE_SAMPLE`` apart, or the refreshes of
``--watch``) and the time until the cap at the current rates. It
only reads Redis; times are Redis's own clock (``TIME``), the clock stream
ids come from. Output is a table on a terminal, one JSON object otherwise (or
with ``--json``); ``--watch`` refreshes every 2 s until Ctrl-C.

A site with ``partitions = P`` above 1 has P of each stream and of each
``due`` set (docs/protocol.md section 7): its numbers are the sums over them (the
oldest pending entry is the oldest of all), and the JSON gets a
``partitions`` list with each partition's own numbers, to show skew; the
table gets a ``partitions`` column (P and the busiest partition's share of
the site's stream). A site with one partition looks exactly as before.

The sites are those of the sites file and every site found in Redis
(:func:`eventwire.store.survey.find_sites`), so a site written by servers
with another sites file is shown too; the sites file gives partitions where
it names the site. ``--watch`` looks for sites again every 30 s.

``--range 1h|24h|7d`` prints instead what the persist workers stored for
each site of the sites file over that range (:mod:`eventwire.persist.ranges`,
read from ``--dsn`` or ``persist_dsn``): the figures the dashboard's range
views and ``GET /v1/sites/{site}/rollups`` show, from the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

from eventwire.commands.tail import every_site, operator_command, operator_config
from eventwire.core.errors import ConfigError, StoreUnavailable
from eventwire.core.rules import load_sites
from eventwire.persist.ranges import RangeView, RollupReader, RollupsUnavailable
from eventwire.store import Keys, RedisClient, redis_client
from eventwire.store.survey import (
    GroupState,
    PartitionNumbers,
    clock_ms,
    dropped_bots,
    find_sites,
    partition_numbers,
)

#: The consumer group whose progress is shown.
GROUP: Final = Keys.PERSIST_GROUP
#: Partitions of one site read at once; each read holds one Redis connection,
#: so this bounds the connections ``stats`` opens (per node on a cluster).
PARTITION_READS: Final = 8
#: Seconds between the two looks of a one-shot ``stats`` (the persist rate is
#: their difference); ``--watch`` uses the refresh before.
RATE_SAMPLE: Final = 1.0
#: ``--watch`` refresh period (s).
WATCH_EVERY: Final = 2.0
#: How often ``--watch`` looks again for sites in Redis (s): a look walks the
#: whole keyspace (:func:`eventwire.store.survey.find_sites`), a refresh does not.
FIND_SITES_EVERY: Final = 30.0
CLEAR: Final = "\x1b[H\x1b[2J"


def merge_groups(states: Sequence[GroupState], now_ms: int) -> dict[str, Any]:
    """``persist_lag``, ``persist_pending`` and ``oldest_pending_s`` over a site's streams.

    All three are None when no stream has the group. The lag is the sum, or
    None when a stream that exists has no group or a lag Redis cannot tell
    (its unread entries are unknown); pending is the sum; the oldest pending
    entry is the oldest of all.
    """
    out: dict[str, Any] = {
        "persist_lag": None,
        "persist_pending": None,
        "oldest_pending_s": None,
        "backlog": None,
        "persist_acked": None,
    }
    grouped = [g for g in states if g.grouped]
    if not grouped:
        return out
    if all(g.lag is not None for g in states if g.exists):
        out["persist_lag"] = sum(g.lag or 0 for g in grouped)
    out["persist_pending"] = sum(g.pending for g in grouped)
    if out["persist_lag"] is not None:
        # What backpressure counts: entries the group has not acknowledged.
        out["backlog"] = out["persist_lag"] + out["persist_pending"]
    if all(g.acked is not None for g in grouped):
        out["persist_acked"] = sum(g.acked or 0 for g in grouped)
    oldest = [g.oldest_pending_ms for g in grouped if g.oldest_pending_ms is not None]
    if oldest:
        out["oldest_pending_s"] = round(max(0, now_ms - min(oldest)) / 1000, 3)
    return out


async def site_stats(
    redis: RedisClient, keys: Keys, site: str, now: int | None = None, partitions: int = 1
) -> dict[str, Any]:
    """One site's numbers, at ``now`` on Redis' clock (read here when None).

    Args:
        redis: the client.
        keys: the key names.
        site: the site.
        now: Redis' clock (ms); read when None.
        partitions: the site's ``partitions``; its numbers are summed over them.

    Returns:
        ``length`` (XLEN of the events stream), ``rejected_length``,
        ``events_per_s`` and ``rejected_per_s`` over the last minute,
        ``bots_per_s`` (of ``events_per_s``, the entries stored with ``"bot": true``),
        ``bots_dropped`` (bot events a site with ``bots = "drop"`` stored nowhere,
        counted by the servers every few seconds),
        ``open_sessions``, and for the ``persist`` group ``persist_lag``,
        ``persist_pending`` and ``oldest_pending_s`` (None: no such group, no
        pending entry, or a lag Redis cannot tell). With more than one
        partition, also ``partitions``: per partition, in order, its
        ``length``, ``events_per_s``, ``open_sessions``, ``persist_lag`` and
        ``persist_pending``.
    """
    if now is None:
        now = await clock_ms(redis)
    tags = Keys.tags(site, partitions)
    gate = asyncio.Semaphore(PARTITION_READS)

    async def read(tag: str) -> PartitionNumbers:
        async with gate:
            return await partition_numbers(redis, keys, tag, now, GROUP)

    parts: list[PartitionNumbers] = list(await asyncio.gather(*(read(t) for t in tags)))
    out: dict[str, Any] = {
        "length": sum(p.length for p in parts),
        "rejected_length": sum(p.rejected_length for p in parts),
        "events_per_s": round(sum(p.events_per_s for p in parts), 3),
        "rejected_per_s": round(sum(p.rejected_per_s for p in parts), 3),
        "bots_per_s": round(sum(p.bots_per_s for p in parts), 3),
        "open_sessions": sum(p.open_sessions for p in parts),
        "bots_dropped": await dropped_bots(redis, keys, site, partitions),
    }
    out.update(merge_groups([p.group for p in parts], now))
    if len(parts) > 1:
        out["partitions"] = [
            {
                "length": p.length,
                "events_per_s": round(p.events_per_s, 3),
                "open_sessions": p.open_sessions,
                "persist_lag": p.group.lag if p.group.grouped else None,
                "persist_pending": p.group.pending if p.group.grouped else None,
            }
            for p in parts
        ]
    return out


async def snapshot(redis: RedisClient, keys: Keys, sites: Mapping[str, int]) -> dict[str, Any]:
    """``{"sites": {site: site_stats}, "time": ms}`` for every site (site -> its partitions)."""
    now = await clock_ms(redis)
    return {
        "sites": {s: await site_stats(redis, keys, s, now, p) for s, p in sites.items()},
        "time": now,
    }


def add_persist_rates(
    snap: dict[str, Any], before: Mapping[str, Any] | None, limits: Mapping[str, int]
) -> None:
    """Add ``persist_per_s``, ``max_backlog`` and ``cap_in_s`` to each site of ``snap``.

    ``persist_per_s``: entries the group acknowledged per second between
    ``before`` (an earlier snapshot; None: unknown) and ``snap``.
    ``max_backlog``: the site's cap over all its streams (per stream times
    partitions; None for ``on_backlog = "trim"`` or a site not in the sites
    file). ``cap_in_s``: seconds until the backlog reaches it at the current
    rates (events/s over the last minute less the persist rate); None when
    it is not growing or a number is unknown, 0 when it is there.
    """
    for site, numbers in snap["sites"].items():
        rate = None
        old = (before or {}).get("sites", {}).get(site)
        if old is not None and before is not None:
            elapsed = (snap["time"] - before["time"]) / 1000
            acked, was = numbers.get("persist_acked"), old.get("persist_acked")
            if elapsed > 0 and acked is not None and was is not None:
                rate = round(max(0, acked - was) / elapsed, 3)
        numbers["persist_per_s"] = rate
        per_stream = limits.get(site)
        cap = per_stream * len(numbers.get("partitions") or [0]) if per_stream else None
        numbers["max_backlog"] = cap
        numbers["cap_in_s"] = None
        backlog = numbers.get("backlog")
        if cap is None or backlog is None or rate is None or numbers.get("persist_lag") is None:
            continue
        growth = numbers["events_per_s"] - rate
        if backlog >= cap:
            numbers["cap_in_s"] = 0.0
        elif growth > 0:
            numbers["cap_in_s"] = round((cap - backlog) / growth, 1)


COLUMNS: Final = (
    ("site", "site"),
    ("length", "length"),
    ("events/s", "events_per_s"),
    ("rejected/s", "rejected_per_s"),
    ("bots/s", "bots_per_s"),
    ("bots dropped", "bots_dropped"),
    ("sessions", "open_sessions"),
    ("persist lag", "persist_lag"),
    ("pending", "persist_pending"),
    ("oldest pending", "oldest_pending_s"),
    ("backlog", "backlog"),
    ("persist/s", "persist_per_s"),
    ("cap in", "cap_in_s"),
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _partitions_cell(numbers: Mapping[str, Any]) -> str:
    """``P (busiest N%)``: how many partitions, and the largest one's share of the stream."""
    parts = numbers.get("partitions")
    if not parts:
        return "1"
    total = sum(int(p.get("length") or 0) for p in parts)
    if not total:
        return str(len(parts))
    busiest = max(int(p.get("length") or 0) for p in parts)
    return f"{len(parts)} (busiest {100 * busiest / total:.0f}%)"


def table(snap: Mapping[str, Any]) -> str:
    """The snapshot as an aligned text table, one row per site.

    A ``partitions`` column is added when a site has more than one.
    """
    columns = list(COLUMNS)
    split = any(n.get("partitions") for n in snap["sites"].values())
    if split:
        columns.append(("partitions", "partitions"))
    rows = [[title for title, _ in columns]]
    for site, numbers in snap["sites"].items():
        row = [site]
        for _, name in columns[1:]:
            if name == "partitions":
                row.append(_partitions_cell(numbers))
                continue
            cell = _cell(numbers.get(name))
            timed = name in ("oldest_pending_s", "cap_in_s") and cell != "-"
            row.append(cell + ("s" if timed else ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
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
        loaded, named = operator_config(args)
    except ConfigError as exc:
        print(f"eventwire stats: configuration error: {exc}", file=sys.stderr)
        return 2
    keys = Keys(loaded.settings.key_prefix)
    limits = {
        site: rules.backlog_limit(loaded.settings)
        for site, rules in load_sites(loaded.sites_path).items()
    }
    tty = sys.stdout.isatty()
    as_json = bool(args.json) or not tty
    if args.range is not None:
        return await run_range(args.range, args.dsn or loaded.settings.persist_dsn, named, as_json)
    client = redis_client(loaded.settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    code = 0
    down = False
    found: dict[str, int] = {}
    looked: float | None = None  # when Redis was last searched for sites (monotonic)
    before: dict[str, Any] | None = None  # the look before: the persist rate's start
    async with operator_command(client) as stopped:
        # stopped() too: a cancellation can be lost inside redis-py (eventwire.tasks).
        while not stopped():
            try:
                if looked is None or time.monotonic() - looked >= FIND_SITES_EVERY:
                    found = await find_sites(client, keys)
                    looked = time.monotonic()
                sites = every_site(named, found)
                if before is None and not args.watch:
                    before = await snapshot(client, keys, sites)
                    await asyncio.sleep(RATE_SAMPLE)
                snap = await snapshot(client, keys, sites)
                add_persist_rates(snap, before, limits)
                before = snap
            except StoreUnavailable as exc:
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


async def run_range(name: str, dsn: str, sites: Mapping[str, int], as_json: bool) -> int:
    """``stats --range``: each site's stored rollups; 1 when the store cannot answer."""
    reader = RollupReader(dsn)
    now = int(time.time() * 1000)
    try:
        views = {site: await reader.view(site, name, now) for site in sites}
    except RollupsUnavailable as exc:
        print(f"eventwire stats: {exc}", file=sys.stderr)
        return 1
    finally:
        await reader.close()
    if as_json:
        body = {"range": name, "now": now, "sites": views}
        sys.stdout.write(msgspec.json.encode(body).decode() + "\n")
    else:
        sys.stdout.write(range_table(name, views))
    return 0


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def range_table(name: str, views: Mapping[str, RangeView]) -> str:
    """Each site's range view as text: the counts, then its top tables."""
    lines = []
    for site, v in views.items():
        seconds = max(1, (v.now - v.since) / 1000)
        newest = _when(v.newest) if v.newest is not None else "nothing stored"
        lines.append(
            f"{site}  last {name} (since {_when(v.since)}; newest minute stored: {newest})"
        )
        t = v.totals
        lines.append(
            f"  accepted {t.accepted:,} ({t.accepted / seconds:.2f}/s)   "
            f"sessions started {t.started:,}, ended {t.ended:,}   "
            "rejected, denied, duplicates: not stored (the live view counts them)"
        )
        for table_name, top in v.top.items():
            shown = ", ".join(
                f"{r.key} {r.count - r.error:,}" + (f"-{r.count:,}" if r.error else "")
                for r in top.rows
            )
            lines.append(f"  top {table_name} (of {top.total:,}): {shown or '-'}")
    return "\n".join(lines) + "\n"
