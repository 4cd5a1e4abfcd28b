"""HTTP ingest beside the WebSocket: eventwire's batch endpoint (docs/protocol.md section 12).

- ``listener``: the aiohttp listener, bodies within the limits, CORS, answers, metrics.
- ``batch``: one batch carried out through the connection protocol of ``core``.
- ``segment``: Segment calls mapped to eventwire batches, without I/O (section 15).
- ``segment_api``: the Segment routes (``/v1/batch``, ``/v1/track``, ...), write-key auth.
"""

from eventwire.http.listener import HttpListener
from eventwire.http.segment_api import SegmentApi

__all__ = ["HttpListener", "SegmentApi"]
