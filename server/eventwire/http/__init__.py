"""HTTP ingest beside the WebSocket: eventwire's batch endpoint (docs/protocol.md section 12).

- ``listener``: the aiohttp listener, bodies within the limits, CORS, answers, metrics.
- ``batch``: one batch carried out through the connection protocol of ``core``.
"""

from eventwire.http.listener import HttpListener

__all__ = ["HttpListener"]
