"""Redis clients and connections, and what "Redis is down" means.

:func:`connect_redis` makes the client every server room shares,
:func:`connect_stream_reader` one for a single blocking reader, and
:func:`redis_client` the plain one commands and the persist worker use. A
``redis+cluster://`` URL gives a RedisCluster client each time.
:func:`exchange` runs packed commands (:mod:`eventwire.store.resp`) on one
connection.

:data:`OUTAGE` is the one tuple of exceptions that mean Redis is away (down,
unreachable, slow, or a cluster slot served by no node right now): an outage
is normal, answered ``nack unavailable`` or retried, never a bug. Error
*answers* other than a cluster slot's moving (``ResponseError``: WRONGTYPE,
NOGROUP, a missing key) are not in it: a caller that treats them as failures too catches
:class:`RedisError` beside it (both re-exported here, so that no room but
this package imports ``redis``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventwire.core.config import Settings, cluster_nodes
from eventwire.core.errors import StoreUnavailable

__all__ = [
    "CLUSTER_NODE_CONNECTIONS",
    "OUTAGE",
    "REDIS_POOL_SIZE",
    "RedisClient",
    "RedisError",
    "ResponseError",
    "connect_redis",
    "connect_stream_reader",
    "exchange",
    "redis_client",
]

#: Redis is away: it cannot be reached, did not answer in time, or (on a
#: cluster) no node serves the slot right now. The members, and why each:
#:
#: - StoreUnavailable: eventwire's own word for it (the store's steps raise it).
#: - redis ConnectionError: refused, reset, AUTH failed, LOADING, pool full.
#: - redis TimeoutError: a socket timeout (not a subclass of the builtin one).
#: - RedisClusterException: a cluster client that reaches no node to learn
#:   the slots, or a slot no node covers (not a RedisError).
#: - ClusterError: CLUSTERDOWN, MASTERDOWN, or redis-py giving up on redirects.
#: - AskError (MovedError too), TryAgainError: a slot moving between nodes.
#: - OSError: a socket error redis-py did not wrap.
#: - TimeoutError: an ``asyncio.timeout`` around a call ran out.
OUTAGE: Final = (
    StoreUnavailable,
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
    ClusterError,
    AskError,
    TryAgainError,
    OSError,
    TimeoutError,
)


def unreachable(exc: BaseException, what: str = "redis") -> str:
    """Why a call found Redis unreachable, for :class:`StoreUnavailable`: the
    exception's text, or ``timeout`` for one without (``asyncio.timeout``'s)."""
    return f"{what} unreachable: {str(exc) or 'timeout'}"


#: Redis connections per process: the publisher uses one at a time, hellos and
#: health checks the rest. Each costs a socket and ~20 KiB in Redis.
REDIS_POOL_SIZE: Final = 32

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


async def exchange(conn: Any, commands: Sequence[list[bytes]]) -> list[Any]:
    """Write packed commands to a connection at once and read their replies.

    Error answers are returned in their command's place, not raised; a
    failure of the connection itself is raised, and the caller must then
    drop the connection (a late reply must never be read as another
    command's).
    """
    # The parts go to the socket as they are (writelines), never joined.
    await conn.send_packed_command([p for command in commands for p in command], check_health=False)
    results: list[Any] = []
    for _ in commands:
        try:
            results.append(await conn.read_response())
        except ResponseError as exc:
            results.append(exc)
    return results
