"""Redis Cluster: the whole ingest-to-store path and every reader over a real 3-master cluster.

The sites' ``{site}`` hash tags land on three different masters (checked
first), so every batch and every multi-site read spans nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from websockets.asyncio.client import connect

from eventwire.client import EventwireClient
from eventwire.core.config import Settings, cluster_nodes, load_settings, mask_url
from eventwire.core.errors import ConfigError
from eventwire.core.rules import SitesBook, load_sites
from eventwire.gateway import EventwireServer
from eventwire.persist.sinks import open_sink
from eventwire.persist.worker import PersistOptions, Worker
from eventwire.store import Keys, connect_redis
from tests.conftest import MakeServer
from tests.procs import UNIT, RedisClusterProcess, eventwire_command
from tests.wire import event, peer, producer_id

#: Their hash slots are 3808, 6805 and 13556: one per master of an even split.
SITES = ("shop", "app", "docs")
SITES_TOML = "".join(f"[sites.{s}]\norigins = []\nallow_no_origin = true\n\n" for s in SITES)
FAST = {"session_grace": 0.3, "reap_interval": 0.05}


@pytest.fixture
async def cluster(redis_cluster_proc: RedisClusterProcess) -> AsyncIterator[RedisCluster]:
    """A client of the session's cluster, every primary emptied (functions too) before each test."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster_proc.nodes[0].port)
    await client.initialize()
    for node in redis_cluster_proc.nodes:
        await on_node(node.port, "FLUSHALL")
        await on_node(node.port, "FUNCTION", "FLUSH")
    yield client
    await client.aclose()


async def on_node(port: int, *command: str) -> Any:
    """One command on one cluster node, through a plain client."""
    async with aioredis.Redis(host="127.0.0.1", port=port) as client:
        return await client.execute_command(*command)


@pytest.fixture
def sites_path(tmp_path: Path) -> Path:
    """A sites file with the three cluster sites."""
    path = tmp_path / "cluster-sites.toml"
    path.write_text(SITES_TOML)
    return path


async def start(
    make_server: MakeServer, proc: RedisClusterProcess, **overrides: Any
) -> EventwireServer:
    """A server of the three sites over the cluster."""
    return await make_server(sites=SITES_TOML, redis_url=proc.url, **(FAST | overrides))


async def events(cluster: RedisCluster, site: str, stream: str = "events") -> list[dict[str, Any]]:
    """Every record of a site's stream, decoded."""
    return [json.loads(f[b"event"]) for _, f in await cluster.xrange(f"ew:{{{site}}}:{stream}")]


async def wait_until(cluster: RedisCluster, site: str, action: str, wait: float = 5) -> None:
    """Wait until a site's stream holds an event of ``action``."""
    async with asyncio.timeout(wait * UNIT):
        while not any(e["action"] == action for e in await events(cluster, site)):  # noqa: ASYNC110 - Redis' state
            await asyncio.sleep(0.02)


async def test_sites_land_on_three_masters(cluster: RedisCluster) -> None:
    """The test sites' hash tags are served by three different masters."""
    nodes = {cluster.get_node_from_key(f"ew:{{{s}}}:events").name for s in SITES}  # type: ignore[union-attr]
    assert len(nodes) == 3 == len(cluster.get_primaries())


async def test_ingest_over_cluster(
    make_server: MakeServer, redis_cluster_proc: RedisClusterProcess, cluster: RedisCluster
) -> None:
    """Both subprotocols, every site: stored once, duplicates on resend, rejects, sessions."""
    srv = await start(make_server, redis_cluster_proc)
    producers = {s: producer_id() for s in SITES}
    for msgpack, site in ((False, "shop"), (True, "app"), (False, "docs")):
        async with peer(srv.url, site=site, msgpack=msgpack) as p:
            await p.hello(f"u-{site}", producers[site])
            ack = await p.track(event(1), event(2, action="nodot"), event(3))
            assert (ack["accepted"], ack["seq"]) == (2, 3), ack
            assert [r["code"] for r in ack["rejected"]] == ["invalid_action"]
            await p.send(b"\xc1" if msgpack else "{not json")  # undecodable: recorded
            await p.recv()
    for msgpack, site in ((True, "shop"), (False, "app"), (True, "docs")):
        async with peer(srv.url, site=site, msgpack=msgpack) as p:
            welcome = await p.hello(f"u-{site}", producers[site])
            assert welcome["acked"] == 3
            ack = await p.track(event(3), event(4))
            assert (ack["accepted"], ack["duplicate"]) == (1, 1), ack
    for site in SITES:
        await wait_until(cluster, site, "session.end")
        stored = await events(cluster, site)
        mine = [e["seq"] for e in stored if e["producer"] == producers[site]]
        assert mine == [1, 3, 4]
        made = [e["action"] for e in stored if e["producer"].startswith("srv:")]
        assert made.count("session.start") == 1
        assert made.count("session.end") == 1
        rejected = await events(cluster, site, "rejected")
        assert any(r.get("code") == "invalid_action" and r["seq"] == 2 for r in rejected)
        assert len(rejected) == 2, rejected  # the bad event and the undecodable frame


