"""An end-to-end chaos run: every acked event must be in the store exactly once.

Starts, on loopback and free ports in a temp dir: a private Redis (AOF,
``appendfsync always``), ``eventwire serve --workers 2`` (``max_backlog``
small), two ``eventwire persist`` workers (``claim_idle`` 2 s) on the store
(a temp SQLite file, or ``--dsn``), and two kinds of clients that keep a
ledger of what they sent: CLIENTS Python clients (each event's label is a
unique id) and one load generator (``bench/loadgen.py --ledger``, LOADGENS
connections, each its own producer, 200 events/s each; it resends nacked frames and
reconnects with the same producer, and ledgers each stored event's
``producer seq``, the store's own key). For ``-t`` seconds it
injects, at random bounded times drawn from ``--seed``: SIGKILL of a server
child (the supervisor starts another), SIGKILL of a persist worker
(restarted; its batch is reclaimed), Redis stopped and started again on its
AOF, both persist workers stopped until the backlog reaches
``max_backlog`` (frames are then nacked) and 2 s more, and the store
refusing the workers for 3 to 15 s (SQLite: another connection holds the
file's write lock, past the workers' 10 s busy timeout; PostgreSQL: the
workers' connections are terminated as soon as they connect). At the end
every client flushes (everything tracked must be acked), the workers drain,
and the ledgers are compared with the store's rows: it prints acked (per
client kind), stored, missing, doubled, nacks by code, faults and the
longest time an acked event
waited to be a row (sampled every 0.25 s: the stream's newest entry, and
when the group had stored everything up to it), and exits 1 on any missing
or doubled row (or an unacked event, or a load generator that failed).

usage: chaos.py [-t 60] [--dsn URL] [--seed N] [--clients 4] [--loadgens 2]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog

from eventwire.client import EventwireClient
from eventwire.persist.sinks import open_sink, sqlite_path

ROOT = Path(__file__).resolve().parents[1]
SITE = "chaos"
STREAM = f"ew:{{{SITE}}}:events"
MAX_BACKLOG = 3000
EVENTWIRE = str(ROOT / ".venv" / "bin" / "eventwire")
LOADGEN = str(ROOT / "bench" / "loadgen.py")
#: The load generator's events per frame, and events per second per connection.
LOADGEN_BATCH = 10
LOADGEN_RATE = 200


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, within: float) -> None:
    """Wait until something listens on a loopback port."""
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (from /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


class Rig:
    """The processes of the run, and how to hurt them."""

    def __init__(self, work: Path, dsn: str) -> None:
        self.work = work
        #: PostgreSQL: the workers' connections carry a name of this run's own,
        #: so the refusal fault ends theirs and no one else's.
        self.app = f"eventwire-chaos-{os.getpid()}"
        if dsn.startswith("postgres"):
            dsn += ("&" if "?" in dsn else "?") + f"application_name={self.app}"
        self.dsn = dsn
        self.redis_port = free_port()
        self.port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.sites = work / "sites.toml"
        self.sites.write_text(f"[sites.{SITE}]\nallow_no_origin = true\n")
        self.env = {
            **os.environ,
            "EVENTWIRE_CONFIG": os.devnull,
            "EVENTWIRE_MAX_BACKLOG": str(MAX_BACKLOG),
            "EVENTWIRE_RETRY_AFTER_MS": "200",
            "EVENTWIRE_CLAIM_IDLE": "2",
        }
        self.redis: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes] | None] = [None, None]
        self.log = (work / "processes.log").open("ab")

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            args, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=self.log,
        )  # fmt: skip

    async def start_redis(self) -> None:
        """redis-server on its AOF (appendfsync always), in the work dir."""
        self.redis = self._spawn(
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--dir", str(self.work), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "",
        )  # fmt: skip
        await wait_port(self.redis_port, 10)

    async def start_server(self) -> None:
        """eventwire serve --workers 2."""
        self.server = self._spawn(
            EVENTWIRE, "serve", "--workers", "2", "--listen", f"127.0.0.1:{self.port}",
            "--admin", f"127.0.0.1:{free_port()}", "--redis", self.redis_url,
            "--sites", str(self.sites),
        )  # fmt: skip
        await wait_port(self.port, 20)

    def start_worker(self, i: int) -> None:
        """Persist worker i."""
        self.workers[i] = self._spawn(
            EVENTWIRE, "persist", "--sites", str(self.sites), "--redis", self.redis_url,
            "--dsn", self.dsn,
        )  # fmt: skip

    def kill_worker(self, i: int) -> None:
        """SIGKILL persist worker i."""
        proc = self.workers[i]
        if proc is not None:
            proc.kill()
            proc.wait()
            self.workers[i] = None

    def kill_server_child(self, rng: random.Random) -> bool:
        """SIGKILL one of the supervisor's server processes."""
        assert self.server is not None
        kids = children(self.server.pid)
        if not kids:
            return False
        os.kill(rng.choice(kids), signal.SIGKILL)
        return True

    async def restart_redis(self, down: float) -> None:
        """Stop Redis (SIGTERM: the AOF is fsynced at every write), wait, start it again."""
        assert self.redis is not None
        self.redis.terminate()
        self.redis.wait(30)
        await asyncio.sleep(down)
        await self.start_redis()

    async def refuse_store(self, seconds: float) -> None:
        """The store refuses the workers for ``seconds``."""
        until = time.monotonic() + seconds
        if not self.dsn.startswith("postgres"):
            # The write lock, held: the workers' writes wait 10 s and fail.
            db = sqlite3.connect(sqlite_path(self.dsn), isolation_level=None, timeout=30)
            try:
                db.execute("BEGIN EXCLUSIVE")
                await asyncio.sleep(seconds)
                db.execute("ROLLBACK")
            finally:
                db.close()
            return
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(self.dsn.split("?")[0])
        try:
            while time.monotonic() < until:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    self.app,
                )
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    def stop(self) -> None:
        """Stop everything this rig started."""
        for i in range(len(self.workers)):
            proc = self.workers[i]
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(20)
                self.workers[i] = None
        for proc in (self.server, self.redis):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def backlog(redis: aioredis.Redis) -> int | None:
    """The persist group's unacknowledged entries (None: Redis or the group is away)."""
    try:
        (group,) = await redis.xinfo_groups(STREAM)
        last = (await redis.xinfo_stream(STREAM))["last-generated-id"]
        # Redis' lag counter can be wrong after an AOF reload: all delivered is lag 0.
        lag = 0 if group["last-delivered-id"] == last else int(group["lag"] or 0)
        return int(group["pending"]) + lag
    except (aioredis.RedisError, OSError, ValueError):
        return None


