"""Who connects: the client address, User-Agent, language, country and bot verdict, no I/O.

This module owns what a connection says about its visitor and what may be
kept of it (README "Privacy", docs/protocol.md section 18). The gateway and
the HTTP listener read the handshake's headers and peer address once
(:meth:`Enrichment.visitor`); the connection's protocol turns that into the
``client`` object of ``session.start`` at hello (:func:`client_info`),
applying the site's ``ip`` and ``bots`` settings. Nothing here runs per
event.

- The client address is the peer's, or, when the peer is one of
  ``trusted_proxies``, the last hop of ``Forwarded`` / ``X-Forwarded-For``
  that is not a trusted proxy (hops to the right of it were added by
  proxies the operator runs; the ones to its left are the client's word).
- The raw address lives only in memory (:class:`Visitor`, per connection,
  and the per-address limits' tables); :func:`ip_policy` makes what may be
  written before anything is.
- User-Agents are parsed by ``ua-parser`` (its shipped regexes) and
  ``user-agents-ng`` (the desktop / mobile / tablet split), and checked
  against CrawlerDetect's maintained crawler list (``crawlerdetect``); each
  distinct string once per process (:func:`user_agent_info`, cached).
- Countries come from ``iptocc`` (the five registries' allocation data, in
  the wheel), or from a MaxMind-format file (``geoip_db``, read with
  ``maxminddb``) that also gives region and city.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

import iptocc
import msgspec
import ua_parser
from crawlerdetect import CrawlerDetect
from user_agents import parse as parse_device

from eventwire.core.errors import ConfigError

IpPolicy = Literal["truncate", "drop", "keep"]
Device = Literal["desktop", "mobile", "tablet", "bot", "other"]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Prefix lengths an address is cut to under ``ip = "truncate"``.
IPV4_PREFIX: Final = 24
IPV6_PREFIX: Final = 48
#: Distinct User-Agents whose parse is kept per process (~1 KiB each).
USER_AGENT_CACHE: Final = 4096
#: Distinct ``client`` objects shared by the connections that have them (~0.3 KiB each).
CLIENT_CACHE: Final = 4096
#: The longest User-Agent parsed; longer ones are cut (regexes on hostile input).
USER_AGENT_MAX: Final = 512
#: A language tag as ``Accept-Language`` carries it (BCP 47, loosely).
_LANGUAGE_RE: Final = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8}){0,4}")


class Visitor(msgspec.Struct, frozen=True, gc=False):
    """What one connection's handshake says about its visitor (in memory only).

    ``address`` is the raw client address: never written anywhere as it
    is; :func:`client_info` applies the site's ``ip`` policy to it.
    """

    address: str
    user_agent: str
    language: str | None
    #: ``Sec-CH-UA-Mobile`` said ``?1``.
    hint_mobile: bool = False
    country: str | None = None
    region: str | None = None
    city: str | None = None


class UserAgentInfo(msgspec.Struct, frozen=True, gc=False):
    """One User-Agent string parsed: browser, OS, device class, crawler verdict."""

    browser: str | None
    browser_version: str | None
    os: str | None
    os_version: str | None
    device: Device
    bot_reason: str | None


class ClientInfo(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    """The ``client`` object of ``session.start`` (docs/protocol.md section 18).

    ``device`` and ``bot`` are always there; every other field is left
    out when unknown (or, for ``ip``, when the site's policy is ``drop``).
    Frozen: connections with the same client share one (:func:`client_info`).
    """

    device: Device
    bot: bool
    bot_reason: str | None = None
    ip: str | None = None
    country: str | None = None
    region: str | None = None
    city: str | None = None
    browser: str | None = None
    browser_version: str | None = None
    os: str | None = None
    os_version: str | None = None
    language: str | None = None


def parse_address(text: str) -> Address | None:
    """An address from a peer or header value (``[v6]:port``, ``v4:port`` too), or None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_hops(forwarded: str | None, forwarded_for: str | None) -> list[str]:
    """The client-to-proxy hops a request names, nearest the client first.

    ``Forwarded`` (RFC 7239) wins over ``X-Forwarded-For`` when both are sent.
    """
    if forwarded:
        hops: list[str] = []
        for element in forwarded.split(","):
            for pair in element.split(";"):
                name, _, value = pair.partition("=")
                if name.strip().lower() == "for":
                    hops.append(value.strip())
        return hops
    if forwarded_for:
        return [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    return []


def client_address(
    peer: str,
    forwarded: str | None,
    forwarded_for: str | None,
    trusted: tuple[Network, ...],
) -> str:
    """The client's address: the peer's, or the last untrusted hop a trusted proxy names.

    Hops are walked from the proxy nearest this server back towards the
    client; the first that is not a trusted proxy is the client. A hop that
    is not an address (``unknown``, an obfuscated name) stops the walk:
    the last trusted hop before it is the best known.
    """
    address = parse_address(peer)
    if address is None or not trusted or not _inside(address, trusted):
        return str(address) if address is not None else peer
    best = address
    for hop in reversed(forwarded_hops(forwarded, forwarded_for)):
        named = parse_address(hop)
        if named is None:
            break
        best = named
        if not _inside(named, trusted):
            break
    return str(best)


def _inside(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def ip_policy(address: str, policy: IpPolicy) -> str | None:
    """What may be written of an address: cut to its /24 or /48, nothing, or all of it."""
    if policy == "drop" or not address:
        return None
    if policy == "keep":
        return address
    parsed = parse_address(address)
    if parsed is None:
        return None
    prefix = IPV4_PREFIX if parsed.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{parsed}/{prefix}", strict=False).network_address)


def first_language(accept_language: str | None) -> str | None:
    """The first language range of ``Accept-Language`` (``*`` and junk give None)."""
    if not accept_language:
        return None
    first = accept_language.split(",", 1)[0].split(";", 1)[0].strip()
    return first if _LANGUAGE_RE.fullmatch(first) else None


_crawlers: Final = CrawlerDetect()


def _version(*parts: str | None) -> str | None:
    shown = [p for p in parts if p]
    return ".".join(shown) if shown else None


def user_agent_info(user_agent: str) -> UserAgentInfo:
    """Parse one User-Agent (cached per distinct string, :data:`USER_AGENT_CACHE` kept).

    Only its first :data:`USER_AGENT_MAX` characters are read, and kept as the
    cache's key: the cache holds at most ~2 MiB of keys whatever is sent.
    """
    return _parse_user_agent(user_agent[:USER_AGENT_MAX])


@functools.lru_cache(maxsize=USER_AGENT_CACHE)
def _parse_user_agent(text: str) -> UserAgentInfo:
    crawler = _crawlers.is_crawler(text)
    reason = f"user agent on the crawler list ({_crawlers.get_matches()})" if crawler else None
    parsed = ua_parser.parse(text)
    agent, system, device = parsed.user_agent, parsed.os, parsed.device
    if reason is None and device is not None and device.family == "Spider":
        reason = f"user agent parsed as a crawler ({agent.family if agent else 'Spider'})"
    kind: Device
    if reason is not None:
        kind = "bot"
    else:
        shape = parse_device(text)
        kind = (
            "tablet"
            if shape.is_tablet
            else "mobile"
            if shape.is_mobile
            else "desktop"
            if shape.is_pc
            else "other"
        )
    return UserAgentInfo(
        browser=agent.family if agent is not None and agent.family != "Other" else None,
        browser_version=_version(agent.major, agent.minor, agent.patch) if agent else None,
        os=system.family if system is not None and system.family != "Other" else None,
        os_version=_version(system.major, system.minor, system.patch) if system else None,
        device=kind,
        bot_reason=reason,
    )


class Enrichment:
    """The process' visitor lookups: trusted proxies, the country database.

    Args:
        trusted_proxies: CIDRs whose forwarding headers are believed.
        geoip_db: a MaxMind-format file, or "" for the shipped country table.

    Raises:
        ConfigError: a CIDR is wrong, or the database cannot be read.
    """

    def __init__(self, trusted_proxies: list[str], geoip_db: str = "") -> None:
        try:
            self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"setting 'trusted_proxies': {exc}") from None
        self._reader: Any = None
        if geoip_db:
            import maxminddb  # only with geoip_db: a memory map of the file

            try:
                self._reader = maxminddb.open_database(geoip_db)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"setting 'geoip_db': cannot read {geoip_db}: {exc}") from None

    def close(self) -> None:
        """Release the database file, if one is open."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def address_of(self, peer: str, headers: Mapping[str, str]) -> str:
        """The client address of a request from ``peer`` with these headers."""
        if not self.trusted:
            address = parse_address(peer)
            return str(address) if address is not None else peer
        return client_address(
            peer, headers.get("Forwarded"), headers.get("X-Forwarded-For"), self.trusted
        )

    def visitor(self, address: str, headers: Mapping[str, str]) -> Visitor:
        """What the handshake says: the address, its place, the User-Agent, the language."""
        country = region = city = None
        if self._reader is not None:
            country, region, city = self._place(address)
        elif address:
            try:
                country = iptocc.country_code(address)
            except ValueError:
                country = None
        return Visitor(
            address=address,
            user_agent=headers.get("User-Agent", ""),
            language=first_language(headers.get("Accept-Language")),
            hint_mobile=headers.get("Sec-CH-UA-Mobile", "").strip() == "?1",
            country=country,
            region=region,
            city=city,
        )

    def _place(self, address: str) -> tuple[str | None, str | None, str | None]:
        try:
            record = self._reader.get(address)
        except ValueError:
            return None, None, None
        if not isinstance(record, dict):
            return None, None, None
        country = record.get("country") or record.get("registered_country") or {}
        code = country.get("iso_code") if isinstance(country, dict) else None
        subdivisions = record.get("subdivisions") or [{}]
        region = subdivisions[0].get("iso_code") if isinstance(subdivisions[0], dict) else None
        names = (record.get("city") or {}).get("names") or {}
        return code, region, names.get("en")


def client_info(
    visitor: Visitor,
    policy: IpPolicy,
    context: Mapping[str, Any] | None,
    browser_site: bool,
) -> ClientInfo:
    """The ``client`` object of a connection's ``session.start``, under the site's ``ip`` policy.

    Args:
        visitor: the handshake's visitor.
        policy: the site's ``ip`` setting.
        context: the hello's context (``"webdriver": true`` marks automation).
        browser_site: the site refuses connections without an ``Origin``
            (``allow_no_origin = false``): a client without a User-Agent there
            is no browser, so a bot.
    """
    agent = user_agent_info(visitor.user_agent) if visitor.user_agent else None
    reason = agent.bot_reason if agent is not None else None
    if reason is None and context is not None and context.get("webdriver") is True:
        reason = "navigator.webdriver is true (browser automation)"
    if reason is None and agent is None and browser_site:
        reason = "no User-Agent on a site that takes browsers only"
    device: Device = "bot" if reason is not None else agent.device if agent else "other"
    if device in ("desktop", "other") and visitor.hint_mobile:
        device = "mobile"
    client = ClientInfo(
        device=device,
        bot=reason is not None,
        bot_reason=reason,
        ip=ip_policy(visitor.address, policy),
        country=visitor.country,
        region=visitor.region,
        city=visitor.city,
        browser=agent.browser if agent else None,
        browser_version=agent.browser_version if agent else None,
        os=agent.os if agent else None,
        os_version=agent.os_version if agent else None,
        language=visitor.language,
    )
    # Connections with the same client (browser, /24, country, language) share
    # one object for as long as they keep it; a raw address (ip = "keep") is
    # not kept past its connection.
    return client if policy == "keep" else _shared_client(client)


@functools.lru_cache(maxsize=CLIENT_CACHE)
def _shared_client(client: ClientInfo) -> ClientInfo:
    return client
