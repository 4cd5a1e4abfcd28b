"""Range views of the stored rollups: what ``GET /v1/sites/{site}/rollups`` shows.

This module owns the three ranges (1 hour, 24 hours, 7 days: their buckets and
which top tables they read), the view's JSON Structs, its queries over the
``rollups`` table (:mod:`eventwire.persist.rollups` writes it) and
:class:`RollupReader`, which reads them from the store a DSN names without
ever creating it. Every query is one scan of a primary-key range.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec

from eventwire.persist.rollups import (
    COUNT_SPAN,
    COUNTS,
    RECENT_TOP_SPAN,
    TABLES,
    TOP_SHOWN,
    TOP_SPAN,
    Fetch,
    numbered,
)


class RangeSpec(NamedTuple):
    """A view's length, the seconds of each of its buckets, and the span of its top tables."""

    seconds: int
    step: int
    top_span: int


RANGES: Final = {
    "1h": RangeSpec(3600, 60, RECENT_TOP_SPAN),
    "24h": RangeSpec(86400, 900, TOP_SPAN),
    "7d": RangeSpec(7 * 86400, 3600, TOP_SPAN),
}


class Bucket(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The exact counts of one bucket starting at ``t`` (ms), or of a whole range."""

    t: int = 0
    accepted: int = 0
    started: int = 0
    ended: int = 0
    bots: int = 0


class TopRow(msgspec.Struct, array_like=True):
    """One row of a top table: key, count, and how much the count may exceed the truth."""

    key: str
    count: int
    error: int


class TopTable(msgspec.Struct, kw_only=True):
    """A top table over a range: the exact number of entries counted, and its leading rows."""

    total: int
    rows: list[TopRow]


class RangeView(msgspec.Struct, kw_only=True):
    """[ext] A site's stored rollups over a range (docs/protocol.md, the rollups route).

    ``since``: the first ms counted (the start of the oldest bucket);
    ``top_since``: where the top tables start (a whole 10 minutes or hour,
    at or before ``since``); ``newest``: the start of the newest minute the
    store has counted for the site (null: none), which shows how far the
    persist worker got.
    """

    site: str
    range: str
    now: int
    since: int
    step: int
    top_since: int
    buckets: list[Bucket]
    totals: Bucket
    top: dict[str, TopTable]
    newest: int | None


class RollupsUnavailable(Exception):
    """The store cannot answer: missing, unreachable, or without the rollups table yet."""


_BUCKETS: Final = (
    "SELECT bucket - bucket % ? AS t, item, CAST(sum(n) AS BIGINT) FROM rollups "
    f"WHERE site = ? AND span = {COUNT_SPAN} AND kind = 'count' AND bucket >= ? AND bucket <= ? "
    "GROUP BY t, item ORDER BY t"
)
_TOP_TOTAL: Final = (
    "SELECT CAST(coalesce(sum(n), 0) AS BIGINT), CAST(coalesce(sum(err), 0) AS BIGINT) "
    "FROM rollups WHERE site = ? AND span = ? AND kind = ? AND item = '' "
    "AND bucket >= ? AND bucket <= ?"
)
#: Per key: the sum of (bound - that table's floor) over the tables holding it (the
#: bound being n + the table's lift), and of its lower bounds (n - err: the lift
#: cancels); the floors of all tables are added after. One scan
#: of the primary key's range (the floor comes to each row by a window, not a join: a
#: join was planned badly by PostgreSQL without fresh statistics).
_TOP_ROWS: Final = (
    "SELECT item, CAST(sum(n + fl) AS BIGINT) AS up, CAST(sum(n - err) AS BIGINT) AS low "
    "FROM (SELECT item, n, err, max(CASE WHEN item = '' THEN lift - err END) "
    "OVER (PARTITION BY bucket) AS fl FROM rollups "
    "WHERE site = ? AND span = ? AND kind = ? AND bucket >= ? AND bucket <= ?) AS held "
    "WHERE item <> '' GROUP BY item ORDER BY low DESC, up DESC, item LIMIT ?"
)
_NEWEST: Final = (
    f"SELECT max(bucket) FROM rollups WHERE site = ? AND span = {COUNT_SPAN} AND kind = 'count'"
)


def view_queries(site: str, spec: RangeSpec, now_ms: int) -> tuple[int, int, list[Fetch]]:
    """``since``, ``top_since`` and the queries of a view, in the order :func:`build_view` reads."""
    step_ms = spec.step * 1000
    since = now_ms - now_ms % step_ms - spec.seconds * 1000 + step_ms
    top_ms = spec.top_span * 1000
    top_since = since - since % top_ms
    queries = [Fetch(_BUCKETS, (step_ms, site, since, now_ms))]
    for table in TABLES:
        args = (site, spec.top_span, table, top_since, now_ms)
        queries += [Fetch(_TOP_TOTAL, args), Fetch(_TOP_ROWS, (*args, TOP_SHOWN))]
    queries.append(Fetch(_NEWEST, (site,)))
    return since, top_since, queries


def build_view(
    site: str, name: str, now_ms: int, since: int, top_since: int, answers: list[list[Any]]
) -> RangeView:
    """A :class:`RangeView` from the rows of :func:`view_queries`."""
    spec = RANGES[name]
    buckets: dict[int, Bucket] = {}
    totals = Bucket()
    for t, item, n in answers[0]:
        b = buckets.setdefault(int(t), Bucket(t=int(t)))
        if item in COUNTS:
            setattr(b, item, getattr(b, item) + int(n))
            setattr(totals, item, getattr(totals, item) + int(n))
    top: dict[str, TopTable] = {}
    for i, table in enumerate(TABLES):
        (total, floors), rows = answers[1 + 2 * i][0], answers[2 + 2 * i]
        out = []
        for key, up, low in rows:
            count = int(up) + int(floors)
            out.append(TopRow(key, count, count - int(low)))
        top[table] = TopTable(total=int(total), rows=out)
    newest = answers[-1][0][0] if answers[-1] else None
    return RangeView(
        site=site,
        range=name,
        now=now_ms,
        since=since,
        step=spec.step,
        top_since=top_since,
        buckets=[buckets[t] for t in sorted(buckets)],
        totals=totals,
        top=top,
        newest=None if newest is None else int(newest),
    )


class RollupReader:
    """Reads range views from the store a DSN names; connects on first use, again after a loss.

    It never creates the store or its tables: a missing SQLite file, an
    unreachable PostgreSQL or a store without the table raise
    :class:`RollupsUnavailable` with what to do.
    """

    #: How long connecting and each query may take (s).
    TIMEOUT: Final = 5.0

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._postgres = dsn.startswith(("postgresql://", "postgres://"))
        self._db: sqlite3.Connection | None = None
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def view(self, site: str, name: str, now_ms: int) -> RangeView:
        """The view ``name`` (a key of :data:`RANGES`) of a site at ``now_ms``.

        Raises:
            KeyError: not a range of :data:`RANGES`.
            RollupsUnavailable: the store cannot answer (the message says why).
        """
        since, top_since, queries = view_queries(site, RANGES[name], now_ms)
        async with self._lock:
            if self._postgres:
                answers = await self._postgres_answers(queries)
            else:
                answers = await asyncio.to_thread(self._sqlite_answers, queries)
        return build_view(site, name, now_ms, since, top_since, answers)

    def _sqlite_answers(self, queries: list[Fetch]) -> list[list[Any]]:
        if self._db is None:
            from eventwire.persist.sinks import sqlite_path

            path = sqlite_path(self.dsn)
            if not path.exists():
                raise RollupsUnavailable(
                    f"no store at {path} yet: the persist worker creates it (persist_dsn)"
                )
            self._db = _open_sqlite_reader(path)
        try:
            # One read transaction: every query sees the same commit.
            self._db.execute("BEGIN")
            try:
                return [self._db.execute(q.sql, q.args).fetchall() for q in queries]
            finally:
                self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise RollupsUnavailable(_missing_table(str(exc))) from None

    async def _postgres_answers(self, queries: list[Fetch]) -> list[list[Any]]:
        import asyncpg  # type: ignore[import-untyped]

        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self.dsn, timeout=self.TIMEOUT)
            async with self._conn.transaction(isolation="repeatable_read", readonly=True):
                return [
                    await self._conn.fetch(numbered(q.sql), *q.args, timeout=self.TIMEOUT)
                    for q in queries
                ]
        except asyncpg.UndefinedTableError as exc:
            raise RollupsUnavailable(_missing_table(str(exc))) from None
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise RollupsUnavailable(f"the store does not answer: {exc}") from None

    async def close(self) -> None:
        """Close the connection, if one was made."""
        async with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                await asyncio.to_thread(db.close)
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await conn.close()


def _open_sqlite_reader(path: Path) -> sqlite3.Connection:
    """A connection that reads (never creates) the worker's file; WAL lets it read beside writes."""
    uri = path.resolve().as_uri() + "?mode=rw"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA query_only = ON")
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def _missing_table(error: str) -> str:
    if "rollups" in error:
        return "the store has no rollups table yet: start a persist worker of this version once"
    return f"the store cannot answer: {error}"
