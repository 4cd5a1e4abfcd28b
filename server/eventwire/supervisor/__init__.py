"""``eventwire serve --workers N``: N server processes on one port under one supervisor.

This module owns the supervisor process and the children's end of the socket
each child shares with it. The supervisor serves no connection itself:

- It resolves the public port (port 0 becomes one concrete free port) and
  keeps it with a bound, never-listening ``SO_REUSEPORT`` socket: no other
  program takes the port while a child restarts, and the kernel hands
  connections only to listening sockets, so this one never gets any.
- It starts N children, each ``python -m eventwire`` with the command line the
  supervisor was given plus ``--workers 1``, the concrete ``--listen`` and a
  private ``--admin 127.0.0.1:0``. Each runs the ordinary single-process
  server and binds the public port with ``SO_REUSEPORT``: the kernel spreads
  new connections across the children. Children share nothing but Redis.
- Each child inherits one end of a socket pair, its *lifeline*. Once it
  listens it writes one JSON line there (pid, port, admin port); when the
  supervisor's end closes (the supervisor exited, even by SIGKILL) the child
  drains and exits by itself, so no child outlives its supervisor.
- A child that exits while the supervisor is not stopping is restarted after
  a backoff (:class:`RestartPolicy`); a child that exits ``crash_limit``
  times within ``crash_window`` makes the supervisor give up: it drains the
  others and exits 1.
- SIGHUP (reload the sites file) is forwarded to every listening child.
- On SIGTERM or SIGINT it sends SIGTERM to every child, which acks what it
  holds and closes its connections 1001 (up to ``drain_timeout``), and waits
  ``drain_timeout + stop_margin`` for them; a child still running then is
  killed.
- Its admin listener (the ``admin`` setting) answers three paths itself:
  ``/healthz`` (the supervisor runs), ``/readyz`` (some child listens and
  every listening child is ready) and ``/metrics``: every child's metrics,
  each sample labelled ``worker="1".."N"``, plus ``eventwire_workers``,
  ``eventwire_worker_up{worker}`` and ``eventwire_worker_restarts_total{worker}``,
  so one scrape target sees every child's counters (``admin_token`` guards
  it as it guards a child's). Every other request (the dashboard, ``/v1/...``,
  the live relay's WebSocket) is passed through, bytes as they are, to one
  listening child's admin listener: those routes read Redis, so any child
  gives the same answer, and the child checks the token.

Exit codes of :meth:`Supervisor.run`: :data:`EXIT_OK` (every child drained
and exited 0), :data:`EXIT_FAILED` (a child did not start, crash-looped or
failed while stopping), :data:`EXIT_KILLED` (a child did not stop in time and
was killed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from eventwire.admin import warn_if_open
from eventwire.core.config import Settings
from eventwire.tasks import cancel_and_wait

#: Every child drained and exited 0.
EXIT_OK: Final = 0
#: A child did not start, crash-looped, or exited with an error while stopping.
EXIT_FAILED: Final = 1
#: A child did not stop within ``drain_timeout + stop_margin`` and was killed.
EXIT_KILLED: Final = 3

#: The environment variable naming the lifeline's file descriptor in a child.
LIFELINE_ENV: Final = "EVENTWIRE_SUPERVISOR_FD"
#: The environment variable giving a child its worker number, added to its log lines.
WORKER_ENV: Final = "EVENTWIRE_WORKER"
#: Children's admin listeners: loopback only, read by the supervisor's /metrics and /readyz.
CHILD_ADMIN: Final = "127.0.0.1:0"
#: Longest ready line a child may write on its lifeline.
READY_LINE_LIMIT: Final = 4096
#: How long /metrics and /readyz wait for one child; a slower child counts as down
#: (``eventwire_worker_up 0``) for that scrape. Bounds the scrape's duration.
CHILD_HTTP_TIMEOUT: Final = 2.0
#: Largest /metrics body read from one child; its series are bounded by sites and codes.
CHILD_METRICS_LIMIT: Final = 8 * 1024 * 1024
#: Longest request head (request line and headers) the admin listener reads.
ADMIN_HEAD_LIMIT: Final = 64 * 1024
#: How long a client of the admin listener may take to send its request head.
ADMIN_HEAD_TIMEOUT: Final = 10.0
#: Admin connections open at once (passed through ones hold two sockets and
#: two 64 KiB reads each, e.g. dashboard viewers); more are answered 503.
ADMIN_MAX_CONNECTIONS: Final = 256
#: The paths the supervisor answers itself; every other goes to a child.
OWN_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})

log = structlog.get_logger("eventwire.supervisor")


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts children and when it gives up.

    Args:
        backoff_base: delay before the first restart; it doubles with each
            further exit of that child within ``crash_window``.
        backoff_max: the longest delay between restarts.
        crash_limit: exits of one child within ``crash_window`` that make the
            supervisor give up (a crash loop costs one process start, ~0.4 s
            of CPU, per restart until then).
        crash_window: seconds over which exits are counted.
        startup_timeout: how long a child may take from its start to
            listening before it is killed and counted as an exit.
        stop_margin: seconds beyond ``drain_timeout`` a child may take to
            close its connections, publish its sessions' ends and exit.
    """

    backoff_base: float = 0.1
    backoff_max: float = 5.0
    crash_limit: int = 5
    crash_window: float = 60.0
    startup_timeout: float = 30.0
    stop_margin: float = 5.0

    def delay(self, exits: int) -> float:
        """The delay before restarting a child that exited ``exits`` times in the window."""
        return float(min(self.backoff_max, self.backoff_base * 2 ** max(0, exits - 1)))


