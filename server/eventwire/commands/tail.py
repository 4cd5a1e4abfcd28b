"""``eventwire tail``: follow the sites' event (or rejected) streams live, for operators.

This module owns the ``tail`` subcommand: its flags, the sites it follows,
where reading starts (``--since``), the filters (``--action`` glob,
``--uuid``), and the two output forms: one aligned, coloured line per event
on a terminal, one JSON line per event otherwise (the stored event JSON plus
``id``, the stream entry id). It only reads Redis (``XREAD COUNT 500 BLOCK
1000`` in a loop, through :func:`eventwire.store.survey.read_streams`; memory
bounded by one reply per stream), survives Redis going away (one line on
stderr, short backoff, it resumes after the last entry it printed), and exits
0 on Ctrl-C or when the reader of its output goes away.

A site with ``partitions = P`` above 1 has P streams (docs/protocol.md section 7);
tail follows all of them, keeping one position per stream, since the ids of
different streams are independent. ``--since`` means the same on every
stream: ``now`` is each stream's own end, a duration is that long ago on each
stream's id clock, ``0`` each stream's beginning, and a stream id ``ID`` means
the entries after ``ID`` in every partition (ids are times, so: after that
moment). The entries of one site's streams that one read brings are printed
merged by id, so lines come roughly in time order; the order is exact within a
partition, that is for each customer. With ``--uuid`` only that customer's
partition is read. Output lines are the same as for one stream: records carry
their site, never the partition.

The sites followed are those of the sites file and those found in Redis
(:func:`sites_to_follow`): servers with another sites file may write sites
this one does not name. The sites file gives partitions where it names the
site; elsewhere Redis tells them by the partition streams it holds, and
``--uuid`` reads every partition of such a site, since a partition with no
stream yet would be missed and the customer's partition wrongly placed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, TextIO

import msgspec

from eventwire.core.config import LoadedConfig, load_settings
from eventwire.core.errors import ConfigError, StoreUnavailable
from eventwire.core.positions import start_id
from eventwire.core.rules import load_sites
from eventwire.store import (
    Keys,
    RedisClient,
    StreamsReader,
    redis_client,
    reply_text,
    stream_id,
)
from eventwire.store.survey import find_site, find_sites, read_streams

#: Entries asked for per XREAD, and how long one XREAD blocks (ms).
READ_COUNT: Final = 500
READ_BLOCK_MS: Final = 1000
#: Reconnect backoff after Redis went away: first and longest pause (s).
BACKOFF_FIRST: Final = 0.2
BACKOFF_MAX: Final = 2.0
#: Params shown first on a terminal line, when an event has them.
KEY_PARAMS: Final = ("url", "sku", "price", "quantity", "order_id", "query", "form", "target")
#: At most this many params on a terminal line, each value at most this long.
MAX_PARAMS: Final = 4
MAX_VALUE: Final = 60
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def decode_entry(entry_id: bytes | str, fields: Mapping[Any, Any]) -> dict[str, Any]:
    """One stream entry as the stored event dict plus ``id``.

    An entry that is not eventwire's (no ``event`` field or no JSON object in
    it) comes out as ``{"id", "fields"}`` with its fields as text.
    """
    raw = fields.get(b"event", fields.get("event"))
    out: dict[str, Any] | None = None
    if raw is not None:
        try:
            decoded = msgspec.json.decode(raw if isinstance(raw, bytes) else raw.encode())
        except msgspec.DecodeError:
            decoded = None
        if isinstance(decoded, dict):
            out = decoded
    if out is None:
        out = {"fields": {reply_text(k): reply_text(v) for k, v in fields.items()}}
    out["id"] = reply_text(entry_id)
    return out


def matches(event: Mapping[str, Any], action: str | None, uuid: str | None) -> bool:
    """Whether an event passes the ``--action`` glob (full match) and the ``--uuid`` filter."""
    if action is not None and not fnmatch.fnmatchcase(str(event.get("action", "")), action):
        return False
    return uuid is None or event.get("uuid") == uuid


def _safe(text: str) -> str:
    """Text with control characters escaped: event data must not drive the terminal."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _compact(value: Any) -> str:
    if isinstance(value, str):
        text = value if value and " " not in value else msgspec.json.encode(value).decode()
    else:
        text = msgspec.json.encode(value).decode()
    text = _safe(text)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _params(params: Any) -> str:
    if not isinstance(params, dict):
        return "" if params is None else _compact(params)
    keys = [k for k in KEY_PARAMS if k in params]
    keys += [k for k in params if k not in KEY_PARAMS]
    shown = [f"{_safe(str(k))}={_compact(params[k])}" for k in keys[:MAX_PARAMS]]
    if len(keys) > MAX_PARAMS:
        shown.append(f"+{len(keys) - MAX_PARAMS}")
    return " ".join(shown)


