"""The only module that speaks Redis: client factory, key names, the atomic steps, replies.

Every step that must be atomic is a function of one Redis function library,
``store.lua`` (loaded with ``FUNCTION LOAD REPLACE``, again whenever Redis
lost it); its header lists every key. Frames reach Redis through
:meth:`Store.submit`: frames from all connections are gathered into one
pipeline of one ``FCALL`` per site. Each of ``publish_lanes`` publisher lanes
has one pipeline in flight at a time; while it is, the lane's next frames
gather (group commit), so a busy server makes few, large round trips and an
idle one answers in one round trip. A producer always uses the same lane,
which keeps its frames in the order they arrived, as the per-producer
de-duplication needs: a later frame must never be stored before an earlier
one that failed (see :class:`FrameOwner`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventwire import metrics
from eventwire.core.config import SessionTimings, Settings, cluster_nodes
from eventwire.core.errors import StoreUnavailable
from eventwire.core.frames import COUNT_ONLY, EVENT, REJECT, REJECT_ALWAYS  # item kinds
from eventwire.core.ordering import FrameOwner
from eventwire.core.rules import SitesBook

_LIBRARY_TEXT: Final = (Path(__file__).parent / "store.lua").read_text()
#: A hash of the library's text: its functions carry it in their names, so
#: processes of two versions sharing one Redis each call their own code.
LIBRARY_VERSION: Final = hashlib.sha1(_LIBRARY_TEXT.encode()).hexdigest()[:12]
LIBRARY: Final = _LIBRARY_TEXT.replace("VERSION", LIBRARY_VERSION)
FN_PUBLISH: Final = f"ew_{LIBRARY_VERSION}_publish"
FN_OPEN: Final = f"ew_{LIBRARY_VERSION}_open"
FN_LEAVE: Final = f"ew_{LIBRARY_VERSION}_leave"
FN_HEARTBEAT: Final = f"ew_{LIBRARY_VERSION}_heartbeat"
FN_REAP: Final = f"ew_{LIBRARY_VERSION}_reap"


log = structlog.get_logger("eventwire.store")

#: Redis connections per process: the publisher uses one at a time, hellos and
#: health checks the rest. Each costs a socket and ~20 KiB in Redis.
REDIS_POOL_SIZE: Final = 32


def reply_text(value: Any) -> str:
    """A Redis reply value as text (redis-py gives bytes or str by version and protocol)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_id(value: Any) -> tuple[int, int]:
    """A stream entry id (``ms-seq``, bytes or str) as a comparable pair."""
    ms, _, seq = reply_text(value).partition("-")
    return int(ms), int(seq or 0)


class Keys:
    """Every Redis key name eventwire uses, in one place.

    A key's hash tag is the site's *tag*: the site id, or ``site:p`` for
    partition ``p`` of a site with ``partitions`` above 1 (PROTOCOL.md
    section 7). Everything of one customer (its session, connections,
    producer seqs and events) lives under the tag of its partition, so each
    atomic step stays within one Redis Cluster slot.

    Args:
        prefix: the ``key_prefix`` setting.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @staticmethod
    def tag(site: str, uuid: str, partitions: int) -> str:
        """The tag of a customer's partition: ``crc32(uuid) mod partitions``.

        CRC-32 (as zlib and most languages compute it) of the uuid's UTF-8
        bytes: stable across processes, versions and languages, so a reader
        elsewhere can find a customer's stream.
        """
        if partitions <= 1:
            return site
        return f"{site}:{zlib.crc32(uuid.encode()) % partitions}"

    @staticmethod
    def tags(site: str, partitions: int) -> list[str]:
        """Every tag of a site: ``[site]``, or ``site:0`` to ``site:P-1``."""
        if partitions <= 1:
            return [site]
        return [f"{site}:{p}" for p in range(partitions)]

    def streams(self, site: str, partitions: int, rejected: bool = False) -> list[str]:
        """A site's events (or rejected) stream in each partition, in partition order."""
        name = "rejected" if rejected else "events"
        return [f"{self.prefix}:{{{tag}}}:{name}" for tag in self.tags(site, partitions)]

    def events(self, tag: str) -> str:
        """The stream of accepted events of a site (or of one partition)."""
        return f"{self.prefix}:{{{tag}}}:events"

    def rejected(self, tag: str) -> str:
        """The stream of rejected events and undecodable frames of a site (or partition)."""
        return f"{self.prefix}:{{{tag}}}:rejected"

    def producer(self, tag: str, producer: str) -> str:
        """The key holding a producer's highest stored seq (in one partition)."""
        return f"{self.prefix}:{{{tag}}}:producer:{producer}"

    def site_prefix(self, tag: str) -> str:
        """The prefix of every key of a tag, for keys built inside Redis functions."""
        return f"{self.prefix}:{{{tag}}}:"

    def session(self, tag: str, uuid: str) -> str:
        """The hash of a customer's open session."""
        return f"{self.prefix}:{{{tag}}}:sess:{uuid}"

    def conns(self, tag: str, uuid: str) -> str:
        """The set of a customer's live connections."""
        return f"{self.prefix}:{{{tag}}}:conns:{uuid}"

    def live(self, tag: str) -> str:
        """Every live connection of a tag, scored by its heartbeat deadline."""
        return f"{self.prefix}:{{{tag}}}:live"

    def due(self, tag: str) -> str:
        """Customers (of a tag) whose session must be looked at, scored by when."""
        return f"{self.prefix}:{{{tag}}}:due"


