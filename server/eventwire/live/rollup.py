"""A site's rollups, kept from the stream entries the relay's readers already read (sans-I/O).

:class:`Rollup` counts, per second of stream id time (Redis' clock, the
``ms`` part of each id), exactly: accepted events, rejected entries by code,
sessions started and ended (the server's ``session.start`` /
``session.end`` events). Seconds older than :data:`WINDOW_S` are dropped.

Top tables (actions, pages, customers) use :class:`TopCounter`, a
Space-Saving counter with batched eviction: at most ``2 * capacity`` keys,
each with a ``count`` and an ``error`` such that the true count lies in
``[count - error, count]``. One counter per minute; a table is the merge of
the current minute and the :data:`WINDOW_S` // 60 before it, and its
``total`` (the entries counted into it) is exact.

Entries stored with ``"bot": true`` are counted apart too (``bots`` of
each second): the dashboard shows humans by default. The "where from"
tables (mediums, sources, countries, devices, browsers) count the
``session.start`` of human sessions started in the window, from its
``client`` and ``source`` (docs/protocol.md section 18).

What the streams cannot tell, and so no rollup counts: duplicates (a resent
event is acknowledged, never stored again), denied events (counted, never
stored; a dropped bot's included). ``/metrics`` counts those per process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final

from eventwire.live.messages import Count, Entry, Second, Top

#: Seconds the per-second counts cover: the dashboard's window.
WINDOW_S: Final = 300
#: Keys a minute's top counter keeps exactly before it evicts (then 2x at most:
#: ~100 bytes a key, so ~40 KB per table per minute, ~1.9 MB per site at worst: 8 tables).
TOP_CAPACITY: Final = 200
#: Rows of each top table sent to viewers.
TOP_SHOWN: Final = 10
#: Newest feed entries kept for a first load (each one frame, ~0.5 KB).
FEED_KEEP: Final = 300
#: Feed entries a viewer gets per second at most: above this, every Nth.
FEED_RATE: Final = 20
#: The action whose ``params.url`` is a page.
PAGE_ACTION: Final = "page.visit"
#: The "where from" tables, each counting one field of a session.start's visitor.
VISITOR_TABLES: Final = ("mediums", "sources", "countries", "devices", "browsers")
TABLES: Final = ("actions", "pages", "customers", *VISITOR_TABLES)


class TopCounter:
    """Space-Saving with batched eviction: bounded keys, per-key bounds on the true count.

    A key not held is counted from ``floor + 1`` with error ``floor``, where
    ``floor`` is the largest count ever evicted: its true count cannot exceed
    that. Eviction keeps the ``capacity`` largest when ``2 * capacity`` keys
    are held, so adding is O(1) amortised.
    """

    __slots__ = ("capacity", "counts", "floor", "total")

    def __init__(self, capacity: int = TOP_CAPACITY) -> None:
        self.capacity = capacity
        #: key -> [count, error]
        self.counts: dict[str, list[int]] = {}
        self.floor = 0
        self.total = 0

    def add(self, key: str, n: int = 1) -> None:
        """Count ``key`` ``n`` more times."""
        self.total += n
        held = self.counts.get(key)
        if held is not None:
            held[0] += n
            return
        if len(self.counts) >= 2 * self.capacity:
            self._evict()
        self.counts[key] = [self.floor + n, self.floor]

    def _evict(self) -> None:
        ranked = sorted(self.counts.items(), key=lambda kv: kv[1][0], reverse=True)
        self.counts = dict(ranked[: self.capacity])
        self.floor = max(self.floor, max(v[0] for _, v in ranked[self.capacity :]))


def merge_top(counters: Iterable[TopCounter], shown: int = TOP_SHOWN) -> Top:
    """The leading rows of several counters taken together, with sound bounds.

    A key a counter does not hold may have had up to that counter's floor
    there: it adds to the key's upper bound (``count``), not its lower.
    """
    counters = list(counters)
    upper: dict[str, int] = {}
    lower: dict[str, int] = {}
    for c in counters:
        for key, (count, error) in c.counts.items():
            upper[key] = upper.get(key, 0) + count - c.floor
            lower[key] = lower.get(key, 0) + count - error
    floors = sum(c.floor for c in counters)
    rows = [Count(key, upper[key] + floors, upper[key] + floors - lower[key]) for key in upper]
    rows.sort(key=lambda r: (-(r.count - r.error), -r.count, r.key))
    return Top(total=sum(c.total for c in counters), rows=rows[:shown])


class Rollup:
    """One site's per-second counts, per-minute top counters and newest feed entries.

    Entries may come in any order (a backfill runs beside the live reader):
    every count is a sum, so the result does not depend on it.
    """

    def __init__(self, window_s: int = WINDOW_S, capacity: int = TOP_CAPACITY) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self.seconds: dict[int, Second] = {}
        #: minute -> table name -> counter
        self.minutes: dict[int, dict[str, TopCounter]] = {}
        #: Newest frames for a first load, in arrival order.
        self.feed: deque[bytes] = deque(maxlen=FEED_KEEP)
        #: Seconds changed since the last :meth:`changed` call.
        self.touched: set[int] = set()
        self.newest_s = 0

    def _second(self, t: int) -> Second:
        s = self.seconds.get(t)
        if s is None:
            s = self.seconds[t] = Second(t=t)
        self.touched.add(t)
        if t > self.newest_s:
            self.newest_s = t
        return s

    def _counter(self, minute: int, table: str) -> TopCounter:
        tables = self.minutes.get(minute)
        if tables is None:
            tables = self.minutes[minute] = {name: TopCounter(self.capacity) for name in TABLES}
        return tables[table]

    def add_events(self, entries: Iterable[Entry], feed: bool = True) -> None:
        """Count entries of the events stream (``feed``: keep them for a first load)."""
        for e in entries:
            t = e.key[0] // 1000
            s = self._second(t)
            if e.action == "session.start":
                s.started += 1
            elif e.action == "session.end":
                s.ended += 1
            s.accepted += 1
            if e.bot:
                s.bots += 1
            minute = t // 60
            self._counter(minute, "actions").add(e.action)
            if e.uuid is not None:
                self._counter(minute, "customers").add(e.uuid)
            if e.page is not None:
                self._counter(minute, "pages").add(e.page)
            visitor = e.visitor
            if visitor is not None and not visitor.bot and not e.bot:
                for table, key in zip(
                    VISITOR_TABLES,
                    (
                        visitor.medium,
                        visitor.source,
                        visitor.country,
                        visitor.device,
                        visitor.browser,
                    ),
                    strict=True,
                ):
                    if key is not None:
                        self._counter(minute, table).add(key)
            if feed:
                self.feed.append(e.frame)

    def add_rejected(self, entries: Iterable[Entry], feed: bool = True) -> None:
        """Count entries of the rejected stream by code."""
        for e in entries:
            s = self._second(e.key[0] // 1000)
            code = e.code or "unknown"
            s.rejected[code] = s.rejected.get(code, 0) + 1
            if feed:
                self.feed.append(e.frame)

    def expire(self, now_ms: int) -> None:
        """Drop the seconds and minutes that left the window at ``now_ms``."""
        oldest = now_ms // 1000 - self.window_s + 1
        for t in [t for t in self.seconds if t < oldest]:
            del self.seconds[t]
            self.touched.discard(t)
        first_minute = oldest // 60
        for m in [m for m in self.minutes if m < first_minute]:
            del self.minutes[m]

    def window(self) -> list[Second]:
        """Every counted second of the window, oldest first."""
        return [self.seconds[t] for t in sorted(self.seconds)]

    def changed(self) -> list[Second]:
        """The seconds counted since the last call (their whole counts), oldest first."""
        out = [self.seconds[t] for t in sorted(self.touched) if t in self.seconds]
        self.touched.clear()
        return out

    def tops(self, shown: int = TOP_SHOWN) -> dict[str, Top]:
        """Each top table over the minutes held (the current one and those of the window)."""
        return {
            name: merge_top((tables[name] for tables in self.minutes.values()), shown)
            for name in TABLES
        }


class FeedSampler:
    """Every Nth feed entry, N set each second so a viewer gets about :data:`FEED_RATE` a second."""

    __slots__ = ("every", "second", "seen", "this_second")

    def __init__(self) -> None:
        self.every = 1
        self.seen = 0
        self.second = 0
        self.this_second = 0

    def take(self, entries: Iterable[Entry], now_s: int) -> list[Entry]:
        """The entries to send of one hand-out at ``now_s`` (seconds)."""
        if now_s != self.second:
            # The rate of the last second sets N for the next: a burst is cut
            # within one second, a quiet site shows every entry.
            self.every = max(1, -(-self.this_second // FEED_RATE))
            self.second = now_s
            self.this_second = 0
        out = []
        for e in entries:
            self.this_second += 1
            self.seen += 1
            if self.seen >= self.every:
                self.seen = 0
                out.append(e)
        return out
