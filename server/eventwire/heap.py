"""The cyclic garbage collector kept off the long-lived heap.

A server process holds two kinds of long-lived objects the collector tracks:
what it imported (modules, classes, functions, compiled patterns: about
75,000 objects), and every open connection's objects (its websockets
protocol and parser, its transport, futures, its protocol state: about a
hundred each). CPython's full collection walks all of them whenever the
objects that outlived two young collections grew by a quarter. Under load
that is often even with few connections: frames in flight for a few
milliseconds outlive two young collections at tens of thousands of frames
per second, so at 50 connections a full pass (20-40 ms on the 2-core
reference machine, walking the imports) ran every second and stopped every
answer meanwhile (p99 ack latency 35-46 ms instead of 16-22). With 19,500
idle connections a pass took 0.5 to 1.6 s.

:class:`HeapKeeper` moves what survives into the permanent generation
(``gc.freeze()``): once at start (:meth:`HeapKeeper.settle`, the imports),
then every :data:`FREEZE_INTERVAL` seconds after a young collection, so that
a full collection walks only what is new. Frozen objects are still freed
when their last reference goes, but a frozen reference cycle is never
collected until the next thaw: the keeper thaws and runs one full
collection (a pause as long as a full pass of everything) when the
connections closed since the last one reach a quarter of the open ones (at
least :data:`MIN_CHURN`), so the pause comes with churn, once per quarter
turnover, as CPython's own rule would have it, instead of with growth or
idle time. With fewer than :data:`MIN_OPEN` connections open, where a full
pass is short, it also thaws every :data:`SMALL_THAW_INTERVAL` seconds, so
that cycles from anything else long-lived (a Redis reconnect, a sites
reload) wait at most that long.

The persist worker has no long-lived connections, only batches: it freezes
what it imported once (:func:`freeze_imports`), for the same reason.
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
#: Closed connections below which churn alone never thaws.
MIN_CHURN: Final = 1_000
#: Open connections below which a full pass is short enough to run every
#: :data:`SMALL_THAW_INTERVAL` seconds.
MIN_OPEN: Final = 2_000
#: Seconds between thaws of a process with fewer than :data:`MIN_OPEN`
#: connections open.
SMALL_THAW_INTERVAL: Final = 60.0


def freeze_imports() -> None:
    """One full collection, then everything alive frozen: call once a process has started.

    A process without long-lived connections (the persist worker) needs no
    more than this: its full collections then walk only its batches.
    """
    gc.collect()
    gc.freeze()


class HeapKeeper:
    """Freezes the long-lived heap; thaws and collects it fully after enough churn.

    Args:
        open_connections: how many connections are open now.
        closed_connections: how many have closed since the process started.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        open_connections: Callable[[], int],
        closed_connections: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open = open_connections
        self._closed = closed_connections
        self._clock = clock
        self._closed_at_thaw = 0
        self._thawed_at = clock()
        #: Full collections run (thaws), for tests and logs.
        self.thaws = 0

    def settle(self) -> None:
        """Once the process has started: what it imported frozen (:func:`freeze_imports`)."""
        freeze_imports()
        self._thawed_at = self._clock()

    def due(self) -> bool:
        """Whether it is time to collect fully: enough churn, or a small heap's interval."""
        open_now = self._open()
        if self._closed() - self._closed_at_thaw >= max(MIN_CHURN, open_now // 4):
            return True
        return open_now < MIN_OPEN and self._clock() - self._thawed_at >= SMALL_THAW_INTERVAL

    def step(self) -> None:
        """One round: a full collection if :meth:`due`, then young garbage out and a freeze."""
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
        self._thawed_at = self._clock()
        self.thaws += 1
        log.info(
            "heap_collected",
            collected=collected,
            ms=round((time.perf_counter() - started) * 1000),
            open_connections=self._open(),
        )

    async def run(self) -> None:
        """Settle, then step every :data:`FREEZE_INTERVAL` s until cancelled; thaw at the end."""
        self.settle()
        try:
            while True:
                await asyncio.sleep(FREEZE_INTERVAL)
                self.step()
        finally:
            gc.unfreeze()
