"""The benchmark row ``naive``: the Python server a user would write first.

It speaks the same subset of the v1 protocol (docs/protocol.md) as
``common.js``, JSON only: ``websockets`` (the new asyncio API) with
``redis.asyncio`` and the standard ``json`` module, one awaited ``XADD`` per
event and one ack per frame. It is deliberately plain: no uvloop, no
pipelining, no de-duplication (``welcome.acked`` and ``duplicate`` are always
0). It imports nothing from ``server/``.

Env: PORT (8790), HOST (127.0.0.1), REDIS_URL (redis://127.0.0.1:6390/0),
SITES (bench), ORIGINS (http://localhost), ALLOW_NO_ORIGIN (1), KEY_PREFIX
(ew), STREAM_MAXLEN (1000000).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, Final

import redis.asyncio as redis
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Origin, Subprotocol

PORT: Final = int(os.environ.get("PORT", "8790"))
HOST: Final = os.environ.get("HOST", "127.0.0.1")
SITES: Final = set(filter(None, os.environ.get("SITES", "bench").split(",")))
ORIGINS: Final[list[Origin | None]] = [
    Origin(o) for o in os.environ.get("ORIGINS", "http://localhost").split(",") if o
]
if os.environ.get("ALLOW_NO_ORIGIN", "1") == "1":
    ORIGINS.append(None)
PREFIX: Final = os.environ.get("KEY_PREFIX", "ew")
MAXLEN: Final = int(os.environ.get("STREAM_MAXLEN", "1000000"))
MAX_BATCH: Final = 500
MAX_EVENT_BYTES: Final = 32 * 1024
MAX_SKEW_MS: Final = 5 * 60 * 1000
MAX_AGE_MS: Final = 7 * 24 * 3600 * 1000
JSON_SUBPROTOCOL: Final = Subprotocol("eventwire.v1.json")
ACTION_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$")
UUID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
PATH_RE: Final = re.compile(r"^/v1/track/([^/?#]+)(?:\?.*)?$")

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6390/0"))


def is_int(value: object) -> bool:
    """Whether ``value`` is a JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def build_event(
    conn: dict[str, str], event: object, received: int
) -> tuple[int, str] | tuple[None, tuple[str, str]]:
    """``(seq, stored JSON)`` for a valid event, or ``(None, (code, detail))``."""
    if not isinstance(event, dict):
        return None, ("invalid", "event must be an object")
    seq = event.get("seq")
    if not is_int(seq) or seq < 1:
        return None, ("invalid", "seq must be an integer >= 1")
    action = event.get("action")
    if not isinstance(action, str) or not 3 <= len(action) <= 32 or not ACTION_RE.match(action):
        return None, ("invalid_action", "action must be context.activity, 3-32 chars")
    params = event.get("params")  # optional fields: absent or null means the default
    params = {} if params is None else params
    if not isinstance(params, dict):
        return None, ("invalid", "params must be an object")
    label = event.get("label")
    if label is None:
        title = params.get("title", params.get("url"))
        label = f"Visited page {title}" if action == "page.visit" else action
    elif not isinstance(label, str) or len(label) > 256:
        return None, ("invalid", "label must be a string of at most 256 chars")
    t = event.get("time")
    t = received if t is None else t
    stored: dict[str, Any] = {
        "site": conn["site"],
        "uuid": conn["uuid"],
        "session": conn["session"],
        "producer": conn["producer"],
        "seq": seq,
        "action": action,
        "label": label,
    }
    if not is_int(t):
        return None, ("invalid", "time must be integer milliseconds")
    if t > received + MAX_SKEW_MS:
        stored["original_time"] = t
        t = received
    elif t < received - MAX_AGE_MS:
        return None, ("too_old", "event older than 7 days")
    if action == "page.visit" and not isinstance(params.get("url"), str):
        return None, ("missing_param", "page.visit requires params.url")
    stored.update(time=t, received=received, params=params)
    data = json.dumps(stored)
    if len(data.encode()) > MAX_EVENT_BYTES:
        return None, ("too_large", f"encoded event over {MAX_EVENT_BYTES} bytes")
    return seq, data


def select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """JSON, also when nothing is offered.

    websockets' default answers 400 to a client that offers no subprotocol;
    the protocol says that means JSON.
    """
    return JSON_SUBPROTOCOL if JSON_SUBPROTOCOL in offered else None


