"""Sessions from connection lifecycles (PROTOCOL.md section 6), on top of ``store``.

A session belongs to a customer (site and uuid), not to a connection. Its
state lives in Redis under the site's hash tag, so any server process can
continue a session another one started, and every decision to start or end
one is a single Redis function call (``store.lua``): two processes can never
both end the same session.

- ``open``: a hello joins the customer's open session (``resumed``) or opens
  one and publishes ``session.start``.
- ``leave``: when the customer's last connection closes, the session ends
  ``session_grace`` later (reason ``closed``), unless a hello joins it first
  (a page reload, a short network drop).
- ``session_idle`` without a stored event, or ``session_max`` in all, also
  end it (reasons ``idle``, ``max``); the customer's next event then opens a
  new session on the same connection (see ``ingest``).
- heartbeats: each process renews its connections' deadlines every third of
  ``heartbeat_ttl``; connections of a process that died lapse and count as
  closed, and the survivors' reapers end those sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Coroutine
from typing import Any, Final

import msgspec
import structlog

from eventwire.core.config import Settings
from eventwire.core.errors import StoreUnavailable
from eventwire.core.protocol import StoredEvent, record_encoder
from eventwire.core.validation import default_label
from eventwire.store import FN_HEARTBEAT, FN_LEAVE, FN_OPEN, FN_REAP, Store
from eventwire.tasks import cancel_and_wait

START: Final = "session.start"
#: Connections renewed, and customers reaped, per function call.
CHUNK: Final = 500

log = structlog.get_logger("eventwire.sessions")


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def new_session_id() -> str:
    """A random session id: 16 URL-safe characters, 96 bits."""
    return secrets.token_urlsafe(12)


class Opened(msgspec.Struct, frozen=True):
    """What a hello learns: its session, whether it joined one, the producer's acked seq."""

    session: str
    resumed: bool
    acked: int


