"""eventwire.supervisor: ``eventwire serve --workers N``, real processes on one port.

Most tests start ``eventwire serve --workers 2`` as a subprocess on port 0 and
break or signal it; the last ones run :class:`~eventwire.supervisor.Supervisor`
in the test's loop with tiny stand-in children (real processes that report
ready, then crash or ignore SIGTERM) to reach its limits quickly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from eventwire.client import EventwireClient
from eventwire.core.config import Settings
from eventwire.core.protocol import Ack
from eventwire.supervisor import EXIT_FAILED, EXIT_KILLED, RestartPolicy, Supervisor
from tests.conftest import SITES_TOML
from tests.procs import UNIT, RedisProcess, ServerProcess
from tests.wire import client_events, event, peer

REPO = Path(__file__).resolve().parents[2]
#: The admin token of the ``workers2`` server.
TOKEN = "t0ken-for-the-admin-routes"


@pytest.fixture
def workers2(redis_proc: RedisProcess, sites_file: Path) -> Iterator[ServerProcess]:
    """``eventwire serve --workers 2`` on port 0 with an admin token; SIGTERMed at teardown."""
    env = {"EVENTWIRE_ADMIN_TOKEN": TOKEN}
    srv = ServerProcess(redis_proc.url, sites_file, env, workers=2).start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.terminate()


async def get(url: str, token: str | None = None) -> tuple[int, str]:
    """GET a URL in a thread (with a Bearer token if given); returns status and body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def fetch() -> tuple[int, str]:
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=5 * UNIT) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(fetch)


async def per_worker(srv: ServerProcess, sample: str, **labels: str) -> dict[str, float]:
    """One sample of the supervisor's /metrics, by its ``worker`` label."""
    status, body = await get(f"http://127.0.0.1:{srv.admin_port}/metrics", TOKEN)
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == sample and labels.items() <= s.labels.items():
                out[s.labels["worker"]] = s.value
    return out


def lines_of(srv: ServerProcess, event_name: str) -> list[dict[str, Any]]:
    """The log lines of one event, in order (the supervisor's and its children's)."""
    return [line for line in list(srv.lines) if line.get("event") == event_name]


def worker_pids(srv: ServerProcess) -> dict[int, int]:
    """The pid of each worker now, from the supervisor's ``worker_started`` lines."""
    return {line["worker"]: line["pid"] for line in lines_of(srv, "worker_started")}


def worker_admin_ports(srv: ServerProcess) -> dict[int, int]:
    """The admin port of each worker now, from the supervisor's ``worker_started`` lines."""
    lines = lines_of(srv, "worker_started")
    return {line["worker"]: int(line["admin"].rsplit(":", 1)[1]) for line in lines}


async def until(check: Callable[[], bool], what: str, wait: float = 10) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``wait`` units."""
    deadline = time.monotonic() + wait * UNIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Streamer:
    """A real client that tracks events and remembers the highest acked seq."""

    def __init__(self, url: str) -> None:
        self.acked_high = 0
        self.acks = 0
        self.client = EventwireClient(
            url, batch_size=20, max_inflight=4, backoff_base=0.05, backoff_max=0.3,
            on_ack=self.on_ack,
        )  # fmt: skip

    def on_ack(self, ack: Ack, latency: float) -> None:
        self.acks += 1
        self.acked_high = max(self.acked_high, ack.seq)

    async def stream(self, total: int, pause: float = 0.002) -> None:
        """Track ``total`` events, ten at a time, ``pause`` seconds apart."""
        for i in range(1, total + 1):
            self.client.track("product.view", {"sku": f"S{i}", "i": i})
            if i % 10 == 0:
                await asyncio.sleep(pause)


async def seqs_by_producer(redis: aioredis.Redis) -> dict[str, list[int]]:
    """Each client producer's seqs in the app stream, in stream order."""
    out: dict[str, list[int]] = {}
    for e in await client_events(redis):
        out.setdefault(e["producer"], []).append(e["seq"])
    return out