async def test_function_flush_is_recovered(
    make_server: MakeServer, redis_cluster_proc: RedisClusterProcess, cluster: RedisCluster
) -> None:
    """A node that lost the function library gets it again; no frame is lost."""
    # No reaper pass nor heartbeat between the flush and the track: either would load
    # the library first (the reaper's every 0.05 s did, now and then), and the track's
    # own reload would go untested.
    srv = await start(make_server, redis_cluster_proc, reap_interval=3600, heartbeat_ttl=3600)
    producer = producer_id()
    async with peer(srv.url, site="docs") as p:
        await p.hello("u-f", producer)
        assert (await p.track(event(1)))["accepted"] == 1
        node = cluster.get_node_from_key("ew:{docs}:events")
        assert node is not None
        await on_node(int(node.port), "FUNCTION", "FLUSH")
        assert await on_node(int(node.port), "FUNCTION", "LIST") == []
        assert (await p.track(event(2)))["accepted"] == 1
        assert await on_node(int(node.port), "FUNCTION", "LIST")
    assert [e["seq"] for e in await events(cluster, "docs") if e["producer"] == producer] == [1, 2]


async def test_admin_summary_over_cluster(
    make_server: MakeServer, redis_cluster_proc: RedisClusterProcess, cluster: RedisCluster
) -> None:
    """The admin summary of a site reads its sessions and stream ends on its node."""
    srv = await start(make_server, redis_cluster_proc)
    async with peer(srv.url, site="docs") as p:
        await p.hello("u-s")
        await p.track(event(1))
        status, body = await asyncio.to_thread(_get, srv.admin_url + "/v1/sites/docs/summary")
    assert status == 200
    summary = json.loads(body)
    assert summary["open_sessions"] == 1
    assert summary["events"]["length"] == len(await events(cluster, "docs"))


def _get(url: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5 * UNIT) as reply:
        return reply.status, reply.read().decode()


async def test_live_relay_over_cluster(
    make_server: MakeServer, redis_cluster_proc: RedisClusterProcess, cluster: RedisCluster
) -> None:
    """A live viewer of a site gets its new events from the site's node."""
    srv = await start(make_server, redis_cluster_proc)
    url = srv.admin_url.replace("http://", "ws://") + "/v1/live?site=app"
    async with connect(url, open_timeout=5 * UNIT, proxy=None) as ws:
        kinds = []
        async with asyncio.timeout(5 * UNIT):
            while (msg := json.loads(await ws.recv()))["type"] != "ready":
                kinds.append(msg["type"])
            async with peer(srv.url, site="app") as p:
                await p.hello("u-l")
                await p.track(event(1))
                while (msg := json.loads(await ws.recv()))["type"] != "event" or msg["event"][
                    "action"
                ] != "product.view":
                    pass
    assert msg["event"]["seq"] == 1
    # From the start: the catch-up reads pages (XINFO and XRANGE in one MULTI).
    async with connect(url + "&since=0", open_timeout=5 * UNIT, proxy=None) as ws:
        async with asyncio.timeout(5 * UNIT):
            actions = []
            while (msg := json.loads(await ws.recv()))["type"] != "ready":
                if msg["type"] == "event":
                    actions.append(msg["event"]["action"])
    assert actions == [e["action"] for e in await events(cluster, "app")]
    assert "product.view" in actions


