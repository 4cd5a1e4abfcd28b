"""eventwire/core/rules.py: the sites file and origin matching."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from eventwire.core.errors import ConfigError
from eventwire.core.rules import SiteConfig, SiteRules, load_sites


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


def site(
    env: dict[str, str] | None = None, base: Path | None = None, **config: object
) -> SiteRules:
    return SiteRules("shop", msgspec.convert(config, SiteConfig), base, env)


def test_allow_and_deny() -> None:
    """Deny wins over allow; an allow list refuses what it does not name."""
    r = site(allow=["page.*", "product.*", "form.submit"], deny=["product.secret", "debug.*"])
    assert not r.verdict("page.visit").denied
    assert not r.verdict("product.view").denied
    assert r.verdict("product.secret").denied
    assert r.verdict("cart.add").denied
    assert r.verdict("debug.dump").denied
    assert not site(deny=["debug.*"]).verdict("cart.add").denied


def test_required_and_authenticated() -> None:
    """Required params merge over every matching glob; form.submit needs a customer by default."""
    r = site(required={"product.*": ["sku"], "product.buy": ["price", "sku"]})
    assert r.verdict("product.buy").required == ("sku", "price")
    assert r.verdict("page.visit").required == ()
    assert r.verdict("form.submit").needs_auth
    assert not site(authenticated=[]).verdict("form.submit").needs_auth


def test_server_events_obey_rules() -> None:
    """Server-made events are taken or not like any action."""
    assert site().server_events == "sei"
    assert site(deny=["session.*"]).server_events == "i"
    assert site(allow=["page.*", "session.end"]).server_events == "e"


def test_keys(tmp_path: Path) -> None:
    """HS256 secrets come from the environment, RS256 keys from PEM files."""
    from tests.keys import SECRET, write_public_pem

    pem = write_public_pem(tmp_path)
    r = site(
        env={"SHOP_SECRET": SECRET},
        base=tmp_path,
        auth="token",
        keys=[
            {"alg": "HS256", "secret_env": "SHOP_SECRET"},
            {"alg": "RS256", "public_key": pem.name},
        ],
    )
    assert [k.alg for k in r.keys] == ["HS256", "RS256"]


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"auth": "token"}, "'auth': \"token\" needs at least one key"),
        ({"keys": [{"alg": "HS256", "secret_env": "NOPE_UNSET"}]}, "NOPE_UNSET must hold"),
        ({"keys": [{"alg": "HS256", "secret_env": "SHORT"}]}, "at least 32"),
        ({"keys": [{"alg": "RS256", "public_key": "missing.pem"}]}, "keys[0]': cannot read"),
        ({"keys": [{"alg": "RS256", "public_key": "bad.pem"}]}, "is not a PEM public key"),
    ],
)
def test_bad_keys(tmp_path: Path, config: dict[str, object], needle: str) -> None:
    """A key that cannot be loaded is an error naming the site and the key."""
    (tmp_path / "bad.pem").write_text(
        "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(ConfigError) as info:
        site(env={"SHORT": "tiny"}, base=tmp_path, **config)
    assert "site 'shop'" in str(info.value)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[sites.a]\ndeny = ["bad glob!"]\n', "$.sites.a.deny[0]"),
        ('[sites.a]\nauth = "maybe"\n', "$.sites.a.auth"),
        ('[sites.a]\nkeys = [{alg = "HS512", secret_env = "X"}]\n', "$.sites.a.keys[0].alg"),
        ('[sites.a]\nkeys = [{alg = "HS256", public_key = "k.pem"}]\n', "secret_env"),
        ("[sites.a]\nrate = {events_per_second = 0, burst = 1}\n", "$.sites.a.rate"),
        ('[sites.a.required]\n"p.*" = "sku"\n', "site 'a': Expected `array`"),
    ],
)
def test_bad_rules_name_site_and_key(tmp_path: Path, text: str, needle: str) -> None:
    """Wrong rules in the file are refused with the site and key in the message."""
    path = tmp_path / "sites.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sites(path)
    assert needle in str(info.value)


def test_shipped_sites_and_example(tmp_path: Path) -> None:
    """config/sites.toml loads, and its commented shop example is a valid site too."""
    from tests.keys import SECRET, write_public_pem

    shipped = Path(__file__).resolve().parents[2] / "config" / "sites.toml"
    assert "demo" in load_sites(shipped)
    example = "\n".join(
        line[2:] for line in shipped.read_text().splitlines() if line.startswith("# ")
    )
    example = example[example.index("[sites.shop]") :]
    (tmp_path / "keys").mkdir()
    write_public_pem(tmp_path / "keys").rename(tmp_path / "keys" / "shop.pem")
    path = tmp_path / "sites.toml"
    path.write_text(example)
    env = {"SHOP_JWT_SECRET": SECRET, "SHOP_WRITE_KEY": "shop-write-key-0123456789"}
    rules = load_sites(path, env=env)["shop"]
    assert rules.write_keys == [b"shop-write-key-0123456789"]
    assert rules.config.segment_actions == {"Order Completed": "order.purchase"}
    assert rules.verdict("cart.add").required == ("sku", "quantity")
    assert rules.verdict("debug.x").denied
    assert rules.config.rate is not None
