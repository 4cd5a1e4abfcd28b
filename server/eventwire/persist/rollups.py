"""Rollups in the store: the ``rollups`` table, written in each batch's transaction, read by range.

This module owns the ``rollups`` table (the same schema in SQLite and
PostgreSQL, created by the sinks' migrations) and what one batch adds to it;
:mod:`eventwire.persist.ranges` reads it back for the admin route
``GET /v1/sites/{site}/rollups`` and ``eventwire stats --range``.

**What is counted.** Only what the store knows: accepted events (the
``events`` table holds nothing else; rejected, denied and duplicate events
never reach it), sessions started and ended (``session.start`` /
``session.end`` events), and three top tables: actions, pages
(``page.visit``'s ``params.url``) and customers (uuid). Every figure goes by
``received``, the server's clock when it took the event (the stream id's
time to within the publish round trip, so the live window and the stored
minutes agree).

**Rows.** ``span`` is the seconds a row covers, ``bucket`` its start (ms
since the epoch, a multiple of the span):

- ``span = 60, kind = 'count'``: exact counts per minute; ``item`` is
  ``accepted``, ``started``, ``ended`` or ``bots`` (of ``accepted``, the rows
  stored with ``bot`` true). Three or four rows a minute per site with
  events, kept for good (4,320-5,760 a day).
- ``span = 600`` and ``span = 3600``, ``kind`` one of :data:`TABLES`: a
  bounded top table per 10 minutes and per hour, a Space-Saving summary with
  batched eviction as the live window's (:mod:`eventwire.live.rollup`): at
  most ``2 * TOP_CAPACITY`` keys, each with ``n + lift`` an upper bound of
  its true count and ``err + lift`` how much that may exceed it (the true
  count is in ``[n - err, n + lift]``, ``lift`` being the table row's); the
  table's own row has ``item = ''``, ``n`` its exact total, ``err`` its
  floor (the most a key it does not hold can have had) and ``lift``, what
  every key it holds has been raised by since it was written (so a batch
  rewrites only the keys it counted, never the whole table; key rows keep
  ``lift = 0``). 10-minute tables serve the
  1-hour view and are deleted :data:`RECENT_TOPS_KEEP_MS` after the newest
  one written; hourly tables are kept.

**Idempotent under redelivery.** A batch counts only the events rows its own
transaction inserted. SQLite: when the insert's row count is the batch's, every
row is new and is counted from the batch itself (in Python, no trigger: a
trigger noting each row cost a third of the insert's time); when it is less (a
redelivery), the rows past the largest rowid seen at the transaction's start
are read back (:data:`SQLITE_INSERTED_SINCE`). PostgreSQL's insert says which
with ``RETURNING``. A
redelivered entry (a worker died after its commit and before its XACK, or an
XAUTOCLAIM took a slow batch) inserts no row, so it adds nothing here; a
batch that rolls back takes its rollups back with it. Nothing depends on
stream entry ids, so a reclaimed batch mixed of old and new entries counts
exactly its new ones. Concurrent PostgreSQL workers take a transaction-scoped
advisory lock per site before touching its rollups (SQLite's writers are
serialised by ``BEGIN IMMEDIATE`` already).

Retention of events (deleting old rows of ``events``) never needs to touch
this table: rollups are counts, not references.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections import Counter
from collections.abc import Generator, Iterable, Sequence
from typing import Any, Final, NamedTuple

import msgspec

#: The sinks' migration step that creates the table (appended to their MIGRATIONS).
MIGRATION: Final = (
    """CREATE TABLE rollups (
        site TEXT NOT NULL,
        span INTEGER NOT NULL,
        bucket BIGINT NOT NULL,
        kind TEXT NOT NULL,
        item TEXT NOT NULL,
        n BIGINT NOT NULL,
        err BIGINT NOT NULL,
        lift BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (site, span, bucket, kind, item)
    )""",
)

#: Seconds of one row of exact counts.
COUNT_SPAN: Final = 60
#: Seconds of the top tables the 1-hour view reads, and of those the longer ones read.
RECENT_TOP_SPAN: Final = 600
TOP_SPAN: Final = 3600
#: How long 10-minute top tables are kept before the newest one written (ms).
RECENT_TOPS_KEEP_MS: Final = 2 * 3600 * 1000
#: Keys a top table holds exactly before it evicts (then at most twice as many).
TOP_CAPACITY: Final = 100
#: Rows of each top table in a view.
TOP_SHOWN: Final = 10
TABLES: Final = ("actions", "pages", "customers")
COUNTS: Final = ("accepted", "started", "ended", "bots")
#: The action whose ``params.url`` is a page.
PAGE_ACTION: Final = "page.visit"

#: What the store knows of one inserted event: site, received, action, uuid, page (or None),
#: and whether it was stored as a bot's (docs/protocol.md section 18).
NewRow = tuple[str, int, str, str, str | None, bool]

# -- the rows a SQLite batch inserted -------------------------------------------

#: The rows of ``events`` past a rowid, as :data:`NewRow` (SQLite): a batch's inserted rows
#: when some of its rows were already stored (a redelivery); the ``rowid`` of a row SQLite
#: adds is one more than the largest before it, so every row past the largest rowid
#: seen at the start of the batch's transaction is one the batch inserted.
SQLITE_INSERTED_SINCE: Final = (
    "SELECT site, received, action, uuid, "
    f"CASE WHEN action <> '{PAGE_ACTION}' THEN NULL "
    "WHEN NOT json_valid(params) THEN NULL "
    "WHEN json_type(params, '$.url') = 'text' THEN json_extract(params, '$.url') END, bot "
    "FROM events WHERE rowid > ? ORDER BY rowid"
)


class _Url(msgspec.Struct):
    """A ``page.visit``'s params, only its ``url`` decoded."""

    url: Any = None


