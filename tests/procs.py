"""Real processes for tests: a private redis-server and eventwire server processes.

Everything listens on 127.0.0.1, on ports the OS picks, never on 6379.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: Every timeout in the tests is a multiple of this (EVENTWIRE_TEST_UNIT=3 on a slow machine).
UNIT = float(os.environ.get("EVENTWIRE_TEST_UNIT", "1"))


#: The repository: commands run from here.
ROOT = Path(__file__).resolve().parent.parent


async def eventwire_command(*args: str) -> asyncio.subprocess.Process:
    """``python -m eventwire ARGS`` as a child, pipes on stdout and stderr, no config file."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventwire",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "EVENTWIRE_CONFIG": os.devnull},
    )


#: Ports :func:`free_port` handed out in this process: never handed out twice.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, never one this process was given before.

    The kernel often gives the same port to two binds to port 0 in a row (one
    in nine on the test machine), so two servers of one test picked this way
    would be told the same port. Another process may still take the port
    before it is bound; :meth:`RedisProcess.start` retries with a fresh one.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


#: How many ports a first start of redis-server tries when the one it was
#: given is taken by the time it binds.
PORT_TRIES = 5


class PortTaken(Exception):
    """redis-server exited at start: a port it was given was in use."""


class RedisProcess:
    """A private ``redis-server`` on a free loopback port.

    Args:
        appendonly: turn AOF on (``appendfsync`` as given).
        appendfsync: ``always``, ``everysec`` or ``no``.
        extra: more ``redis-server`` arguments.
        cluster_bus: a cluster node: its bus (``--cluster-port``) on a free
            port too, and its ``nodes.conf`` in its data folder.
    """

    def __init__(
        self,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra: tuple[str, ...] = (),
        cluster_bus: bool = False,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; scripts/test installs it")
        self.dir = Path(tempfile.mkdtemp(prefix="ew-redis-"))
        self.port = free_port()
        #: The cluster bus port; 0 when not a cluster node.
        self.bus_port = free_port() if cluster_bus else 0
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        """The server's log file (kept across restarts)."""
        return self.dir / "redis.log"

    def start(self) -> RedisProcess:
        """Start (or restart) the server on the same port and data folder; return once it serves.

        A port picked free can be taken before redis-server binds it (by
        another process's bind or outgoing connection). On the first start
        the server then gets fresh ports; a restart keeps its port, which its
        clients know, and tries it again until the deadline.

        Raises:
            RuntimeError: the server exited (its log's tail in the message).
            TimeoutError: not ready in time.
        """
        deadline = time.monotonic() + 10 * UNIT
        for attempt in range(1, PORT_TRIES + 1):
            try:
                self._spawn(deadline)
            except PortTaken as taken:
                if attempt == PORT_TRIES or time.monotonic() > deadline:
                    raise RuntimeError(f"{taken} ({attempt} tries)") from None
                if self._started:
                    time.sleep(0.1)
                else:
                    self.port = free_port()
                    self.bus_port = free_port() if self.bus_port else 0
                continue
            self._started = True
            return self
        raise AssertionError("unreachable")

    def _spawn(self, deadline: float) -> None:
        """One redis-server; wait until its own log says it serves.

        Its log, not a connection, tells: a connection could reach another
        process listening on a port taken meanwhile.
        """
        cluster = ("--cluster-port", str(self.bus_port)) if self.bus_port else ()
        config = ("--cluster-config-file", str(self.dir / "nodes.conf")) if self.bus_port else ()
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            str(self.log),
            *cluster,
            *config,
            *self.extra,
        ]
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        while True:
            code = self.proc.poll()
            said = self._log_since(offset)
            if "Ready to accept connections" in said:
                return
            if code is not None:
                self.proc = None
                if "Address already in use" in said:
                    raise PortTaken(f"redis-server: port {self.port} or {self.bus_port} in use")
                raise RuntimeError(f"redis-server exited with {code}: {said[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server on port {self.port} not ready: {said[-2000:]}")
            time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        """What the log gained past ``offset`` bytes."""
        try:
            with self.log.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (what a crash loses depends on appendfsync)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server holds connections but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server and remove its data folder."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterProcess:
    """A Redis Cluster of ``masters`` primaries, each with ``replicas`` replicas.

    Slots are spread evenly by ``redis-cli --cluster create``.

    Args:
        masters: primaries (at least 3, as redis-cli requires).
        replicas: replicas per primary; with one, a killed primary is failed over.
        node_timeout_ms: ``cluster-node-timeout``: how long a silent node takes
            to be marked failed (and its replica promoted). Shorter fails over
            sooner but marks a merely slow node failed.
        appendonly: AOF (``appendfsync everysec``) on every node.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
        appendonly: bool = False,
    ) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not installed; scripts/test installs it")
        self.replicas = replicas
        self.nodes = [
            # The bus port defaults to port + 10000, which may be taken or above 65535.
            RedisProcess(
                appendonly=appendonly,
                extra=("--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms)),
                cluster_bus=True,
            )
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """redis+cluster:// URL naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterProcess:
        """Start the nodes, join them into one cluster, wait until it serves every slot."""
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30 * UNIT,
        )
        deadline = time.monotonic() + 30 * UNIT
        while True:
            states = [self.cli(n.port, "CLUSTER", "INFO") for n in self.nodes]
            if all("cluster_state:ok" in s for s in states) and self._replicas_synced():
                return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok: {states[0]}")
            time.sleep(0.1)

    def _replicas_synced(self) -> bool:
        """Whether every replica has finished its first sync with its primary."""
        if not self.replicas:
            return True
        for node in self.nodes:
            info = self.cli(node.port, "INFO", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    def primary_of(self, slot: int, asked: int | None = None) -> RedisProcess:
        """The node serving ``slot`` as primary now, as the node on port ``asked`` (else
        any live node) sees it."""
        for node in self.nodes:
            if node.proc is None or asked not in (None, node.port):
                continue
            for line in self.cli(node.port, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "master" not in fields[2] or "fail" in fields[2]:
                    continue
                for part in fields[8:]:
                    low, _, high = part.partition("-")
                    if not low.isdigit():
                        continue
                    if int(low) <= slot <= int(high or low):
                        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                        return next(n for n in self.nodes if n.port == port)
            break
        raise LookupError(f"no live primary serves slot {slot}")

    @staticmethod
    def cli(port: int, *args: str) -> str:
        """One redis-cli command against a node; its output."""
        return subprocess.run(
            ["redis-cli", "-p", str(port), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=10 * UNIT,
        ).stdout

    def stop(self) -> None:
        """Stop every node and remove its data."""
        for node in self.nodes:
            node.stop()


class ServerProcess:
    """``eventwire serve`` in a child process, on free ports.

    Args:
        redis_url: the Redis to use.
        sites: path of a sites file.
        env: extra environment (``EVENTWIRE_*`` settings).
        workers: ``--workers``; above 1 the process is the supervisor, ready
            once it logs ``workers_ready``, and ``admin_port`` is its own.
    """

    def __init__(
        self, redis_url: str, sites: Path, env: dict[str, str] | None = None, workers: int = 1
    ) -> None:
        self.redis_url = redis_url
        self.sites = sites
        self.env = env or {}
        self.workers = workers
        self.port = 0
        self.admin_port = 0
        #: The HTTP ingest listener's port, once listening.
        self.http_port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[dict[str, Any]] = []
        self._reader: threading.Thread | None = None

    def start(self, port: int = 0, http_port: int = 0) -> ServerProcess:
        """Start the process and wait until it listens (port 0: any free port)."""
        # Every test client is 127.0.0.1: the per-address limits are lifted
        # unless a test sets them.
        loopback = {
            "EVENTWIRE_MAX_CONNECTIONS_PER_IP": "1000000",
            "EVENTWIRE_HANDSHAKES_PER_IP": "1000000",
            "EVENTWIRE_HANDSHAKE_BURST": "1000000",
        }
        env = {**os.environ, **loopback, **self.env, "EVENTWIRE_CONFIG": os.devnull}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventwire",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin",
                "127.0.0.1:0",
                "--http",
                f"127.0.0.1:{http_port}",
                "--redis",
                self.redis_url,
                "--sites",
                str(self.sites),
                *(("--workers", str(self.workers)) if self.workers > 1 else ()),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 15 * UNIT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited with {self.proc.wait()}")
            record = json.loads(line)
            self.lines.append(record)
            ready = "workers_ready" if self.workers > 1 else "listening"
            if record.get("event") == ready:
                self.port = int(record["track"].rsplit(":", 1)[1])
                self.admin_port = int(record["admin"].rsplit(":", 1)[1])
                self.http_port = int(record["http"].rsplit(":", 1)[1])
                # Keep reading: a full pipe would block the server's logging.
                self._reader = threading.Thread(target=self._read, daemon=True)
                self._reader.start()
                return self
        raise TimeoutError("server did not start listening")

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def url(self, site: str) -> str:
        """The tracking URL of a site."""
        return f"ws://127.0.0.1:{self.port}/v1/track/{site}"

    def kill(self) -> None:
        """SIGKILL: no drain, no session end, like a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout * UNIT)
        except subprocess.TimeoutExpired:
            # Never leave a process behind; a slow stop is not what these tests check
            # (test_gateway's SIGTERM test checks the stop itself).
            self.proc.kill()
            return self.proc.wait()

    def read_rest(self) -> list[dict[str, Any]]:
        """Every log line of the process (call once it ended)."""
        if self._reader is not None:
            self._reader.join(10 * UNIT)
        return self.lines
