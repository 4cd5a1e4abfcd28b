"""Per-site rules from ``config/sites.toml``: which sites exist and who may connect.

This module owns the sites file's schema and its compiled form. It reads the
file and does no other I/O. A site id becomes part of Redis hash tags, so it
is restricted to ``[A-Za-z0-9_-]``.

Origin patterns: an entry matches the browser's ``Origin`` header in full,
never by substring; ``*`` stands for one run of ``[A-Za-z0-9-]`` (a DNS label
or a port), so ``http://localhost:*`` admits any port of localhost and
``https://*.shop.example`` any direct subdomain.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from server.config import SessionTimings, Settings
from server.errors import ConfigError

SITE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
ORIGIN_RE: Final = re.compile(r"(https?)://([A-Za-z0-9*.-]+|\[[0-9a-fA-F:]+\])(:[0-9*]+)?")


Seconds = Annotated[float, Meta(gt=0)]


class SiteConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One ``[sites.NAME]`` table."""

    origins: list[Annotated[str, Meta(min_length=1)]] = []
    allow_no_origin: bool = False
    #: Per-site session timings, in seconds; unset means the server's settings.
    session_grace: Seconds | None = None
    session_idle: Seconds | None = None
    session_max: Seconds | None = None


class SitesFile(msgspec.Struct, forbid_unknown_fields=True):
    """The whole sites file."""

    sites: dict[str, SiteConfig] = {}


def compile_origin(pattern: str) -> re.Pattern[str]:
    """Compile one origin pattern to a full-match regex.

    Raises:
        ValueError: the pattern is not ``scheme://host[:port]``.
    """
    if pattern != "null" and ORIGIN_RE.fullmatch(pattern) is None:
        raise ValueError(f"origin {pattern!r} is not scheme://host[:port]")
    return re.compile("".join("[A-Za-z0-9-]+" if ch == "*" else re.escape(ch) for ch in pattern))


class SiteRules:
    """The compiled rules of one site.

    Args:
        site: the site id.
        config: its table from the sites file.

    Raises:
        ValueError: a pattern does not compile.
    """

    def __init__(self, site: str, config: SiteConfig) -> None:
        self.site = site
        self.config = config
        self._exact = frozenset(o.lower() for o in config.origins if "*" not in o)
        self._patterns = [compile_origin(o.lower()) for o in config.origins if "*" in o]
        for origin in self._exact:
            compile_origin(origin)

    def timings(self, settings: Settings) -> SessionTimings:
        """The site's session timings: its own where set, else the settings'."""
        c = self.config
        return SessionTimings(
            grace_ms=int((c.session_grace or settings.session_grace) * 1000),
            idle_ms=int((c.session_idle or settings.session_idle) * 1000),
            max_ms=int((c.session_max or settings.session_max) * 1000),
        )

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header (or none) may connect."""
        if origin is None:
            return self.config.allow_no_origin
        origin = origin.lower()
        return origin in self._exact or any(p.fullmatch(origin) for p in self._patterns)


def load_sites(path: Path) -> dict[str, SiteRules]:
    """Read and compile a sites file.

    Raises:
        ConfigError: the file is missing or wrong; the message names the site and key.
    """
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read sites file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        parsed = msgspec.convert(raw, SitesFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    rules: dict[str, SiteRules] = {}
    for site, config in parsed.sites.items():
        if SITE_ID_RE.fullmatch(site) is None:
            raise ConfigError(f"{path}: site id {site!r} must be 1-64 of [A-Za-z0-9_-]")
        try:
            rules[site] = SiteRules(site, config)
        except ValueError as exc:
            raise ConfigError(f"{path}: site {site!r}, key 'origins': {exc}") from None
    if not rules:
        raise ConfigError(f"{path}: no [sites.NAME] table; nothing could connect")
    return rules


def describe_sites(rules: dict[str, SiteRules]) -> dict[str, object]:
    """Each site's effective rules as plain data, for ``check-config``."""
    return {site: msgspec.to_builtins(r.config) for site, r in rules.items()}