_url_decoder: Final = msgspec.json.Decoder(_Url)


def page_of(action: str, params: bytes | msgspec.Raw) -> str | None:
    """The page an event counts for: a ``page.visit``'s ``params.url`` when a string."""
    if action != PAGE_ACTION:
        return None
    try:
        url = _url_decoder.decode(params).url
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return url if isinstance(url, str) else None


#: What PostgreSQL's batch insert returns of each row it took.
POSTGRES_RETURNING: Final = (
    f"RETURNING site, received, action, uuid, CASE WHEN action = '{PAGE_ACTION}' "
    "AND jsonb_typeof(params -> 'url') = 'string' THEN params ->> 'url' END, bot"
)

# -- statements (``?`` placeholders; numbered for PostgreSQL) -----------------

_COLUMNS: Final = "site, span, bucket, kind, item, n, err, lift"
_ADD_COUNT: Final = (
    f"INSERT INTO rollups ({_COLUMNS}) VALUES (?, {COUNT_SPAN}, ?, 'count', ?, ?, 0, 0) "
    "ON CONFLICT (site, span, bucket, kind, item) DO UPDATE SET n = rollups.n + excluded.n"
)
_READ_TABLE: Final = (
    "SELECT item, n, err, lift FROM rollups WHERE site = ? AND span = ? AND bucket = ? AND kind = ?"
)
_SET_TOP: Final = (
    f"INSERT INTO rollups ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (site, span, bucket, kind, item) "
    "DO UPDATE SET n = excluded.n, err = excluded.err, lift = excluded.lift"
)
_DROP_TOP: Final = (
    "DELETE FROM rollups WHERE site = ? AND span = ? AND bucket = ? AND kind = ? AND item = ?"
)
_DROP_RECENT: Final = (
    f"DELETE FROM rollups WHERE site = ? AND span = {RECENT_TOP_SPAN} AND bucket < ?"
)


class Fetch(NamedTuple):
    """A query whose rows the plan needs."""

    sql: str
    args: tuple[Any, ...]


class Run(NamedTuple):
    """A statement run once per argument tuple."""

    sql: str
    args: list[tuple[Any, ...]]


class Lock(NamedTuple):
    """Transaction-scoped locks (PostgreSQL advisory locks; SQLite holds its write lock)."""

    keys: list[int]


Step = Fetch | Run | Lock
Plan = Generator[Step, list[tuple[Any, ...]], None]


class Delta(msgspec.Struct):
    """What one batch's inserted rows add: exact counts, and exact per-table key counts."""

    #: (site, minute bucket ms, item) -> n
    counts: dict[tuple[str, int, str], int]
    #: (site, span, bucket ms, table) -> key -> n
    tops: dict[tuple[str, int, int, str], dict[str, int]]


