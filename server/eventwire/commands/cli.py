"""The ``eventwire`` command: ``serve``, ``check-config``, ``send``, ``persist``,
``activity``, ``tail``, ``stats``, ``forget``, ``unsuppress``, ``export``.

This module holds every subcommand's flags and maps the parsed command to
the module that runs it; no logic of its own beyond mapping errors to exit
codes. It imports only ``argparse`` and :mod:`eventwire.core.config`: each
subcommand's module (and the rooms it needs) is imported when that
subcommand runs, so ``eventwire tail`` never loads the server, the persist
worker or the HTTP listener, and ``--help`` loads none of them
(``tests/commands/test_cli.py`` checks both).

The runners: ``serve`` and ``check-config`` :mod:`eventwire.commands.serve`,
``send`` :mod:`eventwire.commands.send`, ``tail`` and ``stats`` their own
modules, ``persist`` and ``activity`` :mod:`eventwire.persist`, ``forget``,
``unsuppress`` and ``export`` :mod:`eventwire.commands.privacy`.
"""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final, TypeAlias

from eventwire import __version__
from eventwire.core.config import Settings, add_source_flags

#: The ranges of ``stats --range``: the keys of :data:`eventwire.persist.ranges.RANGES`
#: (named here so that parsing the flags does not import the persist worker).
STATS_RANGES: Final = ("1h", "24h", "7d")
#: Rows ``activity`` prints unless ``--limit`` says otherwise.
ACTIVITY_LIMIT: Final = 50
#: A uuid as docs/protocol.md section 0 defines it.
_UUID_HELP: Final = "the customer's uuid (1-64 characters of [A-Za-z0-9._:-])"

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _common(parser: argparse.ArgumentParser) -> None:
    add_source_flags(parser)
    parser.add_argument("--listen", help="public listener HOST:PORT")
    parser.add_argument("--admin", help="admin listener HOST:PORT")
    parser.add_argument(
        "--http", dest="http_listen", help="HTTP ingest listener HOST:PORT ('' for none)"
    )
    parser.add_argument(
        "--workers", help="server processes sharing the listen port under one supervisor (1)"
    )


def _add_send(sub: Subparsers) -> None:
    send = sub.add_parser("send", help="send one event and print the server's answer")
    send.add_argument("--url", required=True, help="ws://HOST:PORT/v1/track/SITE")
    send.add_argument("--uuid", default=None, help="customer uuid (default: random)")
    send.add_argument("--label", default=None)
    send.add_argument("--origin", default=None, help="Origin header to send")
    send.add_argument("action", help="context.activity name, e.g. page.visit")
    send.add_argument("params", nargs="*", help="KEY=VALUE params; VALUE is JSON or a string")


def _add_tail(sub: Subparsers) -> None:
    p = sub.add_parser(
        "tail",
        help="follow the event streams live",
        description="Follow the events (or rejected) streams of the sites live.",
    )
    add_source_flags(p)
    p.add_argument(
        "--site",
        action="append",
        default=None,
        metavar="S",
        help="only this site (repeatable; default: every site of the sites file "
        "and every site found in Redis)",
    )
    p.add_argument("--action", default=None, metavar="GLOB", help="only actions matching GLOB")
    p.add_argument("--uuid", default=None, metavar="U", help="only this customer")
    p.add_argument(
        "--since",
        default="now",
        metavar="now|5m|0|ID",
        help="now (default), a duration ago (30s, 5m, 2h, 1d), 0 (the beginning) "
        "or a stream id (entries after it; on a partitioned site, in every partition)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines (the default off a terminal)")
    p.add_argument("--rejected", action="store_true", help="follow the rejected streams")


def _add_stats(sub: Subparsers) -> None:
    p = sub.add_parser(
        "stats",
        help="per-site stream, session and persist numbers",
        description="Per-site stream length, rates, open sessions and persist lag, for the "
        "sites of the sites file and every site found in Redis.",
    )
    add_source_flags(p)
    p.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    p.add_argument("--json", action="store_true", help="JSON (the default off a terminal)")
    p.add_argument(
        "--range",
        choices=list(STATS_RANGES),
        help="the stored rollups of this range instead (what the dashboard's range views show)",
    )
    p.add_argument("--dsn", help="the store of --range (default: persist_dsn)")