# -- real processes -------------------------------------------------------------------


async def test_workers_share_one_port(workers2: ServerProcess, redis: aioredis.Redis) -> None:
    """Two children listen on the one port; connections reach both; /metrics shows each."""
    srv = workers2
    (ready,) = lines_of(srv, "workers_ready")
    assert srv.proc is not None
    assert len(set(ready["pids"])) == 2
    assert srv.proc.pid not in ready["pids"]
    children = lines_of(srv, "listening")
    assert [int(c["track"].rsplit(":", 1)[1]) for c in children] == [srv.port, srv.port]
    # Every line of a child says which one wrote it.
    assert sorted(c["worker"] for c in children) == [1, 2]

    async def one(i: int) -> int:
        async with peer(f"ws://127.0.0.1:{srv.port}") as p:
            await p.hello(f"c-{i}")
            ack = await p.track(event(1))
            return int(ack["accepted"])

    assert sum(await asyncio.gather(*(one(i) for i in range(24)))) == 24
    assert len(await client_events(redis)) == 24
    connections = await per_worker(srv, "eventwire_connections_total", site="app")
    assert set(connections) == {"1", "2"}
    assert all(n >= 1 for n in connections.values()), connections
    assert sum(connections.values()) == 24
    for _ in range(100):  # a child logs the close after the client saw it
        closed = lines_of(srv, "connection_closed")
        if len(closed) >= 24:
            break
        await asyncio.sleep(0.05 * UNIT)
    assert len(closed) == 24
    assert {line["worker"] for line in closed} == {1, 2}
    assert await per_worker(srv, "eventwire_worker_up") == {"1": 1.0, "2": 1.0}
    admin = f"http://127.0.0.1:{srv.admin_port}"
    assert await get(admin + "/healthz") == (200, "ok\n")
    status, text = await get(admin + "/readyz")
    assert status == 200
    assert text.startswith("ready: 2 of 2")
    assert (await get(admin + "/metrics"))[0] == 401


async def test_admin_routes_pass_through(workers2: ServerProcess) -> None:
    """The supervisor's admin port passes other routes, WebSocket too, to a child as they are."""
    srv = workers2
    admin = f"127.0.0.1:{srv.admin_port}"
    child = f"127.0.0.1:{worker_admin_ports(srv)[1]}"
    via_supervisor = await get(f"http://{admin}/v1/sites", TOKEN)
    assert via_supervisor[0] == 200
    assert via_supervisor == await get(f"http://{child}/v1/sites", TOKEN)
    assert (await get(f"http://{admin}/v1/sites"))[0] == 401  # the child checks the token
    async with connect(
        f"ws://{admin}/v1/live?site=app",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        open_timeout=5 * UNIT,
        proxy=None,
    ) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5 * UNIT))
    assert (hello["type"], hello["site"]) == ("hello", "app")


async def test_child_sigkill_restarted_nothing_lost(
    workers2: ServerProcess, redis: aioredis.Redis
) -> None:
    """SIGKILL of the child holding a client: it is restarted; the stream holds each seq once."""
    srv = workers2
    before = worker_pids(srv)
    total = 2000
    s = Streamer(f"ws://127.0.0.1:{srv.port}/v1/track/app")
    async with s.client:
        producer = s.client.producer
        sending = asyncio.create_task(s.stream(total))
        await until(lambda: s.acks >= 20, "the first acks")
        open_now = await per_worker(srv, "eventwire_connections_open", site="app")
        (victim,) = [int(w) for w, n in open_now.items() if n == 1]
        acked_before = s.acked_high
        os.kill(before[victim], signal.SIGKILL)
        await sending
        await s.client.flush(timeout=30 * UNIT)
        assert s.client.connects >= 2
    await until(lambda: worker_pids(srv)[victim] != before[victim], "the restart")
    (exited,) = lines_of(srv, "worker_exited")
    assert (exited["worker"], exited["pid"], exited["code"]) == (victim, before[victim], -9)
    assert exited["signal"] == "SIGKILL"
    assert lines_of(srv, "worker_started")[-1]["restarts"] == 1
    assert (await per_worker(srv, "eventwire_worker_restarts_total"))[str(victim)] == 1
    seqs = (await seqs_by_producer(redis))[producer]
    assert acked_before > 0
    assert sorted(seqs) == list(range(1, total + 1)), "a seq is missing or stored twice"
    assert seqs == sorted(seqs)


