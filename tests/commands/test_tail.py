"""``eventwire tail`` as a real process against a real server and Redis."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from eventwire.commands.tail import _Output, follow, merge_by_site, stream_keys
from eventwire.core.positions import start_id
from eventwire.gateway import EventwireServer
from eventwire.store import Keys
from tests.conftest import SITES_TOML, MakeServer
from tests.procs import UNIT, RedisProcess, eventwire_command
from tests.wire import event, peer

#: The test sites plus ``big``, whose events are split over four partitions.
P = 4
SPLIT_SITES = SITES_TOML + f"\n[sites.big]\nallow_no_origin = true\npartitions = {P}\n"


def split_sites(tmp_path: Path) -> Path:
    """A sites file with the partitioned site ``big`` (as the server under test has)."""
    path = tmp_path / "split-sites.toml"
    path.write_text(SPLIT_SITES)
    return path


def uuids_over_partitions(n: int, prefix: str) -> list[str]:
    """``n`` customer uuids, at least one in each of the P partitions."""
    uuids = [f"{prefix}-{i}" for i in range(n)]
    assert {Keys.tag("big", u, P) for u in uuids} == set(Keys.tags("big", P))
    return uuids


class Tail:
    """A running ``python -m eventwire tail ...`` and the lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def lines(self, n: int, wait: float = 10.0) -> list[dict[str, Any]]:
        """The next ``n`` JSON lines, all within ``wait`` seconds."""
        deadline = time.monotonic() + wait * UNIT
        return [await self.line(max(deadline - time.monotonic(), 0.01)) for _ in range(n)]

    async def line(self, wait: float = 5.0) -> dict[str, Any]:
        """The next JSON line, within ``wait`` seconds (the process may still be starting)."""
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), wait * UNIT)
        assert raw, "tail exited"
        out: dict[str, Any] = json.loads(raw)
        return out

    async def until(self, uuid: str, action: str, wait: float = 5.0) -> list[dict[str, Any]]:
        """Every line up to and including the first of ``uuid`` and ``action``."""
        deadline = time.monotonic() + wait * UNIT
        seen = []
        while True:
            line = await self.line(max(deadline - time.monotonic(), 0.01))
            seen.append(line)
            if line.get("uuid") == uuid and line.get("action") == action:
                return seen

    async def following(self, url: str, site: str = "app") -> None:
        """Wait until tail follows the streams' ends: a warm-up event (``warm-*``) shows.

        With ``--since now`` only what is stored after tail found the ends is
        shown, and a loaded machine can take seconds to start the process;
        the warm-up lines are read here and not returned.
        """
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20 * UNIT
        for n in itertools.count():
            assert time.monotonic() < deadline, "tail never showed a warm-up event"
            async with peer(url, site=site) as p:
                await p.hello(f"warm-{n}")
                assert (await p.track(event(1)))["accepted"] == 1
            try:
                line = await self.line(0.5)
            except TimeoutError:
                continue
            assert line["uuid"].startswith("warm-"), line
            break
        while True:  # a later warm-up that also showed
            try:
                line = await self.line(0.3)
            except TimeoutError:
                return
            assert line["uuid"].startswith("warm-"), line

    async def nothing_more(self, wait: float = 0.3) -> None:
        """Assert no line comes within ``wait`` seconds."""
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), wait * UNIT)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected line {raw!r}")


@asynccontextmanager
async def tail(redis_url: str, sites: Path, *flags: str) -> AsyncIterator[Tail]:
    """Run tail with JSON output; on exit SIGINT it and check a clean exit."""
    proc = await eventwire_command(
        "tail", "--redis", redis_url, "--sites", str(sites), "--json", *flags
    )
    try:
        yield Tail(proc)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        stderr = await asyncio.wait_for(proc.stderr.read(), 10 * UNIT)
        code = await asyncio.wait_for(proc.wait(), 10 * UNIT)
    assert code == 0, stderr
    assert b"Traceback" not in stderr, stderr