def _clock(ms: Any, entry_id: str) -> str:
    if not isinstance(ms, int | float):
        ms = int(entry_id.split("-", 1)[0]) if entry_id[:1].isdigit() else 0
    try:
        moment = datetime.fromtimestamp(ms / 1000)
    except (OverflowError, OSError, ValueError):
        return "??:??:??.???"
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


class Painter:
    """ANSI colours, or none."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, code: str, text: str) -> str:
        """``text`` in colour ``code`` (an SGR parameter such as ``"36"``)."""
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text


def human_line(event: Mapping[str, Any], site_width: int, paint: Painter, rejected: bool) -> str:
    """One readable line: time, site, uuid, action, label (or code, detail, seq), key params.

    The time is the event's own ``time`` (``received`` for a rejected entry),
    in local time.
    """
    entry_id = str(event.get("id", ""))
    if "fields" in event and "site" not in event:
        return f"{paint('2', _clock(None, entry_id))}  {_safe(str(event['fields']))}"
    when = _clock(event.get("received") if rejected else event.get("time"), entry_id)
    site = _safe(str(event.get("site", "?"))).ljust(site_width)
    uuid = _safe(str(event.get("uuid", "-"))).ljust(20)
    parts = [paint("2", when), paint("36", site), paint("33", uuid)]
    if rejected:
        code = _safe(str(event.get("code", "?"))).ljust(16)
        parts.append(paint("1;31", code))
        parts.append(f"seq={event.get('seq', '-')}")
        parts.append(_safe(str(event.get("detail", ""))))
    else:
        action = _safe(str(event.get("action", "?"))).ljust(20)
        parts.append(paint("1;32", action))
        label = event.get("label")
        parts.append(paint("35", _safe(str(label)).ljust(12) if label is not None else " " * 12))
        parts.append(_params(event.get("params")))
    return "  ".join(parts).rstrip()


class _Output:
    """Writes lines to stdout; remembers whether the reader went away."""

    def __init__(self, stream: TextIO, as_json: bool, site_width: int, rejected: bool) -> None:
        self.stream = stream
        self.as_json = as_json
        self.site_width = site_width
        self.rejected = rejected
        color = not as_json and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        self.paint = Painter(color)

    def write(self, events: Sequence[dict[str, Any]]) -> None:
        """Write one batch and flush it. Raises BrokenPipeError when the reader left."""
        if not events:
            return
        if self.as_json:
            text = "".join(msgspec.json.encode(e).decode() + "\n" for e in events)
        else:
            text = "".join(
                human_line(e, self.site_width, self.paint, self.rejected) + "\n" for e in events
            )
        self.stream.write(text)
        self.stream.flush()


class _Outage:
    """Says once that Redis went away, and paces the retries until it is back."""

    def __init__(self) -> None:
        self.down = False
        self.pause = BACKOFF_FIRST

    async def wait(self, exc: StoreUnavailable) -> None:
        """Report ``exc`` (the first time) and sleep before the next try."""
        if not self.down:
            print(f"eventwire tail: Redis unavailable ({exc}); retrying", file=sys.stderr)
            self.down = True
        await asyncio.sleep(self.pause)
        self.pause = min(self.pause * 2, BACKOFF_MAX)

    def over(self) -> None:
        """Redis answered: the next outage is reported again, from the first pause."""
        self.down = False
        self.pause = BACKOFF_FIRST


def operator_config(args: argparse.Namespace) -> tuple[LoadedConfig, dict[str, int]]:
    """The settings and the sites file's sites (with their partitions) of ``tail`` and ``stats``.

    Raises:
        ConfigError: the config or the sites file is wrong.
    """
    loaded = load_settings(
        args.config, overrides={"redis_url": args.redis_url, "sites": args.sites}
    )
    named = {site: rules.config.partitions for site, rules in load_sites(loaded.sites_path).items()}
    return loaded, named


def every_site(named: Mapping[str, int], found: Mapping[str, int]) -> dict[str, int]:
    """The sites of the sites file, then those found only in Redis, each with its partitions.

    The sites file's partitions win where it names a site: Redis can only
    tell the partitions that have streams (see
    :func:`eventwire.store.survey.partitions_found`).
    """
    return dict(named) | {site: p for site, p in found.items() if site not in named}


async def sites_to_follow(
    client: RedisClient,
    keys: Keys,
    named: Mapping[str, int],
    wanted: Sequence[str] | None,
    stopped: Callable[[], bool] = lambda: False,
) -> dict[str, int] | None:
    """The sites ``tail`` follows, each with its partitions; None when asked to stop first.

    Without ``wanted`` (no ``--site``): every site of the sites file and
    every site found in Redis (:func:`every_site`). With it: those sites,
    each from the sites file or else from Redis
    (:func:`eventwire.store.survey.find_site`); Redis is not asked when the
    sites file names them all. While Redis is unreachable this says so once
    and asks again, as :func:`follow` does.

    Args:
        client: the client.
        keys: the key names.
        named: the sites file's sites and their partitions.
        wanted: the ``--site`` values, or None.
        stopped: looked at between tries (a lost cancellation, see :func:`follow`).

    Raises:
        ConfigError: a wanted site is neither in the sites file nor in Redis,
            or there is no site at all.
    """
    wanted = list(dict.fromkeys(wanted)) if wanted else None
    if wanted is not None and all(site in named for site in wanted):
        return {site: named[site] for site in wanted}
    outage = _Outage()
    found: dict[str, int] | None = None
    while found is None:
        if stopped():
            return None
        try:
            if wanted is None:
                found = await find_sites(client, keys)
            else:
                held = {site: await find_site(client, keys, site) for site in wanted}
                found = {site: p for site, p in held.items() if p is not None}
        except StoreUnavailable as exc:
            await outage.wait(exc)
    where = f"Redis has no stream of it under key prefix {keys.prefix!r}"
    if wanted is None:
        sites = every_site(named, found)
    else:
        unknown = [site for site in wanted if site not in named and site not in found]
        if unknown:
            raise ConfigError(
                f"unknown site(s) {', '.join(unknown)}: the sites file has "
                f"{', '.join(named) or 'none'} and {where}"
            )
        sites = {site: named[site] if site in named else found[site] for site in wanted}
    if not sites:
        raise ConfigError(f"no sites to follow: the sites file has none and {where}")
    return sites


def stream_keys(
    keys: Keys, sites: Mapping[str, int], rejected: bool, uuid: str | None = None
) -> dict[str, str]:
    """The streams to follow, each with its site: every partition of every site.

    Args:
        keys: the key names.
        sites: each site's ``partitions``.
        rejected: the rejected streams instead of the events streams.
        uuid: only this customer's partition of each site (its events live nowhere else).
    """
    out: dict[str, str] = {}
    for site, partitions in sites.items():
        if uuid is None:
            out.update(dict.fromkeys(keys.streams(site, partitions, rejected), site))
        else:
            tag = Keys.tag(site, uuid, partitions)
            out[keys.rejected(tag) if rejected else keys.events(tag)] = site
    return out


def merge_by_site(
    replies: Sequence[tuple[str, list[tuple[Any, Any]]]], site_of: Mapping[str, str]
) -> list[list[tuple[Any, Any]]]:
    """One read's entries, one list per site, a site's partitions merged by entry id.

    Streams not in ``site_of`` are their own group. A site with one stream
    keeps its entries as they came.
    """
    groups: dict[str, list[list[tuple[Any, Any]]]] = {}
    for key, entries in replies:
        if entries:
            groups.setdefault(site_of.get(key, key), []).append(entries)
    out: list[list[tuple[Any, Any]]] = []
    for parts in groups.values():
        if len(parts) == 1:
            out.append(parts[0])
        else:
            # Each part is in id order already; a stable sort keeps that for equal ids.
            out.append(sorted((e for part in parts for e in part), key=lambda e: stream_id(e[0])))
    return out


async def follow(
    client: RedisClient,
    positions: dict[str, str],
    out: _Output,
    action: str | None,
    uuid: str | None,
    stopped: Callable[[], bool] = lambda: False,
    site_of: Mapping[str, str] | None = None,
) -> None:
    """Read and print until cancelled or ``stopped()``; reconnects when Redis goes away.

    ``positions`` holds one position per stream (a partitioned site has
    several streams, whose ids are independent). ``site_of`` names each
    stream's site: the entries of one site's streams that arrive in one read
    are printed merged by id (see :func:`merge_by_site`).

    ``stopped`` is looked at between reads: a cancellation can be lost inside
    redis-py (see :mod:`eventwire.tasks`), and the next read then ends the loop.
    """
    outage = _Outage()
    async with StreamsReader(client, READ_COUNT, READ_BLOCK_MS) as reader:
        while not stopped():
            try:
                replies = await read_streams(reader, positions)
            except StoreUnavailable as exc:
                await outage.wait(exc)
                continue
            outage.over()
            for key, entries in replies:
                if entries:
                    positions[key] = reply_text(entries[-1][0])
            for entries in merge_by_site(replies, site_of or {}):
                events = [decode_entry(i, f) for i, f in entries]
                out.write([e for e in events if matches(e, action, uuid)])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Cancel the current task on SIGINT or SIGTERM, for a clean exit 0.

    Yields:
        A function telling whether a signal asked to stop (so a cancellation
        from elsewhere is not mistaken for it).
    """
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        if task is not None:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop)
    try:
        yield lambda: stopping
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def operator_command(client: RedisClient) -> AsyncIterator[Callable[[], bool]]:
    """The body of ``tail`` or ``stats``: ends quietly on SIGINT, SIGTERM or a closed pipe.

    The client is closed on the way out, whatever the way.

    Yields:
        Whether a signal asked to stop (see :func:`stop_on_signals`).
    """
    with stop_on_signals() as stopped:
        try:
            yield stopped
        except asyncio.CancelledError:
            if not stopped():
                raise
        except BrokenPipeError:
            quiet_stdout()
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()


def quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail on a closed pipe."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


async def run(args: argparse.Namespace) -> int:
    """Run ``tail``: 0 on Ctrl-C, SIGTERM or a closed pipe, 2 on a configuration error."""
    try:
        loaded, named = operator_config(args)
        first = start_id(args.since)
    except (ConfigError, ValueError) as exc:
        print(f"eventwire tail: configuration error: {exc}", file=sys.stderr)
        return 2
    keys = Keys(loaded.settings.key_prefix)
    rejected = bool(args.rejected)
    client = redis_client(
        loaded.settings.redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=READ_BLOCK_MS / 1000 + 5.0,
    )
    async with operator_command(client) as stopped:
        try:
            sites = await sites_to_follow(client, keys, named, args.site, stopped)
        except ConfigError as exc:
            print(f"eventwire tail: {exc}", file=sys.stderr)
            return 2
        if sites is None:
            return 0
        # --uuid reads one partition only where the sites file gives the partitions:
        # those Redis tells may be too few (a partition with no stream yet), which
        # would place the customer wrongly. Elsewhere every partition is read.
        site_of = stream_keys(
            keys, {s: p for s, p in sites.items() if s in named}, rejected, args.uuid
        ) | stream_keys(keys, {s: p for s, p in sites.items() if s not in named}, rejected)
        positions = dict.fromkeys(site_of, first)
        as_json = bool(args.json) or not sys.stdout.isatty()
        out = _Output(sys.stdout, as_json, max(len(s) for s in sites), rejected)
        await follow(client, positions, out, args.action, args.uuid, stopped, site_of)
    return 0
