"""Per-site rules from ``config/sites.toml``: who may connect and which events are taken.

This module owns the sites file's schema, its compiled form and its reload.
It reads the file (and the PEM keys and environment variables it names) and
does no other I/O. A site id becomes part of Redis hash tags, so it is
restricted to ``[A-Za-z0-9_-]``.

Origin patterns: an entry matches the browser's ``Origin`` header in full,
never by substring; ``*`` stands for one run of ``[A-Za-z0-9-]`` (a DNS label
or a port), so ``http://localhost:*`` admits any port of localhost and
``https://*.shop.example`` any direct subdomain.

Action patterns (``allow``, ``deny``, ``authenticated``, ``required``) are
globs over action names: ``*`` any run of characters, ``?`` one character,
matched in full (``page.*`` matches ``page.visit``, not ``page``).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from msgspec import Meta

from eventwire.core.config import SessionTimings, Settings, read_toml
from eventwire.core.errors import ConfigError

SITE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
ORIGIN_RE: Final = re.compile(r"(https?)://([A-Za-z0-9*.-]+|\[[0-9a-fA-F:]+\])(:[0-9*]+)?")

#: The most partitions a site may have: each costs every reader one stream.
MAX_PARTITIONS: Final = 256

#: The server-made actions, which obey allow/deny like any other.
SERVER_ACTIONS: Final = ("session.start", "session.end", "client.identify")

Seconds = Annotated[float, Meta(gt=0)]
Glob = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.*?-]+$")]
ParamName = Annotated[str, Meta(min_length=1, max_length=128)]


class KeyConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One token verification key: an HS256 secret (by environment variable) or an RS256 PEM."""

    alg: Literal["HS256", "RS256"]
    secret_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    public_key: str | None = None

    def __post_init__(self) -> None:
        if self.alg == "HS256" and (self.secret_env is None or self.public_key is not None):
            raise ValueError("an HS256 key takes secret_env (never the secret itself)")
        if self.alg == "RS256" and (self.public_key is None or self.secret_env is not None):
            raise ValueError("an RS256 key takes public_key, the path of a PEM file")


class WriteKeyConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One Segment write key of a site, read from an environment variable (docs/protocol.md 15)."""

    secret_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class RateConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A token bucket per connection: ``burst`` events at once, ``events_per_second`` refill."""

    events_per_second: Annotated[float, Meta(gt=0)]
    burst: Annotated[int, Meta(ge=1)]
    #: A connection whose frames are all refused this long is closed 1008.
    close_after: Seconds = 10.0


class SiteConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One ``[sites.NAME]`` table."""

    origins: list[Annotated[str, Meta(min_length=1)]] = []
    allow_no_origin: bool = False
    auth: Literal["anonymous", "token"] = "anonymous"
    #: Actions taken; unset means every action not denied.
    allow: list[Glob] | None = None
    deny: list[Glob] = []
    #: Actions that need an authenticated customer.
    authenticated: list[Glob] = msgspec.field(default_factory=lambda: ["form.submit"])
    #: Params each action (glob) must carry, on top of page.visit's url.
    required: dict[Glob, list[ParamName]] = {}
    keys: list[KeyConfig] = []
    rate: RateConfig | None = None
    #: Per-site session timings, in seconds; unset means the server's settings.
    session_grace: Seconds | None = None
    session_idle: Seconds | None = None
    session_max: Seconds | None = None
    #: Streams the site's events are split over, by a stable hash of the uuid
    #: (docs/protocol.md section 7). Each partition is its own hash tag, so on a
    #: Redis Cluster the site's load spreads over up to this many masters; each
    #: costs every reader one more stream to follow and each server one more
    #: reaper call per ``reap_interval``. It cannot change while servers run.
    partitions: Annotated[int, Meta(ge=1, le=MAX_PARTITIONS)] = 1
    #: Segment write keys choosing this site on the HTTP listener (several for rotation).
    write_keys: list[WriteKeyConfig] = []
    #: Segment event names mapped to actions explicitly (wins over the derived name).
    segment_actions: dict[str, str] = {}
    #: What is kept of a visitor's address (README "Privacy"): "truncate" (IPv4 to /24,
    #: IPv6 to /48, before anything is written anywhere), "drop" (none; the country is
    #: still looked up from it first) or "keep".
    ip: Literal["truncate", "drop", "keep"] = "truncate"
    #: Connections found to be bots: "flag" (stored with ``"bot": true``), "drop"
    #: (counted, stored nowhere, acked ``denied``) or "keep" (stored as any).
    bots: Literal["flag", "drop", "keep"] = "flag"
    #: Backpressure (README "Persistence"); unset means the server's settings.
    max_backlog: Annotated[int, Meta(ge=1)] | None = None
    on_backlog: Literal["reject", "trim"] | None = None
    #: Days the store keeps an event (by its ``time``); the persist worker deletes
    #: older rows every ``retain_interval``. Unset keeps everything.
    retain_days: Annotated[float, Meta(gt=0)] | None = None


class SitesFile(msgspec.Struct, forbid_unknown_fields=True):
    """The whole sites file; each table is checked apart, so errors can name its site."""

    sites: dict[str, dict[str, Any]] = {}


class VerifyKey(msgspec.Struct, frozen=True):
    """A loaded key: the algorithm it is pinned to and the key material."""

    alg: str
    key: Any


class Verdict(msgspec.Struct, frozen=True):
    """What a site says of one action."""

    denied: bool
    needs_auth: bool
    required: tuple[str, ...]


def compile_origin(pattern: str) -> re.Pattern[str]:
    """Compile one origin pattern to a full-match regex.

    Raises:
        ValueError: the pattern is not ``scheme://host[:port]``.
    """
    if pattern != "null" and ORIGIN_RE.fullmatch(pattern) is None:
        raise ValueError(f"origin {pattern!r} is not scheme://host[:port]")
    return re.compile("".join("[A-Za-z0-9-]+" if ch == "*" else re.escape(ch) for ch in pattern))


def _globs(patterns: list[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


#: Verdicts cached per site; sites use a few dozen action names, and the cache
#: is emptied if it ever grows past this many.
_VERDICTS_MAX: Final = 4096


class SiteRules:
    """The compiled rules of one site.

    Args:
        site: the site id.
        config: its table from the sites file.
        base: the folder relative key paths are read from.
        env: where ``secret_env`` names are looked up.

    Raises:
        ConfigError: a pattern or key is wrong; the message names the key.
    """

    def __init__(
        self,
        site: str,
        config: SiteConfig,
        base: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.site = site
        self.config = config
        try:
            self._exact = frozenset(o.lower() for o in config.origins if "*" not in o)
            self._patterns = [compile_origin(o.lower()) for o in config.origins if "*" in o]
            for origin in self._exact:
                compile_origin(origin)
        except ValueError as exc:
            raise ConfigError(f"site {site!r}, key 'origins': {exc}") from None
        self._allow = _globs(config.allow) if config.allow is not None else None
        self._deny = _globs(config.deny)
        self._auth = _globs(config.authenticated)
        self._required = [
            (re.compile(fnmatch.translate(glob)), tuple(names))
            for glob, names in config.required.items()
        ]
        self.keys = [
            self._load_key(i, k, base or Path.cwd(), env) for i, k in enumerate(config.keys)
        ]
        self.write_keys = [self._load_write_key(i, k, env) for i, k in enumerate(config.write_keys)]
        if config.auth == "token" and not self.keys:
            raise ConfigError(f"site {site!r}, key 'auth': \"token\" needs at least one key")
        self._verdicts: dict[str, Verdict] = {}
        #: Which server-made events the site takes: "s" start, "e" end, "i" identify.
        self.server_events = "".join(
            flag
            for flag, action in zip("sei", SERVER_ACTIONS, strict=True)
            if not self.verdict(action).denied
        )

    def _load_key(
        self, i: int, key: KeyConfig, base: Path, env: dict[str, str] | None
    ) -> VerifyKey:
        where = f"site {self.site!r}, key 'keys[{i}]'"
        if key.alg == "HS256":
            assert key.secret_env is not None
            secret = (os.environ if env is None else env).get(key.secret_env, "")
            if len(secret) < 32:
                raise ConfigError(
                    f"{where}: environment variable {key.secret_env} must hold the HS256 "
                    "secret, at least 32 characters (256 bits, RFC 7518)"
                )
            return VerifyKey("HS256", secret.encode())
        assert key.public_key is not None
        path = Path(key.public_key)
        path = path if path.is_absolute() else base / path
        try:
            loaded = load_pem_public_key(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {path} is not a PEM public key: {exc}") from None
        if not isinstance(loaded, RSAPublicKey):
            raise ConfigError(f"{where}: {path} is not an RSA public key")
        return VerifyKey("RS256", loaded)

    def timings(self, settings: Settings) -> SessionTimings:
        """The site's session timings: its own where set, else the settings'."""
        c = self.config
        return SessionTimings.of(settings, c.session_grace, c.session_idle, c.session_max)

    def _load_write_key(self, i: int, key: WriteKeyConfig, env: dict[str, str] | None) -> bytes:
        secret = (os.environ if env is None else env).get(key.secret_env, "")
        if len(secret) < 16:
            raise ConfigError(
                f"site {self.site!r}, key 'write_keys[{i}]': environment variable "
                f"{key.secret_env} must hold the write key, at least 16 characters"
            )
        return secret.encode()

    def backlog_limit(self, settings: Settings) -> int:
        """Unacked entries per stream at which frames are refused (0: ``on_backlog = "trim"``)."""
        c = self.config
        if (c.on_backlog or settings.on_backlog) == "trim":
            return 0
        return c.max_backlog or settings.max_backlog or settings.stream_maxlen

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header (or none) may connect."""
        if origin is None:
            return self.config.allow_no_origin
        origin = origin.lower()
        return origin in self._exact or any(p.fullmatch(origin) for p in self._patterns)

    def verdict(self, action: str) -> Verdict:
        """Whether the site takes an action, whether it needs a proven customer, its params.

        Deny wins over allow; without an allow list, every action not denied is taken.
        """
        found = self._verdicts.get(action)
        if found is not None:
            return found
        denied = (self._deny is not None and self._deny.match(action) is not None) or (
            self._allow is not None and self._allow.match(action) is None
        )
        required: list[str] = []
        for pattern, names in self._required:
            if pattern.match(action):
                required += (n for n in names if n not in required)
        found = Verdict(
            denied=denied,
            needs_auth=self._auth is not None and self._auth.match(action) is not None,
            required=tuple(required),
        )
        if len(self._verdicts) >= _VERDICTS_MAX:
            self._verdicts.clear()
        self._verdicts[action] = found
        return found


