"""Fuzz the HTTP ingest listener: random and mutated bodies, headers and gzip.

Bodies come from scripts/fuzz.py's :class:`Frames` (valid batches, fields
holding arbitrary values, flipped or cut bytes, random bytes, hostile
shapes), sent as ``POST /v1/track/{site}`` under a few producers, with
random ``Content-Type``, ``Content-Encoding`` (valid gzip, cut gzip, a gzip
bomb) and ``Origin``. A finding is an answer that is not a protocol answer
(a status outside docs/protocol.md section 14, a body that is not its JSON
ack, nack or error), the listener not answering, or, at the end, a stream
where an event an ack promised is missing or stored twice.

usage: scripts/fuzz --http [-n REQUESTS] [--seed N]
                           [--url http://HOST:PORT/v1/track/SITE --site SITE --redis-url URL]

Without --url it starts a private redis-server and ``eventwire serve``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec
import redis.asyncio as aioredis

ROOT: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from fuzz import JSON_CODEC, Frames  # noqa: E402

#: Every status section 14 names.
STATUSES: Final = frozenset({200, 400, 401, 403, 404, 405, 413, 415, 429, 503})
CONTENT_TYPES: Final = (
    "application/json",
    "text/plain;charset=UTF-8",
    "application/msgpack",
    "application/x-www-form-urlencoded",
    None,
)
PRODUCERS: Final = 6


def _events(body: bytes) -> list[dict[str, Any]] | None:
    """The events of a body the server took, when they can be read back."""
    try:
        doc = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        try:
            doc = msgspec.msgpack.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return None
    events = doc.get("events") if isinstance(doc, dict) else None
    return events if isinstance(events, list) else None


async def fuzz_http(
    url: str, redis_url: str, site: str, requests: int, seed: int
) -> tuple[Counter[str], list[str]]:
    """Send ``requests`` fuzzed requests; returns the answers by status and the findings."""
    rng = random.Random(seed)
    frames = Frames(rng, exclude=frozenset({"oversized"}))
    producers = [f"fh-{seed:x}-{i}-{rng.getrandbits(40):010x}" for i in range(PRODUCERS)]
    next_seq = dict.fromkeys(producers, 1)
    promised: set[tuple[str, int]] = set()
    outcomes: Counter[str] = Counter()
    findings: list[str] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for n in range(requests):
            producer = rng.choice(producers)
            kind, frame = frames.frame(JSON_CODEC, next_seq[producer])
            try:
                decoded = json.loads(frame)
            except (ValueError, RecursionError):
                decoded = None
            if isinstance(decoded, dict) and rng.random() < 0.9:
                decoded.pop("type", None)
                decoded.update(uuid=f"fh-u{rng.randrange(4)}", producer=producer)
                content_type = rng.choice(CONTENT_TYPES)
                if content_type == "application/msgpack":
                    try:
                        body = msgspec.msgpack.encode(decoded)
                    except (TypeError, OverflowError):
                        body = json.dumps(decoded).encode()
                else:
                    body = json.dumps(decoded).encode()
            else:
                content_type, body = rng.choice(CONTENT_TYPES), frame
            headers = {"Content-Type": content_type} if content_type else {}
            plain = body
            pick = rng.random()
            if pick < 0.15:
                body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
            elif pick < 0.18:
                body, headers["Content-Encoding"] = gzip.compress(body)[:-6], "gzip"
            elif pick < 0.2:
                body = gzip.compress(b" " * (4 << 20))
                headers["Content-Encoding"], kind = "gzip", "bomb"
            elif pick < 0.22:
                headers["Content-Encoding"] = rng.choice(["br", "gzip", "zstd, gzip"])
            if rng.random() < 0.05:
                headers["Origin"] = rng.choice(["https://evil.example", "null", "\u00e9"])
            try:
                async with http.post(url, data=body, headers=headers) as r:
                    status, answer = r.status, await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                findings.append(f"request {n} ({kind}): no answer: {exc!r}")
                continue
            outcomes[str(status)] += 1
            if status not in STATUSES:
                findings.append(f"request {n} ({kind}): status {status}: {answer[:200]!r}")
                continue
            try:
                msg = json.loads(answer)
            except ValueError:
                findings.append(f"request {n} ({kind}): {status} body is not JSON: {answer[:80]!r}")
                continue
            want = {200: "ack", 429: "nack"}.get(status)
            if msg.get("type") not in ((want,) if want else ("error", "nack")):
                findings.append(f"request {n} ({kind}): {status} with {msg!r:.200}")
            if kind == "bomb" and status not in (403, 413):  # an Origin refused first
                findings.append(f"request {n}: a gzip bomb got {status}")
            if status != 200:
                continue
            events = _events(plain)
            if events is None:
                findings.append(f"request {n} ({kind}): acked, but its body is no batch")
                continue
            rejected = {r["seq"] for r in msg.get("rejected", [])}
            sent = [
                e["seq"] for e in events if isinstance(e, dict) and isinstance(e.get("seq"), int)
            ]
            promised.update((producer, s) for s in sent if s not in rejected)
            if sent:
                next_seq[producer] = max(next_seq[producer], max(sent) + 1)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        entries = await redis.xrange(f"ew:{{{site}}}:events")
    finally:
        await redis.aclose()
    stored: Counter[tuple[str, int]] = Counter()
    for _id, fields in entries:
        event = json.loads(fields[b"event"])
        if event["producer"] in next_seq:
            stored[(event["producer"], event["seq"])] += 1
    findings += [f"acked, not stored: {k}" for k in sorted(promised - set(stored))]
    findings += [f"stored {c} times: {k}" for k, c in stored.items() if c > 1]
    return outcomes, findings


async def run(args: Any) -> tuple[Counter[str], list[str]]:
    """Fuzz --url, or a private redis-server and ``eventwire serve`` started here."""
    if args.url is not None:
        return await fuzz_http(args.url, args.redis_url, args.site, args.n, args.seed)
    sys.path.insert(0, str(ROOT))
    from fuzz import SITE_TOML

    from tests.procs import RedisProcess, ServerProcess

    redis_proc = await asyncio.to_thread(RedisProcess().start)
    server = None
    try:
        sites = Path(tempfile.mkdtemp(prefix="ew-fuzz-http-")) / "sites.toml"
        sites.write_text(SITE_TOML)
        server = await asyncio.to_thread(ServerProcess(redis_proc.url, sites).start)
        url = f"http://127.0.0.1:{server.http_port}/v1/track/fuzz"
        print(f"server at {url}, redis {redis_proc.url}")
        outcomes, findings = await fuzz_http(url, redis_proc.url, "fuzz", args.n, args.seed)
        if server.proc is not None and server.proc.poll() is not None:
            findings.append(f"the server exited with {server.proc.returncode}")
        return outcomes, findings
    finally:
        if server is not None:
            await asyncio.to_thread(server.terminate)
        await asyncio.to_thread(redis_proc.stop)


def main() -> int:
    """Fuzz; print the outcomes and findings."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", action="store_true", help="(the mode scripts/fuzz passes)")
    parser.add_argument("--url", help="http://HOST:PORT/v1/track/SITE (default: a private server)")
    parser.add_argument("--redis-url", help="the Redis --url's server uses, to verify the stream")
    parser.add_argument("--site", default="fuzz")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = parser.parse_args()
    if args.url is not None and args.redis_url is None:
        parser.error("--url needs --redis-url")
    outcomes, findings = asyncio.run(run(args))
    print(f"seed {args.seed}: answers by status {dict(sorted(outcomes.items()))}")
    for finding in findings:
        print("FINDING", finding)
    print(f"{len(findings)} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
