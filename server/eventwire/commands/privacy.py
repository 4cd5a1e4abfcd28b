"""``eventwire forget``, ``unsuppress`` and ``export``: a customer's privacy from the command line.

Flags and output only; the operations are :mod:`eventwire.privacy`'s.
``forget`` and ``unsuppress`` print one JSON object (the counts per
place); ``export`` writes JSON lines to standard output or ``--out``.
Exit codes: 0 done, 1 Redis or the store did not answer (or the forget is
incomplete: run it again), 2 a configuration error or an unknown site.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from eventwire import privacy
from eventwire.core.config import LoadedConfig, load_settings
from eventwire.core.errors import ConfigError, StoreUnavailable
from eventwire.core.rules import load_sites
from eventwire.store import Keys, redis_client
from eventwire.store.privacy import Subjects


def _load(args: argparse.Namespace) -> tuple[LoadedConfig, int]:
    """Settings and the site's partitions.

    Raises:
        ConfigError: bad settings or sites file, or the site is not in it.
    """
    loaded = load_settings(
        args.config, overrides={"sites": args.sites, "redis_url": args.redis_url}
    )
    sites = load_sites(loaded.sites_path)
    if args.site not in sites:
        raise ConfigError(f"site {args.site!r} is not in {loaded.sites_path}")
    return loaded, sites[args.site].config.partitions


async def run(args: argparse.Namespace) -> int:
    """Run ``forget``, ``unsuppress`` or ``export``; returns the exit code."""
    try:
        loaded, partitions = _load(args)
    except ConfigError as exc:
        print(f"eventwire: configuration error: {exc}", file=sys.stderr)
        return 2
    settings = loaded.settings
    keys = Keys(settings.key_prefix)
    client = redis_client(settings.redis_url)
    subjects = Subjects(client, keys, settings.privacy_key_env)
    dsn = getattr(args, "dsn", None) or settings.persist_dsn
    try:
        if args.command == "unsuppress":
            done = await privacy.unsuppress(
                client, keys, subjects, args.site, partitions, args.uuid
            )
            print(msgspec.json.encode(done).decode())
            return 0
        sink = privacy.open_store(dsn)
        if sink is not None:
            await sink.open()
        try:
            if args.command == "forget":
                return await _forget(args, client, keys, subjects, sink, partitions)
            if sink is None:
                print(f"eventwire export: no store at {dsn}", file=sys.stderr)
                return 1
            return await _export(args, client, keys, subjects, sink, partitions)
        finally:
            if sink is not None:
                await sink.close()
    except ConfigError as exc:
        print(f"eventwire: configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"eventwire {args.command}: Redis did not answer: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"eventwire {args.command}: the store did not answer: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()


async def _forget(
    args: argparse.Namespace,
    client: Any,
    keys: Keys,
    subjects: Subjects,
    sink: Any,
    partitions: int,
) -> int:
    try:
        done = await privacy.forget(
            client,
            keys,
            subjects,
            sink,
            args.site,
            partitions,
            args.uuid,
            suppress=args.suppress,
            dry_run=args.dry_run,
        )
    except privacy.ForgetIncomplete as exc:
        print(msgspec.json.encode(exc.counts).decode())
        print(f"eventwire forget: incomplete, {exc}; run it again", file=sys.stderr)
        return 1
    print(msgspec.json.encode(done).decode())
    return 0


async def _export(
    args: argparse.Namespace,
    client: Any,
    keys: Keys,
    subjects: Subjects,
    sink: Any,
    partitions: int,
) -> int:
    lines = await privacy.export(client, keys, subjects, sink, args.site, partitions, args.uuid)
    body = b"".join(line + b"\n" for line in lines)
    if args.out is not None:
        args.out.write_bytes(body)
        print(f"{len(lines)} rows written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
    return 0