async def _command(*args: str) -> tuple[int, bytes, bytes]:
    proc = await eventwire_command(*args)
    out, err = await asyncio.wait_for(proc.communicate(), 20 * UNIT)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def tail_from_start(url: str, sites_path: Path) -> asyncio.subprocess.Process:
    """``eventwire tail --json --since 0`` of the sites file's sites, as a child process."""
    return await eventwire_command(
        "tail", "--redis", url, "--sites", str(sites_path), "--json", "--since", "0"
    )


async def test_tail_and_stats_over_cluster(
    make_server: MakeServer,
    redis_cluster_proc: RedisClusterProcess,
    cluster: RedisCluster,
    sites_path: Path,
) -> None:
    """``tail --since 0`` prints the events of sites on different nodes; ``stats`` counts them."""
    srv = await start(make_server, redis_cluster_proc)
    for site in SITES:
        async with peer(srv.url, site=site) as p:
            await p.hello(f"u-{site}")
            await p.track(event(1))
    url = redis_cluster_proc.url
    proc = await tail_from_start(url, sites_path)
    assert proc.stdout is not None
    seen: set[str] = set()
    try:
        async with asyncio.timeout(10 * UNIT):
            while seen != set(SITES):
                line = json.loads(await proc.stdout.readline())
                if line["action"] == "product.view":
                    seen.add(line["site"])
    finally:
        proc.terminate()
        await proc.wait()
    code, out, err = await _command("stats", "--redis", url, "--sites", str(sites_path), "--json")
    assert code == 0, err
    snap = json.loads(out)
    for site in SITES:
        assert snap["sites"][site]["length"] == len(await events(cluster, site))


def persist_worker(redis_url: str, sites_path: Path, db: Path) -> Worker:
    """A persist worker of the sites file's sites over the cluster, into SQLite at ``db``."""
    settings = msgspec.convert({"redis_url": redis_url}, Settings)
    return Worker(
        settings,
        SitesBook(sites_path, load_sites(sites_path)),
        PersistOptions(dsn="unused"),
        sink=open_sink(f"sqlite:///{db}"),
    )


async def pending(cluster: RedisCluster) -> int:
    """Entries of the sites' streams delivered to the ``persist`` group and not acked."""
    total = 0
    for site in SITES:
        total += int((await cluster.xpending(f"ew:{{{site}}}:events", "persist"))["pending"])
    return total


async def test_persist_worker_over_cluster(
    make_server: MakeServer,
    redis_cluster_proc: RedisClusterProcess,
    cluster: RedisCluster,
    sites_path: Path,
    tmp_path: Path,
) -> None:
    """The persistence worker reads every site's stream on its node and stores each event once."""
    srv = await start(make_server, redis_cluster_proc)
    db = tmp_path / "events.db"
    worker = persist_worker(redis_cluster_proc.url, sites_path, db)
    sink = worker.sink
    await worker.start()
    try:
        for site in SITES:
            async with peer(srv.url, site=site) as p:
                await p.hello(f"u-{site}")
                await p.track(event(1), event(2))
        # Once every session has ended, nothing more comes to the streams.
        for site in SITES:
            await wait_until(cluster, site, "session.end")
        want = [(s, e["producer"], e["seq"]) for s in SITES for e in await events(cluster, s)]
        assert len(want) == len(SITES) * 4  # start, two events, end
        async with asyncio.timeout(10 * UNIT):
            while await sink.count() < len(want) or await pending(cluster):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT site, producer, seq FROM events").fetchall()
    assert sorted(rows) == sorted(want)  # every event, none twice
    assert worker.rows_written == len(want)
    assert worker.dead_lettered == 0


async def test_connect_redis_gives_a_cluster_client(
    redis_cluster_proc: RedisClusterProcess,
) -> None:
    """A redis+cluster:// URL makes a RedisCluster client that reaches every node."""
    settings = msgspec.convert({"redis_url": redis_cluster_proc.url}, Settings)
    client = connect_redis(settings.redis_url, settings)
    try:
        assert isinstance(client, RedisCluster)
        await client.initialize()
        assert len(client.get_primaries()) == 3
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis+cluster://", "cluster node must be host:port"),
        ("redis+cluster://h1:1,h2", "cluster node must be host:port, got 'h2'"),
        ("redis+cluster://h1:99999", "cluster node must be host:port"),
        ("redis+cluster://h1:1/3", "only database 0"),
        ("cluster://h1:1", "redis+cluster"),
    ],
)
def test_bad_cluster_urls_refused(url: str, needle: str) -> None:
    """A cluster URL that names no usable node is a config error saying what is wrong."""
    with pytest.raises(ConfigError) as info:
        load_settings(Path(os.devnull), env={"EVENTWIRE_REDIS_URL": url})
    assert "redis_url" in str(info.value)
    assert needle in str(info.value)


