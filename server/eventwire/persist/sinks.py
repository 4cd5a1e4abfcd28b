"""The event store of the persistence worker: schema, migrations, and the SQLite/PostgreSQL sinks.

This module owns the SQL: the one schema both stores share (versioned by
``schema_version``, migrated forward by :data:`MIGRATIONS` on first start),
the rows an event becomes, the idempotent batch write and the activity feed
query. It never speaks Redis. Every write is one transaction, and every
insert is ``ON CONFLICT DO NOTHING`` (events) or an upsert (sessions), so a
redelivered stream entry never makes a second row. An event row's identity is
the event's own ``(site, producer, seq)``, never its stream entry id: the
streams of a partitioned site number their entries independently (equal ids
in two partitions are two events), while ``(producer, seq)`` names one event
wherever it is stored (a producer's seqs rise over its whole lifetime,
docs/protocol.md section 2), so no migration was needed for partitions.

DSNs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (the
SQLAlchemy convention) or a plain file path for SQLite; ``postgresql://`` or
``postgres://`` for PostgreSQL (asyncpg; other query parameters such as
``search_path`` are sent to the server as settings).
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import operator
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Protocol

import msgspec

from eventwire.core.records import StoredEvent
from eventwire.persist import rollups

#: The default store, relative to where the worker runs.
DEFAULT_DSN: Final = "sqlite:///data/events.db"

#: Migrations, in order; migration ``i`` (0-based) brings the schema to version ``i + 1``.
#: ``{json}`` is ``jsonb`` on PostgreSQL and ``TEXT`` on SQLite; every other type is
#: spelled the same in both. Never edit a released step: append a new one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE events (
            site TEXT NOT NULL,
            producer TEXT NOT NULL,
            seq BIGINT NOT NULL,
            uuid TEXT NOT NULL,
            session TEXT NOT NULL,
            action TEXT NOT NULL,
            label TEXT NOT NULL,
            time BIGINT NOT NULL,
            received BIGINT NOT NULL,
            original_time BIGINT,
            params {json} NOT NULL,
            authenticated BOOLEAN NOT NULL DEFAULT FALSE,
            PRIMARY KEY (site, producer, seq)
        )""",
        # The activity feed: one customer's events, newest first.
        "CREATE INDEX events_customer ON events (site, uuid, time DESC)",
        """CREATE TABLE sessions (
            site TEXT NOT NULL,
            session TEXT NOT NULL,
            uuid TEXT NOT NULL,
            started BIGINT,
            ended BIGINT,
            reason TEXT,
            duration_ms BIGINT,
            events BIGINT,
            PRIMARY KEY (site, session)
        )""",
    ),
    (
        # Anonymous uuids merged into customers (docs/protocol.md section 17): from the
        # stored client.identify / client.alias events that say merged.
        """CREATE TABLE aliases (
            site TEXT NOT NULL,
            alias TEXT NOT NULL,
            uuid TEXT NOT NULL,
            since BIGINT NOT NULL,
            PRIMARY KEY (site, alias)
        )""",
        "CREATE INDEX aliases_customer ON aliases (site, uuid)",
        # Retention deletes by time across customers.
        "CREATE INDEX events_time ON events (site, time)",
    ),
    # Visitors: events of a connection found to be a bot (docs/protocol.md section 18).
    ("ALTER TABLE events ADD COLUMN bot BOOLEAN NOT NULL DEFAULT FALSE",),
    # 4: per-minute counts and bounded top tables (eventwire.persist.rollups).
    rollups.MIGRATION,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: The ``events`` columns, in :class:`StoredEvent`'s field order: a row is a stored event.
_EVENT_COLUMN_NAMES: Final = StoredEvent.__struct_fields__
_EVENT_COLUMNS: Final = ", ".join(_EVENT_COLUMN_NAMES)
#: PostgreSQL's staging table of a batch (temporary: one per connection).
_STAGING: Final = "eventwire_events_staging"