def aggregate(rows: Iterable[NewRow]) -> Delta:
    """The exact counts of a batch's inserted rows, by minute, 10 minutes and hour."""
    rows = list(rows)
    if not rows:
        return Delta({}, {})
    sites, received, actions, uuids, pages, bots = zip(*rows, strict=True)
    return aggregate_columns(sites, received, actions, uuids, pages, bots)


def aggregate_columns(
    sites: Sequence[str],
    received: Sequence[int],
    actions: Sequence[str],
    uuids: Sequence[str],
    pages: Sequence[str | None],
    bots: Sequence[Any],
) -> Delta:
    """:func:`aggregate` of rows given column by column (row ``i`` is each column's item ``i``).

    Rows are grouped by site and minute first (a batch is nearly always one
    site's rows of one minute: then no row is looked at one by one), and
    each group's columns are counted by :class:`collections.Counter`, whose
    counting loop is C.
    """
    minute_ms, ten_ms, hour_ms = COUNT_SPAN * 1000, RECENT_TOP_SPAN * 1000, TOP_SPAN * 1000
    n = len(sites)
    if not n:
        return Delta({}, {})
    first_site, low, high = sites[0], min(received), max(received)
    groups: dict[tuple[str, int], list[int]] | None = None
    if low - low % minute_ms != high - high % minute_ms or sites.count(first_site) != n:
        groups = {}
        for i, (site, at) in enumerate(zip(sites, received, strict=True)):
            groups.setdefault((site, at - at % minute_ms), []).append(i)
    counts: dict[tuple[str, int, str], int] = {}
    tops: dict[tuple[str, int, int, str], dict[str, int]] = {}

    def add(key: tuple[str, int, int, str], counted: Counter[Any]) -> None:
        table = tops.setdefault(key, {})
        for item, k in counted.items():
            table[item] = table.get(item, 0) + k

    parts: Iterable[tuple[tuple[str, int], Sequence[int] | None]]
    parts = [((first_site, low - low % minute_ms), None)] if groups is None else groups.items()
    for (site, minute), rows in parts:
        if rows is None:
            a, u, p, b = actions, uuids, pages, bots
        else:
            a = [actions[i] for i in rows]
            u = [uuids[i] for i in rows]
            p = [pages[i] for i in rows]
            b = [bots[i] for i in rows]
        counts[(site, minute, "accepted")] = len(a)
        by_action = Counter(a)
        for action, item in _SESSION_ITEMS.items():
            if by_action.get(action):
                counts[(site, minute, item)] = by_action[action]
        robots = sum(map(bool, b))
        if robots:
            counts[(site, minute, "bots")] = robots
        by_page = Counter(p)
        by_page.pop(None, None)
        ten = minute - minute % ten_ms
        hour = ten - ten % hour_ms
        for table, counted in (
            ("actions", by_action),
            ("customers", Counter(u)),
            ("pages", by_page),
        ):
            if counted:
                add((site, RECENT_TOP_SPAN, ten, table), counted)
                add((site, TOP_SPAN, hour, table), counted)
    return Delta(counts, tops)


_SESSION_ITEMS: Final = {"session.start": "started", "session.end": "ended"}


def site_lock(site: str) -> int:
    """The advisory lock key of a site's rollups (a signed 64-bit number)."""
    return zlib.crc32(b"eventwire.rollups:" + site.encode()) - 2**31


def plan(delta: Delta) -> Plan:
    """The statements that add a batch's :class:`Delta` to the table, given the rows asked for.

    Sites are locked first, in order (so concurrent writers never wait on
    each other in a cycle); counts are added in place; each top table is read,
    merged with the batch's keys and written back.
    """
    sites = sorted({k[0] for k in delta.counts} | {k[0] for k in delta.tops})
    if not sites:
        return
    yield Lock([site_lock(s) for s in sites])
    if delta.counts:
        yield Run(_ADD_COUNT, [(*key, n) for key, n in sorted(delta.counts.items())])
    newest: dict[str, int] = {}
    for key in sorted(delta.tops):
        site, span, bucket, _ = key
        held = yield Fetch(_READ_TABLE, key)
        writes, drops = merge_table(key, held, delta.tops[key])
        yield Run(_SET_TOP, writes)
        if drops:
            yield Run(_DROP_TOP, drops)
        if span == RECENT_TOP_SPAN:
            newest[site] = max(newest.get(site, bucket), bucket)
    if newest:
        yield Run(_DROP_RECENT, [(s, b - RECENT_TOPS_KEEP_MS) for s, b in sorted(newest.items())])


