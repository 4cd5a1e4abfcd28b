"""Does a server de-duplicate per producer? The check behind the ``node-dedup`` row.

Against a running v1 server and the Redis it writes to, it runs two checks:

1. Resend: connection 1 sends seqs 1..10 (two frames) for a new producer;
   connection 2, same producer, must get ``welcome.acked`` = 10, the same two
   frames must be acked as duplicate with the stream unchanged, and a frame of
   seqs 9..12 must give 2 duplicate and 2 accepted.
2. Race: two connections with one producer send the same 200 seqs at the same
   time; together they must accept each seq once.

Each also checks that the stream holds each seq of the producer exactly once.
It prints one line per check and ``N passed, N failed`` (exit code 1 when one
failed). ``node_dedup.js`` and eventwire pass all 10; ``node.js`` fails 7, as
it should, since it does not de-duplicate. Like the load generator it imports
nothing from ``server/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from types import TracebackType
from typing import Any

import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

#: Seconds a hello or a frame's answer may take.
ANSWER_TIMEOUT = 10.0

RESULTS: list[tuple[bool, str]] = []


def check(ok: bool, what: str) -> None:
    """Record and print one check."""
    RESULTS.append((ok, what))
    print(("PASS " if ok else "FAIL ") + what, flush=True)


def stored_seqs(r: redis.Redis, stream: str, start: str, producer: str) -> list[int]:
    """The seqs of ``producer``'s entries added to the stream after id ``start``."""
    out: list[int] = []
    cursor = start
    while True:
        chunk = r.xrange(stream, cursor, "+", count=5000)
        if not chunk:
            return out
        for _id, fields in chunk:
            event = json.loads(fields[b"event"])
            if event.get("producer") == producer:
                out.append(event["seq"])
        cursor = "(" + chunk[-1][0].decode()


def frame(seqs: range) -> str:
    """A track frame with one event per seq."""
    now = int(time.time() * 1000)
    events = [
        {
            "seq": s,
            "action": "product.view",
            "label": f"dedup check {s}",
            "time": now,
            "params": {"url": f"https://shop.example.com/p/{s}", "product_id": str(s)},
        }
        for s in seqs
    ]
    return json.dumps({"type": "track", "events": events})


class Conn:
    """One connection that has said hello and got its welcome.

    Args:
        a: the command line.
        customer: the hello's uuid.
        producer: the hello's producer.
    """

    def __init__(self, a: argparse.Namespace, customer: str, producer: str) -> None:
        self.a, self.customer, self.producer = a, customer, producer
        self.welcome: dict[str, Any] = {}

    async def __aenter__(self) -> Conn:
        a = self.a
        self.cm = connect(
            f"ws://{a.host}:{a.port}/v1/track/{a.site}",
            origin=Origin(a.origin),
            subprotocols=[Subprotocol("eventwire.v1.json")],
            compression=None,
            proxy=None,
            open_timeout=5,
        )
        self.ws: ClientConnection = await self.cm.__aenter__()
        hello = {"type": "hello", "uuid": self.customer, "producer": self.producer}
        await self.ws.send(json.dumps(hello))
        self.welcome = json.loads(await asyncio.wait_for(self.ws.recv(), ANSWER_TIMEOUT))
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cm.__aexit__(kind, exc, tb)

    async def send_frames(self, frames: list[range]) -> list[dict[str, Any]]:
        """Send every frame back to back (pipelined), then read one answer per frame."""
        for seqs in frames:
            await self.ws.send(frame(seqs))
        return [json.loads(await asyncio.wait_for(self.ws.recv(), ANSWER_TIMEOUT)) for _ in frames]


