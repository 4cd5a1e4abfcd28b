"""server/rules.py: the sites file and origin matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import ConfigError
from server.rules import SiteConfig, SiteRules, load_sites


def rules(*origins: str, allow_no_origin: bool = False) -> SiteRules:
    return SiteRules("shop", SiteConfig(origins=list(origins), allow_no_origin=allow_no_origin))


def test_exact_origin_matches_in_full() -> None:
    """An exact origin matches itself only, never by prefix or substring."""
    r = rules("https://shop.example")
    assert r.origin_allowed("https://shop.example")
    assert r.origin_allowed("HTTPS://SHOP.EXAMPLE")
    assert not r.origin_allowed("https://shop.example.evil.com")
    assert not r.origin_allowed("https://evilshop.example")
    assert not r.origin_allowed("http://shop.example")


def test_port_wildcard() -> None:
    """http://localhost:* admits any port of localhost and nothing else."""
    r = rules("http://localhost:*")
    assert r.origin_allowed("http://localhost:3000")
    assert not r.origin_allowed("http://localhost")
    assert not r.origin_allowed("http://localhost:3000.evil.com")
    assert not r.origin_allowed("http://localhost.evil.com:80")


def test_subdomain_wildcard() -> None:
    """https://*.shop.example admits one subdomain label."""
    r = rules("https://*.shop.example")
    assert r.origin_allowed("https://www.shop.example")
    assert not r.origin_allowed("https://shop.example")
    assert not r.origin_allowed("https://a.b.shop.example")
    assert not r.origin_allowed("https://evil.com/.shop.example")


def test_no_origin() -> None:
    """A handshake without Origin is allowed only with allow_no_origin."""
    assert not rules("https://shop.example").origin_allowed(None)
    assert rules(allow_no_origin=True).origin_allowed(None)


def test_load_sites(tmp_path: Path) -> None:
    """A valid file compiles every site."""
    path = tmp_path / "sites.toml"
    path.write_text(
        '[sites.a]\norigins = ["http://localhost:*"]\n[sites.b]\nallow_no_origin = true\n'
    )
    loaded = load_sites(path)
    assert sorted(loaded) == ["a", "b"]
    assert loaded["b"].origin_allowed(None)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[sites.a]\norigins = ["localhost"]\n', "site 'a', key 'origins'"),
        ("[sites.a]\norigin = []\n", "unknown field `origin`"),
        ('[sites."a{b}"]\n', "site id 'a{b}'"),
        ("[sites.a]\nallow_no_origin = 3\n", "allow_no_origin"),
        ("", "no [sites.NAME] table"),
        ("[sites.a\n", "not valid TOML"),
    ],
)
def test_bad_sites_file(tmp_path: Path, text: str, needle: str) -> None:
    """A wrong sites file is refused with a message naming the site and key."""
    path = tmp_path / "sites.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sites(path)
    assert needle in str(info.value)