class FrameSink(Protocol):
    """Who hears how a frame ended. Called from the publisher task; must not block."""

    def frame_stored(self, frame: Frame, added: int, duplicate: int) -> None:
        """The frame's step ran: ``added`` events stored, ``duplicate`` skipped."""

    def frame_failed(self, frame: Frame, why: str) -> None:
        """Nothing of the frame may be taken as stored."""

    def frame_gone(self, frame: Frame) -> None:
        """The session the frame was encoded for has ended; nothing was stored."""


class Frame:
    """One producer's items on their way into the publish step.

    Args:
        site: the site id.
        tag: the tag of the customer's partition (:meth:`Keys.tag`).
        producer_key: the producer's seq key.
        session_key: the customer's session key.
        session: the session id the events were encoded for.
        uuid: the customer.
        args: flat ``[seq, kind, payload, ...]`` in seq order.
        sink: told how the frame ended.
        token: the sink's own reference.
        owner: the sending connection's ordering state.
        first_seq: the frame's lowest seq.
    """

    __slots__ = (
        "args",
        "epoch",
        "first_seq",
        "n",
        "owner",
        "producer_key",
        "session",
        "session_key",
        "sink",
        "site",
        "tag",
        "token",
        "uuid",
    )

    def __init__(
        self,
        site: str,
        tag: str,
        producer_key: str,
        session_key: str,
        session: str,
        uuid: str,
        args: list[Any],
        sink: FrameSink,
        token: Any,
        owner: FrameOwner,
        first_seq: int,
    ) -> None:
        self.site = site
        self.tag = tag
        self.producer_key = producer_key
        self.session_key = session_key
        self.session = session
        self.uuid = uuid
        self.n = len(args) // 3
        self.args = args
        self.sink = sink
        self.token = token
        self.owner = owner
        self.epoch = owner.epoch
        self.first_seq = first_seq

    def fail(self, why: str) -> None:
        """Tell the sink, and poison the owner's epoch (see :class:`FrameOwner`)."""
        self.owner.fail(self.epoch, self.first_seq)
        self.sink.frame_failed(self, why)


#: A client of one Redis or of a Redis Cluster (``redis+cluster://`` URLs).
RedisClient = aioredis.Redis | RedisCluster

#: Connections per cluster node and process (redis-py's default is 100). Past
#: it a call fails at once (MaxConnectionsError, answered as unavailable)
#: instead of queueing; each costs a socket and ~20 KiB in that node.
CLUSTER_NODE_CONNECTIONS: Final = 64


def redis_client(url: str, **options: Any) -> RedisClient:
    """A redis.asyncio client of ``url``: a RedisCluster for ``redis+cluster://`` URLs.

    Args:
        url: a ``redis_url`` (validated by :class:`Settings`).
        options: connection options (timeouts, ``retry``) for every connection.

    Returns:
        The client; a cluster client learns the slot map on first use.
    """
    nodes = cluster_nodes(url)
    if nodes is None:
        client: aioredis.Redis = aioredis.Redis.from_url(url, **options)
        return client
    parts = urlsplit(url)
    options.pop("max_connections", None)
    options.pop("health_check_interval", None)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss+cluster",
        max_connections=CLUSTER_NODE_CONNECTIONS,
        **options,
    )


def connect_redis(url: str, settings: Settings) -> RedisClient:
    """Create the redis.asyncio client every room uses.

    The pool blocks when all its connections are busy instead of failing: a
    reconnect storm (thousands of hellos after a restart) must queue, not be
    refused. No retries inside redis-py: a failed step is answered ``nack
    unavailable`` and the client's resend is the retry, which de-duplication
    makes safe. A ``redis+cluster://`` URL gives a RedisCluster client (each
    node has its own pool of up to :data:`CLUSTER_NODE_CONNECTIONS`).
    """
    if cluster_nodes(url) is not None:
        return redis_client(
            url,
            socket_timeout=settings.store_timeout,
            socket_connect_timeout=settings.store_timeout,
            retry=Retry(NoBackoff(), 0),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_POOL_SIZE,
        timeout=settings.store_timeout,
        socket_timeout=settings.store_timeout,
        socket_connect_timeout=settings.store_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
    return client


class _Lane:
    """One publisher: a queue of frames and the task that sends them, one batch at a time.

    A lane keeps its own Redis connection: taking one from the pool for each
    batch costs more than a small batch's whole Redis step.
    """

    __slots__ = ("conn", "queue", "task", "wakeup")

    def __init__(self) -> None:
        self.queue: deque[Frame] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.conn: Any = None

    def wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)