#: session.start: the row gets its uuid and start; an earlier session.end's fields stay.
_SESSION_START_SQL: Final = (
    "INSERT INTO sessions (site, session, uuid, started) VALUES ({p1}, {p2}, {p3}, {p4}) "
    "ON CONFLICT (site, session) DO UPDATE SET started = excluded.started"
)
#: session.end: the row gets its end fields; an earlier session.start's start stays.
_SESSION_END_SQL: Final = (
    "INSERT INTO sessions (site, session, uuid, ended, reason, duration_ms, events) "
    "VALUES ({p1}, {p2}, {p3}, {p4}, {p5}, {p6}, {p7}) "
    "ON CONFLICT (site, session) DO UPDATE SET ended = excluded.ended, "
    "reason = excluded.reason, duration_ms = excluded.duration_ms, events = excluded.events"
)
#: original_time while a row is bound, for NULL: binding None costs Python's sqlite3
#: a microsecond (an adaptation looked up), an int a tenth of that. Below every
#: value a row can hold (decoding refuses -2**63), so it never stands for a time.
_NO_TIME: Final = -(2**63)
#: One row of SQLite's batch insert, its values as :func:`sqlite_values` makes them.
_SQLITE_ROW: Final = (
    "("
    + ", ".join(
        "CAST(? AS TEXT)"
        if c == "params"
        else f"NULLIF(?, {_NO_TIME})"
        if c == "original_time"
        else "?"
        for c in _EVENT_COLUMN_NAMES
    )
    + ")"
)
#: Rows per statement of SQLite's batch insert, largest first (a batch is cut into
#: as many of the first as fit, then of the next...). Each statement's step runs
#: without Python's GIL and takes it back at its end, when the other thread (which
#: reads and decodes the next batch) may hold it for up to the switch interval:
#: 256 rows a statement hand the GIL over 20 times per 5,000 rows, not 5,000.
SQLITE_CHUNKS: Final = (256, 16, 1)
_SQLITE_INSERTS: Final = {
    n: f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES "
    + ", ".join([_SQLITE_ROW] * n)
    + " ON CONFLICT DO NOTHING"
    for n in SQLITE_CHUNKS
}
#: PostgreSQL's insert of a batch from its staging table (``params`` there is UTF-8 bytea),
#: the rows stored already left out (see :meth:`PostgresSink._write`).
_PG_INSERT: Final = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) SELECT "
    + ", ".join(
        "convert_from(params, 'UTF8')::jsonb" if c == "params" else c for c in _EVENT_COLUMN_NAMES
    )
    + f" FROM {_STAGING} ON CONFLICT DO NOTHING"
)


#: Largest value a BIGINT column holds; a larger one is refused at decode, not by the store.
_BIGINT_MAX: Final = 2**63 - 1
_BigInt = Annotated[int, msgspec.Meta(ge=-_BIGINT_MAX, le=_BIGINT_MAX)]


class EventRow(StoredEvent, kw_only=True):
    """An event as the ``events`` table holds it: :class:`StoredEvent`, field for column.

    Derived, not repeated: only what the store adds is declared here, the
    BIGINT range of the integer columns and ``params`` kept as the JSON it
    came as (:class:`msgspec.Raw`, checked to be JSON, stored as text).
    Decoding ``params`` into objects only to encode them again for the
    column cost more than half the worker's Python time.
    """

    seq: _BigInt
    time: _BigInt
    received: _BigInt
    params: msgspec.Raw  # type: ignore[assignment]  # StoredEvent's dict, as its JSON
    original_time: _BigInt | None = None


_decoder: Final = msgspec.json.Decoder(StoredEvent)
_row_decoder: Final = msgspec.json.Decoder(EventRow)
_rows_decoder: Final = msgspec.json.Decoder(list[EventRow])
_encoder: Final = msgspec.json.Encoder()


