"""The stored rollups over HTTP and the command line: GET /v1/sites/{site}/rollups, through
the supervisor's admin proxy too, and ``eventwire stats --range``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec

from eventwire.commands.stats import range_table
from eventwire.persist.ranges import RangeView, RollupReader
from eventwire.persist.sinks import open_sink
from tests.conftest import MakeServer
from tests.persist.test_rollups import row
from tests.persist.test_worker import dsn  # noqa: F401 - the store fixture
from tests.procs import UNIT, RedisProcess, ServerProcess, eventwire_command
from tests.supervisor.test_workers import get, worker_admin_ports
from tests.wire import now_ms

TOKEN = "rollups-admin-token"
HOUR = 3_600_000


async def fill(store: str, now: int) -> None:
    """Events of site ``app`` over the last five hours: 10 an hour, plus a session each hour."""
    sink = open_sink(store)
    await sink.open()
    try:
        rows = []
        for h in range(5):
            t = now - h * HOUR - 60_000
            rows.append(row(100 * h, t, "session.start", f"u{h}"))
            rows += [
                row(100 * h + i, t, "page.visit", f"u{h}", f'{{"url": "/p{i % 2}"}}')
                for i in range(1, 11)
            ]
        assert await sink.write(rows) == 55
    finally:
        await sink.close()


async def test_rollups_route(make_server: MakeServer, dsn: str) -> None:  # noqa: F811
    """24 h and 1 h from the store persist_dsn names, with the admin token; clear answers
    for a wrong range, an unknown site, no token, and a store that is not there."""
    now = now_ms()
    await fill(dsn, now)
    srv = await make_server(persist_dsn=dsn, admin_token=TOKEN)
    base = f"{srv.admin_url}/v1/sites"
    status, body = await get(f"{base}/app/rollups?range=24h", TOKEN)
    assert status == 200, body
    day = json.loads(body)
    assert (day["site"], day["range"], day["step"]) == ("app", "24h", 900)
    assert day["totals"] == {"accepted": 55, "started": 5}
    assert day["top"]["pages"]["rows"] == [["/p0", 25, 0], ["/p1", 25, 0]]
    assert day["top"]["customers"]["total"] == 55
    assert sum(b["accepted"] for b in day["buckets"]) == 55
    assert abs(day["now"] - now) < 60_000 * UNIT
    hour = json.loads((await get(f"{base}/app/rollups?range=1h", TOKEN))[1])
    assert hour["totals"] == {"accepted": 11, "started": 1}
    week = json.loads((await get(f"{base}/app/rollups?range=7d", TOKEN))[1])
    assert week["totals"] == day["totals"]
    assert (await get(f"{base}/app/rollups?range=24h"))[0] == 401
    for query in ("", "?range=5m", "?range=24h&range=1h", "?range=24h&until=1"):
        status, body = await get(f"{base}/app/rollups{query}", TOKEN)
        assert status == 400, query
        assert "range must be one of 1h, 24h, 7d" in body
    assert (await get(f"{base}/nope/rollups?range=24h", TOKEN))[0] == 404
    assert (await get(f"{base}/app/rollupz?range=24h", TOKEN))[0] == 404


async def test_rollups_route_without_a_store(make_server: MakeServer, tmp_path: Path) -> None:
    """No store yet (no worker ran): 503 saying so; the file is not made by the server."""
    store = tmp_path / "events.db"
    srv = await make_server(persist_dsn=f"sqlite:///{store}")
    status, body = await get(f"{srv.admin_url}/v1/sites/app/rollups?range=24h")
    assert status == 503
    assert "persist worker creates it" in body
    assert not store.exists()


async def test_rollups_through_the_supervisor(
    redis_proc: RedisProcess, sites_file: Path, tmp_path: Path
) -> None:
    """``serve --workers 2``: the supervisor's admin port passes the route to a child, which
    answers what the other child answers."""
    store = f"sqlite:///{tmp_path / 'events.db'}"
    now = now_ms()
    await fill(store, now)
    env = {"EVENTWIRE_ADMIN_TOKEN": TOKEN, "EVENTWIRE_PERSIST_DSN": store}
    srv = await asyncio.to_thread(ServerProcess(redis_proc.url, sites_file, env, workers=2).start)
    try:
        path = "/v1/sites/app/rollups?range=24h"
        status, body = await get(f"http://127.0.0.1:{srv.admin_port}{path}", TOKEN)
        assert status == 200, body
        views = [json.loads(body)]
        for port in worker_admin_ports(srv).values():
            views.append(json.loads((await get(f"http://127.0.0.1:{port}{path}", TOKEN))[1]))
        assert len(views) == 3
        assert [v["totals"] for v in views] == [{"accepted": 55, "started": 5}] * 3
        assert len({json.dumps(v["top"]) for v in views}) == 1
        assert (await get(f"http://127.0.0.1:{srv.admin_port}{path}"))[0] == 401
    finally:
        srv.terminate()


async def stats_range(*args: str) -> tuple[int, str, str]:
    """``python -m eventwire stats --range ...``: exit code, stdout, stderr."""
    proc = await eventwire_command("stats", *args)
    out, err = await asyncio.wait_for(proc.communicate(), 20 * UNIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_stats_range_prints_the_route_figures(
    sites_file: Path,
    dsn: str,  # noqa: F811
) -> None:
    """``stats --range 24h --json`` gives each site of the sites file the view the route
    gives; the table says the same numbers; no store: exit 1 with why."""
    now = now_ms()
    await fill(dsn, now)
    code, out, err = await stats_range("--sites", str(sites_file), "--dsn", dsn, "--range", "24h")
    assert code == 0, err
    got: dict[str, Any] = json.loads(out)
    assert got["range"] == "24h"
    assert set(got["sites"]) >= {"app", "web"}
    app = got["sites"]["app"]
    reader = RollupReader(dsn)
    try:
        direct = await reader.view("app", "24h", got["now"])
    finally:
        await reader.close()
    assert app["totals"] == {"accepted": 55, "started": 5}
    assert app["top"]["pages"]["rows"] == [
        [r.key, r.count, r.error] for r in direct.top["pages"].rows
    ]
    assert got["sites"]["web"]["totals"] == {}
    text = range_table("24h", {"app": msgspec.convert(app, RangeView)})
    assert "accepted 55 " in text
    assert "top pages (of 50): /p0 25, /p1 25" in text
    code, _, err = await stats_range(
        "--sites", str(sites_file), "--dsn", "sqlite:////nonexistent/x.db", "--range", "1h"
    )
    assert code == 1
    assert "persist worker creates it" in err