def summary(answers: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(type, seq, accepted, duplicate) of each answer."""
    keys = ("type", "seq", "accepted", "duplicate")
    return [tuple(a.get(k) for k in keys) for a in answers]


async def resend(a: argparse.Namespace, r: redis.Redis, stream: str, start: str, tag: str) -> None:
    """Check 1: a resend on a new connection with the same producer."""
    customer, producer = f"dedup-check-{tag}", f"dedup-seq-{tag}"
    async with Conn(a, customer, producer) as c1:
        welcome = c1.welcome
        ok = welcome.get("type") == "welcome" and welcome.get("acked") == 0
        check(ok, f"new producer: welcome.acked == 0 (got {welcome})")
        acks = await c1.send_frames([range(1, 6), range(6, 11)])
        ok = summary(acks) == [("ack", 5, 5, 0), ("ack", 10, 5, 0)]
        check(ok, f"first send of 1..10 accepted (got {acks})")
    n1 = len(stored_seqs(r, stream, start, producer))
    check(n1 == 10, f"stream holds 10 events of the producer (got {n1})")
    async with Conn(a, customer, producer) as c2:
        acked = c2.welcome.get("acked")
        check(acked == 10, f"same producer again: welcome.acked == 10 (got {acked})")
        acks = await c2.send_frames([range(1, 6), range(6, 11)])
        ok = summary(acks) == [("ack", 5, 0, 5), ("ack", 10, 0, 5)]
        check(ok, f"resend of 1..10 counted duplicate (got {acks})")
        n2 = len(stored_seqs(r, stream, start, producer))
        check(n2 == n1, f"stream unchanged by the resend ({n1} -> {n2})")
        acks = await c2.send_frames([range(9, 13)])
        got = (acks[0].get("seq"), acks[0].get("accepted"), acks[0].get("duplicate"))
        check(got == (12, 2, 2), f"frame 9..12: 2 duplicate, 2 accepted (got {acks[0]})")
    seqs = sorted(stored_seqs(r, stream, start, producer))
    check(seqs == list(range(1, 13)), f"stream holds seqs 1..12 exactly once (got {seqs})")


async def race(a: argparse.Namespace, r: redis.Redis, stream: str, start: str, tag: str) -> None:
    """Check 2: two connections of one producer race with the same seqs."""
    customer, producer = f"dedup-check-{tag}", f"dedup-race-{tag}"
    frames = [range(i, i + 10) for i in range(1, 201, 10)]
    async with Conn(a, customer, producer) as x, Conn(a, customer, producer) as y:
        ax, ay = await asyncio.gather(x.send_frames(frames), y.send_frames(frames))
    accepted = sum(m.get("accepted", 0) for m in ax + ay)
    duplicate = sum(m.get("duplicate", 0) for m in ax + ay)
    ok = all(m.get("type") == "ack" for m in ax + ay) and (accepted, duplicate) == (200, 200)
    check(
        ok,
        "race of two connections on seqs 1..200: 200 accepted + 200 duplicate "
        f"(got {accepted} + {duplicate})",
    )
    seqs = stored_seqs(r, stream, start, producer)
    check(
        sorted(seqs) == list(range(1, 201)),
        f"stream holds seqs 1..200 exactly once ({len(seqs)} entries, {len(set(seqs))} distinct)",
    )


async def main(a: argparse.Namespace) -> int:
    """Run both checks; returns the exit code."""
    r = redis.Redis(host=a.redis_host, port=a.redis_port)
    stream = a.stream or f"{a.key_prefix}:{{{a.site}}}:events"
    last = r.xrevrange(stream, "+", "-", count=1)
    start = "(" + last[0][0].decode() if last else "-"
    tag = os.urandom(4).hex()
    try:
        await resend(a, r, stream, start, tag)
        await race(a, r, stream, start, tag)
    finally:
        r.close()
    failed = sum(not ok for ok, _ in RESULTS)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the check."""
    p = argparse.ArgumentParser(
        prog="check_dedup.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--site", default="bench")
    p.add_argument("--origin", default="http://localhost")
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6390)
    p.add_argument("--key-prefix", default="ew")
    p.add_argument("--stream", default=None, help="default {prefix}:{{site}}:events")
    return p


if __name__ == "__main__":
    sys.exit(asyncio.run(main(build_parser().parse_args())))