def decode_event(raw: bytes) -> StoredEvent:
    """Decode an entry's ``event`` field.

    Raises:
        ValueError: not the JSON of a stored event (the message says why).
    """
    try:
        event = _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"undecodable event: {exc}") from None
    for name in ("seq", "time", "received", "original_time"):
        value = getattr(event, name)
        if value is not None and not -_BIGINT_MAX <= value <= _BIGINT_MAX:
            raise ValueError(f"undecodable event: {name} {value} is out of BIGINT range")
    return event


_NOT_OBJECT: Final = "undecodable event: Expected `object`, got another JSON value - at `$.params`"


def decode_row(site: str, raw: bytes) -> EventRow:
    """The row of one entry's ``event`` field of ``site``'s stream (what :func:`to_row`
    of :func:`decode_event` makes, decoding the event once and ``params`` not at all).

    Raises:
        ValueError: not the JSON of a stored event (the message says why).
    """
    try:
        row = _row_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"undecodable event: {exc}") from None
    if bytes(row.params)[:1] != b"{":
        raise ValueError(_NOT_OBJECT)
    row.site = site
    return row


def decode_rows(site: str, raws: Sequence[bytes]) -> list[EventRow] | None:
    """The rows of many entries of ``site``'s stream in one decoder call, as
    :func:`decode_row` makes them; None if any one is not a stored event (then
    decode one by one to find it). One call for a whole batch: a third of the
    decoding time per entry, which is spent calling the decoder.
    """
    try:
        rows = _rows_decoder.decode(b"[" + b",".join(raws) + b"]")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    for row in rows:
        if bytes(row.params)[:1] != b"{":
            return None
        if row.site != site:
            row.site = site
    return rows


#: The fields :func:`sqlite_values` and :func:`_pg_records` spell out, in order (checked at import).
_VALUES_ORDER: Final = (
    "site", "uuid", "session", "producer", "seq", "action", "label", "time", "received",
    "params", "original_time", "authenticated", "bot",
)  # fmt: skip
if _EVENT_COLUMN_NAMES != _VALUES_ORDER:  # pragma: no cover - a StoredEvent change
    raise RuntimeError("sqlite_values must follow StoredEvent's fields")
_utf8: Final = codecs.utf_8_decode


def _utf8_or_bytes(params: msgspec.Raw) -> tuple[Any, ...]:
    """``params`` as :data:`_utf8` gives it (its text first), or its bytes if not UTF-8."""
    try:
        return _utf8(params)
    except UnicodeDecodeError:
        return (bytes(params),)


def sqlite_values(rows: Sequence[EventRow]) -> list[tuple[Any, ...]]:
    """The rows as the batch insert binds them, each value of a type Python's sqlite3
    binds without looking up an adaptation: ``params`` as text, the booleans as 0/1,
    no original_time as :data:`_NO_TIME`. Binding bytes, None and bools cost three
    times as much per row (15.7 against 3.3 us for 13 columns of bytes or str).

    ``params`` that are not UTF-8 stay bytes (stored as ``CAST(x AS TEXT)`` makes them, as
    before): a batch with one is made again with :func:`_utf8_or_bytes`, which costs a
    Python call per row; the rest with the decoder itself.
    """
    try:
        return _sqlite_values(rows, _utf8)
    except UnicodeDecodeError:
        return _sqlite_values(rows, _utf8_or_bytes)