async def stored_frontier(redis: aioredis.Redis) -> tuple[int, int] | None:
    """An id below which the group has stored every entry (None: Redis away)."""
    try:
        (group,) = await redis.xinfo_groups(STREAM)
        summary = await redis.xpending(STREAM, "persist")
    except (aioredis.RedisError, OSError, ValueError):
        return None
    oldest = summary["min"] if summary["pending"] else None
    raw = oldest if oldest is not None else group["last-delivered-id"]
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition("-")
    # Everything before the oldest pending entry is stored; with none pending,
    # everything delivered is (the last delivered one included).
    return (int(ms), int(seq)) if oldest is not None else (int(ms), int(seq) + 1)


async def ack_to_row(redis_url: str, stop: asyncio.Event, longest: list[float]) -> None:
    """The longest wait from an entry's arrival to its row, sampled every 0.25 s.

    Each sample notes the stream's newest entry and the time; a later sample
    whose stored frontier is past it closes that wait.
    """
    redis = aioredis.Redis.from_url(redis_url)
    probes: collections.deque[tuple[float, tuple[int, int]]] = collections.deque()
    try:
        while not stop.is_set():
            now = time.monotonic()
            with contextlib.suppress(aioredis.RedisError, OSError, ValueError):
                info = await redis.xinfo_stream(STREAM)
                raw = info["last-generated-id"]
                ms, _, seq = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition("-")
                if int(info["length"]) and (not probes or probes[-1][1] != (int(ms), int(seq))):
                    probes.append((now, (int(ms), int(seq))))
            frontier = await stored_frontier(redis)
            while frontier is not None and probes and probes[0][1] < frontier:
                longest[0] = max(longest[0], now - probes.popleft()[0])
            if probes:  # still waiting: a lower bound already
                longest[1] = max(longest[1], now - probes[0][0])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        await redis.aclose()


async def client_loop(url: str, n: int, stop: asyncio.Event, ledger: list[str]) -> EventwireClient:
    """One client tracking ~200 events/s until ``stop``; each event's label goes in ``ledger``."""
    client = EventwireClient(url, f"chaos-cust-{n}", batch_size=50)
    await client.__aenter__()
    i = 0
    while not stop.is_set():
        for _ in range(10):
            label = f"c{n}-{i}"
            client.track("chaos.event", {"i": i}, label)
            ledger.append(label)
            i += 1
        await asyncio.sleep(0.05)
    return client


