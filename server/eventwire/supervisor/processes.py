"""The supervisor's children: the port they share, their start, restart policy and stop.

:class:`Supervisor` keeps ``settings.workers`` child slots (:class:`Worker`)
filled. A child is ``python -m eventwire`` with the supervisor's command line
plus ``--workers 1``, the concrete ``--listen`` and ``--http`` and ``--admin 127.0.0.1:0``;
it counts as started once it reports on its lifeline
(:mod:`eventwire.supervisor.lifeline`) that it listens on the shared port.
A child that exits while the supervisor is not stopping is restarted after
a backoff (:class:`RestartPolicy`) until it crash-loops; stopping sends
SIGTERM to every child and kills the late ones.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from eventwire.core.config import Settings
from eventwire.supervisor.admin_proxy import AdminProxy
from eventwire.supervisor.lifeline import SupervisorEnd
from eventwire.supervisor.scrape import WorkerState

#: Every child drained and exited 0.
EXIT_OK: Final = 0
#: A child did not start, crash-looped, or exited with an error while stopping.
EXIT_FAILED: Final = 1
#: A child did not stop within ``drain_timeout + stop_margin`` and was killed.
EXIT_KILLED: Final = 3

#: The environment variable giving a child its worker number, added to its log lines.
WORKER_ENV: Final = "EVENTWIRE_WORKER"
#: Children's admin listeners: loopback only, read by the supervisor's /metrics and /readyz.
CHILD_ADMIN: Final = "127.0.0.1:0"

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
class Worker:
    """One child slot: the process in it now and its history."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    lifeline: SupervisorEnd | None = None
    admin_port: int = 0
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    killed: bool = False
    stop_code: int | None = None
    exits: collections.deque[float] = field(default_factory=collections.deque)

    @property
    def pid(self) -> int | None:
        """The pid of the child in the slot, if one was started."""
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the slot's child runs."""
        return self.proc is not None and self.proc.returncode is None

    @property
    def listening(self) -> bool:
        """Whether the slot's child runs and said it listens."""
        return self.ready and self.running

    def state(self) -> WorkerState:
        """The slot as the admin listener sees it now."""
        return WorkerState(self.index, self.restarts, self.listening, self.admin_port)


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
        self.workers = [Worker(i) for i in range(1, settings.workers + 1)]
        self.port = 0
        self.admin = AdminProxy(
            lambda: [w.state() for w in self.workers],
            self._stopping_now,
            settings.admin_token.encode(),
        )
        self._reserved: socket.socket | None = None
        #: The HTTP ingest port the children share (0: none is served), and its reservation.
        self.http_port = 0
        self._reserved_http: socket.socket | None = None
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
        http = self.settings.http_addr
        if http is not None:
            self._reserved_http = reserve_port(*http)
            self.http_port = self._reserved_http.getsockname()[1]
        await self.admin.start(*self.settings.admin_addr)
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
            http=f"http://{_urlhost(http[0])}:{self.http_port}" if http is not None else None,
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
            if w.listening and _signal(w, sig):
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
        await self.admin.close()
        for reserved in (self._reserved, self._reserved_http):
            if reserved is not None:
                reserved.close()
        log.info("stopped", exit_code=self._exit_code)
        self._stopped.set_result(self._exit_code)
        return self._exit_code

    @property
    def admin_url(self) -> str:
        """Base URL of the supervisor's admin listener."""
        return f"http://{_urlhost(self.settings.admin_addr[0])}:{self.admin.port}"

    def _stopping_now(self) -> bool:
        return self._stopping.is_set()

    def _own(self, task: asyncio.Task[None]) -> None:
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # -- children -------------------------------------------------------------------

    async def _start_child(self, w: Worker) -> bool:
        """Start the child of a slot and wait until it listens; False if it did not."""
        host = self.settings.listen_addr[0]
        listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        http = self.settings.http_addr
        http_flag = ""
        if http is not None:
            http_flag = (
                f"[{http[0]}]:{self.http_port}" if ":" in http[0] else f"{http[0]}:{self.http_port}"
            )
        lifeline = SupervisorEnd()
        w.ready = False
        w.admin_port = 0
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *self.command,
                *("--workers", "1", "--listen", listen, "--admin", CHILD_ADMIN),
                *("--http", http_flag),
                stdin=asyncio.subprocess.DEVNULL,
                env={**self.env, **lifeline.child_env(), WORKER_ENV: str(w.index)},
                pass_fds=(lifeline.child_sock.fileno(),),
                # Its own process group: a Ctrl-C on the terminal reaches only the
                # supervisor, which stops the children in order.
                process_group=0,
            )
        except OSError as exc:
            lifeline.close()
            w.proc = None
            log.error("worker_spawn_failed", worker=w.index, error=str(exc))
            return False
        finally:
            lifeline.release_child_sock()
        w.started_at = time.monotonic()
        w.lifeline = lifeline
        if self._stopping.is_set():  # stop() began while this child was being spawned
            _signal(w, signal.SIGTERM)
        try:
            async with asyncio.timeout(self.policy.startup_timeout):
                report, line = await lifeline.read_report()
        except TimeoutError:
            log.error("worker_start_timeout", worker=w.index, pid=w.pid)
            _signal(w, signal.SIGKILL)
            return False
        if report is None or report.port != self.port:
            if w.running:  # it said something else than "listening on our port"
                log.error("worker_bad_report", worker=w.index, pid=w.pid, report=repr(line[:200]))
                _signal(w, signal.SIGKILL)
            return False
        w.admin_port = report.admin_port
        w.ready = True
        log.info(
            "worker_started",
            worker=w.index,
            pid=w.pid,
            admin=f"http://127.0.0.1:{w.admin_port}",
            restarts=w.restarts,
        )
        return True

    async def _watch(self, w: Worker) -> None:
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

    def _exited(self, w: Worker, code: int | None) -> None:
        """Log a child's exit and close its lifeline."""
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


def child_command(argv: Sequence[str]) -> list[str]:
    """The command line of a child: this Python, ``-m eventwire``, the supervisor's arguments."""
    return [sys.executable, "-m", "eventwire", *argv]


def _signal(w: Worker, sig: signal.Signals) -> bool:
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