def _sqlite_values(
    rows: Sequence[EventRow], text: Callable[[msgspec.Raw], tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    """:func:`sqlite_values`, ``params`` the first value of ``text(params)``."""
    return [
        (
            r.site, r.uuid, r.session, r.producer, r.seq, r.action, r.label, r.time,
            r.received, text(r.params)[0],
            _NO_TIME if r.original_time is None else r.original_time,
            1 if r.authenticated else 0, 1 if r.bot else 0,
        )
        for r in rows
    ]  # fmt: skip


#: What SQLite's batch insert binds: per statement size of :data:`SQLITE_CHUNKS`,
#: the flat values of each statement of that many rows.
SqliteBinds = list[tuple[int, list[tuple[Any, ...]]]]


def sqlite_binds(values: Sequence[tuple[Any, ...]]) -> SqliteBinds:
    """:func:`sqlite_values` cut into the statements of :data:`SQLITE_CHUNKS`, in order."""
    out: SqliteBinds = []
    at, flat = 0, itertools.chain.from_iterable
    for size in SQLITE_CHUNKS:
        end = at + (len(values) - at) // size * size
        if end > at:
            out.append((size, [tuple(flat(values[i : i + size])) for i in range(at, end, size)]))
        at = end
    return out


_get_site: Final = operator.attrgetter("site")
_get_received: Final = operator.attrgetter("received")
_get_action: Final = operator.attrgetter("action")
_get_uuid: Final = operator.attrgetter("uuid")
_get_bot: Final = operator.attrgetter("bot")


def rollup_delta(rows: Sequence[EventRow]) -> rollups.Delta:
    """What the rows add to the rollups if every one is new (:func:`rollups.aggregate`)."""
    actions = list(map(_get_action, rows))
    page = rollups.PAGE_ACTION
    pages = [
        rollups.page_of(page, r.params) if a == page else None
        for a, r in zip(actions, rows, strict=True)
    ]
    return rollups.aggregate_columns(
        list(map(_get_site, rows)),
        list(map(_get_received, rows)),
        actions,
        list(map(_get_uuid, rows)),
        pages,
        list(map(_get_bot, rows)),
    )


class PackedRows(list[EventRow]):
    """A batch's rows with what the SQLite sink's thread would otherwise compute from them:
    their :func:`sqlite_binds`, and their :func:`rollup_delta` (used when every row is
    new). Made by :func:`pack_rows` on the caller's thread, so the sink's thread holds
    Python's GIL for less (while it does, the other thread waits, and the other way
    round)."""

    binds: SqliteBinds
    delta: rollups.Delta


def pack_rows(rows: Sequence[EventRow]) -> PackedRows:
    """``rows`` as :class:`PackedRows` (a write of them by any sink is the same write)."""
    packed = PackedRows(rows)
    packed.binds = sqlite_binds(sqlite_values(rows))
    packed.delta = rollup_delta(rows)
    return packed


def to_row(site: str, event: StoredEvent) -> EventRow:
    """The row of one decoded event of ``site``'s stream."""
    fields = msgspec.structs.asdict(event)
    fields.update(site=site, params=msgspec.Raw(_encoder.encode(event.params)))
    return EventRow(**fields)


#: The actions that feed the ``sessions`` table.
_SESSION_ACTIONS: Final = frozenset({"session.start", "session.end"})


def _session_args(row: EventRow) -> tuple[str, tuple[Any, ...]] | None:
    """Which session statement (``start``/``end``) a row feeds, with its arguments."""
    if row.action == "session.start":
        return "start", (row.site, row.session, row.uuid, row.time)
    if row.action == "session.end":
        params = msgspec.json.decode(row.params)

        def num(key: str) -> int | None:
            value = params.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        reason = params.get("reason")
        return "end", (
            row.site,
            row.session,
            row.uuid,
            row.time,
            reason if isinstance(reason, str) else None,
            num("duration_ms"),
            num("events"),
        )
    if row.action in _MERGE_ACTIONS and b'"merged":true' in bytes(row.params):
        found = msgspec.json.decode(row.params)
        previous = found.get("previous_uuid")
        if found.get("merged") is True and isinstance(previous, str) and previous != row.uuid:
            return "alias", (row.site, previous, row.uuid, row.time)
    return None


#: The events that may record a merge (with ``params.merged`` true).
_MERGE_ACTIONS: Final = frozenset({"client.identify", "client.alias"})
#: A merge: the first one of an anonymous uuid wins, as in Redis.
_ALIAS_SQL: Final = (
    "INSERT INTO aliases (site, alias, uuid, since) VALUES ({p1}, {p2}, {p3}, {p4}) "
    "ON CONFLICT (site, alias) DO NOTHING"
)
_SQLITE_STATEMENTS: Final = {
    "start": _SESSION_START_SQL.format(**{f"p{i}": "?" for i in range(1, 5)}),
    "end": _SESSION_END_SQL.format(**{f"p{i}": "?" for i in range(1, 8)}),
    "alias": _ALIAS_SQL.format(**{f"p{i}": "?" for i in range(1, 5)}),
}
_PG_STATEMENTS: Final = {
    "start": _SESSION_START_SQL.format(**{f"p{i}": f"${i}" for i in range(1, 5)}),
    "end": _SESSION_END_SQL.format(**{f"p{i}": f"${i}" for i in range(1, 8)}),
    "alias": _ALIAS_SQL.format(**{f"p{i}": f"${i}" for i in range(1, 5)}),
}

#: The uuids of one customer's history: itself and every alias merged into it.
_HISTORY_SQL: Final = (
    "SELECT {p2} UNION SELECT alias FROM aliases WHERE site = {p1} AND uuid = {p2}"
)


def _session_statements(rows: Sequence[EventRow]) -> list[tuple[str, tuple[Any, ...]]]:
    """The session and alias statements of a batch's rows (most rows feed none)."""
    out = []
    for row in rows:
        if row.action in _SESSION_ACTIONS or row.action in _MERGE_ACTIONS:
            found = _session_args(row)
            if found is not None:
                out.append(found)
    return out


def _new_rows(rows: Sequence[EventRow]) -> list[rollups.NewRow]:
    """What the rollups count of rows a batch inserted, every one of them (from the batch)."""
    return [
        (r.site, r.received, r.action, r.uuid, rollups.page_of(r.action, r.params), r.bot)
        for r in rows
    ]


def _pg_records(rows: Sequence[EventRow]) -> list[tuple[Any, ...]] | None:
    """The rows as a binary COPY into ``events`` takes them (``params`` as the text of its
    jsonb), or None if some ``params`` are not UTF-8 (the staging table's way then says so)."""
    try:
        return [
            (
                r.site, r.uuid, r.session, r.producer, r.seq, r.action, r.label, r.time,
                r.received, _utf8(r.params)[0], r.original_time, r.authenticated, r.bot,
            )
            for r in rows
        ]  # fmt: skip
    except UnicodeDecodeError:
        return None


class Activity(msgspec.Struct, frozen=True):
    """One line of a customer's activity feed; ``uuid`` is the one it was recorded under."""

    time: int
    label: str
    action: str
    session: str
    uuid: str


class Sink(Protocol):
    """Where batches of rows go. One caller at a time; each write is one transaction."""

    async def open(self) -> None:
        """Connect and bring the schema to :data:`SCHEMA_VERSION`."""

    async def write(self, rows: Sequence[EventRow]) -> int:
        """Insert rows and upsert their sessions in one transaction; returns new event rows."""

    async def ping(self) -> None:
        """Raise if the store does not answer."""

    async def activity(self, site: str, uuid: str, limit: int) -> list[Activity]:
        """A customer's events and its aliases', newest first."""

    async def count(self, site: str | None = None) -> int:
        """Rows of ``events`` (of one site)."""

    async def run(self, fn: Any) -> Any:
        """Run ``fn`` with the store's connection, one call at a time (``persist.privacy``)."""

    async def close(self) -> None:
        """Release the connection."""


def sqlite_path(dsn: str) -> Path:
    """The file a SQLite DSN names (``sqlite:///rel``, ``sqlite:////abs`` or a plain path)."""
    if dsn.startswith("sqlite:///"):
        return Path(dsn[len("sqlite:///") :])
    if "://" in dsn:
        raise ValueError(f"not a SQLite DSN: {dsn!r}")
    return Path(dsn)


def open_sink(dsn: str, pg_writers: int | None = None) -> Sink:
    """The sink a DSN names (not opened yet).

    Args:
        pg_writers: a PostgreSQL sink's writing connections (default
            :attr:`PostgresSink.WRITERS`); SQLite has one.

    Raises:
        ValueError: the DSN's scheme is neither sqlite nor postgresql.
    """
    if dsn.startswith(("postgresql://", "postgres://")):
        return PostgresSink(dsn, PostgresSink.WRITERS if pg_writers is None else pg_writers)
    return SqliteSink(sqlite_path(dsn))


class SqliteSink:
    """The SQLite store: one connection, WAL, used from worker threads one call at a time.

    ``synchronous=FULL``: one fsync per batch (cheap at 500 rows), so a power
    loss never takes back a transaction whose entries were already acked in
    Redis. ``busy_timeout``: several workers may share the file; a writer
    waits up to this long for another's transaction.
    """

    #: How long a write waits for another process' transaction on the same file.
    BUSY_TIMEOUT_MS: Final = 10_000
    #: SQLite's page cache of the worker's connection (KiB).
    CACHE_KIB: Final = 65_536

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def _call(self, fn: Any, *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection."""
        assert self._db is not None, "sink not opened"
        return self._db

    async def open(self) -> None:
        """Create the file and folder if missing, set WAL, migrate."""
        await self._call(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {self.BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        # The primary key and the activity index outgrow the default 2 MiB cache
        # at a few hundred thousand rows; inserts then wait on page reads (30 %
        # slower measured at 400,000 rows).
        db.execute(f"PRAGMA cache_size = -{self.CACHE_KIB}")
        self._db = db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            for version in range(found, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    db.execute(statement.format(json="TEXT"))
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def write(self, rows: Sequence[EventRow]) -> int:
        """Insert in one transaction; returns how many event rows were new."""
        written: int = await self._call(self._write, rows)
        return written

    def _write(self, rows: Sequence[EventRow]) -> int:
        db = self.db
        packed = rows if isinstance(rows, PackedRows) else None
        binds = packed.binds if packed is not None else sqlite_binds(sqlite_values(rows))
        # The rows go straight into events, a few hundred per INSERT ... VALUES
        # (SQLITE_CHUNKS): binding holds the GIL, each statement's step (the
        # table and its indexes) runs without it. A staging table in memory,
        # then one INSERT ... SELECT, wrote every row twice and took the GIL
        # back after each row's step; the worker stored 13-17 % fewer rows/s.
        db.execute("BEGIN IMMEDIATE")
        try:
            last = db.execute("SELECT max(rowid) FROM events").fetchone()[0] or 0
            written = 0
            for size, statements in binds:
                written += db.executemany(_SQLITE_INSERTS[size], statements).rowcount
            self._in_batch(db, rows)
            inserted: Sequence[rollups.NewRow] | rollups.Delta
            if written == len(rows):  # all new: counted from the batch itself
                inserted = packed.delta if packed is not None else rollup_delta(rows)
            else:  # some were stored already: the rows this transaction added
                inserted = db.execute(rollups.SQLITE_INSERTED_SINCE, (last,)).fetchall()
            rollups.write_sqlite(db, inserted)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return written

    def _in_batch(self, db: sqlite3.Connection, rows: Sequence[EventRow]) -> None:
        """What else a batch writes, in its transaction (after its events): sessions, aliases.

        The per-batch hook: a table fed from a batch's rows is written from
        here, so it commits (or rolls back) with them (the rollups, fed from
        the rows actually inserted, follow it in the write).
        """
        for kind, args in _session_statements(rows):
            db.execute(_SQLITE_STATEMENTS[kind], args)

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(connection)`` in the sink's thread, one call at a time (privacy operations)."""
        return await self._call(fn, self.db)

    async def ping(self) -> None:
        """Run ``SELECT 1``."""
        await self._call(lambda: self.db.execute("SELECT 1").fetchone())

    async def activity(self, site: str, uuid: str, limit: int) -> list[Activity]:
        """A customer's events, newest first (ties: highest seq first)."""

        def query() -> list[Activity]:
            history = _HISTORY_SQL.format(p1="?1", p2="?2")
            cur = self.db.execute(
                "SELECT time, label, action, session, uuid FROM events "
                f"WHERE site = ?1 AND uuid IN ({history}) "
                "ORDER BY time DESC, received DESC, seq DESC LIMIT ?3",
                (site, uuid, limit),
            )
            return [Activity(*r) for r in cur.fetchall()]

        out: list[Activity] = await self._call(query)
        return out

    async def count(self, site: str | None = None) -> int:
        """Rows of ``events`` (of one site)."""

        def query() -> int:
            if site is None:
                n: int = self.db.execute("SELECT count(*) FROM events").fetchone()[0]
            else:
                n = self.db.execute(
                    "SELECT count(*) FROM events WHERE site = ?", (site,)
                ).fetchone()[0]
            return n

        out: int = await self._call(query)
        return out

    async def close(self) -> None:
        """Close the connection."""
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)


class _Writer:
    """One connection of a PostgreSQL sink, the staging table of its session, and its turn."""

    def __init__(self) -> None:
        self.conn: Any = None
        #: The connection whose session has the staging table.
        self.staged: Any = None
        self.lock = asyncio.Lock()


class PostgresSink:
    """The PostgreSQL store: ``writers`` asyncpg connections (:data:`WRITERS` by default),
    one batch at a time on each.

    Events go in by binary ``COPY``, straight into ``events`` or, for a batch
    with a row stored already, through a staging table (see :meth:`write`).
    ``writers`` batches may be written at once, each
    on a connection of its own (the worker keeps :attr:`writers` batches in
    flight): PostgreSQL works on one while the worker encodes, commits or
    acks the other. The first connection also serves every other call.
    """

    #: How long connecting, and each statement, may take before the batch fails (and is retried).
    TIMEOUT: Final = 30.0
    #: Connections that write batches at the same time unless told otherwise
    #: (the ``persist_pg_writers`` setting has the same default).
    WRITERS: Final = 2

    def __init__(self, dsn: str, writers: int = WRITERS) -> None:
        self.dsn = dsn
        #: Batches :meth:`write` takes at the same time.
        self.writers = max(1, writers)
        self._pool = [_Writer() for _ in range(self.writers)]
        self._idle: asyncio.Queue[_Writer] = asyncio.Queue()
        for writer in self._pool:
            self._idle.put_nowait(writer)
        #: The first connection's turn: every call but a write takes it.
        self._lock = self._pool[0].lock

    @property
    def _conn(self) -> Any:
        return self._pool[0].conn

    async def _connected(self, writer: _Writer | None = None) -> Any:
        """A connection (the first one by default), made again if it was lost."""
        writer = writer or self._pool[0]
        if writer.conn is None or writer.conn.is_closed():
            import asyncpg  # type: ignore[import-untyped]

            writer.conn = await asyncpg.connect(self.dsn, timeout=self.TIMEOUT)
        return writer.conn

    async def open(self) -> None:
        """Connect, then migrate under an advisory lock (workers may start together)."""
        conn = await self._connected()
        async with self._lock, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('eventwire.persist.schema'))")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            found = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            for version in range(found, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    await conn.execute(statement.format(json="jsonb"))
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version + 1)

    async def write(self, rows: Sequence[EventRow]) -> int:
        """Insert in one transaction; returns how many event rows were new.

        Binary ``COPY`` into ``events`` (a savepoint: the primary key refuses
        a batch with a row stored already), or else into a temporary staging
        table (emptied at each commit), then one ``INSERT ... SELECT ... ON
        CONFLICT DO NOTHING``: COPY is the fastest way in, and the primary key
        keeps writes idempotent. Up to :attr:`writers` calls run at once,
        each on its own connection.
        """
        if not rows:
            return 0
        writer = await self._idle.get()
        try:
            conn = await self._connected(writer)
            async with writer.lock:
                if writer.staged is not conn:
                    # Its own statement, outside the batch's transaction (whose
                    # rollback would take it back); it lives as long as the connection.
                    await conn.execute(
                        f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGING} "
                        "(LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
                        timeout=self.TIMEOUT,
                    )
                    await conn.execute(
                        f"ALTER TABLE {_STAGING} ALTER COLUMN params TYPE bytea "
                        "USING convert_to(params::text, 'UTF8')",
                        timeout=self.TIMEOUT,
                    )
                    writer.staged = conn
                return await self._write(conn, rows)
        finally:
            self._idle.put_nowait(writer)

    async def _write(self, conn: Any, rows: Sequence[EventRow]) -> int:
        import asyncpg

        records = _pg_records(rows)
        async with conn.transaction():
            # Almost every batch is all new rows: binary COPY straight into events,
            # whose primary key refuses a row stored already (or twice in the
            # batch); the rollups then count the batch itself. A refusal (a
            # redelivery) takes back only the savepoint: the rows go through the
            # staging table, and one INSERT ... ON CONFLICT DO NOTHING leaves the
            # stored ones out. Straight in, PostgreSQL writes each row once, not
            # into the staging table first and then again.
            inserted: Sequence[Any] | None = None
            if records is not None:
                try:
                    async with conn.transaction():
                        await conn.copy_records_to_table(
                            "events",
                            records=records,
                            columns=_EVENT_COLUMN_NAMES,
                            timeout=self.TIMEOUT,
                        )
                    inserted = _new_rows(rows)
                except asyncpg.UniqueViolationError:
                    pass
            if inserted is None:
                # params go in as the JSON bytes they came as (bytea in the staging
                # table): PostgreSQL makes them jsonb (and refuses what is not UTF-8).
                await conn.copy_records_to_table(
                    _STAGING,
                    records=list(map(msgspec.structs.astuple, rows)),
                    columns=_EVENT_COLUMN_NAMES,
                    timeout=self.TIMEOUT,
                )
                inserted = await conn.fetch(
                    f"{_PG_INSERT} {rollups.POSTGRES_RETURNING}", timeout=self.TIMEOUT
                )
            await self._in_batch(conn, rows)
            await rollups.write_postgres(conn, inserted, self.TIMEOUT)
        return len(inserted)

    async def _in_batch(self, conn: Any, rows: Sequence[EventRow]) -> None:
        """What else a batch writes, in its transaction (after its events): sessions, aliases.

        The per-batch hook: a table fed from a batch's rows is written from
        here, so it commits (or rolls back) with them (the rollups, fed from
        the rows actually inserted, follow it in the write).
        """
        for kind, args in _session_statements(rows):
            await conn.execute(_PG_STATEMENTS[kind], *args, timeout=self.TIMEOUT)

    async def run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Await ``fn(connection)``, one call at a time (privacy operations)."""
        conn = await self._connected()
        async with self._lock:
            return await fn(conn)

    async def ping(self) -> None:
        """Run ``SELECT 1``."""
        await self._connected()
        async with self._lock:
            await self._conn.fetchval("SELECT 1", timeout=self.TIMEOUT)

    async def activity(self, site: str, uuid: str, limit: int) -> list[Activity]:
        """A customer's events, newest first (ties: highest seq first)."""
        await self._connected()
        async with self._lock:
            history = _HISTORY_SQL.format(p1="$1", p2="$2::text")
            records = await self._conn.fetch(
                "SELECT time, label, action, session, uuid FROM events "
                f"WHERE site = $1 AND uuid IN ({history}) "
                "ORDER BY time DESC, received DESC, seq DESC LIMIT $3",
                site,
                uuid,
                limit,
            )
        return [Activity(*r) for r in records]

    async def count(self, site: str | None = None) -> int:
        """Rows of ``events`` (of one site)."""
        await self._connected()
        async with self._lock:
            if site is None:
                n: int = await self._conn.fetchval("SELECT count(*) FROM events")
            else:
                n = await self._conn.fetchval("SELECT count(*) FROM events WHERE site = $1", site)
        return n

    async def close(self) -> None:
        """Close the connections."""
        for writer in self._pool:
            if writer.conn is not None:
                conn, writer.conn = writer.conn, None
                await conn.close()
