"""Per-address limits: open connections and handshakes per second of one client address.

:class:`PeerLimits` is asked before each WebSocket upgrade and each HTTP
ingest request, with the client address (after ``trusted_proxies``) and
the time; it says whether the request may go on, or how long to wait
(HTTP ``429`` with ``Retry-After``). One host can then no longer take a
process' ``max_connections`` with a forged ``Origin``. Sans I/O: the
listeners carry out its answers.

- ``max_connections_per_ip``: connections (and HTTP requests in flight)
  of one address, counted by :meth:`PeerLimits.opened` and
  :meth:`PeerLimits.closed`;
- ``handshakes_per_ip`` with ``handshake_burst``: a token bucket per
  address; buckets are kept for the :data:`MAX_TRACKED` most recent
  addresses (an address past that starts with a full bucket again).

An IPv6 address counts as its /64 (:data:`IPV6_LIMIT_PREFIX`): one host
usually holds a whole /64 and could otherwise take a new address per
connection.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Final

from eventwire.core.ordering import TokenBucket
from eventwire.core.rules import RateConfig

#: Addresses whose handshake buckets are kept (~200 bytes each).
MAX_TRACKED: Final = 100_000
#: The prefix an IPv6 address is counted by.
IPV6_LIMIT_PREFIX: Final = 64
#: ``Retry-After`` (s) of a refusal for too many open connections: one closes any time.
CONNECTIONS_RETRY_S: Final = 1.0


class PeerLimits:
    """Open connections and handshake rate per client address, in one process.

    Args:
        max_connections: open connections one address may hold.
        per_second: handshakes per second one address may make, on average.
        burst: handshakes one address may make at once.
    """

    def __init__(self, max_connections: int, per_second: float, burst: int) -> None:
        self.max_connections = max_connections
        self.rate = RateConfig(events_per_second=per_second, burst=burst)
        self.open: dict[str, int] = {}
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, address: str, now: int) -> tuple[str, float] | None:
        """Whether a handshake of ``address`` at ``now`` (ms) may go on.

        Returns:
            None, or why not and the seconds to wait.
        """
        address = limit_key(address)
        if self.open.get(address, 0) >= self.max_connections:
            return (
                f"too many connections from one address (max_connections_per_ip = "
                f"{self.max_connections})",
                CONNECTIONS_RETRY_S,
            )
        buckets = self._buckets
        bucket = buckets.get(address)
        if bucket is None:
            bucket = buckets[address] = TokenBucket(self.rate, now)
            if len(buckets) > MAX_TRACKED:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(address)
        wait_ms = bucket.take(1, now)
        if wait_ms is None:
            return None
        return (
            f"too many handshakes from one address (handshakes_per_ip = "
            f"{self.rate.events_per_second:g}/s, handshake_burst = {self.rate.burst})",
            wait_ms / 1000,
        )

    def opened(self, address: str) -> None:
        """A connection (or request) of ``address`` is open."""
        address = limit_key(address)
        self.open[address] = self.open.get(address, 0) + 1

    def closed(self, address: str) -> None:
        """A connection (or request) of ``address`` has ended."""
        address = limit_key(address)
        left = self.open.get(address, 0) - 1
        if left > 0:
            self.open[address] = left
        else:
            self.open.pop(address, None)


def limit_key(address: str) -> str:
    """What an address is counted as: itself, or for IPv6 its /64."""
    if ":" not in address:
        return address
    try:
        network = ipaddress.ip_network(f"{address}/{IPV6_LIMIT_PREFIX}", strict=False)
    except ValueError:
        return address
    return str(network)
