"""eventwire: a real-time event tracking server.

Clients stream events over a WebSocket (``/v1/track/{site}``); the server
validates them, tracks sessions and publishes them into Redis Streams. The
wire and Redis contract is ``PROTOCOL.md``; the map of this package is
``DESIGN.md``.
"""

__version__ = "0.1.0"
