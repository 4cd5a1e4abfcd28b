"""Sessions from connection lifecycles (docs/protocol.md section 6), on top of ``store``.

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
- merges (docs/protocol.md section 17): ``leave`` with an identify records
  the anonymous uuid as an alias of the new customer in the same step as its
  ``client.identify``; ``alias`` does it for a Segment call; ``open`` refuses
  a suppressed customer (its keyed hash, made once per call, never per frame).
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

import structlog

from eventwire import metrics
from eventwire.core.commands import SessionStart
from eventwire.core.config import Settings
from eventwire.core.errors import StoreUnavailable
from eventwire.log import Episodes
from eventwire.store import (
    FN_ALIAS,
    FN_HEARTBEAT,
    FN_LEAVE,
    FN_OPEN,
    FN_REAP,
    OUTAGE,
    REDIS_POOL_SIZE,
    AliasArgs,
    AliasKeys,
    AliasReply,
    CustomerKeys,
    HeartbeatArgs,
    HeartbeatKeys,
    LeaveArgs,
    LeaveKeys,
    OpenArgs,
    ReapArgs,
    ReapKeys,
    Store,
    call_keys,
    identify_record,
    identify_refused_record,
    parse_alias,
    parse_leave,
    parse_open,
    parse_reap,
    session_end_record,
    session_start_record,
    unreachable,
)
from eventwire.store import LeaveReply as Left
from eventwire.store import OpenReply as Opened
from eventwire.store.privacy import is_suppressed, record_alias
from eventwire.tasks import cancel_and_wait

__all__ = ["CHUNK", "Left", "Opened", "Sessions", "new_session_id", "now_ms"]

#: The ``taken`` of a session a dropped bot opens: no server-made event, now or at its end.
QUIET: Final = "q"
#: Connections renewed, and customers reaped, per function call.
CHUNK: Final = 500

log = structlog.get_logger("eventwire.sessions")


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def new_session_id() -> str:
    """A random session id: 16 URL-safe characters, 96 bits."""
    return secrets.token_urlsafe(12)


#: Leave steps in flight at once per process, a quarter of its Redis pool
#: (:data:`REDIS_POOL_SIZE`). A mass disconnect (a network blip, a balancer
#: restart) ends thousands of connections at once: unbounded, their leaves
#: took the whole pool and waited past ``store_timeout`` for a connection
#: (1,783 of 4,300 failed in one run), and hellos waited behind them. Bounded,
#: the rest wait here without a deadline, and the pool keeps room for hellos.
LEAVE_CONCURRENCY: Final = REDIS_POOL_SIZE // 4
#: After a leave found Redis unreachable, the leaves waiting fail at once for
#: this long instead of each waiting ``store_timeout`` in turn (their
#: heartbeats lapse and a reaper ends the sessions when Redis is back).
LEAVE_PAUSE: Final = 1.0
#: At most one ``leave_failed`` line in this many seconds (the metric counts each).
LEAVE_FAILED_LOG_EVERY: Final = 10.0


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
        #: Dropped bot events by site not yet added to Redis' count (flushed with heartbeats).
        self.dropped_bots: dict[str, int] = {}
        self._leaving = asyncio.Semaphore(LEAVE_CONCURRENCY)
        #: Until when (monotonic) waiting leaves fail at once (see :data:`LEAVE_PAUSE`).
        self._leaves_paused_until = 0.0
        #: The ``leave_failed`` lines (see :meth:`leave_failed`).
        self._leave_failures = Episodes(log, "leave_failed", LEAVE_FAILED_LOG_EVERY)

    def member(self, uuid: str) -> str:
        """A new connection member for a customer."""
        return f"{self.process}:{next(self._numbers)}:{uuid}"

    # -- steps --------------------------------------------------------------------

    def _customer_keys(self, tag: str, uuid: str, producer: str) -> CustomerKeys:
        """The keys ``open`` takes."""
        keys = self.keys
        return CustomerKeys(
            session=keys.session(tag, uuid),
            conns=keys.conns(tag, uuid),
            live=keys.live(tag),
            due=keys.due(tag),
            events=keys.events(tag),
            producer=keys.producer(tag, producer),
            suppressed=keys.suppressed(tag),
            aliases=keys.aliases(tag, uuid),
        )

    async def open(
        self,
        site: str,
        uuid: str,
        member: str,
        producer: str,
        context: dict[str, Any] | None,
        carry: int = 0,
        alias: str = "",
        start: SessionStart | None = None,
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
            alias: the anonymous uuid an identify just merged into ``uuid``
                (it joins the customer's aliases set), or ''.
            start: the visitor's ``client``, attribution and bot verdict for
                the ``session.start`` (None: not enriched).

        Returns:
            The session; ``suppressed`` (nothing registered, no session) when
            the customer was forgotten and suppressed.

        Raises:
            StoreUnavailable: Redis did not answer; the connection is not registered.
        """
        tag = self.store.tag(site, uuid)
        timing, taken = self.store.site_params(site)
        subject = await self.store.subjects.subject(site, uuid)
        candidate = new_session_id()
        if start is None:
            record = session_start_record(site, uuid, candidate, producer, context or {}, now_ms())
        else:
            record = session_start_record(
                site,
                uuid,
                candidate,
                producer,
                context or {},
                now_ms(),
                start.client,
                start.source,
                start.bot,
            )
            if start.quiet:
                # A dropped bot: no server-made event for a session it opens (store.lua's q).
                taken = QUIET
        args = OpenArgs(
            uuid=uuid,
            member=member,
            session_id=candidate,
            start_record=record,
            heartbeat_ms=int(self.settings.heartbeat_ttl * 1000),
            grace_ms=timing.grace_ms,
            idle_ms=timing.idle_ms,
            max_ms=timing.max_ms,
            events_maxlen=self.settings.stream_maxlen,
            taken=taken,
            end_record=session_end_record(site),
            carry=carry,
            producer_ttl_ms=int(self.settings.producer_ttl * 1000),
            subject=subject,
            alias=alias,
            alias_ttl_ms=self._alias_ttl_ms(site) if alias else 0,
        )
        keys = self._customer_keys(tag, uuid, producer)
        opened = parse_open(await self.store.call(FN_OPEN, call_keys(keys), args))
        if opened.suppressed:
            return opened._replace(session=candidate)
        self._members.setdefault(tag, set()).add(member)
        return opened

    def drop(self, site: str, uuid: str, member: str) -> None:
        """Stop renewing a member that is no longer registered (its customer was suppressed)."""
        self._members.get(self.store.tag(site, uuid), set()).discard(member)

    async def leave(
        self,
        site: str,
        uuid: str,
        member: str,
        identify_to: str = "",
        producer: str = "",
        refused: str = "",
        quiet: bool = False,
    ) -> Left:
        """Unregister a connection; its customer's session ends after the grace if it was last.

        With ``identify_to``, the session gets a ``client.identify`` event and
        ends now (reason ``identify``) if this was its last connection; the
        uuid left merges into ``identify_to`` unless ``refused`` says why not
        or Redis finds a reason (see ``may_merge`` in ``store.lua``).

        Args:
            site: the site.
            uuid: the customer left.
            member: the connection's member.
            identify_to: the customer the connection moves to, or ''.
            producer: the connection's producer, when its stored seq in this
                partition must be returned (identify to another partition).
            refused: why the merge must not happen ('' allows it).
            quiet: a dropped bot's connection: no ``client.identify`` is stored.

        Returns:
            The producer's stored seq in the customer's partition (0 without
            ``producer``) and whether the identify merged.

        Raises:
            StoreUnavailable: Redis did not answer. The connection's heartbeat
                then lapses and a reaper treats it as closed.
        """
        tag = self.store.tag(site, uuid)
        self._members.get(tag, set()).discard(member)
        timing, taken = self.store.site_params(site)
        if quiet:
            taken = QUIET
        keys = self.keys
        call = LeaveKeys(
            session=keys.session(tag, uuid),
            conns=keys.conns(tag, uuid),
            live=keys.live(tag),
            due=keys.due(tag),
            events=keys.events(tag),
            alias_key=keys.alias(tag, uuid),
            own_aliases=keys.aliases(tag, uuid),
            suppressed=keys.suppressed(tag),
            producer=keys.producer(tag, producer) if producer else None,
        )
        args = LeaveArgs(
            uuid=uuid,
            member=member,
            grace_ms=timing.grace_ms,
            events_maxlen=self.settings.stream_maxlen,
            taken=taken,
            end_record=session_end_record(site),
            identify_record=identify_record(site, identify_to, uuid) if identify_to else b"",
            refused_record=identify_refused_record(site, identify_to, uuid) if identify_to else b"",
            refused=refused,
            subject=await self.store.subjects.subject(site, uuid) if identify_to else "",
            to=identify_to,
            alias_ttl_ms=self._alias_ttl_ms(site),
        )
        async with self._leaving:
            if time.monotonic() < self._leaves_paused_until:
                raise StoreUnavailable("redis unreachable: a leave just before found it so")
            try:
                return parse_leave(await self.store.call(FN_LEAVE, call_keys(call), args))
            except StoreUnavailable:
                self._leaves_paused_until = time.monotonic() + LEAVE_PAUSE
                raise

    def leave_failed(self, error: StoreUnavailable) -> None:
        """A closed connection's leave failed: counted, and logged once per episode.

        Its heartbeat lapses instead and a reaper ends the session; during an
        outage every closing connection comes here, so the line says how many.
        """
        metrics.SESSION_LEAVES_FAILED.inc()
        self._leave_failures.note(
            error=str(error),
            hint="the sessions of these connections end when their heartbeat lapses",
        )

    def _alias_ttl_ms(self, site: str) -> int:
        """How long a merge's alias key lives: the site's ``retain_days`` (0: none, no expiry).

        The store deletes a merge's row after ``retain_days`` (section 17 of
        docs/protocol.md); the key that refuses a second merge of the same
        uuid lives as long, so Redis and the store agree on the merges.
        """
        rules = self.store.book.get(site)
        days = rules.config.retain_days if rules is not None else None
        return int(days * 86_400_000) if days else 0

    async def suppressed(self, site: str, uuid: str) -> bool:
        """Whether a customer is forgotten and suppressed (one look-up: identify, alias only).

        Raises:
            StoreUnavailable: Redis did not answer.
        """
        subject = await self.store.subjects.subject(site, uuid)
        try:
            return await is_suppressed(
                self.store.redis, self.keys, site, self.store.partitions(site), uuid, subject
            )
        except OUTAGE as exc:
            raise StoreUnavailable(unreachable(exc)) from None

    async def alias(self, site: str, alias: str, uuid: str, refused: str = "") -> AliasReply:
        """Merge ``alias`` into ``uuid`` without a connection (Segment ``alias``, ``identify``).

        Decided by the same rules as an identify's merge (``may_merge``), in
        the anonymous uuid's partition; once merged, ``alias`` joins the
        customer's aliases set (in the customer's partition).

        Raises:
            StoreUnavailable: Redis did not answer.
        """
        if await self.suppressed(site, uuid):
            return AliasReply(False, "the customer was forgotten")
        tag = self.store.tag(site, alias)
        keys = self.keys
        call = AliasKeys(keys.alias(tag, alias), keys.aliases(tag, alias), keys.suppressed(tag))
        subject = await self.store.subjects.subject(site, alias)
        ttl_ms = self._alias_ttl_ms(site)
        args = AliasArgs(subject=subject, to=uuid, refused=refused, alias_ttl_ms=ttl_ms)
        done = parse_alias(await self.store.call(FN_ALIAS, call, args))
        if done.merged:
            try:
                await record_alias(
                    self.store.redis, keys, site, self.store.partitions(site), uuid, alias, ttl_ms
                )
            except OUTAGE as exc:
                raise StoreUnavailable(unreachable(exc)) from None
        return done

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
                    HeartbeatKeys(live=self.keys.live(tag)),
                    [
                        *HeartbeatArgs(heartbeat_ms=ttl, site_prefix=self.keys.site_prefix(tag)),
                        *batch[i : i + CHUNK],  # the members
                    ],
                )
                if back:
                    log.warning("connections_reregistered", tag=tag, count=back)

    def note_dropped_bots(self, site: str, n: int) -> None:
        """A closed connection (or batch) had ``n`` bot events dropped (``bots = "drop"``)."""
        if n:
            self.dropped_bots[site] = self.dropped_bots.get(site, 0) + n

    async def flush_dropped_bots(self) -> None:
        """Add the dropped bot events noted since the last flush to each site's count."""
        pending, self.dropped_bots = self.dropped_bots, {}
        for site, n in pending.items():
            if not await self.store.count_dropped_bots(site, n):
                # Redis is away: kept for the next flush.
                self.note_dropped_bots(site, n)

    async def reap_once(self) -> int:
        """End the sessions that are due, on every site; returns how many ended."""
        ended = 0
        for site in list(self.store.book.sites):
            timing, taken = self.store.site_params(site)
            for tag in self.store.tags(site):
                while True:
                    keys = ReapKeys(
                        live=self.keys.live(tag),
                        due=self.keys.due(tag),
                        events=self.keys.events(tag),
                    )
                    args = ReapArgs(
                        site_prefix=self.keys.site_prefix(tag),
                        grace_ms=timing.grace_ms,
                        idle_ms=timing.idle_ms,
                        max_ms=timing.max_ms,
                        limit=CHUNK,
                        events_maxlen=self.settings.stream_maxlen,
                        taken=taken,
                        end_record=session_end_record(site),
                    )
                    dead, n = parse_reap(await self.store.call(FN_REAP, keys, args))
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
            await _guarded(self.flush_dropped_bots(), "bots_flush_failed")

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