async def test_sigterm_drains_every_child(
    redis_proc: RedisProcess, sites_file: Path, redis: aioredis.Redis
) -> None:
    """SIGTERM mid-stream: every child closes 1001 and exits 0, no acked event is missing."""
    srv = ServerProcess(redis_proc.url, sites_file, workers=2).start()
    streamers: list[Streamer] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        # Clients until both children hold one (the kernel picks by a hash).
        while True:
            s = Streamer(f"ws://127.0.0.1:{srv.port}/v1/track/app")
            await s.client.start()
            streamers.append(s)
            tasks.append(asyncio.create_task(s.stream(50_000, pause=0.01)))
            await until(lambda: streamers[-1].acks > 0, "a first ack")
            held = await per_worker(srv, "eventwire_connections_open", site="app")
            if len(held) == 2 and min(held.values()) >= 1:
                break
            assert len(streamers) < 20, "every connection went to one child"
        await until(lambda: all(s.acks >= 10 for s in streamers), "acks from every client")
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(srv.proc.wait, 30 * UNIT)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.client.close(flush=False) for s in streamers))
        srv.kill()
    assert code == 0
    stored = await seqs_by_producer(redis)
    for s in streamers:
        seqs = stored[s.client.producer]
        assert s.acked_high > 0
        assert set(range(1, s.acked_high + 1)) <= set(seqs), "an acked event is missing"
        assert len(seqs) == len(set(seqs)), "an event is stored twice"
    lines = srv.read_rest()
    closes = [line["close_code"] for line in lines if line.get("event") == "connection_closed"]
    # A client may have reconnected to the other child just before it drained too.
    assert len(closes) >= len(streamers)
    assert set(closes) == {1001}
    exits = [line for line in lines if line.get("event") == "worker_exited"]
    assert sorted((e["worker"], e["code"], e["expected"]) for e in exits) == [
        (1, 0, True),
        (2, 0, True),
    ]
    assert [line["exit_code"] for line in lines if "exit_code" in line] == [0]


