"""core/visitor and core/peers: addresses, the ip policy, User-Agents, bots, per-address limits."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from eventwire.core.errors import ConfigError
from eventwire.core.peers import PeerLimits
from eventwire.core.visitor import (
    Enrichment,
    Visitor,
    client_address,
    client_info,
    first_language,
    ip_policy,
    user_agent_info,
)

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
IPAD = (
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/16.6 Mobile/15E148 Safari/604.1"
)
PHANTOM = (
    "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) "
    "PhantomJS/2.1.1 Safari/538.1"
)


@pytest.mark.parametrize(
    ("peer", "forwarded", "xff", "want"),
    [
        ("1.2.3.4", None, "9.9.9.9", "1.2.3.4"),  # an untrusted peer's header is ignored
        ("10.0.0.1", None, "9.9.9.9", "9.9.9.9"),
        ("10.0.0.1", None, "6.6.6.6, 9.9.9.9, 10.0.0.2", "9.9.9.9"),  # the last untrusted hop
        ("10.0.0.1", None, "10.0.0.3", "10.0.0.3"),  # every hop trusted: the first one
        ("10.0.0.1", None, None, "10.0.0.1"),
        ("10.0.0.1", None, "junk, 9.9.9.9", "9.9.9.9"),
        ("10.0.0.1", None, "9.9.9.9, junk", "10.0.0.1"),  # a hop we cannot read stops the walk
        (
            "10.0.0.1",
            'for=192.0.2.60;proto=https, for="[2001:db8::17]:4711"',
            "1.1.1.1",
            "2001:db8::17",
        ),
        ("::1", None, "9.9.9.9:5555", "9.9.9.9"),
        ("::ffff:10.0.0.1", None, "9.9.9.9", "9.9.9.9"),  # a v4-mapped peer is the v4 address
    ],
)
def test_client_address(peer: str, forwarded: str | None, xff: str | None, want: str) -> None:
    """Forwarding headers are believed only from trusted proxies, walked from the right."""
    assert client_address(peer, forwarded, xff, TRUSTED) == want


def test_ip_policy() -> None:
    """truncate cuts IPv4 to /24 and IPv6 to /48; drop keeps nothing; keep all."""
    assert ip_policy("203.0.113.77", "truncate") == "203.0.113.0"
    assert ip_policy("2001:db8:abcd:12:1::9", "truncate") == "2001:db8:abcd::"
    assert ip_policy("::ffff:203.0.113.77", "truncate") == "203.0.113.0"
    assert ip_policy("203.0.113.77", "drop") is None
    assert ip_policy("203.0.113.77", "keep") == "203.0.113.77"
    assert ip_policy("not an address", "truncate") is None


def test_first_language() -> None:
    """The first range of Accept-Language; a wildcard or junk is none."""
    assert first_language("de-CH,de;q=0.9,en;q=0.8") == "de-CH"
    assert first_language("*") is None
    assert first_language("<script>") is None
    assert first_language(None) is None


def test_user_agents_parsed_and_cached() -> None:
    """Browser, OS and device class come from ua-parser; a crawler is a bot; each UA once."""
    chrome = user_agent_info(CHROME)
    assert (chrome.browser, chrome.os, chrome.device, chrome.bot_reason) == (
        "Chrome",
        "Windows",
        "desktop",
        None,
    )
    assert user_agent_info(IPAD).device == "tablet"
    phantom = user_agent_info(PHANTOM)
    assert phantom.device == "bot"
    assert "PhantomJS" in (phantom.bot_reason or "")
    assert user_agent_info(CHROME) is chrome  # cached per distinct string
    assert user_agent_info("python-requests/2.31").device == "bot"


def test_same_clients_share_one_frozen_object() -> None:
    """Visitors alike (browser, /24, language) share a client; it cannot be changed.

    A raw address (``ip = "keep"``) is never kept in the shared table, and
    visitors that differ in anything written get clients of their own.
    """
    one = Visitor(address="8.8.4.4", user_agent=CHROME, language="en", country="US")
    other = Visitor(address="8.8.4.200", user_agent=CHROME, language="en", country="US")
    shared = client_info(one, "truncate", None, browser_site=True)
    assert client_info(other, "truncate", None, browser_site=True) is shared
    with pytest.raises(AttributeError):
        shared.ip = "8.8.4.4"  # type: ignore[misc]
    assert shared.ip == "8.8.4.0"
    german = Visitor(address="8.8.4.4", user_agent=CHROME, language="de", country="US")
    assert client_info(german, "truncate", None, browser_site=True).language == "de"
    assert shared.language == "en"
    bot = client_info(one, "truncate", {"webdriver": True}, browser_site=True)
    assert bot is not shared
    assert (bot.bot, shared.bot) == (True, False)
    kept = client_info(one, "keep", None, browser_site=True)
    assert kept.ip == "8.8.4.4"
    assert client_info(one, "keep", None, browser_site=True) is not kept


def test_client_info_bot_rules() -> None:
    """webdriver, and no User-Agent on a browser site, make a bot; client hints say mobile."""
    human = Visitor(address="8.8.4.4", user_agent=CHROME, language="en", country="US")
    info = client_info(human, "truncate", None, browser_site=True)
    assert (info.bot, info.ip, info.country, info.language) == (False, "8.8.4.0", "US", "en")
    assert client_info(human, "drop", {"webdriver": True}, True).bot_reason is not None
    assert client_info(human, "drop", {"webdriver": "yes"}, True).bot is False
    bare = Visitor(address="8.8.4.4", user_agent="", language=None)
    assert client_info(bare, "keep", None, browser_site=True).bot is True
    assert client_info(bare, "keep", None, browser_site=False).bot is False
    hinted = Visitor(address="", user_agent="SomeApp/1.0", language=None, hint_mobile=True)
    assert client_info(hinted, "keep", None, False).device == "mobile"


def test_country_from_the_shipped_table() -> None:
    """Without geoip_db the country comes from iptocc's registry data."""
    enrichment = Enrichment([])
    assert enrichment.visitor("8.8.8.8", {}).country == "US"
    assert enrichment.visitor("127.0.0.1", {}).country is None
    assert enrichment.visitor("", {}).country is None