def start_loadgen(rig: Rig, conns: int, seconds: float, seed: int) -> subprocess.Popen[bytes]:
    """``bench/loadgen.py --ledger`` on the run's site: new frames for ``seconds``."""
    return rig._spawn(
        sys.executable, LOADGEN, "--port", str(rig.port), "--site", SITE, "--origin", "",
        "-c", str(conns), "-b", str(LOADGEN_BATCH), "-w", "2", "-n", "100000000",
        "--rate", str(LOADGEN_RATE), "--duration", f"{seconds:g}", "--timeout", "120",
        "--seed", str(seed), "--verify", "none", "--ledger", str(rig.work / "loadgen.ledger"),
        "--json", str(rig.work / "loadgen.json"),
    )  # fmt: skip


async def loadgen_rows(dsn: str) -> collections.Counter[str]:
    """The store's rows of the load generator's producers, as ``producer seq``."""
    sink = open_sink(dsn)
    await sink.open()
    try:
        if dsn.startswith("postgres"):

            async def fetch(conn: Any) -> list[Any]:
                sql = "SELECT producer, seq FROM events WHERE site = $1 AND producer LIKE 'lg-%'"
                return list(await conn.fetch(sql, SITE))

            rows = await sink.run(fetch)
        else:
            sql = "SELECT producer, seq FROM events WHERE site = ? AND producer LIKE 'lg-%'"
            rows = await sink.run(lambda db: db.execute(sql, (SITE,)).fetchall())
    finally:
        await sink.close()
    return collections.Counter(f"{producer} {seq}" for producer, seq in rows)


