"""Fixtures: a private Redis for the session, in-process servers on port 0."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
import redis.asyncio as aioredis
from playwright.async_api import Browser, Page, async_playwright

from eventwire.core.config import Settings
from eventwire.core.rules import SiteConfig, SiteRules, load_sites
from eventwire.gateway import EventwireServer
from tests.procs import RedisClusterProcess, RedisProcess

SITES_TOML = """
[sites.shop]
origins = ["https://shop.example", "http://localhost:*"]
allow_no_origin = true

[sites.app]
origins = []
allow_no_origin = true

[sites.web]
origins = ["https://web.example"]
allow_no_origin = false
"""


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """One private redis-server for the whole session."""
    proc = RedisProcess().start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_cluster_proc() -> Iterator[RedisClusterProcess]:
    """One private 3-master Redis Cluster for the whole session (started on first use)."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"cluster test: {' and '.join(missing)} not installed (apt-get install redis)")
    proc = RedisClusterProcess(masters=3)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def redis(redis_proc: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's Redis, emptied before each test."""
    client = aioredis.Redis.from_url(redis_proc.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def sites_file(tmp_path: Path) -> Path:
    """A sites file with the test sites: shop (browser + apps), app (no Origin), web."""
    path = tmp_path / "sites.toml"
    path.write_text(SITES_TOML)
    return path


def build_sites() -> dict[str, SiteRules]:
    """The test sites, compiled."""
    raw = msgspec.toml.decode(SITES_TOML.encode())
    return {
        name: SiteRules(name, msgspec.convert(cfg, SiteConfig))
        for name, cfg in raw["sites"].items()
    }


MakeServer = Callable[..., Awaitable[EventwireServer]]


@pytest.fixture
async def make_server(
    redis_proc: RedisProcess, redis: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[MakeServer]:
    """Start in-process servers on port 0 with settings overrides; all stop at teardown.

    ``sites="..."`` gives the sites file's text (written to a file the server
    watches); without it the server has the test sites.
    """
    servers: list[EventwireServer] = []

    async def make(sites: str | None = None, **overrides: Any) -> EventwireServer:
        settings = msgspec.convert(
            {
                "listen": "127.0.0.1:0",
                "admin": "127.0.0.1:0",
                "http_listen": "127.0.0.1:0",
                "redis_url": redis_proc.url,
            }
            | LOOPBACK_PEERS
            | overrides,
            Settings,
        )
        if sites is None:
            server = EventwireServer(settings, build_sites())
        else:
            path = tmp_path / f"sites-{len(servers)}.toml"
            path.write_text(sites)
            server = EventwireServer(settings, load_sites(path), path)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


#: Every test client shares one address (127.0.0.1): the per-address limits are
#: lifted for them; tests of those limits set their own.
LOOPBACK_PEERS: Final = {
    "max_connections_per_ip": 1_000_000,
    "handshakes_per_ip": 1_000_000.0,
    "handshake_burst": 1_000_000,
}


@pytest.fixture
async def server(make_server: MakeServer) -> EventwireServer:
    """A server with default settings."""
    return await make_server()


CHROMIUM = "/usr/bin/chromium"
#: Debian's Chromium, headless; without the background-networking flag it
#: keeps trying to reach hosts this closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium driven by Playwright, one for the session."""
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat, once)
        pytest.skip("browser test: /usr/bin/chromium is missing (apt-get install chromium)")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page in its own browser context (own cookies and storage)."""
    context = await browser.new_context()
    page = await context.new_page()
    yield page
    await context.close()