class Store:
    """Redis access for the server: the publish pipeline and small look-ups.

    Args:
        client: a redis.asyncio client (see :func:`connect_redis`).
        settings: limits and key prefix.
        book: the sites' current rules (session timings, server-made events taken).

    Use as ``async with Store(...) as store``: the publisher tasks run inside.
    """

    def __init__(self, client: RedisClient, settings: Settings, book: SitesBook) -> None:
        self.redis = client
        #: The cluster client, or None for one Redis (the single-node path).
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._pool: Any = getattr(client, "connection_pool", None)
        #: After a MOVED, ASK or lost node the next cluster call reads the slot map again.
        self._refresh_slots = False
        #: Cluster nodes that failed, by name: until this monotonic time their
        #: calls fail at once, while every other node's go on (see _cluster_fcall).
        self._node_down: dict[str, float] = {}
        self.settings = settings
        self.book = book
        self.keys = Keys(settings.key_prefix)
        self._lanes = [_Lane() for _ in range(settings.publish_lanes)]
        self._started = False
        self._closing = False
        # After a failed round trip, frames are nacked at once until this
        # monotonic time, so that an outage answers clients quickly instead of
        # making every queued batch wait store_timeout again.
        self._down_until = 0.0
        self._fixed = [
            settings.stream_maxlen,
            settings.rejected_maxlen,
            int(settings.producer_ttl * 1000),
        ]

    async def __aenter__(self) -> Store:
        for i, lane in enumerate(self._lanes):
            lane.task = asyncio.create_task(self._run(lane), name=f"eventwire-publisher-{i}")
        self._started = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Publish what is queued, stop the publisher and close the client."""
        self._closing = True
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        for lane in self._lanes:
            lane.wake()
        if tasks:
            await asyncio.wait(tasks)
        self._started = False
        for lane in self._lanes:
            if lane.conn is not None:
                await self._pool.release(lane.conn)
                lane.conn = None
        await self.redis.aclose()

    # -- publishing -----------------------------------------------------------

    def submit(
        self,
        site: str,
        tag: str,
        producer_key: str,
        session_key: str,
        uuid: str,
        session: str,
        items: list[Any],
        sink: FrameSink,
        token: Any,
        owner: FrameOwner,
        first_seq: int,
    ) -> Frame:
        """Queue one frame's items for the next pipeline of its lane.

        Args:
            site: the site id.
            tag: the tag of the customer's partition (:meth:`tag`).
            producer_key: ``keys.producer(tag, producer)``.
            session_key: ``keys.session(tag, uuid)``.
            uuid: the customer the events were encoded for.
            session: the session id the events were encoded for.
            items: flat ``[seq, kind, payload, ...]`` in seq order.
            sink: told how the frame ended, from the publisher task.
            token: the sink's own reference, kept on the frame.
            owner: the sending connection's ordering state.
            first_seq: the frame's lowest seq.

        Returns:
            The queued frame (its ``args`` may be patched and it may be
            :meth:`resubmit` after ``frame_gone``).
        """
        frame = Frame(
            site,
            tag,
            producer_key,
            session_key,
            session,
            uuid,
            items,
            sink,
            token,
            owner,
            first_seq,
        )
        self.resubmit(frame)
        return frame

    def resubmit(self, frame: Frame) -> None:
        """Queue a frame (again) on its producer's lane."""
        if not self._started:
            frame.fail("store closed")
            return
        # A producer always takes the same lane, so its frames reach Redis in
        # the order they were sent; lanes let one batch be packed while
        # another runs in Redis.
        lane = self._lanes[hash(frame.producer_key) % len(self._lanes)]
        lane.queue.append(frame)
        lane.wake()

    def partitions(self, site: str) -> int:
        """How many partitions a site's events are split over (see :meth:`SitesBook.partitions`)."""
        return self.book.partitions(site)

    def tag(self, site: str, uuid: str) -> str:
        """The tag of a customer's partition (see :meth:`Keys.tag`)."""
        return self.keys.tag(site, uuid, self.partitions(site))

    def tags(self, site: str) -> list[str]:
        """Every tag of a site, one per partition."""
        return self.keys.tags(site, self.partitions(site))

    def site_params(self, site: str) -> tuple[SessionTimings, str]:
        """A site's session timings and the server-made events it takes (all, if unknown)."""
        rules = self.book.get(site)
        if rules is None:  # removed by a reload while its frames were on their way
            return SessionTimings.of(self.settings), "sei"
        return rules.timings(self.settings), rules.server_events

    async def call(self, function: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Call one function of the library, in its own round trip.

        Raises:
            StoreUnavailable: Redis is unreachable, slow, or answered an error.
        """
        (result,) = await self._fcall([pack_fcall(function, keys, args)], routes=[keys[0]])
        if isinstance(result, Exception):
            raise StoreUnavailable(f"redis error: {result}")
        return result

    async def _run(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        limit = self.settings.publish_batch_events
        queue = lane.queue
        while True:
            if not queue:
                if self._closing:
                    return
                lane.wakeup = loop.create_future()
                await lane.wakeup
                continue
            batch: list[Frame] = []
            events = 0
            while queue and (not batch or events + queue[0].n <= limit):
                frame = queue.popleft()
                owner = frame.owner
                if owner is not None and frame.epoch <= owner.failed_epoch:
                    # An earlier frame of this connection failed: see FrameOwner.
                    frame.fail("an earlier frame of this connection was not stored")
                    continue
                batch.append(frame)
                events += frame.n
            if not batch:
                continue
            if time.monotonic() < self._down_until:
                for frame in batch:
                    frame.fail("redis unavailable")
                continue
            await self._flush(batch, lane)

    async def _flush(self, batch: list[Frame], lane: _Lane) -> None:
        # One call per tag: all its keys share one hash tag (one cluster slot).
        by_tag: dict[str, list[Frame]] = {}
        for frame in batch:
            by_tag.setdefault(frame.tag, []).append(frame)
        calls: list[list[bytes]] = []
        routes: list[str] = []
        keys = self.keys
        # The arguments of a site, the same for each of its partitions.
        site_args: dict[str, list[Any]] = {}
        for tag, frames in by_tag.items():
            site = frames[0].site
            fargs = site_args.get(site)
            if fargs is None:
                timing, taken = self.site_params(site)
                fargs = [*self._fixed, site, timing.idle_ms, timing.max_ms, taken]
                site_args[site] = fargs
            fkeys: list[Any] = [keys.events(tag), keys.rejected(tag), keys.due(tag)]
            routes.append(fkeys[0])
            # Per frame: session, uuid, n, then its n (seq, kind, payload) items.
            tail: list[bytes] = []
            count = 0
            for frame in frames:
                fkeys += (frame.producer_key, frame.session_key)
                tail += (_bulk(frame.session), _bulk(frame.uuid), _bulk(frame.n))
                tail.append(pack_items(frame.args))
                count += 3 + 3 * frame.n
            calls.append(pack_fcall(FN_PUBLISH, fkeys, fargs, tail, count))
        started = time.perf_counter()
        try:
            results = await self._fcall(calls, lane, routes)
        except Exception as exc:
            # Whatever went wrong, the publisher must live on: the frames are
            # nacked and their clients resend them.
            metrics.STORE_ERRORS.inc()
            self._down_until = time.monotonic() + self.settings.retry_after_ms / 1000
            if not isinstance(exc, StoreUnavailable):
                log.exception("publish_failed")
            for frame in batch:
                frame.fail(str(exc))
            return
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        for frames, result in zip(by_tag.values(), results, strict=True):
            if isinstance(result, Exception):
                metrics.STORE_ERRORS.inc()
                if not isinstance(result, StoreUnavailable):  # a node down is logged once
                    log.error("publish_refused", error=str(result), frames=len(frames))
                for frame in frames:
                    frame.fail(f"redis error: {result}")
                continue
            for i, frame in enumerate(frames):
                if result[3 * i + 2]:
                    frame.sink.frame_gone(frame)
                else:
                    frame.sink.frame_stored(frame, result[3 * i], result[3 * i + 1])

    async def _fcall(
        self,
        commands: Sequence[list[bytes]],
        lane: _Lane | None = None,
        routes: Sequence[str] = (),
    ) -> list[Any]:
        """Run packed FCALLs in one round trip; load the library first if Redis lost it.

        ``routes`` holds one key of each command: on a cluster, the command
        goes to the node serving that key's slot (all its keys share it).
        """
        if self._cluster is not None:
            return await self._cluster_fcall(self._cluster, commands, routes)
        results = await self._pipeline(commands, lane)
        again = [i for i, r in enumerate(results) if _missing_function(r)]
        if again:
            # Redis restarted without persistence, or was flushed. A call to a
            # missing function did nothing, so those calls are sent again.
            load = pack_args(("FUNCTION", "LOAD", "REPLACE", LIBRARY))
            retried = await self._pipeline([load, *(commands[i] for i in again)], lane)
            if isinstance(retried[0], Exception):
                raise StoreUnavailable(f"cannot load the function library: {retried[0]}")
            for i, r in zip(again, retried[1:], strict=True):
                results[i] = r
        return results

    async def _pipeline(
        self, commands: Sequence[list[bytes]], lane: _Lane | None = None
    ) -> list[Any]:
        """Send packed commands in one write and read their replies; error replies are returned.

        redis-py's Pipeline object costs more per command than the whole Lua
        step at small frames, so commands come packed and this talks to one
        connection directly: the lane's own, or one from the pool. Any
        failure drops that connection: a reply that arrives late must never
        be read as another command's.

        Raises:
            StoreUnavailable: Redis is unreachable or did not answer in time.
        """
        pool = self._pool
        conn: Any = lane.conn if lane is not None else None
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                if conn is None:
                    conn = await pool.get_connection()
                    if lane is not None:
                        lane.conn = conn
                results = await _exchange(conn, commands)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            if conn is not None:
                await conn.disconnect()
            raise StoreUnavailable(f"redis unreachable: {exc or 'timeout'}") from None
        except BaseException:
            if conn is not None:
                await conn.disconnect()
            raise
        finally:
            # A lane keeps its connection (disconnected after a failure, it
            # connects again on next use); others go back to the pool.
            if conn is not None and lane is None:
                await pool.release(conn)
        return results

    async def _cluster_fcall(
        self, cluster: RedisCluster, commands: Sequence[list[bytes]], routes: Sequence[str]
    ) -> list[Any]:
        """:meth:`_fcall` on a cluster: one round trip per node, all nodes at once.

        Nodes fail alone: a node that cannot be reached, is slow, or answers
        MOVED, ASK, TRYAGAIN or CLUSTERDOWN gives its commands a
        :class:`StoreUnavailable` result (their frames are nacked and
        resent), makes the next call read the slot map again, and has its
        calls fail at once for ``retry_after_ms``, while the other nodes'
        calls go on: one primary down (a failover) stops only the sites and
        partitions it serves.

        Raises:
            StoreUnavailable: the slot map cannot be read (and none was read before).
        """
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                if self._refresh_slots:
                    self._refresh_slots = False
                    await cluster.nodes_manager.initialize()
                await cluster.initialize()
        except _NODE_ERRORS as exc:
            self._refresh_slots = True
            # While a primary is down and not yet replaced its slots are not
            # covered, and redis-py refuses the new map; the map in hand
            # still routes every other node's calls.
            if not cluster.nodes_manager.slots_cache:
                raise StoreUnavailable(f"redis cluster unreachable: {exc or 'timeout'}") from None
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, key in enumerate(routes):
            node = cluster.get_node_from_key(key)
            assert node is not None  # only replica look-ups give None
            groups.setdefault(node.name, (node, []))[1].append(i)
        now = time.monotonic()
        results: list[Any] = [None] * len(commands)
        sent: list[tuple[ClusterNode, list[int]]] = []
        for name, (node, indexes) in groups.items():
            if self._node_down.get(name, 0.0) > now:
                down = StoreUnavailable(f"redis cluster node {name} unavailable")
                for i in indexes:
                    results[i] = down
            else:
                sent.append((node, indexes))
        replies = await asyncio.gather(
            *(self._node_fcall(node, [commands[i] for i in indexes]) for node, indexes in sent),
            return_exceptions=True,
        )
        for (node, indexes), reply in zip(sent, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, _NODE_ERRORS):
                    raise reply
                reason = f"redis cluster node {node.name}: {reply or 'timeout'}"
                self._refresh_slots = True
                if not isinstance(reply, _SlotElsewhere):  # else the node is fine
                    if node.name not in self._node_down:  # once per outage
                        log.warning(
                            "redis_node_failed", node=node.name, error=str(reply) or "timeout"
                        )
                    self._node_down[node.name] = now + self.settings.retry_after_ms / 1000
                for i in indexes:
                    results[i] = StoreUnavailable(reason)
                continue
            if self._node_down.pop(node.name, None) is not None:
                log.info("redis_node_back", node=node.name)
            for i, result in zip(indexes, reply, strict=True):
                results[i] = result
        return results

    async def _node_fcall(self, node: ClusterNode, commands: Sequence[list[bytes]]) -> list[Any]:
        """Packed commands to one cluster node; the library is loaded there if it lacks it.

        Raises:
            StoreUnavailable, redis ConnectionError or TimeoutError, OSError,
            TimeoutError: the node is unreachable, slow, or not serving a slot.
        """
        async with asyncio.timeout(self.settings.store_timeout):
            return await self._node_exchange(node, commands)

    async def _node_exchange(self, node: ClusterNode, commands: Sequence[list[bytes]]) -> list[Any]:
        conn: Any = node.acquire_connection()
        try:
            results = await _exchange(conn, commands)
            again = [i for i, r in enumerate(results) if _missing_function(r)]
            if again:
                # This node never had the library, restarted empty or was
                # promoted from a replica that lacked it.
                load = pack_args(("FUNCTION", "LOAD", "REPLACE", LIBRARY))
                retried = await _exchange(conn, [load, *(commands[i] for i in again)])
                if isinstance(retried[0], Exception):
                    raise StoreUnavailable(f"cannot load the function library: {retried[0]}")
                for i, r in zip(again, retried[1:], strict=True):
                    results[i] = r
            moved = next((r for r in results if isinstance(r, _NOT_HERE)), None)
            if moved is not None:
                raise _SlotElsewhere(f"redis cluster slot not served here: {moved}")
        except BaseException:
            # A reply that arrives late must never be read as another command's.
            await conn.disconnect()
            raise
        finally:
            node.release(conn)
        return results

    # -- look-ups -------------------------------------------------------------

    async def record_rejected(self, site: str, uuid: str | None, record: bytes) -> bool:
        """Append one record to a customer's partition's rejected stream; False if Redis failed.

        Used for undecodable frames, which have no producer seq to de-duplicate
        by. Before a hello (no customer yet) the record goes to partition 0.
        """
        try:
            await self.redis.xadd(
                self.keys.rejected(self.tag(site, uuid or "")),
                {"event": record},
                maxlen=self.settings.rejected_maxlen,
                approximate=True,
            )
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            RedisClusterException,
            *_NOT_HERE,
        ):
            # On a cluster, a slot moving (MOVED, ASK) is an outage of this call too.
            return False
        return True

    async def ping(self) -> bool:
        """Whether Redis answers PING within ``store_timeout``."""
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                return bool(await self.redis.ping())
        except (redis.exceptions.RedisError, TimeoutError, OSError):
            return False

    async def site_summary(self, site: str) -> SiteSnapshot:
        """A site's open sessions and both streams' ends, read in one round trip.

        Open sessions are the members of the ``due`` sets: the Lua steps add
        a customer there when its session opens and remove it when the
        session ends, so their size is the open session count (``ZCARD``,
        O(1)). A partitioned site's streams are summed as one (see
        :func:`merge_stream_info`).

        Raises:
            StoreUnavailable: Redis is unreachable or slow.
        """
        keys = self.keys
        tags = self.tags(site)
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                async with self.redis.pipeline(transaction=False) as pipe:
                    if self._cluster is None:
                        pipe.time()
                    else:
                        # redis-py sends no keyless command in a cluster
                        # pipeline: TIME is asked of the site's own node.
                        pipe.eval("return redis.call('TIME')", 1, keys.due(tags[0]))
                    for tag in tags:
                        pipe.zcard(keys.due(tag))
                        pipe.xinfo_stream(keys.events(tag))
                        pipe.xinfo_stream(keys.rejected(tag))
                    now, *replies = await pipe.execute(raise_on_error=False)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis unreachable: {exc or 'timeout'}") from None
        except TimeoutError:
            raise StoreUnavailable("redis did not answer in time") from None
        for reply in (now, *replies[::3]):
            if isinstance(reply, Exception):
                raise StoreUnavailable(f"redis error: {reply}")
        return SiteSnapshot(
            now_ms=time_ms(now),
            open_sessions=sum(int(n) for n in replies[::3]),
            events=merge_stream_info([_info_or_none(r) for r in replies[1::3]]),
            rejected=merge_stream_info([_info_or_none(r) for r in replies[2::3]]),
        )


# -- packing commands (RESP) ---------------------------------------------------
#
# hiredis' pack_command costs ~0.4 µs per event in a 100-event call and grows
# to ~1.7 µs in a 2,000-event call (it is not linear); packing here is linear
# at ~0.3 µs per event, and a frame's items are packed in one formatting step.

_KIND_BULK: Final = {
    kind: b"$1\r\n" + kind + b"\r\n" for kind in (EVENT, REJECT, REJECT_ALWAYS, COUNT_ONLY)
}


def _bulk(value: Any) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int):
        data = b"%d" % value
    else:
        raise TypeError(f"cannot send {type(value).__name__} to Redis")
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack_args(args: Sequence[Any]) -> list[bytes]:
    """One Redis command (str, bytes and int arguments) in RESP, in parts."""
    return [b"*%d\r\n" % len(args), *(_bulk(a) for a in args)]


def pack_items(items: Sequence[Any]) -> bytes:
    """A frame's flat ``[seq, kind, payload, ...]`` as RESP bulk strings (no header)."""
    out = []
    for i in range(0, len(items), 3):
        seq = b"%d" % items[i]
        payload = items[i + 2]
        out.append(
            b"$%d\r\n%b\r\n%b$%d\r\n%b\r\n"
            % (len(seq), seq, _KIND_BULK[items[i + 1]], len(payload), payload)
        )
    return b"".join(out)


