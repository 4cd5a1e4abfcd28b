"""The async Python client of the tracking protocol (docs/protocol.md sections 2-4).

The client's public face; its rooms are:

- :mod:`~eventwire.client.options`: :class:`ClientOptions`, every setting as
  one typed, validated object.
- :mod:`~eventwire.client.delivery`: :class:`Delivery`, the client half of the
  delivery guarantee without I/O (numbering, buffering, batching, what each
  answer means, what to resend), and the reconnect policy :class:`Backoff`.
- :mod:`~eventwire.client.connection`: :class:`EventwireClient`, the async
  driver (websockets, reconnects, timers) that feeds the delivery state.

Messages are the Structs and codecs of :mod:`eventwire.core.protocol`;
nothing here describes the wire by hand.
"""

from __future__ import annotations

from eventwire.client.connection import CLOSE_TIMEOUT, WELCOME_TIMEOUT, EventwireClient
from eventwire.client.delivery import (
    POLICY_CLOSE_CODES,
    REFUSED_STATUSES,
    Backoff,
    BufferFull,
    ClientClosed,
    Delivery,
    EventwireClientError,
)
from eventwire.client.options import CLIENT_NAME, FRAME_OVERHEAD, ClientOptions

__all__ = [
    "CLIENT_NAME",
    "CLOSE_TIMEOUT",
    "FRAME_OVERHEAD",
    "POLICY_CLOSE_CODES",
    "REFUSED_STATUSES",
    "WELCOME_TIMEOUT",
    "Backoff",
    "BufferFull",
    "ClientClosed",
    "ClientOptions",
    "Delivery",
    "EventwireClient",
    "EventwireClientError",
]
