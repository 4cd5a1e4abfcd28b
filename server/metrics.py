"""Prometheus metrics of the server process, served by ``admin`` at ``/metrics``.

Counters are incremented once per frame with a count, never once per event,
so that metrics cost nothing measurable on the ingest path. Label values are
bounded: ``site`` comes from the sites file, ``code`` and ``outcome`` from
fixed lists.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONNECTIONS_OPEN: Final = Gauge(
    "eventwire_connections_open", "Open tracking connections.", ["site"]
)
CONNECTIONS: Final = Counter(
    "eventwire_connections", "Tracking connections that completed the hello.", ["site"]
)
HANDSHAKES_REFUSED: Final = Counter(
    "eventwire_handshakes_refused", "Opening handshakes refused, by HTTP status.", ["status"]
)
FRAMES: Final = Counter("eventwire_frames", "Track frames received.", ["site"])
EVENTS: Final = Counter(
    "eventwire_events",
    "Events by outcome (accepted, duplicate, rejected, denied).",
    ["site", "outcome"],
)
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