def pack_fcall(
    function: str,
    keys: Sequence[Any],
    args: Sequence[Any],
    tail: Sequence[bytes] = (),
    tail_count: int = 0,
) -> list[bytes]:
    """``FCALL function len(keys) *keys *args`` in RESP parts, then ``tail_count`` packed ones.

    ``tail`` holds arguments packed already (:func:`pack_items`); the parts are
    written to the socket as they are, so a large call is never copied whole.
    """
    head = ("FCALL", function, len(keys), *keys, *args)
    return [b"*%d\r\n" % (len(head) + tail_count), *(_bulk(a) for a in head), *tail]


#: Cluster answers meaning the slot is served elsewhere (or nowhere) right now.
_NOT_HERE: Final = (AskError, TryAgainError, ClusterDownError)


class _SlotElsewhere(StoreUnavailable):
    """A cluster node answered that a slot is served by another node (or none) now."""


#: How one cluster node's round trip fails when the node is away or not serving.
_NODE_ERRORS: Final = (
    StoreUnavailable,
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
    OSError,
    TimeoutError,
)


async def _exchange(conn: Any, commands: Sequence[list[bytes]]) -> list[Any]:
    """Write packed commands to a connection at once and read their replies (errors returned)."""
    # The parts go to the socket as they are (writelines), never joined.
    await conn.send_packed_command([p for command in commands for p in command], check_health=False)
    results: list[Any] = []
    for _ in commands:
        try:
            results.append(await conn.read_response())
        except ResponseError as exc:
            results.append(exc)
    return results