def merge_table(
    key: tuple[str, int, int, str],
    held_rows: Sequence[tuple[Any, ...]],
    counts: dict[str, int],
    capacity: int = TOP_CAPACITY,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """One top table as stored, merged with a batch's exact key counts: rows to write and drop.

    Two Space-Saving summaries merged. The batch keeps its ``capacity``
    largest keys exactly; each key it leaves out counted at most ``m`` (the
    largest left out), so every key the table holds and the batch does not
    rises by ``m`` in both bound and error: the table's ``lift`` does that
    for all of them at once, and the floor rises by ``m``. A kept key new to
    the table starts at the old floor with that as its error. Past
    ``2 * capacity`` keys the ``capacity`` largest stay and the floor is at
    least the largest dropped. Rows written hold ``(n, err)`` less the lift.
    """
    total = floor = lift = 0
    held: dict[str, list[int]] = {}
    for item, n, err, row_lift in held_rows:
        if item == "":
            total, floor, lift = int(n), int(err), int(row_lift)
        else:
            held[item] = [int(n), int(err)]
    stored_before = set(held)
    if len(counts) > capacity:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept, m = dict(ranked[:capacity]), ranked[capacity][1]
    else:
        kept, m = counts, 0
    lift += m  # every held key: bound and error up by m, without a write
    for item, n in kept.items():
        stored = held.get(item)
        if stored is None:
            held[item] = [floor + n - lift, floor - lift]
        else:  # exact here: up by n, error as it was
            stored[0] += n - m
            stored[1] -= m
    floor += m
    total += sum(counts.values())
    changed = set(kept)
    drops: list[tuple[Any, ...]] = []
    if len(held) > 2 * capacity:
        ranked_held = sorted(held.items(), key=lambda kv: (-kv[1][0], kv[0]))
        for item, (n, _) in ranked_held[capacity:]:
            floor = max(floor, n + lift)
            del held[item]
            changed.discard(item)
            if item in stored_before:
                drops.append((*key, item))
    writes = [(*key, item, *held[item], 0) for item in sorted(changed)]
    writes.append((*key, "", total, floor, lift))
    return writes, drops


def true_bounds(held_rows: Sequence[tuple[Any, ...]]) -> dict[str, tuple[int, int]]:
    """A stored table's rows as ``item -> (bound, error)`` (the table row: total, floor)."""
    lift = next((int(r[3]) for r in held_rows if r[0] == ""), 0)
    return {
        str(item): (int(n), int(err)) if item == "" else (int(n) + lift, int(err) + lift)
        for item, n, err, _ in held_rows
    }


# -- carrying out a plan --------------------------------------------------------


def write_sqlite(db: sqlite3.Connection, inserted: Sequence[NewRow] | Delta) -> None:
    """Add the rows a batch inserted (or their :class:`Delta`) to the rollups, in its
    transaction (before COMMIT)."""
    delta = inserted if isinstance(inserted, Delta) else aggregate(inserted)
    steps = plan(delta)
    step = next(steps, None)
    while step is not None:
        answer: list[tuple[Any, ...]] = []
        if isinstance(step, Fetch):
            answer = db.execute(step.sql, step.args).fetchall()
        elif isinstance(step, Run):
            db.executemany(step.sql, step.args)
        step = _send(steps, answer)


def _send(steps: Plan, answer: list[tuple[Any, ...]]) -> Step | None:
    """The plan's next step, given the rows the last one asked for; None at its end."""
    try:
        return steps.send(answer)
    except StopIteration:
        return None


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1``, ``$2``, ... (no ``?`` in literals here)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))


async def write_postgres(conn: Any, inserted: Sequence[Any], limit_s: float) -> None:
    """Add the rows an insert returned (:data:`POSTGRES_RETURNING`) to the rollups, in its
    transaction."""
    if not inserted:
        return
    steps = plan(aggregate(tuple(r) for r in inserted))
    step = next(steps, None)
    while step is not None:
        answer: list[tuple[Any, ...]] = []
        if isinstance(step, Lock):
            for key in step.keys:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", key, timeout=limit_s)
        elif isinstance(step, Fetch):
            answer = [
                tuple(r) for r in await conn.fetch(numbered(step.sql), *step.args, timeout=limit_s)
            ]
        else:
            await conn.executemany(numbered(step.sql), step.args, timeout=limit_s)
        step = _send(steps, answer)
