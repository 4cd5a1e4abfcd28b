"""The live relay: ``WS /v1/live`` on the admin listener streams a site's events from Redis.

This package owns the relay, in six modules:

- :mod:`~eventwire.live.messages`: the messages' Structs, and stream entries
  encoded once as relay frames.
- :mod:`~eventwire.live.query`: the ``/v1/live`` query, checked before the
  handshake (the cursors in ``since`` are :mod:`eventwire.core.positions`).
- :mod:`~eventwire.live.viewer`: one viewer: its filters, its bounded queue
  and ``lagged`` accounting, its backlog replay and handover to the reader.
- :mod:`~eventwire.live.relay`: the fan-out: one Redis reader per (site,
  stream) per process, started by the first viewer, stopped by the last.
- :mod:`~eventwire.live.rollup`: a site's exact per-second counts and
  bounded top tables (sans-I/O).
- :mod:`~eventwire.live.tally`: one site's rollups per process, fed by its
  readers, served to ``stream=summary`` viewers (snapshot, ticks, sampled feed).

What follows is the relay's wire and the guarantees the modules keep.

URL: ``/v1/live?site=S[&stream=events|rejected][&action=GLOB][&uuid=U][&since=...]``,
or ``/v1/live?site=S&stream=summary`` (docs/protocol.md section 8, "Summary viewers").
``action`` is a glob over the action name matched in full (events only),
``uuid`` one customer, ``since`` where to start: ``now`` (the default), a
duration back on Redis' clock (``30s``, ``5m``, ``2h``), ``0`` (the start of
the stream), a stream id (entries after it), or a *cursor*: the position a
reconnecting viewer was at (see Partitions; with one partition a cursor is
one stream id, the id of the last message it saw).

Messages are JSON text frames with a ``type``; each carries ``id``, which a
viewer keeps to pass back as ``since`` and resume right after it:

- ``hello`` ``{site, stream, id, now, queue}``: ``id`` is the resolved start,
  ``now`` Redis' clock (ms; the clock of stream ids), ``queue`` the viewer's
  queue bound.
- ``event`` / ``rejected`` ``{id, event}``: one entry of the events or
  rejected stream, ``event`` being the stored JSON as it is
  (docs/protocol.md section 7).
- ``trimmed`` ``{from, first, id}``: the stream no longer holds ``from``;
  entries between it and ``first`` (the oldest one left) may have been
  trimmed (``stream_maxlen``, ``persist_retain``) and are not sent.
- ``ready`` ``{id}``: the backlog after ``since`` is sent; live events follow.
- ``lagged`` ``{missed, first, id}``: the viewer did not read fast enough;
  ``missed`` matching events, ``first`` to ``id``, were dropped for it.

Fan-out (:mod:`~eventwire.live.relay`): one Redis reader per (site, stream)
per process hands each entry, encoded once, to every viewer's queue. A queue
holds at most ``live_queue`` events: a viewer whose socket is full gets no
more until it drains, then one ``lagged`` notice with the count of what it
missed. A viewer with ``since`` replays the backlog itself, then joins the
reader without a gap or a duplicate (the handover,
:mod:`~eventwire.live.viewer`).

Partitions. A site with ``partitions = P`` above 1 keeps each stream as P
streams, ``ew:{site:0}:events`` to ``ew:{site:P-1}:events``; a customer's
entries all lie in one of them, in order. Their ids are independent (each
stream numbers its own; on a cluster they come from different machines'
clocks), so everything above holds per partition, and the relay follows all
of them at once:

- Position: a viewer's position is one id per partition. On the wire it is a
  *cursor*: the P ids in partition order joined by ``,``
  (``1764160000123-0,1764160000087-2,...``). With P = 1 the cursor is the one
  id, and the wire is exactly the one above: no field is added.
- ``since``: ``now`` starts at every partition's end; ``0``, a duration or
  one stream id is the same id in every partition, a cut in time on Redis'
  clock (one clock on one Redis; each node's own on a cluster); a cursor of
  exactly P ids starts at each. A cursor of another length is refused (400).
- Messages: ``hello`` adds ``partitions: P``; ``hello`` and ``ready`` carry
  the whole cursor in ``id``. ``event``, ``rejected``, ``trimmed`` and
  ``lagged`` add ``p``, the partition they concern, and their ``id`` (and
  ``from``, ``first``) are ids of that partition's stream. A viewer resumes
  by one rule: a message with ``p`` moves partition ``p``'s id to its
  ``id``; a message without ``p`` (hello, ready; every message when P = 1)
  sets the whole cursor to its ``id``. The cursor so kept, passed back as
  ``since``, gives no gap and no duplicate, as one id does for P = 1.
- Order: each read of the reader, and each step of a replay, takes entries
  from every partition and hands them out merged by id (ties by partition).
  Across reads there is no total order (``COUNT`` cuts each partition on its
  own, and cluster nodes' clocks differ), but one customer is in one
  partition, read in order: a customer's entries reach a viewer in order.
- Reads: a read takes at most ``live_batch // P`` entries (at least one) of
  each partition, so it hands out no more than ``live_batch`` (P if
  ``live_batch`` is smaller), the bound the viewer queues are set against.
  On one Redis all partitions are one ``XREAD``; on a cluster each key is
  read on its own node (:class:`eventwire.store.StreamsReader`). Page reads (a
  replay; a reader behind or back from a failure) read each partition in its
  own ``MULTI``.
- ``lagged`` and ``trimmed`` are counted per partition: a gap gives one
  ``lagged`` notice for each partition that lost entries, all of them before
  the next entry queued after the gap, each counting exactly the entries of
  its partition that were dropped; ``trimmed`` names the one partition whose
  position was trimmed. A viewer's queue holds at most ``live_queue`` events
  plus the notices of one gap (at most P + 1).
"""

from eventwire.live.messages import (
    STREAMS,
    Entry,
    Event,
    Hello,
    Lagged,
    LiveMessage,
    Ready,
    Rejected,
    Snapshot,
    StreamName,
    Tick,
    Trimmed,
    decode_entries,
)
from eventwire.live.query import LiveQuery, parse_query
from eventwire.live.relay import Relay, per_read
from eventwire.live.viewer import VIEWER_SEND_BUFFER, Filter, Viewer

__all__ = [
    "STREAMS",
    "VIEWER_SEND_BUFFER",
    "Entry",
    "Event",
    "Filter",
    "Hello",
    "Lagged",
    "LiveMessage",
    "LiveQuery",
    "Ready",
    "Rejected",
    "Relay",
    "Snapshot",
    "StreamName",
    "Tick",
    "Trimmed",
    "Viewer",
    "decode_entries",
    "parse_query",
    "per_read",
]
