"""eventwire/commands/cli.py: the eventwire command as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from eventwire.gateway import EventwireServer
from tests.wire import client_events

REPO = Path(__file__).resolve().parents[2]


def eventwire(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m eventwire ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "eventwire", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=30,
        check=False,
    )


def test_check_config_prints_effective_settings() -> None:
    """check-config prints settings with their sources and the sites, secrets masked."""
    out = eventwire(
        "check-config", "--listen", "0.0.0.0:9000",
        env={"EVENTWIRE_REDIS_URL": "redis://:s3cret@db:6379/0", "EVENTWIRE_MAX_BATCH": "50"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["settings"]["listen"] == "0.0.0.0:9000"
    assert config["sources"]["listen"] == "command line"
    assert config["settings"]["max_batch"] == 50
    assert config["sources"]["max_batch"] == "EVENTWIRE_MAX_BATCH"
    assert "s3cret" not in out.stdout
    assert "demo" in config["sites"]


def test_config_error_exits_2() -> None:
    """A wrong setting stops startup with exit 2 and a message naming key and source."""
    out = eventwire("serve", env={"EVENTWIRE_HELLO_TIMEOUT": "soon"})
    assert out.returncode == 2
    assert "hello_timeout" in out.stderr
    assert "EVENTWIRE_HELLO_TIMEOUT" in out.stderr


def test_missing_sites_file_exits_2(tmp_path: Path) -> None:
    """A missing sites file is named in the error."""
    out = eventwire("serve", "--sites", str(tmp_path / "nope.toml"))
    assert out.returncode == 2
    assert "nope.toml" in out.stderr


async def test_send(server: EventwireServer, redis: aioredis.Redis) -> None:
    """eventwire send stores one event and says so; a bad action is reported, exit 1."""

    async def send(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventwire", "send", "--url", f"{server.url}/v1/track/app", *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await send("--uuid", "cli-1", "product.view", 'sku="A-1"', "price=12.5")
    assert code == 0
    assert out.startswith("stored: product.view for cli-1")
    (stored,) = await client_events(redis)
    assert stored["params"] == {"sku": "A-1", "price": 12.5}
    code, _, err = await send("nodot")
    assert code == 1
    assert err.startswith("rejected invalid_action")