async def test_sighup_reaches_every_child(workers2: ServerProcess, sites_file: Path) -> None:
    """SIGHUP to the supervisor reloads the sites file in every child."""
    srv = workers2

    def add_site_keeping_mtime() -> None:
        # The children's own watcher looks at the modification time: keep it,
        # so that only the forwarded SIGHUP can reload the file.
        stat = sites_file.stat()
        sites_file.write_text(SITES_TOML + "\n[sites.late]\norigins = []\nallow_no_origin = true\n")
        os.utime(sites_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    await asyncio.to_thread(add_site_keeping_mtime)
    await asyncio.sleep(1.5 * UNIT)  # longer than the watcher's poll (SITES_POLL): it saw nothing
    assert lines_of(srv, "sites_reloaded") == []
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    await until(lambda: len(lines_of(srv, "sites_reloaded")) == 2, "two reloads")
    assert all("late" in line["sites"] for line in lines_of(srv, "sites_reloaded"))
    (forwarded,) = lines_of(srv, "signal_forwarded")
    assert sorted(forwarded["pids"]) == sorted(worker_pids(srv).values())
    for i in range(8):  # whichever child takes it knows the new site
        async with peer(f"ws://127.0.0.1:{srv.port}", site="late") as p:
            await p.hello(f"late-{i}")


def test_supervisor_sigkill_children_drain_and_exit(
    redis_proc: RedisProcess, sites_file: Path
) -> None:
    """A supervisor killed by SIGKILL leaves no child behind: each drains and exits."""
    srv = ServerProcess(redis_proc.url, sites_file, workers=2).start()
    srv.kill()
    lines = srv.read_rest()  # returns once every child closed its end of the pipe
    assert srv._reader is not None
    assert not srv._reader.is_alive(), "a child still holds stdout: it is still running"
    assert len([line for line in lines if line.get("event") == "supervisor_gone"]) == 2
    assert len([line for line in lines if line.get("event") == "stopped"]) == 2


def test_listen_port_taken_exits_1(sites_file: Path) -> None:
    """A listen port held by another program: the supervisor says so and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "eventwire", "serve", "--workers", "2",
             "--sites", str(sites_file), "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"],
            capture_output=True, text=True, cwd=REPO, timeout=30,
            env={**os.environ, "EVENTWIRE_CONFIG": os.devnull}, check=False,
        )  # fmt: skip
    assert out.returncode == 1
    assert "cannot listen" in out.stderr
    assert "worker_started" not in out.stdout


def test_workers_setting() -> None:
    """--workers and EVENTWIRE_WORKERS set ``workers``; 0 is a configuration error (exit 2)."""

    def eventwire(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eventwire", *args], capture_output=True, text=True, cwd=REPO,
            env={**os.environ, **env}, timeout=30, check=False,
        )  # fmt: skip

    out = eventwire("check-config", "--workers", "3")
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert (config["settings"]["workers"], config["sources"]["workers"]) == (3, "command line")
    out = eventwire("serve", EVENTWIRE_WORKERS="0")
    assert out.returncode == 2
    assert "workers" in out.stderr
    assert "EVENTWIRE_WORKERS" in out.stderr


# -- the supervisor with stand-in children ----------------------------------------------

#: A stand-in child: says it listens on the port it was given, then runs as told
#: by its first argument: "crash" (exit 3 after 0.05 s) or "deaf" (ignores SIGTERM).
STAND_IN = """
import json, os, signal, socket, sys, time
port = int(sys.argv[sys.argv.index("--listen") + 1].rsplit(":", 1)[1])
if sys.argv[1] == "deaf":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
lifeline = socket.socket(fileno=int(os.environ["EVENTWIRE_SUPERVISOR_FD"]))
lifeline.sendall(json.dumps({"pid": os.getpid(), "port": port, "admin_port": 1}).encode() + b"\\n")
time.sleep(0.05 if sys.argv[1] == "crash" else 60)
sys.exit(3)
"""


def stand_in_supervisor(kind: str, policy: RestartPolicy) -> Supervisor:
    """A supervisor of two stand-in children on port 0."""
    settings = msgspec.convert(
        {"workers": 2, "listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "drain_timeout": 0.2},
        Settings,
    )
    return Supervisor(settings, [sys.executable, "-c", STAND_IN, kind], policy)


async def test_crash_loop_gives_up() -> None:
    """Children that keep crashing are restarted with backoff, then the supervisor exits 1."""
    policy = RestartPolicy(backoff_base=0.01, crash_limit=3, startup_timeout=10 * UNIT)
    sup = stand_in_supervisor("crash", policy)
    code = await asyncio.wait_for(sup.run(), 20 * UNIT)
    assert code == EXIT_FAILED
    restarts = Counter({w.index: w.restarts for w in sup.workers})
    assert max(restarts.values()) == policy.crash_limit - 1
    assert all(not w.running for w in sup.workers)


async def test_child_that_ignores_sigterm_is_killed() -> None:
    """A child still running drain_timeout + stop_margin after SIGTERM is killed: exit 3."""
    sup = stand_in_supervisor("deaf", RestartPolicy(stop_margin=0.3, startup_timeout=10 * UNIT))
    assert await sup.start()
    started = time.monotonic()
    assert await sup.stop() == EXIT_KILLED
    assert time.monotonic() - started < 5 * UNIT
    assert [w.stop_code for w in sup.workers] == [-signal.SIGKILL, -signal.SIGKILL]
    assert all(w.killed for w in sup.workers)
