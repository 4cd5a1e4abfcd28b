"""``eventwire serve`` and ``eventwire check-config``: the server's settings, and the server.

Loads settings and sites, configures logging and runs the server until
SIGTERM or SIGINT (exit 0 after a drain; 2 for a configuration error).
``serve --workers N`` (N > 1) runs :class:`~eventwire.supervisor.Supervisor`
here, which starts N children running this same command with ``--workers 1``.
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

from eventwire import supervisor
from eventwire.commands.cli import run_async
from eventwire.core.config import LoadedConfig, describe, load_settings
from eventwire.core.errors import ConfigError
from eventwire.core.rules import SiteRules, describe_sites, load_sites
from eventwire.gateway import EventwireServer
from eventwire.heap import HeapKeeper
from eventwire.log import configure
from eventwire.tasks import cancel_and_wait

log = structlog.get_logger("eventwire.cli")


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


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run ``serve`` or ``check-config``; ``argv`` is the command line (None: ``sys.argv``)."""
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
    return run_async(_serve(loaded, sites))


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