class Sessions:
    """Session steps and the heartbeat and reaper tasks of one server process.

    Args:
        store: the Redis room (and, through it, the sites' current rules).
        settings: session timings and limits.
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.keys = store.keys
        #: This process' name in connection members: "<process>:<n>:<uuid>".
        self.process = secrets.token_hex(4)
        self._numbers = itertools.count(1)
        #: This process' live connection members, by tag (site or partition).
        self._members: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def member(self, uuid: str) -> str:
        """A new connection member for a customer."""
        return f"{self.process}:{next(self._numbers)}:{uuid}"

    # -- steps --------------------------------------------------------------------

    def _customer_keys(self, tag: str, uuid: str) -> list[str]:
        """The keys ``open`` and ``leave`` take, in their order."""
        keys = self.keys
        return [
            keys.session(tag, uuid),
            keys.conns(tag, uuid),
            keys.live(tag),
            keys.due(tag),
            keys.events(tag),
        ]

    async def open(
        self,
        site: str,
        uuid: str,
        member: str,
        producer: str,
        context: dict[str, Any] | None,
        carry: int = 0,
    ) -> Opened:
        """Register a connection and join or open its customer's session.

        Args:
            site: the site.
            uuid: the customer.
            member: the connection's member (:meth:`member`).
            producer: the connection's producer, whose stored seq is returned.
            context: the hello's context, for ``session.start``.
            carry: a stored seq of the producer in another partition (see
                :meth:`leave`); the producer's seq here is raised to it.

        Raises:
            StoreUnavailable: Redis did not answer; the connection is not registered.
        """
        keys = self.keys
        tag = self.store.tag(site, uuid)
        timing, taken = self.store.site_params(site)
        candidate = new_session_id()
        received = now_ms()
        start = record_encoder.encode(
            StoredEvent(
                site=site,
                uuid=uuid,
                session=candidate,
                producer=f"srv:{candidate}",
                seq=1,
                action=START,
                label=default_label(START, {}),
                time=received,
                received=received,
                params={"session": candidate, "producer": producer, "context": context or {}},
            )
        )
        session, resumed, acked = await self.store.call(
            FN_OPEN,
            [*self._customer_keys(tag, uuid), keys.producer(tag, producer)],
            [
                site,
                uuid,
                member,
                candidate,
                start,
                int(self.settings.heartbeat_ttl * 1000),
                timing.grace_ms,
                timing.idle_ms,
                timing.max_ms,
                self.settings.stream_maxlen,
                taken,
                *((carry, int(self.settings.producer_ttl * 1000)) if carry else ()),
            ],
        )
        self._members.setdefault(tag, set()).add(member)
        return Opened(session.decode(), bool(resumed), int(acked))

    async def leave(
        self, site: str, uuid: str, member: str, identify_to: str = "", producer: str = ""
    ) -> int:
        """Unregister a connection; its customer's session ends after the grace if it was last.

        With ``identify_to``, the session gets a ``client.identify`` event and
        ends now (reason ``identify``) if this was its last connection.

        Args:
            site: the site.
            uuid: the customer left.
            member: the connection's member.
            identify_to: the customer the connection moves to, or ''.
            producer: the connection's producer, when its stored seq in this
                partition must be returned (identify to another partition).

        Returns:
            The producer's stored seq in the customer's partition (0 without ``producer``).

        Raises:
            StoreUnavailable: Redis did not answer. The connection's heartbeat
                then lapses and a reaper treats it as closed.
        """
        tag = self.store.tag(site, uuid)
        self._members.get(tag, set()).discard(member)
        timing, taken = self.store.site_params(site)
        keys = self._customer_keys(tag, uuid)
        if producer:
            keys.append(self.keys.producer(tag, producer))
        _, stored = await self.store.call(
            FN_LEAVE,
            keys,
            [site, uuid, member, timing.grace_ms, self.settings.stream_maxlen, identify_to, taken],
        )
        return int(stored)

    # -- background -----------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat and reaper tasks."""
        for coro in (self._heartbeats(), self._reaper()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop the background tasks."""
        await cancel_and_wait(self._tasks)

    async def heartbeat_once(self) -> None:
        """Renew the deadline of every connection of this process."""
        ttl = int(self.settings.heartbeat_ttl * 1000)
        for tag, members in list(self._members.items()):
            batch = list(members)
            for i in range(0, len(batch), CHUNK):
                back = await self.store.call(
                    FN_HEARTBEAT,
                    [self.keys.live(tag)],
                    [ttl, self.keys.site_prefix(tag), *batch[i : i + CHUNK]],
                )
                if back:
                    log.warning("connections_reregistered", tag=tag, count=back)

    async def reap_once(self) -> int:
        """End the sessions that are due, on every site; returns how many ended."""
        ended = 0
        for site in list(self.store.book.sites):
            timing, taken = self.store.site_params(site)
            for tag in self.store.tags(site):
                while True:
                    dead, n = await self.store.call(
                        FN_REAP,
                        [self.keys.live(tag), self.keys.due(tag), self.keys.events(tag)],
                        [
                            site,
                            self.keys.site_prefix(tag),
                            timing.grace_ms,
                            timing.idle_ms,
                            timing.max_ms,
                            CHUNK,
                            self.settings.stream_maxlen,
                            taken,
                        ],
                    )
                    ended += n
                    if dead:
                        log.info("dead_connections_reaped", tag=tag, count=dead)
                    if dead < CHUNK and n < CHUNK:
                        break
        return ended

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_ttl / 3)
            await _guarded(self.heartbeat_once(), "heartbeat_failed")

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval)
            await _guarded(self.reap_once(), "reap_failed")


async def _guarded(step: Coroutine[Any, Any, Any], what: str) -> None:
    # A background step must outlive any failure: Redis being away is normal
    # (the next round retries), anything else is logged and retried too.
    try:
        await step
    except StoreUnavailable:
        pass
    except Exception:
        log.exception(what)
