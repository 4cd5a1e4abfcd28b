"""eventwire/core/config.py: file, environment and flags, in that order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eventwire.core.config import describe, load_settings, mask_url
from eventwire.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_is_valid_and_complete() -> None:
    """config/eventwire.toml loads and names every setting with its default."""
    loaded = load_settings(REPO / "config" / "eventwire.toml", env={})
    text = (REPO / "config" / "eventwire.toml").read_text()
    for name in type(loaded.settings).__struct_fields__:
        assert f"\n{name} = " in text, f"{name} is not documented in config/eventwire.toml"
    assert loaded.sites_path == REPO / "config" / "sites.toml"


def test_layers(tmp_path: Path) -> None:
    """Environment overrides the file; flags override both; floats allowed for durations."""
    path = tmp_path / "ew.toml"
    path.write_text('hello_timeout = 3\nmax_batch = 100\nlisten = "127.0.0.1:1"\n')
    loaded = load_settings(
        path,
        env={"EVENTWIRE_HELLO_TIMEOUT": "0.5", "EVENTWIRE_LISTEN": "127.0.0.1:2"},
        overrides={"listen": "127.0.0.1:3"},
    )
    s = loaded.settings
    assert (s.hello_timeout, s.max_batch, s.listen) == (0.5, 100, "127.0.0.1:3")
    assert loaded.sources["hello_timeout"] == "EVENTWIRE_HELLO_TIMEOUT"
    assert loaded.sources["listen"] == "command line"
    assert loaded.sources["max_batch"] == str(path)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"EVENTWIRE_MAX_BATCH": "many"}, "'max_batch' (from EVENTWIRE_MAX_BATCH)"),
        ({"EVENTWIRE_HELLO_TIMEOUT": "-1"}, "'hello_timeout'"),
        ({"EVENTWIRE_LISTEN": "nowhere"}, "'listen'"),
        ({"EVENTWIRE_REDIS_URL": "http://x"}, "'redis_url'"),
    ],
)
def test_bad_values_name_key_and_source(env: dict[str, str], needle: str) -> None:
    """A wrong value stops startup with a message naming the key and where it came from."""
    with pytest.raises(ConfigError) as info:
        load_settings(Path(os.devnull), env=env)
    assert needle in str(info.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    """A misspelt key in the file is an error, not silently ignored."""
    path = tmp_path / "ew.toml"
    path.write_text("max_bach = 3\n")
    with pytest.raises(ConfigError, match="max_bach"):
        load_settings(path, env={})


def test_secrets_masked() -> None:
    """check-config never prints a Redis password."""
    assert mask_url("redis://:hunter2@h:1/0") == "redis://:****@h:1/0"
    loaded = load_settings(Path(os.devnull), env={"EVENTWIRE_REDIS_URL": "redis://u:pw@h:1/0"})
    assert "pw" not in str(describe(loaded))


def test_trusted_proxies_from_the_environment() -> None:
    """EVENTWIRE_TRUSTED_PROXIES is a comma-separated list; a wrong CIDR names the key."""
    env = {"EVENTWIRE_TRUSTED_PROXIES": "10.0.0.0/8, fd00::/8"}
    assert load_settings(env=env).settings.trusted_proxies == ["10.0.0.0/8", "fd00::/8"]
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(env={"EVENTWIRE_TRUSTED_PROXIES": "10.0.0.0/33"})