def _add_persist(sub: Subparsers, default_dsn: str) -> None:
    p = sub.add_parser(
        "persist", help="copy every site's events from Redis into SQLite or PostgreSQL"
    )
    add_source_flags(p)
    p.add_argument(
        "--dsn",
        help=f"store: sqlite:///PATH or postgresql://... (EVENTWIRE_PERSIST_DSN; {default_dsn})",
    )
    p.add_argument(
        "--claim-idle",
        type=float,
        help="seconds before a dead consumer's entries are taken over (EVENTWIRE_CLAIM_IDLE; 60)",
    )
    p.add_argument(
        "--max-deliveries",
        type=int,
        help="deliveries before a failing entry goes to the dead stream "
        "(EVENTWIRE_MAX_DELIVERIES; 5)",
    )
    p.add_argument(
        "--pg-writers",
        type=int,
        help="PostgreSQL connections writing batches at once (EVENTWIRE_PERSIST_PG_WRITERS; 2)",
    )
    p.add_argument("--metrics", help="serve Prometheus /metrics on HOST:PORT")


def _add_activity(sub: Subparsers, default_dsn: str) -> None:
    p = sub.add_parser(
        "activity",
        help="print a customer's events (and its aliases') from the store, newest first",
    )
    p.add_argument("--dsn", help=f"store (env EVENTWIRE_PERSIST_DSN; {default_dsn})")
    p.add_argument("--site", required=True)
    p.add_argument("--uuid", required=True, help="the customer")
    p.add_argument("--limit", type=int, default=ACTIVITY_LIMIT, help=f"rows ({ACTIVITY_LIMIT})")
    p.add_argument("--json", action="store_true", help="JSON lines (the default off a TTY)")


def _add_privacy(sub: Subparsers, default_dsn: str) -> None:
    def target(p: argparse.ArgumentParser, dsn: bool = True) -> None:
        add_source_flags(p)
        p.add_argument("--site", required=True)
        p.add_argument("--uuid", required=True, help=_UUID_HELP)
        if dsn:
            p.add_argument("--dsn", help=f"store (EVENTWIRE_PERSIST_DSN; {default_dsn})")

    forget = sub.add_parser(
        "forget", help="remove a customer and its aliases from Redis and the store"
    )
    target(forget)
    forget.add_argument(
        "--suppress", action="store_true", help="keep them forgotten: deny their later events"
    )
    forget.add_argument("--dry-run", action="store_true", help="count, change nothing")
    unsuppress = sub.add_parser("unsuppress", help="lift a forgotten customer's suppression")
    target(unsuppress, dsn=False)
    export = sub.add_parser(
        "export", help="a customer's and its aliases' events and sessions as JSON lines"
    )
    target(export)
    export.add_argument("--out", type=Path, help="write to this file instead of standard output")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``eventwire``."""
    parser = argparse.ArgumentParser(
        prog="eventwire", description="eventwire: a real-time event tracking server."
    )
    parser.add_argument("--version", action="version", version=f"eventwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the tracking server")
    _common(serve)
    check = sub.add_parser("check-config", help="print the effective configuration")
    _common(check)
    _add_send(sub)
    _add_tail(sub)
    _add_stats(sub)
    default_dsn = Settings().persist_dsn
    _add_persist(sub, default_dsn)
    _add_activity(sub, default_dsn)
    _add_privacy(sub, default_dsn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    command = args.command
    if command == "send":
        from eventwire.commands.send import send

        return run_async(send(args))
    if command in ("persist", "activity"):
        from eventwire import persist

        return run_async(persist.run(args))
    if command in ("forget", "unsuppress", "export"):
        from eventwire.commands import privacy

        return run_async(privacy.run(args))
    if command == "tail":
        from eventwire.commands import tail

        return _operator(tail.run(args))
    if command == "stats":
        from eventwire.commands import stats

        return _operator(stats.run(args))
    from eventwire.commands import serve

    return serve.run(args, argv)


def _operator(main: Coroutine[Any, Any, int]) -> int:
    """Run ``tail`` or ``stats``: they end on Ctrl-C or a closed pipe (``| head``), quietly."""
    from eventwire.commands.tail import quiet_stdout

    try:
        return run_async(main)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        quiet_stdout()
        return 0


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop where it is installed (else asyncio's loop); its exit code."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)