def _missing_function(result: Any) -> bool:
    return isinstance(result, ResponseError) and "Function not found" in str(result)


# -- stream readers (the live relay) --------------------------------------------------


class StreamInfo(NamedTuple):
    """The parts of ``XINFO STREAM`` a reader needs."""

    length: int
    entries_added: int
    first_id: str | None
    last_generated_id: str


class SiteSnapshot(NamedTuple):
    """A site's numbers at one moment of Redis' clock (see :meth:`Store.site_summary`)."""

    now_ms: int
    open_sessions: int
    events: StreamInfo | None
    rejected: StreamInfo | None


class StreamEntry(NamedTuple):
    """One stream entry: its id and its ``event`` field (None if it has none)."""

    id: str
    event: bytes | None


def reply_field(reply: Mapping[Any, Any], name: str) -> Any:
    """A field of a redis-py reply dict, whose keys are str or bytes by version and protocol."""
    if name in reply:
        return reply[name]
    return reply.get(name.encode())


def parse_stream_info(reply: Mapping[Any, Any]) -> StreamInfo:
    """``XINFO STREAM``'s reply (RESP2 or RESP3 shape) as a :class:`StreamInfo`."""
    first = reply_field(reply, "first-entry")
    return StreamInfo(
        length=int(reply_field(reply, "length")),
        entries_added=int(reply_field(reply, "entries-added") or 0),
        first_id=reply_text(first[0]) if first else None,
        last_generated_id=reply_text(reply_field(reply, "last-generated-id") or "0-0"),
    )


