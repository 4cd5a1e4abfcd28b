"""The ``persist`` and ``activity`` commands: settings, signals, output.

This module owns the command-line surface of persistence and nothing else:
it reads the settings (``redis_url``, ``key_prefix``,
``sites`` through :func:`eventwire.core.config.load_settings`; the worker's own
``persist_dsn``, ``claim_idle``, ``max_deliveries``, ``persist_pg_writers`` from flags
or ``EVENTWIRE_PERSIST_DSN``, ``EVENTWIRE_CLAIM_IDLE``, ``EVENTWIRE_MAX_DELIVERIES``,
``EVENTWIRE_PERSIST_PG_WRITERS``),
runs the worker until SIGTERM/SIGINT and prints the activity feed. Exit
codes: 0 done or stopped by a signal, 1 the worker failed, 2 a configuration
error.

Wiring into ``eventwire.commands.cli``: the flags are defined there (so that
parsing them imports no persist module), and ``run(args)`` runs when
``args.command`` is ``persist`` or ``activity``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal
import sys

import msgspec
from prometheus_client import start_http_server

from eventwire.core.config import load_settings, parse_hostport
from eventwire.core.errors import ConfigError
from eventwire.core.rules import SitesBook, load_sites
from eventwire.heap import freeze_imports
from eventwire.log import configure
from eventwire.persist.sinks import Activity, open_sink
from eventwire.persist.worker import PersistOptions, Worker


async def run(args: argparse.Namespace) -> int:
    """Run ``persist`` or ``activity`` per ``args.command``; returns the exit code."""
    if args.command == "persist":
        return await run_persist(args)
    if args.command == "activity":
        return await run_activity(args)
    raise ValueError(f"not a persist command: {args.command!r}")


async def run_persist(args: argparse.Namespace) -> int:
    """Run the worker until SIGTERM/SIGINT (finishes and acks its batch, exit 0)."""
    try:
        loaded = load_settings(
            args.config,
            overrides={
                "sites": args.sites,
                "redis_url": args.redis_url,
                # A setting like any other: its range is checked with the rest.
                "persist_pg_writers": args.pg_writers,
            },
        )
        book = SitesBook(loaded.sites_path, load_sites(loaded.sites_path))
        options = PersistOptions.from_settings(
            loaded.settings,
            dsn=args.dsn,
            claim_idle=args.claim_idle,
            max_deliveries=args.max_deliveries,
        )
        metrics_addr = parse_hostport(args.metrics) if args.metrics else None
    except (ConfigError, ValueError) as exc:
        print(f"eventwire: configuration error: {exc}", file=sys.stderr)
        return 2
    configure(loaded.settings.log_level)
    if metrics_addr is not None:
        start_http_server(metrics_addr[1], addr=metrics_addr[0])
    worker = Worker(loaded.settings, book, options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop_soon)
    try:
        await worker.start()
    except Exception as exc:
        print(f"eventwire persist: cannot start: {exc!r}", file=sys.stderr)
        await worker.stop()
        return 1
    # Full collections walk the batches, not the imports (eventwire.heap).
    freeze_imports()
    try:
        await worker.wait()
    finally:
        await worker.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def _line(a: Activity) -> str:
    when = datetime.datetime.fromtimestamp(a.time / 1000, datetime.UTC)
    return (
        f"{when:%Y-%m-%d %H:%M:%S}.{a.time % 1000:03d}Z  {a.label}  ({a.action})  {a.session}"
        f"  {a.uuid}"
    )


async def run_activity(args: argparse.Namespace) -> int:
    """Print a customer's activity feed: readable lines on a TTY, JSON lines otherwise."""
    try:
        dsn = args.dsn or load_settings().settings.persist_dsn
    except ConfigError as exc:
        print(f"eventwire: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("eventwire activity: --limit must be at least 1", file=sys.stderr)
        return 2
    sink = open_sink(dsn)
    try:
        await sink.open()
        feed = await sink.activity(args.site, args.uuid, args.limit)
    finally:
        await sink.close()
    as_json = args.json or not sys.stdout.isatty()
    out = sys.stdout
    for a in feed:
        out.write((msgspec.json.encode(a).decode() if as_json else _line(a)) + "\n")
    out.flush()
    return 0
