"""Typed settings: ``config/eventwire.toml``, then ``EVENTWIRE_*`` variables, then flags.

This module owns every server setting, its default and what it costs. It
reads files and the environment and never touches the network. Each setting
``name`` can be overridden by the environment variable ``EVENTWIRE_NAME``
(durations in seconds, floats allowed); command-line flags override both. A
wrong value stops startup with a :class:`~eventwire.core.errors.ConfigError` naming
the key, its source and the problem.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta

from eventwire.core.errors import ConfigError

ENV_PREFIX: Final = "EVENTWIRE_"
DEFAULT_CONFIG: Final = Path("config/eventwire.toml")

Seconds = Annotated[float, Meta(gt=0)]
Count = Annotated[int, Meta(ge=1)]


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8780`` for IPv6); port 0 means any free port.

    Raises:
        ValueError: the value is not HOST:PORT with a port in 0-65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The table of a TOML file; ``what`` names the file in the error ("sites file").

    Raises:
        ConfigError: the file cannot be read or is not TOML.
    """
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every command that reads settings takes: ``--config``, ``--sites``, ``--redis``."""
    parser.add_argument("--config", type=Path, help="settings file (config/eventwire.toml)")
    parser.add_argument("--sites", help="sites file (config/sites.toml)")
    parser.add_argument("--redis", dest="redis_url", help="Redis URL (redis://host:port/db)")


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every server setting with its default. See ``config/eventwire.toml``."""

    # -- listeners and Redis
    listen: str = "127.0.0.1:8780"
    admin: str = "127.0.0.1:8781"
    #: The HTTP ingest listener (batch endpoint, beacons, Segment API); "" serves none.
    #: Each keep-alive connection costs a few KiB; a body at most ``max_frame_bytes``.
    http_listen: str = "127.0.0.1:8782"
    #: The HTTP listener's URL as browsers reach it (behind a proxy); "" derives it.
    public_http_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Path of the sites file; relative paths are resolved from the config file's folder.
    sites: str = "sites.toml"
    key_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "ew"
    log_level: Annotated[str, Meta(pattern=r"^(debug|info|warning|error)$")] = "info"
    #: Server processes sharing the public port (SO_REUSEPORT) under one supervisor;
    #: 1 serves in this process, no supervisor. Each process uses up to one core,
    #: ~40 MiB plus its connections, and its own Redis connections and ``max_connections``.
    workers: Annotated[int, Meta(ge=1, le=256)] = 1

    # -- docs/protocol.md limits
    #: Largest frame read; a larger one closes 1009. Memory: one frame per connection at most.
    max_frame_bytes: Annotated[int, Meta(ge=1024)] = 256 * 1024
    max_batch: Annotated[int, Meta(ge=1, le=10_000)] = 500
    max_event_bytes: Annotated[int, Meta(ge=256)] = 32 * 1024
    max_clock_skew: Annotated[float, Meta(ge=0)] = 300.0
    max_event_age: Seconds = 7 * 86400.0
    hello_timeout: Seconds = 5.0

    # -- Redis layout
    #: ``MAXLEN ~`` of each events stream: a safety cap on Redis memory (~0.5 KiB an event).
    stream_maxlen: Count = 1_000_000
    #: ``MAXLEN ~`` of each rejected stream.
    rejected_maxlen: Count = 100_000
    #: How long a producer's highest stored seq is kept (de-duplication window).
    producer_ttl: Seconds = 7 * 86400.0
    #: How long a Segment call's ``messageId`` is remembered (its producer key of
    #: ~100 bytes, one per call); ``producer_ttl`` bounds it from above.
    message_dedup_window: Seconds = 86400.0

    # -- backpressure (README "Persistence"); both may be set per site
    #: Entries of an events stream its persist group has not acknowledged at which
    #: new frames of the site are nacked ``unavailable``; 0: ``stream_maxlen``.
    max_backlog: Annotated[int, Meta(ge=0)] = 0
    #: "reject": while a stream has a persist group nothing unpersisted is trimmed
    #: and frames wait at ``max_backlog``; "trim": ``MAXLEN ~ stream_maxlen`` trims
    #: the oldest entries, stored or not (acked events may never reach the store).
    on_backlog: Literal["reject", "trim"] = "reject"

    # -- store behaviour
    #: How long one Redis round trip may take before frames are nacked ``unavailable``.
    store_timeout: Seconds = 2.0
    #: ``retry_after_ms`` sent with ``nack unavailable``.
    retry_after_ms: Annotated[int, Meta(ge=0)] = 500
    #: Events in one Lua call; bounds how long Redis is busy with one call (~1 ms per 500).
    publish_batch_events: Annotated[int, Meta(ge=1)] = 2000
    #: Publisher lanes: round trips to Redis in flight at once (one Redis connection each).
    publish_lanes: Annotated[int, Meta(ge=1, le=16)] = 1
    #: Publish calls one lane keeps in flight on its Redis connection (pipelined):
    #: with one in flight, another goes once a full call (``publish_batch_events``) waits;
    #: a producer's frames are in at most one of them. 1: one round trip at a time.
    publish_depth: Annotated[int, Meta(ge=1, le=16)] = 4

    # -- connections
    #: Frames of one connection waiting for their ack; more stop reading the socket.
    max_inflight_frames: Count = 64
    #: Open WebSocket connections per process; more are refused with HTTP 503.
    max_connections: Count = 50_000
    #: Connections the kernel queues before the server accepts them (capped by
    #: net.core.somaxconn); a few hundred bytes each. asyncio's default of 100
    #: drops handshakes in a reconnect storm after a restart.
    listen_backlog: Count = 4096
    #: Open WebSocket connections from one client address (after ``trusted_proxies``;
    #: an IPv6 address counts as its /64);
    #: more are refused with HTTP 429 before the upgrade. HTTP requests in flight from
    #: one address count against the same number. One dict entry (~150 bytes) per address.
    max_connections_per_ip: Count = 1000
    #: WebSocket handshakes (and HTTP requests) per second from one client address,
    #: refilling a bucket of ``handshake_burst``; past it, HTTP 429 with ``Retry-After``.
    #: One bucket (~200 bytes) per recent address, at most 100,000 kept.
    handshakes_per_ip: Annotated[float, Meta(gt=0)] = 50.0
    handshake_burst: Count = 200
    ping_interval: Seconds = 20.0
    ping_timeout: Seconds = 20.0
    #: On SIGTERM, how long in-flight frames may take to be acked before connections close.
    drain_timeout: Seconds = 10.0

    # -- visitors (README "Privacy"): the connection's context, read once at the handshake
    #: Enrich connections: the ``client`` object of ``session.start`` (User-Agent, country,
    #: bot), ``params.source`` of page visits, bot detection. Costs one lookup per
    #: connection (a few microseconds; a new User-Agent ~1 ms once, then cached).
    enrich_visitors: bool = True
    #: CIDRs of proxies whose ``X-Forwarded-For`` / ``Forwarded`` is believed (the client
    #: address is the last hop not in these); empty: the peer address is the client's.
    trusted_proxies: list[str] = []
    #: A MaxMind-format (.mmdb) City or Country database for ``client.country``,
    #: ``region`` and ``city``; "" uses the country table shipped with iptocc (RIR data).
    #: The file is memory-mapped once per process.
    geoip_db: str = ""

    # -- sessions (docs/protocol.md section 6); the first three may be set per site
    #: After a customer's last connection closes, how long until the session ends.
    session_grace: Seconds = 30.0
    #: Without a stored event for this long, the session ends even while connected.
    session_idle: Seconds = 1800.0
    #: The longest a session lasts.
    session_max: Seconds = 86400.0
    #: A connection whose process stopped renewing it this long counts as closed.
    heartbeat_ttl: Annotated[float, Meta(ge=0.1)] = 15.0
    #: How often each process looks for sessions to end (one call per site and partition).
    reap_interval: Seconds = 1.0

    # -- persistence (eventwire persist)
    #: The store: sqlite:///PATH (relative to where the worker runs) or postgresql://...
    persist_dsn: str = "sqlite:///data/events.db"
    #: An entry unacked this long with a consumer is taken over by another worker.
    claim_idle: Seconds = 60.0
    #: Deliveries after which a failing entry goes to ew:{site}:dead (each claim_idle apart).
    max_deliveries: Annotated[int, Meta(ge=1)] = 5
    #: Seconds of persisted events kept in each stream for live readers (~0.5 KiB an event).
    persist_retain: Annotated[float, Meta(ge=0)] = 3600.0
    #: PostgreSQL connections each worker writes batches on at once (one batch each);
    #: each is a backend in PostgreSQL. SQLite ignores it (one connection).
    persist_pg_writers: Annotated[int, Meta(ge=1, le=32)] = 2
    #: How often the persist worker deletes rows older than a site's ``retain_days``
    #: (and once at start), in bounded batches (one short transaction each).
    retain_interval: Annotated[float, Meta(gt=0)] = 3600.0

    # -- customers' privacy (README "Customers: identity, forget, export, retention, consent")
    #: The environment variable holding the HMAC secret of the keyed hashes in the
    #: audit stream and the suppression list; "" makes one on first use and keeps it
    #: in Redis (``{key_prefix}:privacy:secret``). Changing it forgets every suppression.
    privacy_key_env: Annotated[str, Meta(pattern=r"^([A-Za-z_][A-Za-z0-9_]{0,127})?$")] = ""

    # -- admin listener: dashboard and live relay
    #: When set, /dashboard's data, /v1/live, /v1/sites and /metrics need it (Bearer
    #: header or the page's login); empty leaves them open to whoever reaches ``admin``.
    #: 16-256 printable ASCII characters; set it through EVENTWIRE_ADMIN_TOKEN.
    admin_token: Annotated[str, Meta(pattern=r"^([!-~]{16,256})?$")] = ""
    #: Events queued per live viewer before it is sent ``lagged`` and events are dropped
    #: for it. Queued frames are shared between viewers: ~100 bytes per queued event
    #: per viewer, plus the viewer's socket write buffer (32 KiB).
    live_queue: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    #: Entries per XRANGE/XREAD of the live relay: one reply in memory at a time
    #: per reader or replaying viewer (~0.5 KiB an entry).
    live_batch: Annotated[int, Meta(ge=1, le=10_000)] = 500
    #: Live viewers (dashboard tabs count two) per process; more are refused with
    #: HTTP 503. Each costs up to ``live_queue`` queued events; each (site, stream)
    #: being watched costs one Redis connection.
    live_max_viewers: Annotated[int, Meta(ge=1, le=100_000)] = 200
    #: Start every site's rollups (the summary viewers' tally) with the process and
    #: keep them, so a dashboard's first load is complete at once, not only after
    #: the window's backfill. Costs per site and process, viewers or not: two Redis
    #: readers, decoding every entry, and the tally's memory (see README).
    live_tally_at_start: bool = False

    def __post_init__(self) -> None:
        for key in ("listen", "admin", "http_listen"):
            if key == "http_listen" and not self.http_listen:
                continue
            try:
                parse_hostport(getattr(self, key))
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        if self.live_queue < self.live_batch:
            # A reader hands a whole batch to each viewer at once.
            raise ValueError(
                f"live_queue: must be at least live_batch ({self.live_batch}), "
                f"got {self.live_queue}"
            )
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {exc}") from None
        scheme = urlsplit(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix", *CLUSTER_SCHEMES):
            raise ValueError(
                "redis_url: scheme must be redis, rediss, unix, redis+cluster or "
                f"rediss+cluster, got {scheme!r}"
            )
        if scheme in CLUSTER_SCHEMES:
            try:
                cluster_nodes(self.redis_url)
            except ValueError as exc:
                raise ValueError(f"redis_url: {exc}") from None

    @property
    def listen_addr(self) -> tuple[str, int]:
        """``listen`` as (host, port)."""
        return parse_hostport(self.listen)

    @property
    def http_addr(self) -> tuple[str, int] | None:
        """``http_listen`` as (host, port), or None when no HTTP listener is served."""
        return parse_hostport(self.http_listen) if self.http_listen else None

    @property
    def admin_addr(self) -> tuple[str, int]:
        """``admin`` as (host, port)."""
        return parse_hostport(self.admin)


SETTING_NAMES: Final = frozenset(Settings.__struct_fields__)
#: Settings that are lists: comma-separated in their environment variable.
_LISTS: Final = frozenset({"trusted_proxies"})


class SessionTimings(msgspec.Struct, frozen=True):
    """A site's session timings in milliseconds, as the Redis functions take them."""

    grace_ms: int
    idle_ms: int
    max_ms: int

    @classmethod
    def of(
        cls,
        settings: Settings,
        grace: float | None = None,
        idle: float | None = None,
        longest: float | None = None,
    ) -> SessionTimings:
        """Timings from the settings, each overridden where given (seconds)."""
        return cls(
            grace_ms=int((grace or settings.session_grace) * 1000),
            idle_ms=int((idle or settings.session_idle) * 1000),
            max_ms=int((longest or settings.session_max) * 1000),
        )


#: URL schemes naming a Redis Cluster by some of its nodes: ``redis+cluster://h:p,h:p``.
CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")


def cluster_nodes(url: str) -> list[tuple[str, int]] | None:
    """The ``host:port`` startup nodes of a cluster URL; None for a single-node URL.

    Raises:
        ValueError: a cluster URL without nodes, or with a node that is not host:port.
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        return None
    hosts = parts.netloc.rsplit("@", 1)[-1]
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"cluster node must be host:port, got {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    return nodes


def mask_url(url: str) -> str:
    """Hide the password of a URL, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:****@{netloc}"))


class LoadedConfig(msgspec.Struct, frozen=True):
    """Settings with where they came from."""

    settings: Settings
    config_path: Path | None
    sites_path: Path
    sources: dict[str, str]


def load_settings(
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Read the settings: file, then environment, then ``overrides`` (flags).

    Args:
        config_path: a TOML file; None means ``$EVENTWIRE_CONFIG`` or
            ``config/eventwire.toml`` if either exists, else the defaults.
        env: the environment to read ``EVENTWIRE_*`` from (``os.environ``).
        overrides: values from command-line flags, by setting name.

    Raises:
        ConfigError: naming the key, where it came from and what is wrong.
    """
    env = os.environ if env is None else env
    if config_path is None:
        named = env.get(ENV_PREFIX + "CONFIG")
        if named:
            config_path = Path(named)
        elif DEFAULT_CONFIG.exists():
            config_path = DEFAULT_CONFIG
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_path is not None:
        raw = read_toml(config_path, "config file")
        sources.update(dict.fromkeys(raw, str(config_path)))
    for name in SETTING_NAMES:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None:
            # A list setting comes from the environment as comma-separated items.
            items = [v.strip() for v in value.split(",") if v.strip()]
            raw[name] = items if name in _LISTS else value
            sources[name] = ENV_PREFIX + name.upper()
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = value
            sources[name] = "command line"
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), sources)) from None
    sites_path = Path(settings.sites)
    if not sites_path.is_absolute():
        # A path written in the config file is relative to that file; one from
        # the environment or a flag is relative to where the command runs.
        if config_path is not None and sources.get("sites", str(config_path)) == str(config_path):
            sites_path = config_path.parent / sites_path
        elif "sites" not in sources:
            sites_path = DEFAULT_CONFIG.parent / sites_path
    return LoadedConfig(settings, config_path, sites_path, sources)


def _explain(message: str, sources: Mapping[str, str]) -> str:
    """Add the source of the offending key to a msgspec validation message."""
    for key, source in sources.items():
        if f"`$.{key}`" in message or message.startswith(f"{key}:"):
            return f"setting {key!r} (from {source}): {message}"
    return f"settings: {message}"


def describe(loaded: LoadedConfig) -> dict[str, Any]:
    """The effective settings as plain data, secrets masked, for ``check-config``."""
    out: dict[str, Any] = msgspec.to_builtins(loaded.settings)
    out["redis_url"] = mask_url(out["redis_url"])
    out["persist_dsn"] = mask_url(out["persist_dsn"])
    if out["admin_token"]:
        out["admin_token"] = "****"
    out["sites"] = str(loaded.sites_path)
    return out