def merge_stream_info(infos: Sequence[StreamInfo | None]) -> StreamInfo | None:
    """The streams of a partitioned site summed as one: lengths and counts added,
    the oldest first entry and the newest id (None when no stream exists)."""
    found = [i for i in infos if i is not None]
    if len(found) <= 1:
        return found[0] if found else None
    firsts = [i.first_id for i in found if i.first_id is not None]
    return StreamInfo(
        length=sum(i.length for i in found),
        entries_added=sum(i.entries_added for i in found),
        first_id=min(firsts, key=stream_id) if firsts else None,
        last_generated_id=max((i.last_generated_id for i in found), key=stream_id),
    )


def _info_or_none(reply: Any) -> StreamInfo | None:
    if isinstance(reply, ResponseError) and "no such key" in str(reply).lower():
        return None
    if isinstance(reply, Exception):
        raise StoreUnavailable(f"redis error: {reply}")
    return parse_stream_info(reply)


def trimmed_after(position: str, info: StreamInfo | None) -> bool:
    """Whether the stream lost entries at or after ``position`` (exclusive) by trimming.

    XREAD and XRANGE from an id older than the stream's first entry start at
    that first entry without a word, so a reader must ask. Trimming (``MAXLEN
    ~``, ``XTRIM MINID``) removes a prefix of the stream, and Redis 7.0 does
    not move ``max-deleted-entry-id`` when it does: what is left to compare
    is the first entry. The answer is True when entries were removed
    (``entries-added`` above ``length``) and ``position`` is older than the
    first entry still there. It may be True when every removed entry was older
    than ``position`` (Redis keeps no record of the last trimmed id), never
    False when entries after ``position`` were trimmed.

    Args:
        position: an entry id; the reader has seen everything up to it.
        info: the stream's info read together with the entries (None: no stream).
    """
    if info is None or info.entries_added <= info.length:
        return False
    if info.first_id is None:  # everything was trimmed
        return stream_id(info.last_generated_id) > stream_id(position)
    return stream_id(position) < stream_id(info.first_id)


