"""The supervisor's ``/metrics``: every child's metrics with a ``worker`` label, and its own.

One scrape target sees every child's counters: each listening child's
``/metrics`` is read over loopback and each sample gets ``worker="1".."N"``.
The supervisor adds ``eventwire_workers``, ``eventwire_worker_up{worker}``
(0 for a child that did not answer this scrape) and
``eventwire_worker_restarts_total{worker}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

#: How long /metrics and /readyz wait for one child; a slower child counts as down
#: (``eventwire_worker_up 0``) for that scrape. Bounds the scrape's duration.
CHILD_HTTP_TIMEOUT: Final = 2.0
#: Largest /metrics body read from one child; its series are bounded by sites and codes.
CHILD_METRICS_LIMIT: Final = 8 * 1024 * 1024


@dataclass(frozen=True)
class WorkerState:
    """One child slot as the admin listener sees it at one request.

    Args:
        index: the worker number (1..N), its ``worker`` label.
        restarts: times its child was restarted.
        listening: whether its child runs and said it listens.
        admin_port: its child's loopback admin port (meaningful when listening).
    """

    index: int
    restarts: int
    listening: bool
    admin_port: int


async def child_get(port: int, path: str, token: bytes = b"") -> tuple[int, str]:
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


async def scrape(workers: Sequence[WorkerState], token: bytes) -> str:
    """Every listening child's metrics labelled ``worker``, and the supervisor's own, as text.

    Args:
        workers: every slot, listening or not.
        token: the admin token the children ask for (b"" if none).
    """
    listening = [w for w in workers if w.listening]
    answers = await asyncio.gather(*(child_get(w.admin_port, "/metrics", token) for w in listening))
    bodies: dict[int, str] = {}
    for w, (status, body) in zip(listening, answers, strict=True):
        if status == 200:
            bodies[w.index] = body
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(workers, bodies))
    return generate_latest(registry).decode()


class _Scrape(Collector):
    """One /metrics answer: the children's families merged, with a ``worker`` label."""

    def __init__(self, workers: Sequence[WorkerState], bodies: Mapping[int, str]) -> None:
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
