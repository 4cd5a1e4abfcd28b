"""Calls on a Redis Cluster: packed function calls node by node, and reads sent to a key's node.

:class:`ClusterCalls` runs the publisher's packed ``FCALL`` commands on a
cluster: one round trip per node, all nodes at once, each node failing
alone (a failover stops only the slots its primary served).
:func:`on_key_node` sends a command whose keys redis-py cannot place by
itself to the node serving its key. :data:`CLUSTER_READS` bounds the reads
one cluster reader has in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Final

import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, ClusterDownError, TryAgainError

from eventwire.core.errors import StoreUnavailable
from eventwire.store.client import OUTAGE, exchange, unreachable
from eventwire.store.functions import LOAD_LIBRARY
from eventwire.store.replies import missing_function
from eventwire.store.resp import pack_args

log = structlog.get_logger("eventwire.store")

#: Reads one cluster reader (a :class:`~eventwire.store.streams.StreamsReader`,
#: the persist worker) has in flight at once, one connection each, below the
#: client's :data:`~eventwire.store.client.CLUSTER_NODE_CONNECTIONS` per node.
#: A StreamsReader with more keys polls.
CLUSTER_READS: Final = 32
#: The pause between two polls of a cluster reader with more keys than that.
CLUSTER_POLL_MS: Final = 100

#: Cluster answers meaning the slot is served elsewhere (or nowhere) right now.
_NOT_HERE: Final = (AskError, TryAgainError, ClusterDownError)


class _SlotElsewhere(StoreUnavailable):
    """A cluster node answered that a slot is served by another node (or none) now."""


async def on_key_node(cluster: RedisCluster, key: str, *command: Any) -> Any:
    """Run a command naming ``key`` on the node serving its slot.

    For commands whose keys redis-py cannot place by itself (XREAD,
    XREADGROUP: the keys follow ``STREAMS``), which it would otherwise ask a
    node about first (``COMMAND GETKEYS``), a round trip and a connection more
    per call.
    """
    node = cluster.get_node_from_key(key)
    return await cluster.execute_command(*command, target_nodes=node)


class ClusterCalls:
    """Packed commands on a cluster, each sent to the node serving its route key.

    Nodes fail alone: a node that cannot be reached, is slow, or answers
    MOVED, ASK, TRYAGAIN or CLUSTERDOWN gives its commands a
    :class:`StoreUnavailable` result (their frames are nacked and resent),
    makes the next call read the slot map again, and has its calls fail at
    once for ``retry_after_ms``, while the other nodes' calls go on.

    Args:
        cluster: the cluster client.
        timeout: the ``store_timeout`` setting (s), per round trip.
        retry_after_ms: how long a failed node's calls fail at once.
    """

    def __init__(self, cluster: RedisCluster, timeout: float, retry_after_ms: int) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self.retry_after_ms = retry_after_ms
        #: After a MOVED, ASK or lost node the next call reads the slot map again.
        self._refresh_slots = False
        #: Held while the map is read again: calls that come meanwhile wait for
        #: the new map instead of routing by the old one.
        self._reading_map = asyncio.Lock()
        #: Nodes that failed, by name: until this monotonic time their calls
        #: fail at once, while every other node's go on.
        self._node_down: dict[str, float] = {}

    async def fcall(self, commands: Sequence[list[bytes]], routes: Sequence[str]) -> list[Any]:
        """Run packed commands, ``routes[i]`` naming a key of command ``i``; results in order.

        Raises:
            StoreUnavailable: the slot map cannot be read (and none was read before).
        """
        cluster = self.cluster
        try:
            async with asyncio.timeout(self.timeout):
                if self._refresh_slots or self._reading_map.locked():
                    async with self._reading_map:
                        if self._refresh_slots:
                            self._refresh_slots = False
                            await cluster.nodes_manager.initialize()
                await cluster.initialize()
        except OUTAGE as exc:
            self._refresh_slots = True
            # While a primary is down and not yet replaced its slots are not
            # covered, and redis-py refuses the new map; the map in hand
            # still routes every other node's calls.
            if not cluster.nodes_manager.slots_cache:
                raise StoreUnavailable(unreachable(exc, "redis cluster")) from None
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
                if not isinstance(reply, OUTAGE):
                    raise reply
                self._node_failed(node, reply, now)
                reason = StoreUnavailable(f"redis cluster node {node.name}: {reply or 'timeout'}")
                for i in indexes:
                    results[i] = reason
                continue
            if self._node_down.pop(node.name, None) is not None:
                log.info("redis_node_back", node=node.name)
            for i, result in zip(indexes, reply, strict=True):
                results[i] = result
        return results

    def _node_failed(self, node: ClusterNode, error: BaseException, now: float) -> None:
        self._refresh_slots = True
        if isinstance(error, _SlotElsewhere):  # the node is fine
            return
        if node.name not in self._node_down:  # once per outage
            log.warning("redis_node_failed", node=node.name, error=str(error) or "timeout")
        self._node_down[node.name] = now + self.retry_after_ms / 1000

    async def _node_fcall(self, node: ClusterNode, commands: Sequence[list[bytes]]) -> list[Any]:
        """Packed commands to one node; the library is loaded there if it lacks it.

        Raises:
            StoreUnavailable, redis ConnectionError or TimeoutError, OSError,
            TimeoutError: the node is unreachable, slow, or not serving a slot.
        """
        async with asyncio.timeout(self.timeout):
            return await self._node_exchange(node, commands)

    async def _node_exchange(self, node: ClusterNode, commands: Sequence[list[bytes]]) -> list[Any]:
        conn: Any = node.acquire_connection()
        try:
            results = await exchange(conn, commands)
            again = [i for i, r in enumerate(results) if missing_function(r)]
            if again:
                # This node never had the library, restarted empty or was
                # promoted from a replica that lacked it.
                load = pack_args(LOAD_LIBRARY)
                retried = await exchange(conn, [load, *(commands[i] for i in again)])
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