def stream_entries(raw: Any) -> list[StreamEntry]:
    """Entries of XRANGE, or one key's of :func:`xread_entries`, as :class:`StreamEntry` values."""
    out: list[StreamEntry] = []
    for entry_id, fields in raw or ():
        value = reply_field(fields, "event") if fields else None
        if isinstance(value, str):
            value = value.encode()
        out.append(StreamEntry(reply_text(entry_id), value))
    return out


async def read_page(
    client: RedisClient, key: str, after: str, count: int, until: str = "+"
) -> tuple[list[StreamEntry], StreamInfo | None]:
    """Entries after ``after`` (exclusive) up to ``until``, and the stream's info, at one moment.

    Both are read in one ``MULTI``, so :func:`trimmed_after` judges the very
    snapshot the entries come from.

    Args:
        client: a redis.asyncio client.
        key: the stream.
        after: an entry id; entries after it are returned.
        count: the most entries returned.
        until: the last id that may be returned (``+``: the end).

    Returns:
        The entries, oldest first, and the info (None: the stream does not exist).

    Raises:
        redis.exceptions.RedisError, OSError: Redis is unreachable or failed.
    """
    async with client.pipeline(transaction=True) as pipe:
        pipe.xinfo_stream(key)
        pipe.xrange(key, f"({after}", until, count=count)
        info, entries = await pipe.execute(raise_on_error=False)
    if isinstance(entries, Exception):
        raise entries
    return stream_entries(entries), _info_or_none(info)


def xread_entries(reply: Any) -> list[tuple[str, list[tuple[Any, Any]]]]:
    """XREAD's (or XREADGROUP's) reply as ``[(key, [(id, fields), ...]), ...]``.

    RESP2 answers a list of ``[key, entries]``, RESP3 a dict whose entries may
    sit one level deeper; both come out the same.
    """
    if not reply:
        return []
    items: list[Any] = list(reply.items()) if isinstance(reply, Mapping) else list(reply)
    out: list[tuple[str, list[tuple[Any, Any]]]] = []
    for key, entries in items:
        if entries and isinstance(entries[0], list | tuple) and len(entries[0]) == 1:
            entries = entries[0]
        out.append((reply_text(key), [(e[0], e[1] or {}) for e in entries or ()]))
    return out


async def read_new(
    client: RedisClient, key: str, after: str, count: int, block_ms: int
) -> list[StreamEntry]:
    """Entries added after ``after``, waiting up to ``block_ms`` for the first (``XREAD BLOCK``).

    Raises:
        redis.exceptions.RedisError, OSError: Redis is unreachable or failed.
    """
    replies = xread_entries(await client.xread({key: after}, count=count, block=block_ms))
    return stream_entries(replies[0][1]) if replies else []


async def stream_end(client: RedisClient, key: str) -> str:
    """The id of the last entry ever added to a stream (``0-0`` if it does not exist)."""
    try:
        info = parse_stream_info(await client.xinfo_stream(key))
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return "0-0"
        raise
    return info.last_generated_id


async def redis_time_ms(client: RedisClient) -> int:
    """Redis' clock in milliseconds: the clock stream ids come from."""
    return time_ms(await client.time())


def time_ms(reply: Sequence[Any]) -> int:
    """``TIME``'s reply (seconds, microseconds) in milliseconds."""
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


#: Reads one cluster reader (a :class:`StreamsReader`, the persist worker) has
#: in flight at once, one connection each, below the client's
#: :data:`CLUSTER_NODE_CONNECTIONS` per node. A StreamsReader with more keys polls.
CLUSTER_READS: Final = 32
#: The pause between two polls of a cluster reader with more keys than that.
CLUSTER_POLL_MS: Final = 100


