"""The cyclic garbage collector kept off the objects of long-lived connections.

Every open connection holds about a hundred objects the collector tracks
(its websockets connection, protocol and parser, its transport, tasks and
futures, its protocol state), and they live as long as the connection.
CPython's full collection walks all of them each time the long-lived objects
grew by a quarter: with 19,500 idle connections on the 2-core reference
machine a pass took 0.5 to 1.6 s, in which no frame was answered (a trickle's
p99 ack latency went from 8 ms to 0.7-1.2 s).

:class:`HeapKeeper` moves what survived into the permanent generation
(``gc.freeze()``) every :data:`FREEZE_INTERVAL` seconds, after a young
collection, so that full collections walk only what is new. Frozen objects
are never collected: a closed connection's reference cycles stay until the
next thaw. The keeper thaws and runs one full collection when the
connections closed since the last one reach a quarter of the open ones (at
least :data:`MIN_CHURN`): the pause then comes with churn, once per quarter
turnover, as CPython's own rule would have it, instead of with growth or
idle time. With fewer than :data:`MIN_OPEN` connections open nothing is
frozen.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Final

import structlog

log = structlog.get_logger("eventwire.heap")

#: Seconds between freezes.
FREEZE_INTERVAL: Final = 5.0
#: Closed connections below which the keeper never thaws.
MIN_CHURN: Final = 1_000
#: Open connections below which nothing is frozen: a full collection of a
#: small heap is short, and frozen cycles of closed connections would only
#: wait for a thaw.
MIN_OPEN: Final = 2_000


class HeapKeeper:
    """Freezes the long-lived heap; thaws and collects it fully after enough churn.

    Args:
        open_connections: how many connections are open now.
        closed_connections: how many have closed since the process started.
    """

    def __init__(
        self, open_connections: Callable[[], int], closed_connections: Callable[[], int]
    ) -> None:
        self._open = open_connections
        self._closed = closed_connections
        self._closed_at_thaw = 0
        #: Full collections run (thaws), for tests and logs.
        self.thaws = 0

    def due(self) -> bool:
        """Whether enough connections closed since the last thaw to collect fully."""
        churn = self._closed() - self._closed_at_thaw
        return churn >= max(MIN_CHURN, self._open() // 4)

    def step(self) -> None:
        """One round: a full collection if :meth:`due`, then young garbage out and a freeze.

        Below :data:`MIN_OPEN` open connections nothing stays frozen.
        """
        if self._open() < MIN_OPEN:
            if gc.get_freeze_count():
                self._thaw()
            return
        if self.due():
            self._thaw()
        gc.collect(1)
        gc.freeze()

    def _thaw(self) -> None:
        """Everything back to the collector, and one full collection."""
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        self._closed_at_thaw = self._closed()
        self.thaws += 1
        log.info(
            "heap_collected",
            collected=collected,
            ms=round((time.perf_counter() - started) * 1000),
            open_connections=self._open(),
        )

    async def run(self) -> None:
        """Step every :data:`FREEZE_INTERVAL` seconds until cancelled; thaw at the end."""
        try:
            while True:
                await asyncio.sleep(FREEZE_INTERVAL)
                self.step()
        finally:
            gc.unfreeze()
