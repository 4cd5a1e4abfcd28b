"""The ``eventwire`` command: ``serve``, ``check-config``, ``send``, ``persist``,
``activity``, ``tail``, ``stats``, ``forget``, ``unsuppress``, ``export``.

Parses flags, loads settings and sites, configures logging and runs the
rooms; no logic of its own beyond mapping errors to exit codes (2 for a
configuration error, 0 for a graceful stop). ``serve --workers N`` (N > 1)
runs :class:`~eventwire.supervisor.Supervisor` here, which starts N children
running this same command with ``--workers 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys
from typing import Any

import msgspec
import structlog

from eventwire import __version__, persist, supervisor
from eventwire.commands import privacy, stats, tail
from eventwire.commands.tail import quiet_stdout
from eventwire.core.config import LoadedConfig, add_source_flags, describe, load_settings
from eventwire.core.errors import ConfigError
from eventwire.core.rules import SiteRules, describe_sites, load_sites
from eventwire.gateway import EventwireServer
from eventwire.heap import HeapKeeper
from eventwire.log import configure
from eventwire.tasks import cancel_and_wait

#: How long ``eventwire send`` waits for its event to be acked.
SEND_TIMEOUT = 5.0

log = structlog.get_logger("eventwire.cli")


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
    send = sub.add_parser("send", help="send one event and print the server's answer")
    send.add_argument("--url", required=True, help="ws://HOST:PORT/v1/track/SITE")
    send.add_argument("--uuid", default=None, help="customer uuid (default: random)")
    send.add_argument("--label", default=None)
    send.add_argument("--origin", default=None, help="Origin header to send")
    send.add_argument("action", help="context.activity name, e.g. page.visit")
    send.add_argument("params", nargs="*", help="KEY=VALUE params; VALUE is JSON or a string")
    tail.add_parser(sub)
    stats.add_parser(sub)
    persist.add_parsers(sub)
    privacy.add_parsers(sub)
    return parser


def _load(args: argparse.Namespace) -> tuple[LoadedConfig, dict[str, SiteRules]]:
    overrides: dict[str, Any] = {
        "sites": args.sites,
        "listen": args.listen,
        "admin": args.admin,
        "http_listen": args.http_listen,
        "redis_url": args.redis_url,
        "workers": args.workers,
    }
    loaded = load_settings(args.config, overrides=overrides)
    return loaded, load_sites(loaded.sites_path)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "send":
        return _run(_send(args))
    if args.command in ("persist", "activity"):
        return _run(persist.run(args))
    if args.command in ("forget", "unsuppress", "export"):
        return _run(privacy.run(args))
    if args.command in ("tail", "stats"):
        # Operator commands end on Ctrl-C or a closed pipe (| head): quietly.
        try:
            return _run(tail.run(args) if args.command == "tail" else stats.run(args))
        except KeyboardInterrupt:
            return 0
        except BrokenPipeError:
            quiet_stdout()
            return 0
    try:
        loaded, sites = _load(args)
    except ConfigError as exc:
        print(f"eventwire: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        out = {
            "config_file": str(loaded.config_path) if loaded.config_path else None,
            "sources": loaded.sources,
            "settings": describe(loaded),
            "sites": describe_sites(sites, loaded.settings),
        }
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(out)).decode() + "\n")
        return 0
    worker = os.environ.get(supervisor.WORKER_ENV)
    configure(loaded.settings.log_level, fields={"worker": int(worker)} if worker else None)
    if loaded.settings.workers > 1:
        command = supervisor.child_command(sys.argv[1:] if argv is None else argv)
        # The stock loop: the supervisor only waits on children and signals,
        # and asyncio's subprocesses take every Popen option it needs.
        return asyncio.run(_supervise(loaded, command))
    return _run(_serve(loaded, sites))


def _raise_fd_limit(connections: int) -> None:
    """Let the process hold ``max_connections`` sockets: raise the soft fd limit toward it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 1024  # listeners, Redis, logs
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


async def _serve(loaded: LoadedConfig, sites: dict[str, SiteRules]) -> int:
    _raise_fd_limit(loaded.settings.max_connections)
    lifeline = supervisor.Lifeline.from_environ()
    server = EventwireServer(loaded.settings, sites, loaded.sites_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_sites)
    await server.start()
    # Full collections walk only what is new (eventwire.heap): with many open
    # connections a full pass would stop every answer for a second.
    keeper = HeapKeeper(lambda: server.open_connections, lambda: server.closed_connections)
    heap = asyncio.create_task(keeper.run())
    orphaned: asyncio.Task[None] | None = None
    if lifeline is not None:
        try:
            await lifeline.report(server.port, server.admin_port)
        except OSError:  # the supervisor is gone already
            log.warning("supervisor_gone", detail="draining")
            stop.set()
        else:
            orphaned = asyncio.create_task(_stop_when_orphaned(lifeline, stop))
    await stop.wait()
    if orphaned is not None:
        orphaned.cancel()
        await asyncio.wait([orphaned])
    await server.stop()
    await cancel_and_wait([heap])
    if lifeline is not None:
        lifeline.close()
    return 0


async def _stop_when_orphaned(lifeline: supervisor.Lifeline, stop: asyncio.Event) -> None:
    """A child whose supervisor is gone drains and exits, as on SIGTERM."""
    await lifeline.wait_closed()
    log.warning("supervisor_gone", detail="draining")
    stop.set()


async def _supervise(loaded: LoadedConfig, command: list[str]) -> int:
    sup = supervisor.Supervisor(loaded.settings, command)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sup.request_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, sup.forward, signal.SIGHUP)
    try:
        return await sup.run()
    except OSError as exc:
        print(f"eventwire: cannot listen: {exc}", file=sys.stderr)
        await sup.stop()
        return supervisor.EXIT_FAILED


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"eventwire send: param {text!r} is not KEY=VALUE")
    try:
        return key, msgspec.json.decode(value)
    except msgspec.DecodeError:
        return key, value


async def _send(args: argparse.Namespace) -> int:
    from eventwire.client import EventwireClient

    configure("error")  # the answer is printed below; the client's retries are noise here
    params = dict(_param(p) for p in args.params)
    client = EventwireClient(args.url, args.uuid, origin=args.origin)
    await client.start()
    seq = client.track(args.action, params, args.label)
    try:
        await client.flush(timeout=SEND_TIMEOUT)
    except TimeoutError:
        why = client.last_problem or f"no answer within {SEND_TIMEOUT:g} s"
        print(f"not stored: {why}", file=sys.stderr)
        return 1
    finally:
        await client.close(flush=False)
    for r in client.rejections:
        if r.seq == seq:
            print(f"rejected {r.code}: {r.detail}", file=sys.stderr)
            return 1
    assert client.welcome is not None
    print(f"stored: {args.action} for {client.uuid} in session {client.welcome.session}")
    return 0


def _run(main: Any) -> int:
    try:
        import uvloop
    except ImportError:
        code: int = asyncio.run(main)
    else:
        code = uvloop.run(main)
    return code