@dataclass(eq=False)
class _Worker:
    """One child slot: the process in it now and its history."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    lifeline: asyncio.StreamWriter | None = None
    admin_port: int = 0
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    killed: bool = False
    stop_code: int | None = None
    exits: collections.deque[float] = field(default_factory=collections.deque)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    """The parent of ``settings.workers`` server processes sharing one port.

    Args:
        settings: effective settings (``workers``, ``listen``, ``admin``,
            ``drain_timeout`` are read here).
        command: the child's command line; the supervisor appends
            ``--workers 1 --listen HOST:PORT --admin 127.0.0.1:0``.
        policy: restart and stop timings.
        env: the children's environment (``os.environ``).

    Use :meth:`run`, with :meth:`request_stop` and :meth:`forward` wired to
    signals; or ``await start()``, then ``await stop()``.
    """

    def __init__(
        self,
        settings: Settings,
        command: Sequence[str],
        policy: RestartPolicy | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.command = list(command)
        self.policy = policy or RestartPolicy()
        self.env = dict(os.environ if env is None else env)
        self.workers = [_Worker(i) for i in range(1, settings.workers + 1)]
        self.port = 0
        self.admin: asyncio.Server | None = None
        self._admin_connections: set[asyncio.Task[Any]] = set()
        self._next_child = itertools.count()
        self._token = settings.admin_token.encode()
        self._reserved: socket.socket | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._stop_requested = asyncio.Event()
        self._stopping = asyncio.Event()
        self._exit_code = EXIT_OK
        self._stopped: asyncio.Future[int] | None = None

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until :meth:`request_stop` or a crash loop, stop; returns the exit code."""
        if await self.start():
            await self._stop_requested.wait()
        return await self.stop()

    async def start(self) -> bool:
        """Reserve the port, open the admin listener, start every child and wait until each listens.

        Returns:
            Whether every child listens; if not, the reason is logged and
            :meth:`stop` ends the others.

        Raises:
            OSError: the public or admin address cannot be bound.
        """
        host, port = self.settings.listen_addr
        self._reserved = reserve_port(host, port)
        self.port = self._reserved.getsockname()[1]
        admin_host, admin_port = self.settings.admin_addr
        warn_if_open(self._token, admin_host, admin_port)
        self.admin = await asyncio.start_server(
            self._admin_connection, admin_host, admin_port, limit=ADMIN_HEAD_LIMIT
        )
        started = await asyncio.gather(*(self._start_child(w) for w in self.workers))
        for w in self.workers:
            self._own(asyncio.create_task(self._watch(w), name=f"eventwire-worker-{w.index}"))
        if not all(started):
            failed = [w.index for w, ok in zip(self.workers, started, strict=True) if not ok]
            log.error("workers_failed_to_start", workers=failed)
            self._exit_code = EXIT_FAILED
            return False
        log.info(
            "workers_ready",
            track=f"ws://{_urlhost(host)}:{self.port}",
            admin=self.admin_url,
            workers=len(self.workers),
            pids=[w.pid for w in self.workers],
        )
        return True

    def request_stop(self, reason: str = "signal") -> None:
        """Ask :meth:`run` to stop (a signal handler may call this)."""
        if not self._stop_requested.is_set():
            log.info("stopping", reason=reason, workers=len(self.workers))
            self._stop_requested.set()

    def forward(self, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to every listening child; returns their pids.

        A child still starting is skipped: it has no handler yet (SIGHUP would
        kill it), and it reads the sites file as it starts anyway.
        """
        pids: list[int] = []
        for w in self.workers:
            if w.ready and w.running and _signal(w, sig):
                assert w.pid is not None
                pids.append(w.pid)
        log.info("signal_forwarded", signal=sig.name, pids=pids)
        return pids

    async def stop(self) -> int:
        """SIGTERM every child, wait for them to drain, kill late ones; returns the exit code."""
        if self._stopped is not None:
            return await asyncio.shield(self._stopped)
        self._stopped = asyncio.get_running_loop().create_future()
        self._stopping.set()
        self._stop_requested.set()
        for w in self.workers:
            _signal(w, signal.SIGTERM)
        if self._watchers:
            limit = self.settings.drain_timeout + self.policy.stop_margin
            _, late = await asyncio.wait(self._watchers, timeout=limit)
            for w in self.workers:
                if _signal(w, signal.SIGKILL):
                    log.error("worker_killed", worker=w.index, pid=w.pid, after_s=limit)
                    w.killed = True
            if late:
                await asyncio.wait(late)
        for w in self.workers:
            if w.killed:
                self._exit_code = max(self._exit_code, EXIT_KILLED)
            elif w.stop_code not in (None, 0, -signal.SIGTERM):
                # -SIGTERM: a child still starting, stopped before its handler existed.
                self._exit_code = max(self._exit_code, EXIT_FAILED)
        if self.admin is not None:
            self.admin.close()
            await cancel_and_wait(self._admin_connections)
            await self.admin.wait_closed()
        if self._reserved is not None:
            self._reserved.close()
        log.info("stopped", exit_code=self._exit_code)
        self._stopped.set_result(self._exit_code)
        return self._exit_code

    @property
    def admin_url(self) -> str:
        """Base URL of the supervisor's admin listener."""
        assert self.admin is not None
        port: int = self.admin.sockets[0].getsockname()[1]
        return f"http://{_urlhost(self.settings.admin_addr[0])}:{port}"

    def _own(self, task: asyncio.Task[None]) -> None:
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # -- children -------------------------------------------------------------------

    async def _start_child(self, w: _Worker) -> bool:
        """Start the child of a slot and wait until it listens; False if it did not."""
        host = self.settings.listen_addr[0]
        listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        ours, theirs = socket.socketpair()
        w.ready = False
        w.admin_port = 0
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *self.command,
                *("--workers", "1", "--listen", listen, "--admin", CHILD_ADMIN),
                stdin=asyncio.subprocess.DEVNULL,
                env={**self.env, LIFELINE_ENV: str(theirs.fileno()), WORKER_ENV: str(w.index)},
                pass_fds=(theirs.fileno(),),
                # Its own process group: a Ctrl-C on the terminal reaches only the
                # supervisor, which stops the children in order.
                process_group=0,
            )
        except OSError as exc:
            ours.close()
            w.proc = None
            log.error("worker_spawn_failed", worker=w.index, error=str(exc))
            return False
        finally:
            theirs.close()
        w.started_at = time.monotonic()
        if self._stopping.is_set():  # stop() began while this child was being spawned
            _signal(w, signal.SIGTERM)
        reader, w.lifeline = await asyncio.open_connection(sock=ours, limit=READY_LINE_LIMIT)
        line = b""
        report: Any = None
        try:
            async with asyncio.timeout(self.policy.startup_timeout):
                line = await reader.readline()
            report = json.loads(line) if line else None
        except TimeoutError:
            log.error("worker_start_timeout", worker=w.index, pid=w.pid)
            _signal(w, signal.SIGKILL)
            return False
        except ValueError:  # an overlong line, or not JSON
            pass
        if not isinstance(report, dict) or report.get("port") != self.port:
            if w.running:  # it said something else than "listening on our port"
                log.error("worker_bad_report", worker=w.index, pid=w.pid, report=repr(line[:200]))
                _signal(w, signal.SIGKILL)
            return False
        w.admin_port = int(report["admin_port"])
        w.ready = True
        log.info(
            "worker_started",
            worker=w.index,
            pid=w.pid,
            admin=f"http://127.0.0.1:{w.admin_port}",
            restarts=w.restarts,
        )
        return True

    async def _watch(self, w: _Worker) -> None:
        """Keep one slot filled until stopping: wait for its child to exit, restart it."""
        while True:
            code = await w.proc.wait() if w.proc is not None else None
            self._exited(w, code)
            if self._stopping.is_set():
                return
            now = time.monotonic()
            w.exits.append(now)
            while w.exits and w.exits[0] < now - self.policy.crash_window:
                w.exits.popleft()
            if len(w.exits) >= self.policy.crash_limit:
                log.error(
                    "workers_crash_loop",
                    worker=w.index,
                    exits=len(w.exits),
                    window_s=self.policy.crash_window,
                    detail="giving up: stopping every worker",
                )
                self._exit_code = EXIT_FAILED
                self.request_stop("crash_loop")
                return
            delay = self.policy.delay(len(w.exits))
            log.warning("worker_restart", worker=w.index, delay_s=delay, exits=len(w.exits))
            try:
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
                return
            except TimeoutError:
                pass
            w.restarts += 1
            await self._start_child(w)

    def _exited(self, w: _Worker, code: int | None) -> None:
        stopping = self._stopping.is_set()
        if stopping:
            w.stop_code = code
        fields: dict[str, Any] = {"worker": w.index, "pid": w.pid, "code": code}
        if code is not None and code < 0:
            fields["signal"] = signal.Signals(-code).name
        if w.started_at:
            fields["uptime_s"] = round(time.monotonic() - w.started_at, 3)
        if not stopping:
            log.error("worker_exited", expected=False, **fields)
        elif code in (0, -signal.SIGTERM):
            log.info("worker_exited", expected=True, **fields)
        else:
            log.warning("worker_exited", expected=True, **fields)
        w.ready = False
        if w.lifeline is not None:
            w.lifeline.close()
            w.lifeline = None

    # -- admin listener -------------------------------------------------------------

    async def _admin_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One admin connection: answer /healthz, /readyz, /metrics; pass any other on."""
        task = asyncio.current_task()
        assert task is not None
        if len(self._admin_connections) >= ADMIN_MAX_CONNECTIONS:
            await _respond(writer, HTTPStatus.SERVICE_UNAVAILABLE, "too many admin connections\n")
            return
        self._admin_connections.add(task)
        try:
            try:
                async with asyncio.timeout(ADMIN_HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await _respond(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too large\n")
                return
            except (asyncio.IncompleteReadError, TimeoutError, OSError):
                writer.close()
                return
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0].decode("latin-1")
            if path not in OWN_PATHS:
                await self._pass_through(head, reader, writer)
            elif method != b"GET":
                await _respond(writer, HTTPStatus.METHOD_NOT_ALLOWED, "GET only\n")
            else:
                await self._answer(path, head, writer)
        finally:
            self._admin_connections.discard(task)

    async def _answer(self, path: str, head: bytes, writer: asyncio.StreamWriter) -> None:
        """Answer one of :data:`OWN_PATHS`."""
        if path == "/healthz":
            await _respond(writer, HTTPStatus.OK, "ok\n")
        elif path == "/readyz":
            ready, listening = await self._readiness()
            text = f"{ready} of {len(self.workers)} workers ready, {listening} listening\n"
            if ready and ready == listening and not self._stopping.is_set():
                await _respond(writer, HTTPStatus.OK, "ready: " + text)
            else:
                await _respond(writer, HTTPStatus.SERVICE_UNAVAILABLE, "not ready: " + text)
        elif self._token and not hmac.compare_digest(_bearer(head), self._token):
            # The same rule as a child's admin listener (server/admin.py).
            await _respond(
                writer,
                HTTPStatus.UNAUTHORIZED,
                "admin token required\n",
                headers={"WWW-Authenticate": 'Bearer realm="eventwire-admin"'},
            )
        else:
            await _respond(writer, HTTPStatus.OK, await self.metrics(), CONTENT_TYPE_LATEST)

    async def _pass_through(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Relay the connection to a listening child's admin listener, bytes as they are."""
        listening = [w for w in self.workers if w.ready and w.running]
        child: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        if listening:
            w = listening[next(self._next_child) % len(listening)]
            try:
                async with asyncio.timeout(CHILD_HTTP_TIMEOUT):
                    child = await asyncio.open_connection("127.0.0.1", w.admin_port)
            except (OSError, TimeoutError):
                child = None
        if child is None:
            await _respond(writer, HTTPStatus.BAD_GATEWAY, "no worker answers\n")
            return
        child_reader, child_writer = child
        child_writer.write(head)
        pipes = [
            asyncio.create_task(_pipe(reader, child_writer)),
            asyncio.create_task(_pipe(child_reader, writer)),
        ]
        try:
            # Either side ending ends the exchange: a child closes after each
            # HTTP answer, and a WebSocket ends with its closing handshake.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(pipes)
            child_writer.close()
            writer.close()

    async def _readiness(self) -> tuple[int, int]:
        """How many children answer /readyz 200, and how many listen."""
        listening = [w for w in self.workers if w.ready and w.running]
        answers = await asyncio.gather(*(_child_get(w.admin_port, "/readyz") for w in listening))
        return sum(1 for status, _ in answers if status == 200), len(listening)

    async def metrics(self) -> str:
        """Every listening child's metrics labelled ``worker``, and the supervisor's own."""
        listening = [w for w in self.workers if w.ready and w.running]
        answers = await asyncio.gather(
            *(_child_get(w.admin_port, "/metrics", self._token) for w in listening)
        )
        bodies: dict[int, str] = {}
        for w, (status, body) in zip(listening, answers, strict=True):
            if status == 200:
                bodies[w.index] = body
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Scrape(self.workers, bodies))
        return generate_latest(registry).decode()


