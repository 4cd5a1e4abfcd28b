"""Many idle connections on one server process: memory per connection, open time, trickle latency.

Opens N connections to a running server, each from one of several loopback
source addresses (127.0.0.1, 127.0.0.2, ...: one address has only about
28,000 ephemeral ports), each saying hello and waiting for its welcome before
it counts as open. Then it reads the server's resident memory (VmRSS) and
sends a trickle of single-event track frames (``--rate`` events/s, 1,000 by
default, spread over random connections) for ``--trickle`` seconds, timing
each ack. Prints the time to open them, KiB of server RSS per connection
(against the RSS before the first), and the trickle's ack latency p50, p99
and max.

Each connection says what a browser's does: one of :data:`VISITORS`'
User-Agent and Accept-Language headers (three browsers and a crawler) and a
hello context with a landing page and referrer, so the server enriches it as
a visitor's (``client``, ``params.source``, the bot flag). Per worker it
prints the open latencies (connect to 101, connect to welcome: p50, p99,
max); connections that did not open are counted by kind (the reason with its
numbers masked), the first five as they came.

The clients are lean: a raw RFC 6455 client per connection (an
``asyncio.Protocol`` with the handshake and masked frames written by hand,
no ``websockets`` client objects), spread over ``--procs`` worker
processes (each below its file descriptor limit), so the generator's own
memory and CPU stay small beside the server's.

File descriptors: the server needs one per connection, and so does each
worker. Every process raises its soft ``RLIMIT_NOFILE`` to the hard limit;
a process cannot go above the hard limit without ``CAP_SYS_RESOURCE``
(``ulimit -Hn``; ``fs.nr_open`` caps it for root). When N does not fit the
server's limit the run says so and stops before opening anything (exit 2).

usage: bench_idle.py --url ws://HOST:PORT/v1/track/SITE --server-pid PID [-n 5000]
                     [--procs P] [--sources K] [--concurrency 50] [--rate 1000]
                     [--trickle 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import resource
import secrets
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

#: Connections opened at once per worker (each waits for its welcome), by default.
#: The server gives a handshake ``hello_timeout`` (5 s) from its accept to the
#: 101 (and again to the hello) and aborts it silently after that: with 200 in
#: flight the opens queued inside the server, their p99 1.4-2 s and max 2.4-3.2 s
#: at 19,500 on the loaded 2-core machine, and runs lost 539 and 1,314
#: connections that way. The server opens ~250-430 a second whatever the
#: number in flight past a few dozen, so 50 keep its rate at a quarter of
#: the wait (p99 0.5 s, max 0.6 s).
OPEN_CONCURRENCY = 50
#: Seconds a connection may take from connect to welcome.
OPEN_TIMEOUT = 60.0
#: What the connections say of themselves, in turn: browsers' User-Agent and
#: Accept-Language headers (and one crawler), and the hello's page, so that
#: each connection is enriched as a visitor's is (client, source, bot flag).
VISITORS = (
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        "en-US,en;q=0.9",
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
        "fr-CH,fr;q=0.9",
    ),
    (
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "de-DE,de;q=0.8,en;q=0.5",
    ),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", ""),
)
#: Landing pages of the hellos (i % PAGES) and their referrers.
PAGES = 50
REFERRERS = ("https://www.google.com/", "", "https://news.ycombinator.com/")
#: File descriptors a process keeps beside its connections.
FD_SPARE = 200


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_limit(pid: int | None = None) -> int:
    """The soft ``RLIMIT_NOFILE`` of a process (this one by default)."""
    if pid is None:
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no open files limit for pid {pid}")


def raise_fd_limit() -> int:
    """Raise this process' soft fd limit to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the lean client ---------------------------------------------------------------------


def masked_text(payload: bytes) -> bytes:
    """One client-to-server text frame (FIN, masked) carrying ``payload``."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes([0x81, 0x80 | n])
    elif n < 65536:
        header = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take the complete server frames (unmasked) off the front of ``buf``: (opcode, payload)."""
    out = []
    while len(buf) >= 2:
        n = buf[1] & 0x7F
        at = 2
        if n == 126:
            if len(buf) < 4:
                break
            n, at = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, at = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < at + n:
            break
        out.append((buf[0] & 0x0F, bytes(buf[at : at + n])))
        del buf[: at + n]
    return out