async def test_tail_prints_each_event_within_a_second(
    server: EventwireServer, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """A JSON line (stored event plus stream id) arrives within 1 s of each ack, every site."""
    async with tail(redis_proc.url, sites_file, "--since", "0") as t:
        for site, uuid in (("app", "u-t1"), ("shop", "u-t2")):
            async with peer(server.url, site=site) as p:
                await p.hello(uuid)
                ack = await p.track(event(1))
                assert ack["accepted"] == 1
                lines = await t.until(uuid, "product.view")
            line = lines[-1]
            assert line["site"] == site
            assert line["params"] == {"sku": "S1"}
            assert line["seq"] == 1
            assert "-" in line["id"]
            assert {ln["action"] for ln in lines[:-1]} <= {"session.start", "session.end"}


async def test_tail_filters_site_action_uuid(
    server: EventwireServer, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """--site, --action (glob) and --uuid each keep out what they do not match."""
    flags = ("--since", "0", "--site", "shop", "--action", "product.*", "--uuid", "u-f")
    async with tail(redis_proc.url, sites_file, *flags) as t:
        async with peer(server.url, site="app") as p:
            await p.hello("u-f")
            await p.track(event(1))
        async with peer(server.url, site="shop") as p:
            await p.hello("u-other")
            await p.track(event(1))
        async with peer(server.url, site="shop") as p:
            await p.hello("u-f")
            visit = {"seq": 1, "action": "page.visit", "params": {"url": "https://shop.example/"}}
            assert (await p.track(visit))["accepted"] == 1
            assert (await p.track(event(2, action="product.buy")))["accepted"] == 1
            lines = await t.until("u-f", "product.buy")
        assert [(ln["site"], ln["uuid"], ln["action"]) for ln in lines] == [
            ("shop", "u-f", "product.buy")
        ]
        await t.nothing_more()


async def test_tail_rejected_shows_code(
    server: EventwireServer, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """--rejected follows the rejected streams: a bad event's code, detail and seq."""
    async with tail(redis_proc.url, sites_file, "--since", "0", "--rejected") as t:
        async with peer(server.url) as p:
            await p.hello("u-r")
            ack = await p.track(event(1, action="nodot"))
        assert ack["rejected"][0]["code"] == "invalid_action"
        line = await t.line()
        assert line["code"] == "invalid_action"
        assert line["seq"] == 1
        assert line["uuid"] == "u-r"
        assert line["detail"]


async def test_tail_since_now_skips_the_past(
    server: EventwireServer, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """--since now (the default) shows only what is stored after tail started."""
    async with peer(server.url) as p:
        await p.hello("u-old")
        await p.track(event(1))
    async with tail(redis_proc.url, sites_file, "--action", "product.*") as t:
        await t.following(server.url)
        async with peer(server.url) as p:
            await p.hello("u-new")
            await p.track(event(1))
            lines = await t.until("u-new", "product.view")
        assert [ln["uuid"] for ln in lines] == ["u-new"]


async def test_tail_since_duration(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """--since 5m starts five minutes ago: an entry from ten minutes ago is not shown."""
    now = int(time.time() * 1000)
    for ms, n in ((now - 600_000, "old"), (now - 60_000, "recent")):
        body = {"site": "app", "uuid": n, "action": "product.view", "time": ms}
        await redis.xadd("ew:{app}:events", {"event": json.dumps(body)}, id=f"{ms}-0")
    async with tail(redis_proc.url, sites_file, "--since", "5m") as t:
        line = await t.line(5)
        assert line["uuid"] == "recent"
        assert line["id"] == f"{now - 60_000}-0"
        await t.nothing_more()


def test_start_id() -> None:
    """--since values map to XREAD ids; anything else is refused."""
    assert start_id("now") == "$"
    assert start_id("0") == "0-0"
    assert start_id("30s", now_ms=100_000) == f"69999-{2**64 - 1}"
    assert start_id("2h", now_ms=10_000_000) == f"2799999-{2**64 - 1}"
    assert start_id("1700000000000-3") == "1700000000000-3"
    for bad in ("yesterday", "5x", "-1"):
        with pytest.raises(ValueError, match="--since"):
            start_id(bad)


async def test_follow_ends_when_stopped_without_a_cancel(redis: aioredis.Redis) -> None:
    """A stop whose cancellation was lost (as inside redis-py) still ends follow after one read."""
    answers = iter([False, True])
    out = _Output(io.StringIO(), True, 4, False)
    async with asyncio.timeout(10 * UNIT):
        await follow(redis, {"ew:{app}:events": "$"}, out, None, None, lambda: next(answers))
    assert next(answers, "done") == "done"


async def test_tail_follows_every_partition_once(
    make_server: MakeServer, redis: aioredis.Redis, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """A site of 4 partitions: each new event of every customer shows exactly once, none old."""
    server = await make_server(sites=SPLIT_SITES)
    sites = split_sites(tmp_path)
    uuids = uuids_over_partitions(24, "tp")
    for uuid in uuids[:8]:  # older entries in the partitions: --since now must skip them
        async with peer(server.url, site="big") as p:
            await p.hello(uuid)
            assert (await p.track(event(1, action="product.old")))["accepted"] == 1
    async with tail(redis_proc.url, sites, "--site", "big", "--action", "product.view") as t:
        await t.following(server.url, site="big")
        for uuid in uuids:
            async with peer(server.url, site="big") as p:
                await p.hello(uuid)
                ack = await p.track(event(1), event(2), event(3))
                assert ack["accepted"] == 3
        lines = await t.lines(3 * len(uuids))
        await t.nothing_more()
    assert sorted((ln["uuid"], ln["seq"]) for ln in lines) == sorted(
        (u, seq) for u in uuids for seq in (1, 2, 3)
    )
    assert {ln["site"] for ln in lines} == {"big"}
    for uuid in uuids:  # one customer's events stay in order
        assert [ln["seq"] for ln in lines if ln["uuid"] == uuid] == [1, 2, 3]
    for ln in lines:  # each line is its entry of the customer's partition
        key = Keys("ew").events(Keys.tag("big", ln["uuid"], P))
        assert len(await redis.xrange(key, ln["id"], ln["id"])) == 1


async def test_tail_rejected_over_partitions(
    make_server: MakeServer, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """--rejected --since 0 on a 4-partition site: every customer's rejected event, once."""
    server = await make_server(sites=SPLIT_SITES)
    uuids = uuids_over_partitions(12, "tr")
    for uuid in uuids:
        async with peer(server.url, site="big") as p:
            await p.hello(uuid)
            ack = await p.track(event(1, action="nodot"))
            assert ack["rejected"][0]["code"] == "invalid_action"
    flags = ("--since", "0", "--rejected", "--site", "big")
    async with tail(redis_proc.url, split_sites(tmp_path), *flags) as t:
        lines = await t.lines(len(uuids))
        await t.nothing_more()
    assert sorted(ln["uuid"] for ln in lines) == sorted(uuids)
    assert {(ln["site"], ln["code"], ln["seq"]) for ln in lines} == {("big", "invalid_action", 1)}


@pytest.mark.parametrize("since", ["5m", "id"])
async def test_tail_since_over_partitions(
    redis: aioredis.Redis, redis_proc: RedisProcess, tmp_path: Path, since: str
) -> None:
    """--since 5m (or an id 5 min ago) means the same on every partition; lines merged by id."""
    now = int(time.time() * 1000)
    expected = []
    for part in range(P):
        key = f"ew:{{big:{part}}}:events"
        for ms, n in ((now - 600_000 + part, "old"), (now - 60_000 + 7 * (P - part), "recent")):
            body = {"site": "big", "uuid": f"{n}-{part}", "action": "product.view", "time": ms}
            await redis.xadd(key, {"event": json.dumps(body)}, id=f"{ms}-0")
            if n == "recent":
                expected.append((f"{ms}-0", f"recent-{part}"))
    flag = "5m" if since == "5m" else f"{now - 300_000}-0"
    async with tail(redis_proc.url, split_sites(tmp_path), "--since", flag) as t:
        lines = await t.lines(P)
        await t.nothing_more()
    # Written newest partition first; printed oldest first: merged by id.
    assert [(ln["id"], ln["uuid"]) for ln in lines] == sorted(expected)


def test_stream_keys_every_partition() -> None:
    """Every partition's stream of each site, each with its site; --uuid: its partition only."""
    keys = Keys("ew")
    assert stream_keys(keys, {"app": 1, "big": 3}, rejected=False) == {
        "ew:{app}:events": "app",
        "ew:{big:0}:events": "big",
        "ew:{big:1}:events": "big",
        "ew:{big:2}:events": "big",
    }
    assert stream_keys(keys, {"app": 1}, rejected=True) == {"ew:{app}:rejected": "app"}
    only = stream_keys(keys, {"app": 1, "big": 4}, rejected=False, uuid="customer-42")
    assert only == {"ew:{app}:events": "app", "ew:{big:1}:events": "big"}  # crc32 % 4 = 1


def test_merge_by_site() -> None:
    """One read's entries: a site's partitions merged by id, other sites apart, order kept."""
    replies = [
        ("ew:{big:0}:events", [(b"5-0", {}), (b"9-0", {})]),
        ("ew:{app}:events", [(b"7-0", {}), (b"3-0", {})]),  # one stream: kept as it came
        ("ew:{big:1}:events", [(b"5-0", {"n": 1}), (b"6-0", {})]),
        ("ew:{big:2}:events", []),
    ]
    site_of = {
        "ew:{big:0}:events": "big",
        "ew:{big:1}:events": "big",
        "ew:{big:2}:events": "big",
        "ew:{app}:events": "app",
    }
    merged = merge_by_site(replies, site_of)
    assert [[e[0] for e in group] for group in merged] == [
        [b"5-0", b"5-0", b"6-0", b"9-0"],
        [b"7-0", b"3-0"],
    ]
    assert merged[0][1] == (b"5-0", {"n": 1})  # equal ids: the earlier stream first


# -- sites found in Redis, not in the sites file ------------------------------------------


async def add_entry(redis: aioredis.Redis, key: str, site: str, uuid: str) -> str:
    """XADD one stored-looking event to ``key``; its entry id."""
    body = {"site": site, "uuid": uuid, "action": "product.view", "time": int(time.time() * 1000)}
    entry_id: bytes = await redis.xadd(key, {"event": json.dumps(body)})
    return entry_id.decode()


async def test_tail_site_found_only_in_redis(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """``tail --site acc``: the sites file lacks acc, its stream is in Redis, so it is followed."""
    old = await add_entry(redis, "ew:{acc}:events", "acc", "u-acc-old")
    async with tail(redis_proc.url, sites_file, "--site", "acc", "--since", "0") as t:
        line = await t.line()
        assert (line["site"], line["uuid"], line["id"]) == ("acc", "u-acc-old", old)
        new = await add_entry(redis, "ew:{acc}:events", "acc", "u-acc-new")
        line = await t.line()
        assert (line["uuid"], line["id"]) == ("u-acc-new", new)
        await t.nothing_more()


async def test_tail_unknown_site_exits_2(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """``--site`` of a site neither in the sites file nor in Redis: a clear message, exit 2."""
    await add_entry(redis, "ew:{acc}:events", "acc", "u-1")
    await add_entry(redis, "other:{nope}:events", "nope", "u-1")  # another key prefix's
    proc = await eventwire_command(
        "tail", "--redis", redis_proc.url, "--sites", str(sites_file), "--site", "acc",
        "--site", "nope", "--json",
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 10 * UNIT)
    assert proc.returncode == 2
    assert out == b""
    message = err.decode()
    assert message.startswith("eventwire tail: unknown site(s) nope: ")
    assert "the sites file has shop, app, web" in message
    assert "Redis has no stream of it under key prefix 'ew'" in message
    assert "Traceback" not in message


async def test_tail_follows_file_and_redis_sites(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """Without --site: every site of the sites file and every site found in Redis."""
    await add_entry(redis, "ew:{app}:events", "app", "u-file")
    await add_entry(redis, "ew:{acc}:events", "acc", "u-redis")
    await add_entry(redis, "ew:{zed:1}:events", "zed", "u-split")
    async with tail(redis_proc.url, sites_file, "--since", "0") as t:
        lines = await t.lines(3)
        await t.nothing_more()
    assert sorted((ln["site"], ln["uuid"]) for ln in lines) == [
        ("acc", "u-redis"),
        ("app", "u-file"),
        ("zed", "u-split"),
    ]


async def test_tail_partitioned_site_found_only_in_redis(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """A site with partitions 0 and 2 in Redis only: both, and partition 1 once it appears.

    Partition 1 has no stream when tail starts, yet it lies below the highest
    found, so it is read; --uuid reads every partition of such a site, since
    the partitions Redis tells may be too few to place the customer.
    """
    for part in (0, 2):
        await add_entry(redis, f"ew:{{far:{part}}}:events", "far", "u-far")
        await add_entry(redis, f"ew:{{far:{part}}}:events", "far", "u-other")
    flags = ("--site", "far", "--since", "0", "--uuid", "u-far")
    async with tail(redis_proc.url, sites_file, *flags) as t:
        lines = await t.lines(2)
        assert [ln["uuid"] for ln in lines] == ["u-far", "u-far"]
        assert Keys.tag("far", "u-far", 3) != "far:1"  # not where --uuid would have looked
        new = await add_entry(redis, "ew:{far:1}:events", "far", "u-far")
        line = await t.line()
        assert (line["site"], line["id"]) == ("far", new)
        await t.nothing_more()
