"""eventwire: a real-time event tracking server.

Clients stream events over a WebSocket (``/v1/track/{site}``); the server
validates them, tracks sessions and publishes them into Redis Streams. The
wire and Redis contract is ``docs/protocol.md``; the map of this package, its
rooms and their import rules, is ``docs/design.md``.
"""

__version__ = "0.1.0"