def process_request(connection: ServerConnection, request: Request) -> Response | None:
    """404 for anything but ``/v1/track/{site}`` of a known site."""
    match = PATH_RE.match(request.path)
    if not match or match.group(1) not in SITES:
        return connection.respond(HTTPStatus.NOT_FOUND, "unknown site\n")
    return None


def highest_seq(events: list[Any]) -> int:
    """The frame's highest integer seq (what its ack or nack answers); 0 if none."""
    seqs = [e.get("seq") for e in events if isinstance(e, dict)]
    return max((s for s in seqs if isinstance(s, int) and is_int(s)), default=0)


async def store_frame(
    conn: dict[str, str], events: list[Any], keys: tuple[str, str]
) -> tuple[int, list[dict[str, Any]]]:
    """XADD each event in turn; returns (accepted, rejections)."""
    events_key, rejected_key = keys
    received = int(time.time() * 1000)
    accepted = 0
    rejected: list[dict[str, Any]] = []
    for e in events:
        seq = e.get("seq") if isinstance(e, dict) else None
        _, data = build_event(conn, e, received)
        if isinstance(data, str):
            await r.xadd(events_key, {"event": data}, maxlen=MAXLEN, approximate=True)
            accepted += 1
            continue
        code, detail = data
        rejected.append({"seq": seq if is_int(seq) else None, "code": code, "detail": detail})
        record: dict[str, Any] = {"site": conn["site"], "uuid": conn["uuid"]}
        record["producer"] = conn["producer"]
        record.update(seq=rejected[-1]["seq"], code=code, detail=detail, received=received)
        record["raw"] = json.dumps(e)[:4096]
        await r.xadd(rejected_key, {"event": json.dumps(record)}, maxlen=MAXLEN, approximate=True)
    return accepted, rejected


async def handler(ws: ServerConnection) -> None:
    """One connection: hello, welcome, then one ack per track frame."""
    assert ws.request is not None
    match = PATH_RE.match(ws.request.path)
    assert match is not None  # process_request let only these through
    site = match.group(1)
    keys = (f"{PREFIX}:{{{site}}}:events", f"{PREFIX}:{{{site}}}:rejected")
    try:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
    except (TimeoutError, ValueError):
        await ws.close(1008, "bad or late hello")
        return
    if (
        not isinstance(hello, dict)
        or hello.get("type") != "hello"
        or not isinstance(hello.get("uuid"), str)
        or not UUID_RE.match(hello["uuid"])
        or not isinstance(hello.get("producer"), str)
        or not 8 <= len(hello["producer"]) <= 64
    ):
        await ws.send(json.dumps({"type": "error", "code": "bad_hello", "detail": "invalid hello"}))
        await ws.close(1008, "bad hello")
        return
    conn = {"site": site, "uuid": hello["uuid"], "producer": hello["producer"]}
    conn["session"] = "s-" + secrets.token_hex(8)
    welcome = {"type": "welcome", "session": conn["session"], "resumed": False, "acked": 0}
    welcome.update(server_time=int(time.time() * 1000), max_batch=MAX_BATCH)
    await ws.send(json.dumps(welcome))
    try:
        async for message in ws:
            try:
                msg = json.loads(message)
            except ValueError:
                await ws.close(1007, "frame not decodable")
                return
            is_track = isinstance(msg, dict) and msg.get("type") == "track"
            events = msg.get("events") if is_track else None
            if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH:
                error = {"type": "error", "code": "invalid", "detail": "expected track"}
                await ws.send(json.dumps(error))
                await ws.close(1008, "invalid message")
                return
            max_seq = highest_seq(events)
            try:
                accepted, rejected = await store_frame(conn, events, keys)
            except redis.RedisError:
                nack = {"type": "nack", "seq": max_seq, "code": "unavailable"}
                nack["retry_after_ms"] = 500
                await ws.send(json.dumps(nack))
                continue
            ack = {"type": "ack", "seq": max_seq, "accepted": accepted, "duplicate": 0}
            ack["rejected"] = rejected
            await ws.send(json.dumps(ack))
    except ConnectionClosed:
        pass


async def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler,
        HOST,
        PORT,
        origins=ORIGINS,
        process_request=process_request,
        select_subprotocol=select_subprotocol,
        compression=None,
        max_size=256 * 1024,
    ):
        sites = ",".join(sorted(SITES))
        print(f"naive listening on ws://{HOST}:{PORT}/v1/track/{{{sites}}}", flush=True)
        await stop
    await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