class _Scrape(Collector):
    """One /metrics answer: the children's families merged, with a ``worker`` label."""

    def __init__(self, workers: Sequence[_Worker], bodies: Mapping[int, str]) -> None:
        self.workers = workers
        self.bodies = bodies

    def collect(self) -> Iterator[Metric]:
        count = GaugeMetricFamily("eventwire_workers", "Server processes configured.")
        count.add_metric([], len(self.workers))
        up = GaugeMetricFamily(
            "eventwire_worker_up", "1 if the worker answered this scrape.", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "eventwire_worker_restarts", "Times the worker was restarted.", labels=["worker"]
        )
        for w in self.workers:
            up.add_metric([str(w.index)], 1 if w.index in self.bodies else 0)
            restarts.add_metric([str(w.index)], w.restarts)
        yield from (count, up, restarts)
        merged: dict[str, Metric] = {}
        for index, body in sorted(self.bodies.items()):
            try:
                families = list(text_string_to_metric_families(body))
            except ValueError:
                continue  # a cut or garbled answer: this worker counts as down next time
            for family in families:
                out = merged.get(family.name)
                if out is None:
                    out = Metric(family.name, family.documentation, family.type, family.unit)
                    merged[family.name] = out
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp)
        yield from merged.values()


async def _child_get(port: int, path: str, token: bytes = b"") -> tuple[int, str]:
    """GET a child's admin path (with the admin token if set); (0, "") when it does not answer."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
    if token:
        request += b"Authorization: Bearer " + token + b"\r\n"
    try:
        async with asyncio.timeout(CHILD_HTTP_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request + b"\r\n")
                chunks: list[bytes] = []
                size = 0
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > CHILD_METRICS_LIMIT:
                        return 0, ""
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return 0, ""
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0, ""
    return int(parts[1]), body.decode("utf-8", "replace")


async def _respond(
    writer: asyncio.StreamWriter,
    status: HTTPStatus,
    body: str,
    content_type: str = "text/plain; charset=utf-8",
    headers: dict[str, str] | None = None,
) -> None:
    """Write one HTTP answer and close the connection."""
    data = body.encode()
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + data)
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of file or an error."""
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass


def _bearer(head: bytes) -> bytes:
    """The token of an ``Authorization: Bearer`` header in a request head; b"" if none."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return b""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) a ``SO_REUSEPORT`` socket to ``host:port``; port 0 picks a free one.

    Children bind the same port with ``SO_REUSEPORT``; this socket keeps the
    port for them across restarts and receives no connection itself.

    Raises:
        OSError: the address cannot be bound (e.g. taken without SO_REUSEPORT).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _signal(w: _Worker, sig: signal.Signals) -> bool:
    """Send a signal to a slot's running child; False if there is none (any more)."""
    if not w.running:
        return False
    assert w.proc is not None
    try:
        w.proc.send_signal(sig)
    except ProcessLookupError:
        return False
    return True


def _urlhost(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# -- the child's end -----------------------------------------------------------------


class Lifeline:
    """A child's end of its supervisor's socket: says when it listens, notices the supervisor go.

    Args:
        sock: the inherited socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Lifeline | None:
        """The lifeline named by ``EVENTWIRE_SUPERVISOR_FD`` (removed from the environment).

        Returns:
            None when this process has no supervisor.

        Raises:
            SystemExit: the variable names no usable socket.
        """
        value = (os.environ if environ is None else environ).pop(LIFELINE_ENV, None)
        if value is None:
            return None
        try:
            return cls(socket.socket(fileno=int(value)))
        except (ValueError, OSError) as exc:
            raise SystemExit(f"eventwire: {LIFELINE_ENV}={value!r} is no socket: {exc}") from None

    async def report(self, port: int, admin_port: int) -> None:
        """Tell the supervisor this process listens."""
        self._reader, self._writer = await asyncio.open_connection(sock=self.sock)
        line = {"pid": os.getpid(), "port": port, "admin_port": admin_port}
        self._writer.write(json.dumps(line).encode() + b"\n")
        await self._writer.drain()

    async def wait_closed(self) -> None:
        """Return when the supervisor's end closes (it exited, whatever the way)."""
        assert self._reader is not None, "report() first"
        try:
            while await self._reader.read(256):
                pass  # the supervisor sends nothing; anything read is ignored
        except OSError:
            pass

    def close(self) -> None:
        """Close this end."""
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()


def child_command(argv: Sequence[str]) -> list[str]:
    """The command line of a child: this Python, ``-m server``, the supervisor's arguments."""
    return [sys.executable, "-m", "eventwire", *argv]