async def on_key_node(cluster: RedisCluster, key: str, *command: Any) -> Any:
    """Run a command naming ``key`` on the node serving its slot.

    For commands whose keys redis-py cannot place by itself (XREAD,
    XREADGROUP: the keys follow ``STREAMS``), which it would otherwise ask a
    node about first (``COMMAND GETKEYS``), a round trip and a connection more
    per call.
    """
    node = cluster.get_node_from_key(key)
    return await cluster.execute_command(*command, target_nodes=node)


class StreamsReader:
    """``XREAD COUNT count BLOCK block_ms`` over several streams, call after call.

    One Redis reads every key in one call. A cluster cannot read keys of
    several slots in one call, so each key is read on its own, sent straight
    to its key's node (:func:`on_key_node`). Up to :data:`CLUSTER_READS` keys each get a
    blocking read, all at once; the first answers end a call, and the reads
    still waiting stay in flight for the next call rather than being
    cancelled: redis-py drops the connection of a cancelled command (a late
    reply must never be read as the next command's), which would cost a
    reconnect per key per call. A read in flight is kept while its key's
    position is the one it was sent with, and sent again when the caller
    moved it. With more keys, every key is read without blocking (that many
    at a time) and, when none had entries, the call waits
    :data:`CLUSTER_POLL_MS` before it returns.

    Args:
        client: a redis.asyncio client (one Redis or a cluster).
        count: the most entries per key and read.
        block_ms: how long a read waits for new entries.

    Use as ``async with StreamsReader(...) as reader``: the reads in flight
    are cancelled on exit.
    """

    def __init__(self, client: RedisClient, count: int, block_ms: int) -> None:
        self.client = client
        self.count = count
        self.block_ms = block_ms
        #: Per key on a cluster: the position a read was sent with, and the read.
        self._reads: dict[str, tuple[str, asyncio.Task[Any]]] = {}

    async def __aenter__(self) -> StreamsReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the reads in flight and wait for them."""
        reads = [task for _, task in self._reads.values()]
        self._reads.clear()
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)

    async def read(self, streams: Mapping[str, str]) -> list[tuple[str, list[tuple[Any, Any]]]]:
        """Entries after each key's position, waiting up to ``block_ms`` for the first.

        Args:
            streams: key -> the id after which to read.

        Returns:
            The entries by key, as :func:`xread_entries` gives them (keys
            without new entries may be missing).

        Raises:
            redis.exceptions.RedisError, OSError: Redis is unreachable or failed.
        """
        client = self.client
        if not isinstance(client, RedisCluster):
            wanted: dict[Any, Any] = dict(streams)
            return xread_entries(await client.xread(wanted, count=self.count, block=self.block_ms))
        # Concurrent commands must not meet a cold cluster client (new, or
        # after a failover): redis-py's initialisation closes connections the
        # first commands use. A no-op once initialised.
        await client.initialize()
        if len(streams) > CLUSTER_READS:
            return await self._poll(client, streams)
        reads = self._reads
        for key in [k for k in reads if k not in streams]:
            reads.pop(key)[1].cancel()
        for key, pos in streams.items():
            sent = reads.get(key)
            if sent is not None and sent[0] != pos:
                sent[1].cancel()
                sent = None
            if sent is None:
                task = asyncio.ensure_future(self._read_one(client, key, pos, self.block_ms))
                reads[key] = (pos, task)
        await asyncio.wait([t for _, t in reads.values()], return_when=asyncio.FIRST_COMPLETED)
        merged: list[tuple[str, list[tuple[Any, Any]]]] = []
        failure: BaseException | None = None
        for key, (_, task) in list(reads.items()):
            if not task.done():
                continue
            del reads[key]
            if task.cancelled():
                continue
            if (error := task.exception()) is not None:
                failure = failure or error
                continue
            merged += xread_entries(task.result())
        if failure is not None:
            raise failure
        return merged

    async def _read_one(
        self, cluster: RedisCluster, key: str, pos: str, block_ms: int | None
    ) -> Any:
        """One key's XREAD, on the node serving its slot."""
        args: list[Any] = ["XREAD", "COUNT", self.count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        return await on_key_node(cluster, key, *args, "STREAMS", key, pos)

    async def _poll(
        self, cluster: RedisCluster, streams: Mapping[str, str]
    ) -> list[tuple[str, list[tuple[Any, Any]]]]:
        await self.aclose()
        gate = asyncio.Semaphore(CLUSTER_READS)

        async def one(key: str, pos: str) -> Any:
            async with gate:
                return await self._read_one(cluster, key, pos, None)

        replies = await asyncio.gather(*(one(k, p) for k, p in streams.items()))
        merged = [pair for reply in replies for pair in xread_entries(reply)]
        if not any(entries for _, entries in merged):
            await asyncio.sleep(min(self.block_ms, CLUSTER_POLL_MS) / 1000)
        return merged


def connect_stream_reader(url: str, settings: Settings, block_ms: int) -> RedisClient:
    """A client with its own connection for one blocking reader (``XREAD BLOCK``).

    A blocked read holds its connection for up to ``block_ms``: it must not
    take one of the publisher's pooled connections (on a cluster: of the
    reader's own client, one per node at a time).
    """
    wait = settings.store_timeout + block_ms / 1000
    return redis_client(
        url,
        max_connections=1,
        socket_timeout=wait,
        socket_connect_timeout=settings.store_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
