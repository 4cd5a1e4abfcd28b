"""Scratch: where PostgreSQL's time goes per row of a persist batch (variants, one schema)."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import msgspec

from eventwire.core.records import StoredEvent
from eventwire.persist import rollups, sinks

DSN0 = "postgresql://postgres@127.0.0.1/test"
SCHEMA = "ewpg_micro"


def make_rows(n: int, start: int, run: str) -> list[sinks.EventRow]:
    now = int(time.time() * 1000)
    enc = msgspec.json.Encoder()
    raws = []
    for i in range(start, start + n):
        event = StoredEvent(
            site="bench",
            uuid=f"cust-{i % 50}",
            session=f"s-{i % 50:014d}",
            producer=f"bench-{run}-{i % 50}",
            seq=i + 1,
            action="product.view",
            label="Viewed product",
            time=now + i,
            received=now + i,
            params={"url": f"https://shop.example/p/{i}", "sku": f"S{i}", "price": 12.5},
        )
        raws.append(enc.encode(event))
    rows = sinks.decode_rows("bench", raws)
    assert rows is not None
    return rows


def backend_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def lsn(conn: Any) -> int:
    return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


COLS = sinks._EVENT_COLUMN_NAMES
STAGING = sinks._STAGING


async def stage(conn: Any, text: bool = False) -> None:
    await conn.execute(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING} "
        "(LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    typ = "text" if text else "bytea"
    await conn.execute(
        f"ALTER TABLE {STAGING} ALTER COLUMN params TYPE {typ} "
        f"USING convert_to(params::text, 'UTF8')"
        if not text
        else f"ALTER TABLE {STAGING} ALTER COLUMN params TYPE text"
    )


def insert_sql(params_expr: str, conflict: str = "ON CONFLICT DO NOTHING", ret: str = "") -> str:
    cols = ", ".join(params_expr if c == "params" else c for c in COLS)
    return f"INSERT INTO events ({', '.join(COLS)}) SELECT {cols} FROM {STAGING} s {conflict} {ret}"


T: dict[str, float] = {}


async def timed(name: str, aw: Any) -> Any:
    t = time.perf_counter()
    out = await aw
    T[name] = T.get(name, 0.0) + time.perf_counter() - t
    return out


async def copy_in(conn: Any, rows: list[sinks.EventRow]) -> None:
    """The batch into the staging table by binary COPY, timed as ``copy``."""
    await timed(
        "copy",
        conn.copy_records_to_table(
            STAGING, records=list(map(msgspec.structs.astuple, rows)), columns=COLS
        ),
    )


async def v_baseline(conn: Any, rows: list[sinks.EventRow]) -> None:
    async with conn.transaction():
        await copy_in(conn, rows)
        ins = await timed(
            "insert",
            conn.fetch(
                insert_sql("convert_from(params, 'UTF8')::jsonb", ret=rollups.POSTGRES_RETURNING)
            ),
        )
        await timed("rollups", rollups.write_postgres(conn, ins, 30))
    T["commit"] = 0


async def v_noreturn(conn: Any, rows: list[sinks.EventRow]) -> None:
    async with conn.transaction():
        await copy_in(conn, rows)
        await timed("insert", conn.execute(insert_sql("convert_from(params, 'UTF8')::jsonb")))


async def v_plainret(conn: Any, rows: list[sinks.EventRow]) -> None:
    """RETURNING only the plain columns (page extracted from staging not needed)."""
    async with conn.transaction():
        await copy_in(conn, rows)
        await timed(
            "insert",
            conn.fetch(
                insert_sql("convert_from(params, 'UTF8')::jsonb", ret="RETURNING producer, seq")
            ),
        )


async def v_notexists(conn: Any, rows: list[sinks.EventRow]) -> None:
    async with conn.transaction():
        await copy_in(conn, rows)
        await timed(
            "insert",
            conn.execute(
                insert_sql(
                    "convert_from(params, 'UTF8')::jsonb",
                    conflict="WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.site = s.site "
                    "AND e.producer = s.producer AND e.seq = s.seq)",
                )
            ),
        )


async def v_nojson(conn: Any, rows: list[sinks.EventRow]) -> None:
    """params as a constant jsonb: what parsing costs."""
    async with conn.transaction():
        await copy_in(conn, rows)
        await timed("insert", conn.execute(insert_sql("'{}'::jsonb")))


async def v_copydirect(conn: Any, rows: list[sinks.EventRow]) -> None:
    async with conn.transaction():
        recs = [(*t[:9], bytes(t[9]).decode(), *t[10:]) for t in map(msgspec.structs.astuple, rows)]
        await timed("copy", conn.copy_records_to_table("events", records=recs, columns=COLS))


async def v_copyonly(conn: Any, rows: list[sinks.EventRow]) -> None:
    async with conn.transaction():
        await copy_in(conn, rows)


SINK = sinks.PostgresSink("")


async def v_sink(conn: Any, rows: list[sinks.EventRow]) -> None:
    """The sink's write as this tree has it."""
    await timed("write", SINK._write(conn, rows))