def test_cluster_url_nodes_and_masked_password() -> None:
    """Every node of a cluster URL is a startup node; check-config hides its password."""
    url = "redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2:7001/"
    assert cluster_nodes(url) == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert cluster_nodes("redis://h:1/0") is None
    assert "s3cret" not in mask_url(url)
    assert "10.0.0.2:7001" in mask_url(url)


async def move_slot(proc: RedisClusterProcess, slot: int, to_port: int) -> None:
    """Give an empty slot to another master, as a resharding does; return once every node
    routes it there.

    The target imports the slot before it is given it: only then does it take a new
    config epoch, so its claim outranks the old owner's gossip. Told bare, a node that
    heard the old owner's last ping before being told could give the slot back, and
    two nodes would send each other's clients MOVED forever.
    """
    source_port = (await asyncio.to_thread(proc.primary_of, slot)).port
    target = (await on_node(to_port, "CLUSTER", "MYID")).decode()
    source = (await on_node(source_port, "CLUSTER", "MYID")).decode()
    assert await on_node(source_port, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == 0
    await on_node(to_port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source)
    await on_node(source_port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target)
    others = [n.port for n in proc.nodes if n.port not in (to_port, source_port)]
    for port in (to_port, source_port, *others):
        await on_node(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target)
    async with asyncio.timeout(10 * UNIT):
        for node in proc.nodes:
            while (await asyncio.to_thread(proc.primary_of, slot, node.port)).port != to_port:  # noqa: ASYNC110 - the cluster's state
                await asyncio.sleep(0.05)


async def test_moved_slot_fails_at_most_once_then_follows(
    make_server: MakeServer, redis_cluster_proc: RedisClusterProcess, cluster: RedisCluster
) -> None:
    """After a site's slot moves, at most one call fails (1013): the server follows the new map.

    None fails when another task (the session sweeper) met the move first; a
    call that comes while the map is read again waits for the new map rather
    than routing by the old one (before, a second hello could fail then).
    """
    srv = await start(make_server, redis_cluster_proc)
    key = "ew:{docs}:events"
    slot = cluster.keyslot(key)
    old = cluster.get_node_from_key(key)
    assert old is not None
    new_port = next(n.port for n in redis_cluster_proc.nodes if n.port != int(old.port))
    async with peer(srv.url, site="shop") as p:
        await p.hello("u-w")  # the server has learnt the slot map
    await move_slot(redis_cluster_proc, slot, new_port)
    try:
        failures = 0
        async with asyncio.timeout(5 * UNIT):
            while True:
                async with peer(srv.url, site="docs") as p:
                    await p.send({"type": "hello", "uuid": "u-m", "producer": producer_id()})
                    answer = await p.recv()
                    if answer["type"] == "error":
                        assert answer["code"] == "unavailable", answer
                        assert "slot" in str(answer), answer
                        failures += 1
                        continue
                    assert answer["type"] == "welcome"
                    assert (await p.track(event(1)))["accepted"] == 1
                    break
        assert failures <= 1
        assert await on_node(new_port, "XLEN", key) > 0
    finally:
        # Stopped first: its session ends would write the slot again between the flush
        # and the move back.
        await srv.stop()
        await on_node(new_port, "FLUSHALL")
        await move_slot(redis_cluster_proc, slot, int(old.port))


#: A site split over 4 partitions; their tags' slots (457, 4584, 8587, 12714)
#: are served by all three masters.
PARTED = "[sites.part]\norigins = []\nallow_no_origin = true\npartitions = 4\n"


async def test_partitions_over_cluster(
    make_server: MakeServer,
    redis_cluster_proc: RedisClusterProcess,
    cluster: RedisCluster,
    tmp_path: Path,
) -> None:
    """partitions = 4 over three masters: ingest, sessions, identify across partitions,
    and every reader (persist, tail, stats, the relay) following all four streams."""
    tags = [f"part:{p}" for p in range(4)]
    nodes = {cluster.get_node_from_key(f"ew:{{{t}}}:events").name for t in tags}  # type: ignore[union-attr]
    assert len(nodes) == 3
    sites_path = tmp_path / "parted.toml"
    sites_path.write_text(PARTED)
    srv = await make_server(sites=PARTED, redis_url=redis_cluster_proc.url, **FAST)
    url = f"{srv.url}/v1/track/part"
    customers = [f"c-{n}" for n in range(12)]
    assert {Keys.tag("part", u, 4) for u in customers} == set(tags)
    clients = [
        EventwireClient(url, uuid=u, encoding="msgpack" if n % 2 else "json")
        for n, u in enumerate(customers)
    ]
    for client in clients:
        await client.start()
    for i in range(50):
        for client in clients:
            client.track("product.view", {"sku": f"S{i}"})
    for client in clients:
        await client.close(timeout=10 * UNIT)
    # identify from a customer of one partition to one of another (other masters):
    producer = producer_id()
    a, b = "c-0", next(u for u in customers if Keys.tag("part", u, 4) != Keys.tag("part", "c-0", 4))
    async with peer(srv.url, site="part") as p:
        await p.hello(a, producer)
        assert (await p.track(event(1), event(2)))["accepted"] == 2
        await p.send({"type": "identify", "uuid": b})
        ack = await p.track(event(2), event(3))
        assert (ack["accepted"], ack["duplicate"]) == (1, 1)
    async with peer(srv.url, site="part") as p:
        assert (await p.hello(b, producer))["acked"] == 3

    stored: dict[str, list[dict[str, Any]]] = {}
    async with asyncio.timeout(10 * UNIT):
        while True:
            stored = {t: await events(cluster, t) for t in tags}
            actions = [e["action"] for s in stored.values() for e in s]
            starts = actions.count("session.start")
            if starts >= len(customers) and actions.count("session.end") == starts:
                break
            await asyncio.sleep(0.05)
    for tag, records in stored.items():
        assert all(
            Keys.tag("part", e["uuid"], 4) == tag
            for e in records
            if e["action"] != "client.identify"
        )
        assert all(e["site"] == "part" for e in records)
    everything = [e for records in stored.values() for e in records]
    for client, uuid in zip(clients, customers, strict=True):
        seqs = [e["seq"] for e in everything if e["producer"] == client.producer]
        assert len(seqs) == 50, uuid
        assert seqs == sorted(set(seqs)), uuid
    assert [e["seq"] for e in everything if e["producer"] == producer] == [1, 2, 3]
    want = {(e["producer"], e["seq"]) for e in everything}
    assert len(want) == len(everything), "nothing stored twice"

    # The persist worker stores every event of the four streams once.
    db = tmp_path / "events.db"
    worker = persist_worker(redis_cluster_proc.url, sites_path, db)
    sink = worker.sink
    await worker.start()
    try:
        async with asyncio.timeout(10 * UNIT):
            while await sink.count() < len(everything):  # noqa: ASYNC110 - the store's state
                await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT producer, seq FROM events WHERE site = 'part'").fetchall()
    assert sorted(rows) == sorted(want)

    # tail from the start prints each event once; stats sums the partitions.
    url_ = redis_cluster_proc.url
    proc = await tail_from_start(url_, sites_path)
    assert proc.stdout is not None
    tailed: list[tuple[str, int]] = []
    try:
        async with asyncio.timeout(10 * UNIT):
            while len(tailed) < len(everything):
                line = json.loads(await proc.stdout.readline())
                tailed.append((line["producer"], line["seq"]))
    finally:
        proc.terminate()
        await proc.wait()
    assert sorted(tailed) == sorted(want)
    code, out, err = await _command("stats", "--redis", url_, "--sites", str(sites_path), "--json")
    assert code == 0, err
    assert json.loads(out)["sites"]["part"]["length"] == len(everything)

    # The relay replays all four partitions from the start.
    live = srv.admin_url.replace("http://", "ws://") + "/v1/live?site=part&since=0"
    relayed: list[tuple[str, int]] = []
    async with connect(live, open_timeout=5 * UNIT, proxy=None) as ws:
        async with asyncio.timeout(10 * UNIT):
            while (msg := json.loads(await ws.recv()))["type"] != "ready":
                if msg["type"] == "event":
                    relayed.append((msg["event"]["producer"], msg["event"]["seq"]))
    assert sorted(relayed) == sorted(want)