class IdleClient(asyncio.Protocol):
    """One connection: handshake, hello, welcome, then idle but for trickle frames."""

    __slots__ = (
        "buf",
        "failed",
        "index",
        "opened",
        "sent",
        "seq",
        "started",
        "transport",
        "upgraded",
        "worker",
    )

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        #: which of the worker's requests and pages this connection sends
        self.index = index
        #: monotonic ns of the connect call (the open latencies count from it)
        self.started = time.monotonic_ns()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.opened: asyncio.Future[None] | None = worker.loop.create_future()
        self.failed = ""
        self.upgraded = False
        self.seq = 0
        #: seq -> monotonic ns it was sent at
        self.sent: dict[int, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        requests = self.worker.requests
        transport.write(requests[self.index % len(requests)])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if (
            self.opened is not None
            and not self.opened.done()
            and self.transport is not None
            and not self.upgraded
        ):
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self.fail(head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            self.upgraded = True
            self.worker.upgrade_ns.append(time.monotonic_ns() - self.started)
            page = self.index % PAGES
            hello = {
                "type": "hello",
                "uuid": "idle-" + secrets.token_hex(6),
                "producer": "idle-" + secrets.token_hex(8),
                "context": {
                    "url": f"https://shop.example/p/{page}?utm_campaign=c{page % 5}",
                    "referrer": REFERRERS[page % len(REFERRERS)],
                },
            }
            self.transport.write(masked_text(json.dumps(hello).encode()))
        for opcode, payload in parse_frames(self.buf):
            if opcode == 0x8:
                self.fail(f"closed by the server: {payload[:2].hex()} {payload[2:].decode()!r}")
                return
            if opcode == 0x9:  # ping: answer with a pong (masked, same payload)
                if self.transport is not None:
                    frame = bytearray(masked_text(payload))
                    frame[0] = 0x8A
                    self.transport.write(bytes(frame))
                continue
            if opcode != 0x1:
                continue
            msg = json.loads(payload)
            kind = msg.get("type")
            if kind == "welcome":
                if self.opened is not None and not self.opened.done():
                    self.worker.welcome_ns.append(time.monotonic_ns() - self.started)
                    self.opened.set_result(None)
            elif kind == "ack":
                sent = self.sent.pop(msg["seq"], None)
                if sent is not None:
                    self.worker.latencies.append(time.monotonic_ns() - sent)
            else:
                self.fail(f"unexpected answer {payload[:200]!r}")

    def fail(self, why: str) -> None:
        self.failed = self.failed or why
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.failed:
            self.failed = f"connection lost: {exc}"
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(ConnectionError(self.failed))
        self.worker.lost(self)

    def track(self, now_ms: int) -> None:
        """Send one single-event frame; its ack is timed."""
        if self.transport is None or self.transport.is_closing():
            return
        self.seq += 1
        event = {
            "seq": self.seq,
            "action": "page.visit",
            "time": now_ms,
            "params": {"url": "https://shop.example/p/" + str(self.seq)},
        }
        frame = {"type": "track", "events": [event]}
        self.sent[self.seq] = time.monotonic_ns()
        self.transport.write(masked_text(json.dumps(frame).encode()))


class Worker:
    """One process' share of the connections (``--worker``)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.loop = asyncio.get_running_loop()
        u = urlsplit(a.url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        key = base64.b64encode(os.urandom(16)).decode()
        self.requests = [
            (
                f"GET {u.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: eventwire.v1.json\r\nOrigin: http://localhost\r\n"
                f"User-Agent: {agent}\r\n"
                + (f"Accept-Language: {language}\r\n" if language else "")
                + "\r\n"
            ).encode()
            for agent, language in VISITORS
        ]
        self.clients: list[IdleClient] = []
        self.latencies: list[int] = []
        #: ns from the connect call to the 101, and to the welcome, of each connection opened
        self.upgrade_ns: list[int] = []
        self.welcome_ns: list[int] = []
        self.lost_after_open = 0
        self.open_failures: list[str] = []
        #: failures by kind (the reason without its per-connection details)
        self.failure_kinds: dict[str, int] = {}
        self.sources = [f"127.0.0.{i}" for i in range(1, a.sources + 1)]

    def lost(self, c: IdleClient) -> None:
        if c.opened is not None and c.opened.done() and c.opened.exception() is None:
            self.lost_after_open += 1

    async def open_one(self, i: int) -> None:
        source = self.sources[i % len(self.sources)]
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                _, client = await self.loop.create_connection(
                    lambda: IdleClient(self, i), self.host, self.port, local_addr=(source, 0)
                )
                assert client.opened is not None
                await client.opened
        except (OSError, TimeoutError, ConnectionError) as exc:
            why = f"{type(exc).__name__} {exc}"
            self.open_failures.append(f"{source}: {why}")
            kind = failure_kind(why)
            self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1
            return
        client.opened = None  # open: no future kept per idle connection
        self.clients.append(client)

    async def open_all(self) -> float:
        started = time.monotonic()
        sem = asyncio.Semaphore(self.a.concurrency)

        async def guarded(i: int) -> None:
            async with sem:
                await self.open_one(i)

        await asyncio.gather(*(guarded(self.a.offset + i) for i in range(self.a.n)))
        return time.monotonic() - started

    async def trickle(self, rate: float, seconds: float) -> int:
        """Single-event frames at ``rate`` per second over random open connections."""
        if rate <= 0 or not self.clients:
            return 0
        rng = random.Random(self.a.offset)
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate) + 1
            now_ms = int(time.time() * 1000)
            while sent < due:
                rng.choice(self.clients).track(now_ms)
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.sleep(1.0)  # the last acks
        return sent


async def run_worker(a: argparse.Namespace) -> None:
    """A worker: open its share, say so, wait for the go, trickle, report, wait to be stopped."""
    raise_fd_limit()
    w = Worker(a)
    opened = await w.open_all()
    report = {
        "opened": len(w.clients),
        "open_s": round(opened, 2),
        "failures": w.open_failures[:5],
        "n_failures": len(w.open_failures),
        "failure_kinds": w.failure_kinds,
        "upgrade_ms": spread_ms(w.upgrade_ns),
        "welcome_ms": spread_ms(w.welcome_ns),
    }
    print(json.dumps(report), flush=True)
    # The parent says "go" once every worker is open and the RSS is read.
    line = await w.loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return
    sent = await w.trickle(a.rate, a.trickle)
    lats = w.latencies
    print(
        json.dumps(
            {
                "sent": sent,
                "acked": len(lats),
                "latencies_ns": lats,
                "lost_after_open": w.lost_after_open,
            }
        ),
        flush=True,
    )
    await w.loop.run_in_executor(None, sys.stdin.readline)  # "stop": close everything
    for c in w.clients:
        if c.transport is not None:
            c.transport.close()


def failure_kind(why: str) -> str:
    """A failure's reason without what differs per connection (ids, ports, hex codes)."""
    return re.sub(r"\d+", "N", why)[:120]


def spread_ms(values_ns: list[int]) -> list[float]:
    """p50, p99 and max of durations (ns), in ms."""
    values = sorted(values_ns)
    if not values:
        return [float("nan")] * 3
    return [round(percentile(values, q) / 1e6, 1) for q in (0.5, 0.99)] + [values[-1] / 1e6]


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("-n", type=int, default=5000, help="connections in all")
    p.add_argument("--procs", type=int, default=0, help="worker processes (default: by fd limit)")
    p.add_argument(
        "--sources",
        type=int,
        default=0,
        help="loopback source addresses 127.0.0.1..K (default: 1 per 20,000)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=OPEN_CONCURRENCY,
        help="connections opening at once per worker",
    )
    p.add_argument("--rate", type=float, default=1000.0, help="trickle events/s in all")
    p.add_argument("--trickle", type=float, default=10.0, help="trickle seconds (0: none)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading RSS")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        try:
            import uvloop

            uvloop.run(run_worker(a))
        except ImportError:
            asyncio.run(run_worker(a))
        return 0
    return coordinate(a)


def coordinate(a: argparse.Namespace) -> int:
    own = raise_fd_limit()
    server_fds = fd_limit(a.server_pid)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    print(
        f"fd limits: server {server_fds}, this process {own} (hard {hard}); fs.nr_open "
        f"{nr_open}; somaxconn {Path('/proc/sys/net/core/somaxconn').read_text().strip()}"
    )
    if a.n + FD_SPARE > server_fds:
        print(
            f"cannot hold {a.n:,} connections: the server may open {server_fds:,} files. Its "
            f"hard limit is set by whoever starts it (ulimit -Hn; above it needs root with "
            f"CAP_SYS_RESOURCE, up to fs.nr_open {nr_open:,}); at most about "
            f"{server_fds - FD_SPARE:,} here",
            file=sys.stderr,
        )
        return 2
    per_proc = max(1, own - FD_SPARE)
    procs = a.procs or -(-a.n // per_proc)
    sources = a.sources or max(1, -(-a.n // 20_000))
    shares = [a.n // procs + (1 if i < a.n % procs else 0) for i in range(procs)]
    print(
        f"opening {a.n:,} connections from {sources} source address(es) "
        f"(127.0.0.1-{sources}) in {procs} worker process(es), {a.concurrency} at a time each"
    )
    before = rss_kib(a.server_pid)
    started = time.monotonic()
    workers = []
    offset = 0
    for share in shares:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--url",
            a.url,
            "-n",
            str(share),
            "--offset",
            str(offset),
            "--sources",
            str(sources),
            "--rate",
            str(a.rate / procs),
            "--concurrency",
            str(a.concurrency),
            "--trickle",
            str(a.trickle),
        ]
        workers.append(
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
        offset += share
    try:
        opened = 0
        failures: list[str] = []
        kinds: dict[str, int] = {}
        spreads: list[tuple[list[float], list[float]]] = []
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if not line:
                print("a worker died while opening", file=sys.stderr)
                return 1
            r = json.loads(line)
            opened += r["opened"]
            failures += r["failures"]
            spreads.append((r["upgrade_ms"], r["welcome_ms"]))
            for kind, count in r["failure_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + count
        open_s = time.monotonic() - started
        time.sleep(a.settle)
        after = rss_kib(a.server_pid)
        per = (after - before) / max(1, opened)
        print(
            f"idle connections: {opened:,} of {a.n:,} open (each after its welcome) in "
            f"{open_s:.1f} s ({opened / open_s:,.0f}/s); server RSS {before / 1024:.1f} MiB -> "
            f"{after / 1024:.1f} MiB: {per:.1f} KiB per connection"
        )
        for i, (up, wel) in enumerate(spreads):
            print(
                f"  worker {i + 1}: connect to 101 p50 {up[0]:.0f} ms, p99 {up[1]:.0f} ms, max "
                f"{up[2]:.0f} ms; to welcome p50 {wel[0]:.0f} ms, p99 {wel[1]:.0f} ms, max "
                f"{wel[2]:.0f} ms"
            )
        for kind, count in sorted(kinds.items(), key=lambda kc: -kc[1]):
            print(f"  {count:,} failed to open: {kind}", file=sys.stderr)
        for f in failures[:5]:
            print("  open failed:", f, file=sys.stderr)
        lats: list[int] = []
        sent = acked = lost = 0
        if a.trickle > 0:
            for w in workers:
                assert w.stdin is not None
                w.stdin.write("go\n")
                w.stdin.flush()
            for w in workers:
                assert w.stdout is not None
                r = json.loads(w.stdout.readline())
                sent += r["sent"]
                acked += r["acked"]
                lost += r["lost_after_open"]
                lats += r["latencies_ns"]
            lats.sort()
            p50, p99 = percentile(lats, 0.5) / 1e6, percentile(lats, 0.99) / 1e6
            mx = lats[-1] / 1e6 if lats else float("nan")
            print(
                f"trickle: {a.rate:,.0f} events/s for {a.trickle:g} s over the open connections: "
                f"{sent:,} sent, {acked:,} acked; ack latency p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
                f"max {mx:.1f} ms; server RSS {rss_kib(a.server_pid) / 1024:.1f} MiB; "
                f"connections lost {lost}"
            )
        ok = opened == a.n and acked == sent and lost == 0
        print("ok" if ok else "NOT OK: connections failed to open, were lost or frames unacked")
        return 0 if ok else 1
    finally:
        for w in workers:
            try:
                if w.stdin is not None:
                    w.stdin.write("stop\n")
                    w.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()


if __name__ == "__main__":
    sys.exit(main())
