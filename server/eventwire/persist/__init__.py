"""Persistence: the ``persist`` worker (Redis events streams into SQLite or PostgreSQL)
and the ``activity`` feed read from that store.

``worker`` owns the read loop (read, write a batch, ack), ``upkeep`` the care of
the streams (reclaim, dead letters, lag, trimming), both through
:class:`eventwire.store.ConsumerGroup`; ``sinks`` the SQL (schema, migrations,
idempotent writes, queries), ``rollups`` the per-minute rollups each batch adds
in its transaction, ``ranges`` their 1 h / 24 h / 7 d views,
``commands`` the two command-line commands, which ``eventwire.commands.cli`` parses and
runs with :func:`run`.
"""

from eventwire.persist.commands import run, run_activity, run_persist

__all__ = [
    "run",
    "run_activity",
    "run_persist",
]
