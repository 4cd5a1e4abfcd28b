"""bench/loadgen.py's ledger mode: nacked frames are resent and stored once, and ledgered.

A real server (``max_backlog`` tiny, so frames are nacked while no worker
reads), the load generator as its own process, then a persist worker on a
SQLite store: every event of the ledger is one row and every row of the
load generator's producer is in the ledger.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.conftest import MakeServer
from tests.persist.test_worker import ROOT, start_worker
from tests.procs import UNIT, RedisProcess

FRAMES = 40
BATCH = 10


def backlog_nacks(site: str) -> float:
    """``eventwire_backlog_nacks_total`` of a site in this process."""
    return REGISTRY.get_sample_value("eventwire_backlog_nacks_total", {"site": site}) or 0.0


async def test_ledger_mode_resends_nacked_frames_and_each_event_is_stored_once(
    make_server: MakeServer,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    tmp_path: Path,
) -> None:
    """Backlog full: nacks; the worker back: every ledgered event is one row, none else."""
    dsn = f"sqlite:///{tmp_path / 'events.db'}"
    server = await make_server(max_backlog=50, retry_after_ms=50)
    worker = await start_worker(redis_proc, sites_file, dsn)
    await worker.stop()  # the group exists; nobody reads it
    ledger, record = tmp_path / "ledger.txt", tmp_path / "record.jsonl"
    nacks_before = backlog_nacks("app")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(server.port),
        "--site", "app", "--origin", "", "-c", "1", "-b", str(BATCH), "-w", "2",
        "-n", str(FRAMES * BATCH), "--ledger", str(ledger), "--json", str(record),
        "--redis-port", str(redis_proc.port), "--verify", "scan", "--timeout", "60",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20 * UNIT
        while backlog_nacks("app") - nacks_before < 3:
            assert time.monotonic() < deadline, "no backlog nack"
            assert proc.returncode is None
            await asyncio.sleep(0.02)
        worker = await start_worker(redis_proc, sites_file, dsn)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60 * UNIT)
            assert proc.returncode == 0, out.decode()
            deadline = time.monotonic() + 20 * UNIT
            while (await redis.xinfo_groups("ew:{app}:events"))[0]["pending"] or (
                (await redis.xinfo_groups("ew:{app}:events"))[0]["lag"]
            ):
                assert time.monotonic() < deadline, "the worker did not drain"
                await asyncio.sleep(0.05)
        finally:
            await worker.stop()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    (result,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert result["nacks"] >= 3
    assert result["nack_codes"].get("unavailable", 0) >= 3
    assert result["sent_frames"] == result["acked_frames"] == FRAMES  # each frame once
    assert result["verify_ok"], result  # the stream: exactly the acked seqs, once each
    assert result["stream_dup"] == 0
    lines = ledger.read_text().splitlines()
    assert len(lines) == len(set(lines)) == FRAMES * BATCH
    db = sqlite3.connect(tmp_path / "events.db")
    try:
        rows = db.execute(
            "SELECT producer, seq FROM events WHERE site = 'app' AND producer LIKE 'lg-%'"
        ).fetchall()
    finally:
        db.close()
    assert len(rows) == FRAMES * BATCH
    assert {f"{p} {s}" for p, s in rows} == set(lines)
