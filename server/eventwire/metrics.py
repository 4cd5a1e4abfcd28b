"""Prometheus metrics of the server process, served by ``admin`` at ``/metrics``.

The per-frame counts (frames, events by outcome) are plain integers on a
:class:`SiteCounts` per site, read by a collector when ``/metrics`` is
scraped: a prometheus-client counter takes a lock per increment, which the
ingest path cannot afford per frame. Label values are bounded: ``site``
comes from the sites file, ``code`` and ``outcome`` from fixed lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONNECTIONS_OPEN: Final = Gauge(
    "eventwire_connections_open", "Open tracking connections.", ["site"]
)
CONNECTIONS: Final = Counter(
    "eventwire_connections", "Tracking connections that completed the hello.", ["site"]
)
HTTP_REQUESTS: Final = Counter(
    "eventwire_http_requests",
    "Requests to the HTTP ingest listener, by route (a template) and status.",
    ["route", "status"],
)
BOT_CONNECTIONS: Final = Counter(
    "eventwire_bot_connections",
    "Connections (and HTTP batches) found to be bots at hello, by the site's bots setting.",
    ["site", "mode"],
)
HANDSHAKES_REFUSED: Final = Counter(
    "eventwire_handshakes_refused", "Opening handshakes refused, by HTTP status.", ["status"]
)
HANDSHAKE_TIMEOUTS: Final = Counter(
    "eventwire_handshake_timeouts",
    "Opening handshakes aborted (TCP closed, no HTTP answer) for taking longer than "
    "hello_timeout from the accept to the 101.",
)

SESSION_LEAVES_FAILED: Final = Counter(
    "eventwire_session_leaves_failed",
    "Closed connections whose leave step Redis did not take (their heartbeat lapses "
    "instead, and a reaper ends their session).",
)


class SiteCounts:
    """Counts of one site's track frames and events, added to on the ingest path."""

    __slots__ = ("accepted", "bots", "denied", "duplicate", "frames", "rejected")

    def __init__(self) -> None:
        self.frames = 0
        self.accepted = 0
        self.duplicate = 0
        self.rejected = 0
        self.denied = 0
        #: Events of bot connections, by what the site's ``bots`` setting did with them.
        self.bots = {"flagged": 0, "dropped": 0, "kept": 0}


_SITE_COUNTS: dict[str, SiteCounts] = {}


def site_counts(site: str) -> SiteCounts:
    """The counts of a site (created at first use)."""
    counts = _SITE_COUNTS.get(site)
    if counts is None:
        counts = _SITE_COUNTS[site] = SiteCounts()
    return counts


class _SiteCountsCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        frames = CounterMetricFamily("eventwire_frames", "Track frames received.", labels=["site"])
        events = CounterMetricFamily(
            "eventwire_events",
            "Events by outcome (accepted, duplicate, rejected, denied).",
            labels=["site", "outcome"],
        )
        for site, c in list(_SITE_COUNTS.items()):
            frames.add_metric([site], c.frames)
            for outcome in ("accepted", "duplicate", "rejected", "denied"):
                events.add_metric([site, outcome], getattr(c, outcome))
        bots = CounterMetricFamily(
            "eventwire_bot_events",
            "Events of connections found to be bots, by what the site's bots setting did "
            "(flagged: stored with bot true; dropped: stored nowhere; kept: stored as any).",
            labels=["site", "outcome"],
        )
        for site, c in list(_SITE_COUNTS.items()):
            for outcome, n in c.bots.items():
                bots.add_metric([site, outcome], n)
        yield frames
        yield events
        yield bots


REGISTRY.register(_SiteCountsCollector())
REJECTS: Final = Counter("eventwire_rejects", "Rejected events by code.", ["site", "code"])
NACKS: Final = Counter("eventwire_nacks", "Frames answered with nack, by code.", ["site", "code"])
PROTOCOL_ERRORS: Final = Counter(
    "eventwire_protocol_errors", "Connections closed for a protocol error.", ["site", "code"]
)
STORE_SECONDS: Final = Histogram(
    "eventwire_store_seconds",
    "Duration of one publish round trip to Redis (one pipeline).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
STORE_ERRORS: Final = Counter(
    "eventwire_store_errors", "Publish round trips that failed (frames nacked)."
)
LIVE_VIEWERS: Final = Gauge(
    "eventwire_live_viewers", "Open live relay viewers (/v1/live), by stream.", ["stream"]
)
LIVE_READERS: Final = Gauge(
    "eventwire_live_readers", "Redis readers of the live relay: one per watched (site, stream)."
)
LIVE_MISSED: Final = Counter(
    "eventwire_live_missed",
    "Events dropped for live viewers that could not keep up (each was sent lagged).",
)

# -- backpressure (README "Persistence"): set by the publisher from publish's replies
BACKLOG_NACKS: Final = Counter(
    "eventwire_backlog_nacks",
    "Frames nacked unavailable because a stream's persist backlog was at max_backlog.",
    ["site"],
)
BACKLOG_ENTRIES: Final = Gauge(
    "eventwire_backlog_entries",
    "Entries of a site's events streams the persist group has not acknowledged, as this "
    "process last saw them (sites with on_backlog = reject and a persist group).",
    ["site"],
)
BACKLOG_MAX: Final = Gauge(
    "eventwire_backlog_max",
    "The backlog at which a site's frames are refused, over all its streams (max_backlog "
    "x partitions). Time until the cap: (eventwire_backlog_max - eventwire_backlog_entries) "
    "/ deriv(eventwire_backlog_entries[1m]).",
    ["site"],
)
