"""A raw protocol peer for tests: frames by hand, so every answer can be checked."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from tests.procs import UNIT


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return int(time.time() * 1000)


def producer_id() -> str:
    """A fresh producer id."""
    return "t-" + secrets.token_hex(8)


class Peer:
    """One raw connection: JSON text frames, or MessagePack binary frames."""

    def __init__(self, ws: ClientConnection, msgpack: bool) -> None:
        self.ws = ws
        self.msgpack = msgpack

    async def send(self, msg: Any) -> None:
        """Send one message (a dict, or raw str/bytes as they are)."""
        if isinstance(msg, str | bytes):
            await self.ws.send(msg)
        elif self.msgpack:
            await self.ws.send(msgspec.msgpack.encode(msg))
        else:
            await self.ws.send(json.dumps(msg))

    async def recv(self, wait: float = 5) -> dict[str, Any]:
        """Receive and decode one message."""
        data = await asyncio.wait_for(self.ws.recv(), wait * UNIT)
        out: dict[str, Any] = (
            msgspec.msgpack.decode(data) if isinstance(data, bytes) else json.loads(data)
        )
        return out

    async def hello(
        self, uuid: str = "u-1", producer: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        """Say hello and return the welcome."""
        await self.send(
            {"type": "hello", "uuid": uuid, "producer": producer or producer_id(), **extra}
        )
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    async def track(self, *events: dict[str, Any]) -> dict[str, Any]:
        """Send one track frame and return its answer."""
        await self.send({"type": "track", "events": list(events)})
        return await self.recv()


@asynccontextmanager
async def peer(
    url: str,
    site: str = "app",
    msgpack: bool = False,
    subprotocol: str | None = "default",
    origin: str | None = None,
) -> AsyncIterator[Peer]:
    """Connect a raw peer to ``url``/v1/track/``site``."""
    if subprotocol == "default":
        subprotocol = "eventwire.v1.msgpack" if msgpack else "eventwire.v1.json"
    async with connect(
        f"{url}/v1/track/{site}",
        subprotocols=[Subprotocol(subprotocol)] if subprotocol else None,
        origin=Origin(origin) if origin else None,
        compression=None,
        proxy=None,
        open_timeout=5 * UNIT,
    ) as ws:
        yield Peer(ws, msgpack)


def event(seq: int, action: str = "product.view", **fields: Any) -> dict[str, Any]:
    """A wire event with a sku param."""
    return {"seq": seq, "action": action, "params": {"sku": f"S{seq}"}, **fields}


async def stream(redis: aioredis.Redis, key: str) -> list[dict[str, Any]]:
    """Every record of a stream, decoded; asserts the single ``event`` field."""
    out = []
    for _id, fields in await redis.xrange(key):
        assert list(fields) == [b"event"], fields
        out.append(json.loads(fields[b"event"]))
    return out


async def client_events(redis: aioredis.Redis, site: str = "app") -> list[dict[str, Any]]:
    """The events of a site's stream that clients sent (not server-made)."""
    return [
        e
        for e in await stream(redis, f"ew:{{{site}}}:events")
        if not e["producer"].startswith("srv:")
    ]