def test_geoip_db_gives_country_region_city(tmp_path: Path) -> None:
    """A MaxMind-format file (geoip_db) gives country, region and city."""
    from mmdb_writer import MMDBWriter  # type: ignore[import-untyped]
    from netaddr import IPSet  # type: ignore[import-untyped]

    writer = MMDBWriter(ip_version=6, database_type="GeoIP2-City", ipv4_compatible=True)
    record = {
        "country": {"iso_code": "CH"},
        "subdivisions": [{"iso_code": "ZH"}],
        "city": {"names": {"en": "Zurich"}},
    }
    writer.insert_network(IPSet(["198.51.100.0/24"]), record)
    path = tmp_path / "city.mmdb"
    writer.to_db_file(str(path))
    enrichment = Enrichment([], str(path))
    try:
        found = enrichment.visitor("198.51.100.7", {})
        assert (found.country, found.region, found.city) == ("CH", "ZH", "Zurich")
        assert enrichment.visitor("192.0.2.1", {}).country is None
    finally:
        enrichment.close()
    with pytest.raises(ConfigError, match="geoip_db"):
        Enrichment([], str(tmp_path / "missing.mmdb"))
    with pytest.raises(ConfigError, match="trusted_proxies"):
        Enrichment(["10.0.0.0/33"])


def test_peer_limits() -> None:
    """Connections per address and a handshake bucket per address."""
    limits = PeerLimits(max_connections=2, per_second=1.0, burst=3)
    for _ in range(2):
        assert limits.admit("a", 0) is None
        limits.opened("a")
    refused = limits.admit("a", 0)
    assert refused is not None
    assert "max_connections_per_ip" in refused[0]
    assert limits.admit("b", 0) is None  # another address is not held back
    limits.closed("a")
    assert limits.admit("a", 0) is None  # the third handshake of the burst
    refused = limits.admit("a", 0)
    assert refused is not None
    assert "handshakes_per_ip" in refused[0]
    assert refused[1] == pytest.approx(1.0)
    assert limits.admit("a", 1000) is None  # one second refills one
    limits.closed("a")
    limits.closed("a")
    assert limits.open == {}
    # IPv6: one /64 is one address.
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2"):
        assert limits.admit(host, 0) is None
        limits.opened(host)
    refused = limits.admit("2001:db8:1:2:ffff::3", 0)
    assert refused is not None
    assert limits.admit("2001:db8:1:3::1", 0) is None
    assert limits.open == {"2001:db8:1:2::/64": 2}
