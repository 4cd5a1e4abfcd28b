"""What the stored rollups cost: the write per batch, the store's size, a range view's time, bytes.

    .venv/bin/python scripts/bench_rollups.py [--dsn URL] [--batches 30] [--customers 5000]

1. **Write**: ``--batches`` batches of 2000 events (a third ``page.visit``
   over 300 pages, customers skewed over ``--customers``) into a fresh store,
   with the rollups and without them (the same sink, its rollup step
   switched off), in rows/s.
2. **A week at the bound**: the ``rollups`` rows a site has after 7 days at
   any rate high enough to fill every top table (more than 200 distinct
   actions, pages and customers an hour and 10 minutes): per-minute counts
   and full tables, written straight into the table; its size (SQLite: the
   file's pages).
3. **Range views** over that week: the time of ``RollupReader.view`` (best
   of 5) and the bytes of its JSON body, for 1 h, 24 h and 7 d.

Loopback only, bounded in time (well under a minute on SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from eventwire.persist import ranges, rollups
from eventwire.persist.sinks import EventRow, open_sink

DAY = 86_400_000


def batches(n: int, customers: int, now: int) -> list[list[EventRow]]:
    """n batches of 2000 rows, received over the last few minutes."""
    rng = random.Random(19)
    out, seq = [], 0
    for _ in range(n):
        rows = []
        for _ in range(2000):
            seq += 1
            page = seq % 3 == 0
            params = f'{{"url": "/p{rng.randrange(300)}"}}' if page else '{"sku": "S1"}'
            uuid = f"c{int(customers * rng.random() ** 3)}"
            action = "page.visit" if page else f"product.view{seq % 5}"
            t = now - 300_000 + seq * 5 % 300_000
            row = EventRow(
                site="s", producer="p", seq=seq, uuid=uuid, session="x", action=action,
                label=action, time=t, received=t, params=msgspec.Raw(params.encode()),
            )  # fmt: skip
            rows.append(row)
        out.append(rows)
    return out


async def write_rate(dsn: str, data: list[list[EventRow]], with_rollups: bool) -> float:
    """Rows/s of the batches into a fresh store."""
    saved = rollups.write_sqlite, rollups.write_postgres
    if not with_rollups:

        async def none_pg(*_: Any) -> None:
            return None

        rollups.write_sqlite = lambda db, inserted: None  # type: ignore[assignment]
        rollups.write_postgres = none_pg  # type: ignore[assignment]
    try:
        sink = open_sink(dsn)
        await sink.open()
        start = time.perf_counter()
        for rows in data:
            await sink.write(rows)
        elapsed = time.perf_counter() - start
        await sink.close()
    finally:
        rollups.write_sqlite, rollups.write_postgres = saved
    return sum(len(b) for b in data) / elapsed


def week_rows(now: int) -> list[tuple[Any, ...]]:
    """A busy site's rollups rows after 7 days, every top table full (200 keys)."""
    rows: list[tuple[Any, ...]] = []
    first = now - 7 * DAY
    for m in range(first - first % 60_000, now, 60_000):
        for item, n in (("accepted", 600_000), ("started", 900), ("ended", 880)):
            rows.append(("s", 60, m, "count", item, n, 0, 0))
    for span, since in ((3600, first), (600, now - rollups.RECENT_TOPS_KEEP_MS)):
        step = span * 1000
        for b in range(since - since % step, now, step):
            for kind in rollups.TABLES:
                rows.append(("s", span, b, kind, "", 60_000 * span, 40 * span // 60, 0))
                for k in range(rollups.TOP_CAPACITY * 2):
                    item = f"https://shop.example/{kind}/{k}"
                    rows.append(("s", span, b, kind, item, 100 * span // (k + 1), k, 0))
    return rows


async def fill_week(dsn: str, now: int) -> int:
    """Write a week's rollups rows into a fresh store; their count."""
    sink = open_sink(dsn)
    await sink.open()  # the schema
    await sink.close()
    rows = week_rows(now)
    sql = f"INSERT INTO rollups ({rollups._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    if dsn.startswith("postgres"):
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(dsn)
        await conn.executemany(rollups.numbered(sql), rows)
        await conn.close()
    else:
        db = sqlite3.connect(rollups_path(dsn))
        with db:
            db.executemany(sql, rows)
        db.close()
    return len(rows)


def rollups_path(dsn: str) -> str:
    return dsn.removeprefix("sqlite:///")


async def views(dsn: str, now: int) -> dict[str, tuple[float, int]]:
    """Per range: the best of 5 view times (s) and the JSON body's bytes."""
    reader = RollupReader(dsn)
    out = {}
    try:
        for name in ranges.RANGES:
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                view = await reader.view("s", name, now)
                best = min(best, time.perf_counter() - start)
            out[name] = (best, len(msgspec.json.encode(view)))
    finally:
        await reader.close()
    return out


RollupReader = ranges.RollupReader


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="postgresql://... (default: SQLite files in a temp dir)")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--customers", type=int, default=5000)
    args = parser.parse_args()
    now = int(time.time() * 1000)
    data = batches(args.batches, args.customers, now)
    with tempfile.TemporaryDirectory() as tmp:

        async def fresh() -> str:
            if args.dsn is None:
                return f"sqlite:///{tmp}/{secrets.token_hex(4)}.db"
            import asyncpg

            schema = f"bench_{secrets.token_hex(4)}"
            conn = await asyncpg.connect(args.dsn)
            await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.close()
            schemas.append(schema)
            return f"{args.dsn}?search_path={schema}"

        schemas: list[str] = []
        try:
            load = os.getloadavg()[0]
            off = await write_rate(await fresh(), data, with_rollups=False)
            on = await write_rate(await fresh(), data, with_rollups=True)
            print(
                f"write, {args.batches} x 2000 rows, {args.customers} customers: "
                f"{off:,.0f} rows/s without rollups, {on:,.0f} with ({on / off:.2f}x); "
                f"load {load:.2f}"
            )
            dsn = await fresh()
            n = await fill_week(dsn, now)
            size = ""
            if args.dsn is None:
                file_bytes = await asyncio.to_thread(os.path.getsize, rollups_path(dsn))
                size = f", {file_bytes / 2**20:.1f} MiB file"
            print(f"a week at the bound: {n:,} rollups rows ({n / 7:,.0f} a day){size}")
            for name, (seconds, size_b) in (await views(dsn, now)).items():
                print(f"view {name}: {seconds * 1000:.1f} ms, {size_b / 1024:.1f} KiB of JSON")
        finally:
            if schemas:
                import asyncpg

                conn = await asyncpg.connect(args.dsn)
                for schema in schemas:
                    await conn.execute(f"DROP SCHEMA {schema} CASCADE")
                await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