VARIANTS = {
    "sink": v_sink,
    "baseline": v_baseline,
    "noreturn": v_noreturn,
    "plainret": v_plainret,
    "notexists": v_notexists,
    "nojson": v_nojson,
    "copydirect": v_copydirect,
    "copyonly": v_copyonly,
}


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prefill", type=int, default=300_000)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--drop-indexes", action="store_true")
    p.add_argument("variants", nargs="*", default=list(VARIANTS))
    a = p.parse_args()
    admin = await asyncpg.connect(DSN0)
    await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    await admin.execute(f"CREATE SCHEMA {SCHEMA}")
    await admin.close()
    dsn = f"{DSN0}?search_path={SCHEMA}"
    sink = sinks.PostgresSink(dsn)
    await sink.open()
    run = secrets.token_hex(4)
    n = 0
    for start in range(0, a.prefill, 10000):
        await sink.write(make_rows(10000, start, run))
        n += 10000
    await sink.close()
    conn = await asyncpg.connect(dsn)
    if a.drop_indexes:
        await conn.execute("DROP INDEX events_customer; DROP INDEX events_time")
    await stage(conn)
    await conn.execute("CHECKPOINT")
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    results: dict[str, list[tuple[float, float, float, dict[str, float]]]] = {}
    perf = None
    if os.environ.get("PERF"):
        import subprocess

        perf = subprocess.Popen(  # noqa: ASYNC220 - stopped below
            ["perf", "record", "-g", "-o", os.environ["PERF"], "-p", str(pid)]
        )
        await asyncio.sleep(1)
    for _ in range(a.rounds):
        for name in a.variants:
            batches = [make_rows(a.batch, n + i * a.batch, run) for i in range(a.batches)]
            n += a.batch * a.batches
            T.clear()
            w0, c0, t0 = await lsn(conn), backend_cpu(pid), time.perf_counter()
            for b in batches:
                await VARIANTS[name](conn, b)
            t1, c1, w1 = time.perf_counter(), backend_cpu(pid), await lsn(conn)
            rows = a.batch * a.batches
            results.setdefault(name, []).append(
                (rows / (t1 - t0), (c1 - c0) / rows * 1e6, (w1 - w0) / rows, dict(T))
            )
    if perf is not None:
        import signal

        perf.send_signal(signal.SIGINT)
        perf.wait()
    total = await conn.fetchval("SELECT count(*) FROM events")
    print(f"events now {total}; batch {a.batch}")
    for name, rs in results.items():
        for rate, us, wal, t in rs:
            ts = " ".join(f"{k}={v / (a.batch * a.batches) * 1e6:.1f}" for k, v in t.items())
            print(
                f"{name:11s} {rate:9,.0f} rows/s  backend {us:5.1f} us/row  "
                f"WAL {wal:6.0f} B/row  wall us/row: {ts}"
            )
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