def load_sites(path: Path, env: dict[str, str] | None = None) -> dict[str, SiteRules]:
    """Read and compile a sites file.

    Raises:
        ConfigError: the file is missing or wrong; the message names the site and key.
    """
    raw = read_toml(path, "sites file")
    try:
        parsed = msgspec.convert(raw, SitesFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    rules: dict[str, SiteRules] = {}
    for site, table in parsed.sites.items():
        if SITE_ID_RE.fullmatch(site) is None:
            raise ConfigError(f"{path}: site id {site!r} must be 1-64 of [A-Za-z0-9_-]")
        try:
            config = msgspec.convert(table, SiteConfig)
        except msgspec.ValidationError as exc:
            message = str(exc).replace("`$", f"`$.sites.{site}", 1)
            raise ConfigError(f"{path}: site {site!r}: {message}") from None
        try:
            rules[site] = SiteRules(site, config, path.parent, env)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if not rules:
        raise ConfigError(f"{path}: no [sites.NAME] table; nothing could connect")
    return rules


class SitesBook:
    """The current rules of every site, replaced whole on a successful reload.

    Args:
        path: the sites file.
        sites: its compiled rules, as loaded at startup.
    """

    def __init__(self, path: Path | None, sites: dict[str, SiteRules]) -> None:
        self.path = path
        self.sites = sites
        self._mtime = self._stat()
        #: Every site's partitions, kept after a reload removed the site: its
        #: connections still open must leave the keys they joined.
        self._partitions = {site: r.config.partitions for site, r in sites.items()}

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime if self.path is not None else 0.0
        except OSError:
            return 0.0

    def get(self, site: str) -> SiteRules | None:
        """A site's current rules, or None if the site is not (any more) configured."""
        return self.sites.get(site)

    def partitions(self, site: str) -> int:
        """A site's partitions, also after a reload removed it (1 for a site never loaded)."""
        return self._partitions.get(site, 1)

    def changed(self) -> bool:
        """Whether the file's modification time moved since the last (re)load."""
        return self.path is not None and self._stat() != self._mtime

    def reload(self) -> dict[str, SiteRules]:
        """Load the file again; the old rules stay if it is wrong.

        Raises:
            ConfigError: the new file is wrong (the old rules are kept).
        """
        assert self.path is not None
        self._mtime = self._stat()
        sites = load_sites(self.path)
        for site, rules in sites.items():
            old = self._partitions.get(site, rules.config.partitions)
            if old != rules.config.partitions:
                # Customers would move to other streams mid-session, and the
                # open sessions and producer seqs of the old layout would be
                # orphaned: a new layout needs every process restarted.
                raise ConfigError(
                    f"{self.path}: site {site!r}: partitions cannot change while running "
                    f"({old} -> {rules.config.partitions}); restart the servers and "
                    "readers with the new value (see docs/deploy.md)"
                )
        self._partitions.update((site, r.config.partitions) for site, r in sites.items())
        self.sites = sites
        return self.sites


def describe_sites(rules: dict[str, SiteRules], settings: Settings) -> dict[str, object]:
    """Each site's effective rules as plain data, for ``check-config`` (no secrets in it)."""
    out: dict[str, object] = {}
    for site, r in rules.items():
        described: dict[str, Any] = msgspec.to_builtins(r.config)
        timing = r.timings(settings)
        described["session_grace"] = timing.grace_ms / 1000
        described["session_idle"] = timing.idle_ms / 1000
        described["session_max"] = timing.max_ms / 1000
        described["server_events_taken"] = [a for a in SERVER_ACTIONS if not r.verdict(a).denied]
        out[site] = described
    return out
