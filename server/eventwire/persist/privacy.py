"""The store side of a customer's privacy: aliases, forget, export and retention, in SQL.

Every function takes an opened :class:`~eventwire.persist.sinks.Sink` (SQLite
or PostgreSQL, one schema) and runs its statements through the sink's
``run``, one call at a time with the worker's writes. A customer's rows are
the events recorded under its uuid or one of its aliases, the merge events
(``client.identify``, ``client.alias``) whose ``params.previous_uuid`` names
one of them, their sessions, and the ``aliases`` rows that link them.

Retention deletes in batches of :data:`RETAIN_BATCH` rows, each its own
short transaction, so the worker's batch writes wait at most one of them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import msgspec

from eventwire.persist.sinks import PostgresSink, Sink, SqliteSink

#: Rows one retention statement deletes (one short transaction each).
RETAIN_BATCH: Final = 5000
#: Days in ms.
DAY_MS: Final = 86_400_000

_EVENT_COLUMNS: Final = (
    "site", "producer", "seq", "uuid", "session", "action", "label", "time", "received",
    "original_time", "params", "authenticated",
)  # fmt: skip
_SESSION_COLUMNS: Final = (
    "site", "session", "uuid", "started", "ended", "reason", "duration_ms", "events",
)  # fmt: skip
_ALIAS_COLUMNS: Final = ("site", "alias", "uuid", "since")


def _is_sqlite(sink: Sink) -> bool:
    if isinstance(sink, SqliteSink):
        return True
    if isinstance(sink, PostgresSink):
        return False
    raise TypeError(f"not a store sink: {type(sink).__name__}")


class _Where:
    """The predicates of one customer's rows, for one dialect.

    Args:
        sqlite: SQLite (``?``) or PostgreSQL (``$n``).
        site: the site.
        uuids: the customer and its aliases.
    """

    def __init__(self, sqlite: bool, site: str, uuids: Sequence[str]) -> None:
        self.args: list[Any] = [site, *uuids]
        if sqlite:
            marks = ", ".join("?" for _ in uuids)
            previous = "json_extract(params, '$.previous_uuid')"
            site_mark = "?"
        else:
            marks = ", ".join(f"${i + 2}" for i in range(len(uuids)))
            previous = "params->>'previous_uuid'"
            site_mark = "$1"
        self.events = (
            f"site = {site_mark} AND (uuid IN ({marks}) OR (action IN "
            f"('client.identify', 'client.alias') AND {previous} IN ({marks})))"
        )
        self.sessions = f"site = {site_mark} AND uuid IN ({marks})"
        self.aliases = f"site = {site_mark} AND (alias IN ({marks}) OR uuid IN ({marks}))"
        #: Their keys in the stored top tables of customers (eventwire.persist.rollups);
        #: the tables' totals stay (counts of events, no uuid).
        self.rollups = f"site = {site_mark} AND kind = 'customers' AND item IN ({marks})"
        #: The events predicate repeats the uuids (SQLite's ? are positional).
        self.events_args: list[Any] = [site, *uuids, *uuids] if sqlite else self.args
        self.aliases_args: list[Any] = [site, *uuids, *uuids] if sqlite else self.args


async def aliases_in_store(sink: Sink, site: str, uuid: str) -> list[str]:
    """The uuids the store's ``aliases`` table merged into ``uuid``."""
    if _is_sqlite(sink):

        def query(db: sqlite3.Connection) -> list[str]:
            cur = db.execute(
                "SELECT alias FROM aliases WHERE site = ? AND uuid = ? ORDER BY alias", (site, uuid)
            )
            return [r[0] for r in cur.fetchall()]

        found: list[str] = await sink.run(query)
        return found

    async def fetch(conn: Any) -> list[str]:
        rows = await conn.fetch(
            "SELECT alias FROM aliases WHERE site = $1 AND uuid = $2 ORDER BY alias", site, uuid
        )
        return [r[0] for r in rows]

    out: list[str] = await sink.run(fetch)
    return out