async def faults(
    rig: Rig, rng: random.Random, until: float, done: collections.Counter[str]
) -> None:
    """Inject a random fault every 3 to 8 s until ``until`` (monotonic)."""
    redis = aioredis.Redis.from_url(rig.redis_url)
    try:
        while time.monotonic() + 8 < until:
            await asyncio.sleep(rng.uniform(3, 8))
            kind = rng.choice(
                ["server child", "persist worker", "redis", "workers stopped", "store refuses"]
            )
            if kind == "server child":
                if not rig.kill_server_child(rng):
                    continue
            elif kind == "persist worker":
                i = rng.randrange(2)
                rig.kill_worker(i)
                await asyncio.sleep(rng.uniform(0, 2))
                rig.start_worker(i)
            elif kind == "redis":
                await rig.restart_redis(rng.uniform(0.2, 2.0))
                await redis.aclose()
                redis = aioredis.Redis.from_url(rig.redis_url)
            elif kind == "store refuses":
                await rig.refuse_store(rng.uniform(3, 15))
            else:
                rig.kill_worker(0)
                rig.kill_worker(1)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and ((await backlog(redis)) or 0) < MAX_BACKLOG:  # noqa: ASYNC110 - polling Redis
                    await asyncio.sleep(0.1)
                await asyncio.sleep(2)
                rig.start_worker(0)
                rig.start_worker(1)
            done[kind] += 1
            print(f"  {time.strftime('%H:%M:%S')} fault: {kind}", flush=True)
    finally:
        await redis.aclose()


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="eventwire-chaos."))
    dsn = args.dsn or f"sqlite:///{work / 'events.db'}"
    rng = random.Random(args.seed)
    rig = Rig(work, dsn)
    print(f"chaos: seed {args.seed}, {args.t:g} s, store {dsn.split(':')[0]}, work dir {work}")
    try:
        await rig.start_redis()
        await rig.start_server()
    except BaseException:
        rig.stop()  # nothing of this run is left running
        raise
    rig.start_worker(0)
    rig.start_worker(1)
    redis = aioredis.Redis.from_url(rig.redis_url)
    while (await backlog(redis)) is None:  # noqa: ASYNC110 - until the workers made the group
        await asyncio.sleep(0.1)
    stop = asyncio.Event()
    ledgers: list[list[str]] = [[] for _ in range(args.clients)]
    url = f"ws://127.0.0.1:{rig.port}/v1/track/{SITE}"
    tasks = [
        asyncio.create_task(client_loop(url, n, stop, ledgers[n])) for n in range(args.clients)
    ]
    loadgen = start_loadgen(rig, args.loadgens, args.t, args.seed) if args.loadgens else None
    done: collections.Counter[str] = collections.Counter()
    code = 0
    waits = [0.0, 0.0]  # longest closed wait, longest open one
    sampled = asyncio.Event()
    sampler = asyncio.create_task(ack_to_row(rig.redis_url, sampled, waits))
    try:
        await faults(rig, rng, time.monotonic() + args.t, done)
        stop.set()
        clients = await asyncio.gather(*tasks)
        unacked = 0
        for client in clients:
            try:
                await client.flush(timeout=120)
            except TimeoutError:
                unacked += 1
        nacks = sum(c.nacks for c in clients)
        codes: collections.Counter[str] = collections.Counter()
        for c in clients:
            codes.update(c.nack_codes)
        for client in clients:
            await client.__aexit__(None, None, None)
        lg_record: dict[str, Any] = {}
        if loadgen is not None:  # it stops at -t and answers what it sent
            while loadgen.poll() is None:  # noqa: ASYNC110 - a child process
                await asyncio.sleep(0.2)
            record = rig.work / "loadgen.json"
            lines = record.read_text().splitlines() if record.exists() else []
            lg_record = json.loads(lines[-1]) if lines else {}
            nacks += lg_record.get("nacks", 0)
            codes.update(lg_record.get("nack_codes", {}))
            if loadgen.returncode != 0 or not lg_record.get("ok"):
                print(f"chaos: the load generator failed (exit {loadgen.returncode})")
                code = 1
        for i in range(2):  # both workers up for the drain
            if rig.workers[i] is None:
                rig.start_worker(i)
        deadline = time.monotonic() + 120
        while (await backlog(redis)) != 0:
            if time.monotonic() > deadline:
                print("chaos: the workers did not drain in 120 s")
                code = 1
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # a last sample of the drained stream
        sampled.set()
        await sampler
        sink = open_sink(dsn)
        await sink.open()
        stored: collections.Counter[str] = collections.Counter()
        for n in range(args.clients):
            for a in await sink.activity(SITE, f"chaos-cust-{n}", 10_000_000):
                if a.action == "chaos.event":
                    stored[a.label] += 1
        await sink.close()
        acked = {label for ledger in ledgers for label in ledger}
        missing = len(acked - set(stored))
        doubled = sum(1 for c in stored.values() if c > 1)
        foreign = len(set(stored) - acked)
        lg_acked: set[str] = set()
        if loadgen is not None:
            ledger = rig.work / "loadgen.ledger"
            lg_lines = ledger.read_text().splitlines() if ledger.exists() else []
            lg_acked = set(lg_lines)
            doubled += len(lg_lines) - len(lg_acked)  # an event ledgered twice
            lg_stored = await loadgen_rows(dsn)
            stored.update(lg_stored)
            missing += len(lg_acked - set(lg_stored))
            doubled += sum(1 for c in lg_stored.values() if c > 1)
            foreign += len(set(lg_stored) - lg_acked)
        print(
            f"chaos: acked {len(acked) + len(lg_acked):,} (python {len(acked):,}, "
            f"loadgen {len(lg_acked):,}; its reconnects {lg_record.get('reconnects', 0)}, "
            f"frames welcome.acked covered {lg_record.get('resumed_frames', 0)}), "
            f"stored {sum(stored.values()):,}, missing {missing}, "
            f"doubled {doubled}, unknown {foreign}, clients not flushed {unacked}, "
            f"nacks {nacks:,} {dict(codes)}; faults: {dict(done)}; longest ack-to-row "
            f"{max(waits):.1f} s"
        )
        if missing or doubled or foreign or unacked:
            code = 1
    finally:
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        sampled.set()
        with contextlib.suppress(Exception):
            await sampler
        await redis.aclose()
        rig.stop()
    print("chaos: " + ("OK" if code == 0 else f"FAILED (logs in {work})"))
    if code == 0:
        shutil.rmtree(work, ignore_errors=True)
    return code


def main() -> int:
    # The clients log every nack at debug level: thousands in a run.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", type=float, default=60.0, help="seconds of faults (60)")
    parser.add_argument("--dsn", help="the store (default: a temp SQLite file)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random seed")
    parser.add_argument("--clients", type=int, default=4, help="Python clients (4)")
    parser.add_argument(
        "--loadgens",
        type=int,
        default=2,
        help=f"load generator connections, {LOADGEN_RATE} events/s each (2; 0: none)",
    )
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
