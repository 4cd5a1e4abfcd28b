"""The real @segment/analytics-node (npm), unmodified, from a Node script, at the listener."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from eventwire.gateway import EventwireServer
from tests.http.test_segment import KEY, client_events, shop, write_keys
from tests.procs import UNIT

__all__ = ["shop", "write_keys"]  # fixtures, used by name

NODE_DIR = Path(__file__).resolve().parent / "node"


def node_modules() -> None:
    """Install the SDK from package-lock.json (npm ci) unless it is there already."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (Debian: apt-get install nodejs npm)")
    stamp = NODE_DIR / "node_modules" / ".eventwire-installed"
    want = (NODE_DIR / "package-lock.json").read_bytes()
    if stamp.exists() and stamp.read_bytes() == want:
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        check=True,
        timeout=120,
    )
    stamp.write_bytes(want)


async def test_segment_analytics_node(shop: EventwireServer, redis: aioredis.Redis) -> None:
    """track, page, screen and identify from @segment/analytics-node land as mapped."""
    await asyncio.to_thread(node_modules)
    out = await asyncio.to_thread(
        subprocess.run,
        ["node", "send.mjs"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=30 * UNIT,
        env={**os.environ, "EW_HOST": shop.http_url or "", "EW_WRITE_KEY": KEY},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "flushed"
    found = await client_events(redis)
    assert sorted((e["uuid"], e["action"]) for e in found) == [
        ("node-1", "client.identify"),
        ("node-1", "order.completed"),
        ("node-1", "page.visit"),
        ("node-1", "screen.view"),
    ]
    order = next(e for e in found if e["action"] == "order.completed")
    assert order["params"]["revenue"] == 7
    assert order["params"]["context"]["library"]["name"] == "@segment/analytics-node"