async def forget_in_store(
    sink: Sink, site: str, uuids: Iterable[str], dry_run: bool = False
) -> dict[str, int]:
    """Delete a customer's rows (events, sessions, aliases, rollups' keys) in one transaction.

    Returns:
        Rows per table (``events``, ``sessions``, ``aliases``, ``rollups``):
        deleted, or found with ``dry_run`` (nothing changes).
    """
    ids = sorted(set(uuids))
    if not ids:
        return {"events": 0, "sessions": 0, "aliases": 0, "rollups": 0}
    sqlite = _is_sqlite(sink)
    where = _Where(sqlite, site, ids)
    plan = (
        ("events", where.events, where.events_args),
        ("sessions", where.sessions, where.args),
        ("aliases", where.aliases, where.aliases_args),
        ("rollups", where.rollups, where.args),
    )
    if sqlite:

        def change(db: sqlite3.Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            db.execute("BEGIN IMMEDIATE")
            try:
                for table, predicate, args in plan:
                    if dry_run:
                        sql = f"SELECT count(*) FROM {table} WHERE {predicate}"
                        out[table] = db.execute(sql, args).fetchone()[0]
                    else:
                        out[table] = db.execute(
                            f"DELETE FROM {table} WHERE {predicate}", args
                        ).rowcount
                db.execute("ROLLBACK" if dry_run else "COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return out

        done: dict[str, int] = await sink.run(change)
        return done

    async def change_pg(conn: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        async with conn.transaction():
            for table, predicate, args in plan:
                if dry_run:
                    out[table] = await conn.fetchval(
                        f"SELECT count(*) FROM {table} WHERE {predicate}", *args
                    )
                else:
                    status = await conn.execute(f"DELETE FROM {table} WHERE {predicate}", *args)
                    out[table] = int(status.rsplit(" ", 1)[1])
        return out

    done_pg: dict[str, int] = await sink.run(change_pg)
    return done_pg


def _export_line(table: str, columns: Sequence[str], row: Sequence[Any]) -> bytes:
    record: dict[str, Any] = {"table": table}
    for name, value in zip(columns, row, strict=True):
        if name == "params" and isinstance(value, str):
            value = msgspec.json.decode(value)
        elif name == "authenticated":
            value = bool(value)
        record[name] = value
    return msgspec.json.encode(record)


async def export_from_store(sink: Sink, site: str, uuids: Iterable[str]) -> list[bytes]:
    """A customer's rows as JSON lines: events (in time order), then sessions, then aliases.

    Each line is one row with ``table`` (``events``, ``sessions``, ``aliases``)
    and the row's columns (``params`` as an object).
    """
    ids = sorted(set(uuids))
    if not ids:
        return []
    sqlite = _is_sqlite(sink)
    where = _Where(sqlite, site, ids)
    queries = (
        ("events", _EVENT_COLUMNS, where.events, where.events_args, "time, received, seq"),
        ("sessions", _SESSION_COLUMNS, where.sessions, where.args, "started, session"),
        ("aliases", _ALIAS_COLUMNS, where.aliases, where.aliases_args, "since, alias"),
    )
    lines: list[bytes] = []
    if sqlite:

        def read(db: sqlite3.Connection) -> list[bytes]:
            out: list[bytes] = []
            for table, columns, predicate, args, order in queries:
                cur = db.execute(
                    f"SELECT {', '.join(columns)} FROM {table} WHERE {predicate} ORDER BY {order}",
                    args,
                )
                out += [_export_line(table, columns, r) for r in cur.fetchall()]
            return out

        lines = await sink.run(read)
        return lines

    async def read_pg(conn: Any) -> list[bytes]:
        out: list[bytes] = []
        for table, columns, predicate, args, order in queries:
            cols = ", ".join(c + "::text" if c == "params" else c for c in columns)
            rows = await conn.fetch(
                f"SELECT {cols} FROM {table} WHERE {predicate} ORDER BY {order}", *args
            )
            out += [_export_line(table, columns, tuple(r)) for r in rows]
        return out

    lines = await sink.run(read_pg)
    return lines


def _retention_statements(sqlite: bool) -> Iterator[tuple[str, str]]:
    """(table, one bounded DELETE) of retention, in order: events, sessions, aliases.

    Arguments: site, cutoff (ms), batch size. A session goes with its last
    moment (its end, else its start); an alias once it is older than the cutoff
    and no event of its uuid is left.
    """
    if sqlite:
        pick = "rowid IN (SELECT rowid FROM {table} WHERE {cond} LIMIT ?3)"
        p_site, p_cut = "?1", "?2"
    else:
        pick = "ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE {cond} LIMIT $3))"
        p_site, p_cut = "$1", "$2"
    conds = {
        "events": f"site = {p_site} AND time < {p_cut}",
        "sessions": f"site = {p_site} AND coalesce(ended, started, 0) < {p_cut}",
        "aliases": (
            f"site = {p_site} AND since < {p_cut} AND NOT EXISTS (SELECT 1 FROM events e "
            "WHERE e.site = aliases.site AND e.uuid = aliases.alias)"
        ),
    }
    for table, cond in conds.items():
        yield table, f"DELETE FROM {table} WHERE " + pick.format(table=table, cond=cond)


async def retain_batch(
    sink: Sink, site: str, cutoff_ms: int, batch: int = RETAIN_BATCH
) -> dict[str, int]:
    """Delete at most ``batch`` rows per table older than ``cutoff_ms``; rows deleted per table.

    Each table's delete is its own transaction. Call again while any count is ``batch``.
    """
    sqlite = _is_sqlite(sink)
    out: dict[str, int] = {}
    for table, sql in _retention_statements(sqlite):
        if sqlite:

            def delete(db: sqlite3.Connection, sql: str = sql) -> int:
                db.execute("BEGIN IMMEDIATE")
                try:
                    n = db.execute(sql, (site, cutoff_ms, batch)).rowcount
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                return int(n)

            out[table] = await sink.run(delete)
        else:

            async def delete_pg(conn: Any, sql: str = sql) -> int:
                status = await conn.execute(sql, site, cutoff_ms, batch)
                return int(status.rsplit(" ", 1)[1])

            out[table] = await sink.run(delete_pg)
    return out
