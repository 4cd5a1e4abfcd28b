"""The server's Redis access: the publish pipeline (lanes of group-committed frames) and look-ups.

Frames reach Redis through :meth:`Store.submit`: frames from all connections
are gathered into one pipeline of one ``FCALL`` of ``publish`` per site (or
partition). Each of ``publish_lanes`` publisher lanes sends its calls on
one Redis connection; while one is in flight the lane's next frames gather
(group commit), so a busy server makes few, large round trips and an idle
one answers in one round trip. Once enough waits (:data:`DEPTH_GATE`), the
next call is sent at once, up to ``publish_depth`` calls in flight, so that
Python packs and settles while Redis runs; the replies are read in order by
the lane's reader task. A producer always uses the same lane and has frames
in at most one of its calls in flight, which keeps its frames in the order
they arrived, as the per-producer de-duplication needs: a later frame must
never be stored before an earlier one that was not (see
:class:`~eventwire.core.ordering.FrameOwner` and :class:`_Lane`).

On a cluster the pipeline goes node by node (:class:`ClusterCalls`); the
other calls (:meth:`Store.call` for the session steps, the look-ups) use
the shared client.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import structlog
from redis.asyncio.cluster import RedisCluster

from eventwire import metrics
from eventwire.core.config import SessionTimings, Settings
from eventwire.core.errors import StoreUnavailable
from eventwire.core.ordering import FrameOwner
from eventwire.core.rules import SitesBook
from eventwire.store.client import (
    OUTAGE,
    RedisClient,
    RedisError,
    ResponseError,
    exchange,
    unreachable,
)
from eventwire.store.cluster import ClusterCalls
from eventwire.store.functions import (
    FN_PUBLISH,
    LOAD_LIBRARY,
    PublishArgs,
    PublishKeys,
    session_end_record,
)
from eventwire.store.keys import Keys
from eventwire.store.privacy import Subjects
from eventwire.store.replies import (
    PUBLISH_FULL,
    PUBLISH_GONE,
    SiteSnapshot,
    missing_function,
    publish_counts,
)
from eventwire.store.resp import (
    FrameIds,
    bulk,
    frame_count,
    pack_args,
    pack_fcall,
    pack_frame_ids,
    pack_items,
)
from eventwire.store.streams import read_site_summary

log = structlog.get_logger("eventwire.store")

#: With a call in flight, a lane sends the next once this share of
#: ``publish_batch_events`` waits. 1 (a full call): the least CPU per event;
#: 1/4 overlapped more on an idle machine but cost ~15 % more CPU per event
#: (smaller calls) and lost when other jobs kept both cores busy (README
#: "Performance"). Frames that gather while a call runs go in the next one.
DEPTH_GATE = 1.0

#: Seconds without a refused frame after which a full backlog counts as a new
#: episode (warned again) even if no frame came to see it drained.
BACKLOG_QUIET = 30.0


def _lane_ended(task: asyncio.Task[None]) -> None:
    """A lane task that ended by an exception says so (its frames would wait unanswered)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("publisher_lane_failed", task=task.get_name(), error=repr(task.exception()))


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
        "ids",
        "n",
        "owner",
        "producer_key",
        "session",
        "session_key",
        "sink",
        "site",
        "tag",
        "token",
    )

    def __init__(
        self,
        site: str,
        tag: str,
        producer_key: str,
        session_key: str,
        session: str,
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
        self.n = len(args) // 3
        self.args = args
        self.sink = sink
        self.token = token
        self.owner = owner
        self.epoch = owner.epoch
        self.first_seq = first_seq
        #: The frame's keys and ids packed (for :attr:`session`), or None: packed when sent.
        self.ids: FrameIds | None = None

    def fail(self, why: str) -> None:
        """Tell the sink, and poison the owner's epoch (see :class:`FrameOwner`)."""
        self.owner.fail(self.epoch, self.first_seq)
        self.sink.frame_failed(self, why)


class _Call:
    """One packed pipeline a lane has sent: its frames by tag, until its replies are settled."""

    __slots__ = ("by_tag", "commands", "conn", "deadline", "done", "producers", "started")

    def __init__(
        self, by_tag: dict[str, list[Frame]], commands: list[list[bytes]], producers: list[str]
    ) -> None:
        self.by_tag = by_tag
        self.commands = commands
        self.producers = producers
        self.conn: Any = None
        #: The event loop's time by which its replies must have been read.
        self.deadline = 0.0
        self.started = 0.0
        #: Settled or failed: its frames have been told.
        self.done = False


class _Lane:
    """One publisher: its producers' frames, the task that sends them and the one reading replies.

    Frames wait per producer (:attr:`pending`, in the order they came); a
    producer whose frames are in a call not yet settled (:attr:`busy`) sends
    no more until it is, so a producer's frames are in at most one call in
    flight. Within one call the ``publish`` step keeps them in order (a
    frame refused for a full backlog or an ended session refuses the ones
    behind it too); across calls this rule does, whatever each call's
    outcome: a later frame can never be stored after an earlier one that was
    not (see :class:`~eventwire.core.ordering.FrameOwner`). Up to
    ``publish_depth`` calls are in flight on the lane's one Redis connection
    (:attr:`inflight`, replies read in order), so the next call is packed and
    sent while Redis runs the last.

    A lane keeps its own Redis connection: taking one from the pool for each
    batch costs more than a small batch's whole Redis step.
    """

    __slots__ = (
        "busy",
        "conn",
        "depth",
        "gate",
        "inflight",
        "orphan",
        "pending",
        "reader",
        "reading",
        "ready",
        "ready_events",
        "replies",
        "sending",
        "settling",
        "task",
        "wakeup",
    )

    def __init__(self, depth: int, gate: int) -> None:
        #: Calls in flight at most; events that must wait before one more goes.
        self.depth = depth
        self.gate = gate
        #: Frames not yet sent, per producer key, in order (no empty entry).
        self.pending: dict[str, deque[Frame]] = {}
        #: Producers with pending frames and none in flight, in the order they became so.
        self.ready: deque[str] = deque()
        #: Events of the ready producers' pending frames.
        self.ready_events = 0
        #: Producers with frames in a call in flight.
        self.busy: set[str] = set()
        #: Calls sent on :attr:`conn` whose replies are not read yet, oldest first.
        self.inflight: deque[_Call] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        #: Set when a call is sent: wakes the reader task.
        self.replies: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        #: The call whose replies the reader has read and is settling (it may
        #: load the library first): out of :attr:`inflight`, its producers busy.
        self.settling: _Call | None = None
        self.conn: Any = None
        #: The connection the reader awaits a reply on, the sender writes on.
        self.reading: Any = None
        self.sending: Any = None
        #: A dropped connection still in use by one of the lane's tasks.
        self.orphan: Any = None

    def wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def add(self, frame: Frame) -> None:
        """Queue a frame behind its producer's earlier ones."""
        key = frame.producer_key
        frames = self.pending.get(key)
        if frames is None:
            self.pending[key] = deque((frame,))
            if key not in self.busy:
                self.ready.append(key)
                self.ready_events += frame.n
        else:
            frames.append(frame)
            if key not in self.busy:
                self.ready_events += frame.n
        # With a call in flight the sender waits for DEPTH_GATE (see Store._run).
        inflight = len(self.inflight)
        if not inflight or (inflight < self.depth and self.ready_events >= self.gate):
            self.wake()

    def release(self, call: _Call) -> None:
        """A call's frames are told: its producers may send again."""
        busy, pending, ready = self.busy, self.pending, self.ready
        for key in call.producers:
            busy.discard(key)
            frames = pending.get(key)
            if frames is not None:
                ready.append(key)
                self.ready_events += sum(f.n for f in frames)
        self.wake()


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
        #: Calls node by node on a cluster, or None for one Redis (the single-node path).
        self._cluster = (
            ClusterCalls(client, settings.store_timeout, settings.retry_after_ms)
            if isinstance(client, RedisCluster)
            else None
        )
        self._pool: Any = getattr(client, "connection_pool", None)
        self.settings = settings
        self.book = book
        self.keys = Keys(settings.key_prefix)
        #: Keyed hashes of uuids (suppression, the audit).
        self.subjects = Subjects(client, self.keys, settings.privacy_key_env)
        # A cluster's calls go one at a time per lane, node by node (ClusterCalls).
        depth = 1 if self._cluster is not None else settings.publish_depth
        gate = max(1, int(settings.publish_batch_events * DEPTH_GATE))
        self._lanes = [_Lane(depth, gate) for _ in range(settings.publish_lanes)]
        self._started = False
        self._closing = False
        #: The backlog each tag's events stream had at its last publish call.
        self._backlogs: dict[str, int] = {}
        #: Streams (tags) refusing frames now -> [last refusal (monotonic), frames
        #: refused]: one warning per episode (see :meth:`_settle`).
        self._full: dict[str, list[float]] = {}
        # After a failed round trip, frames are nacked at once until this
        # monotonic time, so that an outage answers clients quickly instead of
        # making every queued batch wait store_timeout again.
        self._down_until = 0.0

    async def __aenter__(self) -> Store:
        for i, lane in enumerate(self._lanes):
            lane.task = asyncio.create_task(self._run(lane), name=f"eventwire-publisher-{i}")
            lane.task.add_done_callback(_lane_ended)
            if self._cluster is None:  # a cluster's calls are read by ClusterCalls
                lane.reader = asyncio.create_task(
                    self._read(lane), name=f"eventwire-publisher-{i}-replies"
                )
                lane.reader.add_done_callback(_lane_ended)
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

    # -- the sites' rules -------------------------------------------------------

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

    # -- publishing -------------------------------------------------------------

    def submit(
        self,
        site: str,
        tag: str,
        producer_key: str,
        session_key: str,
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
            session_key: ``keys.session(tag, uuid)`` of the customer the
                events were encoded for.
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
        self._lanes[hash(frame.producer_key) % len(self._lanes)].add(frame)

    async def call(self, function: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Call one function of the library, in its own round trip.

        Args:
            function: an ``FN_*`` name.
            keys: its KEYS (a typed layout of :mod:`eventwire.store.functions`).
            args: its ARGV (likewise, and any repeated part after it).

        Raises:
            StoreUnavailable: Redis is unreachable, slow, or answered an error.
        """
        (result,) = await self._fcall([pack_fcall(function, keys, args)], [keys[0]])
        if isinstance(result, Exception):
            raise StoreUnavailable(f"redis error: {result}")
        return result

    def _publish_args(self, site: str) -> PublishArgs:
        settings = self.settings
        timing, taken = self.site_params(site)
        return PublishArgs(
            events_maxlen=settings.stream_maxlen,
            rejected_maxlen=settings.rejected_maxlen,
            producer_ttl_ms=int(settings.producer_ttl * 1000),
            idle_ms=timing.idle_ms,
            max_ms=timing.max_ms,
            taken=taken,
            end_record=session_end_record(site),
            max_backlog=self._max_backlog(site),
        )

    def _max_backlog(self, site: str) -> int:
        """The site's ``max_backlog`` for publish (0: ``on_backlog = "trim"``)."""
        rules = self.book.get(site)
        if rules is not None:
            return rules.backlog_limit(self.settings)
        s = self.settings
        return 0 if s.on_backlog == "trim" else s.max_backlog or s.stream_maxlen

    def _take(self, lane: _Lane) -> tuple[list[Frame], list[str]]:
        """The next batch of a lane: ready producers' frames up to ``publish_batch_events``.

        Returns the frames and the producers they make busy. A producer's
        frames beyond the limit stay pending behind the batch.
        """
        limit = self.settings.publish_batch_events
        pending, ready, busy = lane.pending, lane.ready, lane.busy
        batch: list[Frame] = []
        producers: list[str] = []
        events = 0
        while ready:
            key = ready[0]
            frames = pending[key]
            taken = False
            while frames and (not batch or events + frames[0].n <= limit):
                frame = frames.popleft()
                lane.ready_events -= frame.n
                owner = frame.owner
                if owner is not None and frame.epoch <= owner.failed_epoch:
                    # An earlier frame of this connection failed: see FrameOwner.
                    frame.fail("an earlier frame of this connection was not stored")
                    continue
                batch.append(frame)
                events += frame.n
                taken = True
            if frames and not taken:
                break  # the batch is full before this producer's next frame
            ready.popleft()
            if not frames:
                del pending[key]
            if taken:
                busy.add(key)
                producers.append(key)
            if frames:
                lane.ready_events -= sum(f.n for f in frames)  # pending behind the batch
                break  # the batch is full
        return batch, producers

    async def _run(self, lane: _Lane) -> None:
        """A lane's sender: packs ready frames into calls while fewer than ``publish_depth`` fly."""
        loop = asyncio.get_running_loop()
        depth, gate = lane.depth, lane.gate
        try:
            while True:
                inflight = len(lane.inflight)
                # With a call in flight another goes only once enough waits
                # (DEPTH_GATE): a tiny one would cost a call's overhead for
                # frames that gather anyway while the first runs (group commit).
                if not lane.ready or (inflight and (inflight >= depth or lane.ready_events < gate)):
                    if (
                        self._closing
                        and not lane.pending
                        and not lane.inflight
                        and lane.settling is None
                    ):
                        return
                    lane.wakeup = loop.create_future()
                    await lane.wakeup
                    continue
                batch, producers = self._take(lane)
                if not batch:
                    continue
                by_tag: dict[str, list[Frame]] = {}
                for frame in batch:
                    by_tag.setdefault(frame.tag, []).append(frame)
                call = _Call(by_tag, [], producers)
                if time.monotonic() < self._down_until:
                    self._fail_call(lane, call, "redis unavailable")
                    continue
                if self._cluster is not None:
                    await self._flush(call)
                    lane.release(call)
                else:
                    await self._send(lane, call)
        finally:
            if lane.reader is not None:
                lane.reader.cancel()
                await asyncio.gather(lane.reader, return_exceptions=True)
                lane.reader = None

    def _fail_call(self, lane: _Lane, call: _Call, why: str) -> None:
        """Nack every frame of a call not settled yet, in order, and free its producers."""
        if call.done:
            return
        call.done = True
        for frames in call.by_tag.values():
            for frame in frames:
                frame.fail(why)
        lane.release(call)

    async def _send(self, lane: _Lane, call: _Call) -> None:
        """Pack a call and write it on the lane's connection; the reader task reads its replies."""
        loop = asyncio.get_running_loop()
        try:
            call.commands, _ = self._pack_batch(call.by_tag)
        except Exception as exc:
            # A frame this code cannot pack (a bug): its call is nacked, never left
            # unanswered, and the lane lives on (a dead lane would answer no frame again).
            log.exception("publish_pack_failed", frames=sum(map(len, call.by_tag.values())))
            self._fail_call(lane, call, f"cannot pack the call: {exc!r}")
            return
        call.started = time.perf_counter()
        call.deadline = loop.time() + self.settings.store_timeout
        conn = lane.conn
        try:
            async with asyncio.timeout_at(call.deadline):
                if conn is None:
                    conn = lane.conn = await self._pool.get_connection()
                call.conn = conn
                lane.inflight.append(call)
                replies = lane.replies
                if replies is not None and not replies.done():
                    replies.set_result(None)
                lane.sending = conn
                try:
                    await conn.send_packed_command(
                        [p for command in call.commands for p in command], check_health=False
                    )
                finally:
                    lane.sending = None
        except Exception as exc:
            if call.conn is None:  # no connection: nothing was sent
                self._outage(exc)
                self._fail_call(lane, call, self._why(exc))
            elif not call.done:  # else the reader found the connection broken first
                await self._broken(lane, conn, exc)
        if lane.orphan is not None:
            await self._let_go(lane)

    async def _read(self, lane: _Lane) -> None:
        """A lane's reader: the replies of its calls in flight, in the order they were sent."""
        loop = asyncio.get_running_loop()
        inflight = lane.inflight
        while True:
            if lane.orphan is not None:
                await self._let_go(lane)
            if not inflight:
                lane.replies = loop.create_future()
                await lane.replies
                continue
            call = inflight[0]
            conn = call.conn
            results: list[Any] = []
            lane.reading = conn
            try:
                async with asyncio.timeout_at(call.deadline):
                    for _ in call.commands:
                        try:
                            results.append(await conn.read_response(disconnect_on_error=False))
                        except ResponseError as exc:
                            results.append(exc)
            except Exception as exc:
                lane.reading = None
                if not call.done:
                    await self._broken(lane, conn, exc)
                continue
            lane.reading = None
            if call.done:  # failed while its replies were on their way
                continue
            inflight.popleft()
            call.done = True
            lane.settling = call
            try:
                await self._reload_missing(call.commands, results)
                metrics.STORE_SECONDS.observe(time.perf_counter() - call.started)
                self._settle_results(call.by_tag, results)
            except Exception as exc:
                self._outage(exc)
                for frames in call.by_tag.values():
                    for frame in frames:
                        frame.fail(self._why(exc))
            finally:
                lane.settling = None
                lane.release(call)

    async def _broken(self, lane: _Lane, conn: Any, exc: BaseException) -> None:
        """The lane's connection failed: every call in flight on it is nacked, oldest first.

        Redis ran some of them, perhaps, but nothing tells which: their frames
        are nacked and resent, and de-duplication makes that safe. The
        connection is dropped (a late reply must never be read as another
        call's); the lane takes a fresh one for its next call, and this one
        goes back to the pool only once neither of the lane's tasks is still
        writing or reading on it.
        """
        self._outage(exc)
        why = self._why(exc)
        inflight = lane.inflight
        failed = [c for c in inflight if c.conn is conn]
        kept = [c for c in inflight if c.conn is not conn]
        inflight.clear()
        inflight.extend(kept)
        if lane.conn is conn:
            lane.conn = None
        for call in failed:
            self._fail_call(lane, call, why)
        await conn.disconnect()
        if lane.orphan is None:
            lane.orphan = conn
            await self._let_go(lane)
        else:  # cannot happen: a lane has one connection in use at a time
            await self._pool.release(conn)

    async def _let_go(self, lane: _Lane) -> None:
        """Give a dropped connection back to the pool once no task of the lane is using it."""
        conn = lane.orphan
        if conn is None or conn is lane.reading or conn is lane.sending:
            return
        lane.orphan = None
        await self._pool.release(conn)

    def _outage(self, exc: BaseException) -> None:
        """Count a failed round trip; nack the next frames at once for ``retry_after_ms``."""
        metrics.STORE_ERRORS.inc()
        self._down_until = time.monotonic() + self.settings.retry_after_ms / 1000
        if not isinstance(exc, OUTAGE):
            # Whatever went wrong, the publisher must live on: the frames are
            # nacked and their clients resend them.
            log.error("publish_failed", error=repr(exc))

    @staticmethod
    def _why(exc: BaseException) -> str:
        if isinstance(exc, StoreUnavailable):
            return str(exc)
        if isinstance(exc, OUTAGE):
            return unreachable(exc)
        return str(exc) or type(exc).__name__

    def _pack_batch(self, by_tag: dict[str, list[Frame]]) -> tuple[list[list[bytes]], list[str]]:
        """One packed ``publish`` call per tag (all its keys share one slot), and its route key.

        The call is ``FCALL publish numkeys`` with the tag's three keys and two
        per frame, the site's arguments, then per frame its session id, kinds,
        seqs and payloads (:func:`~eventwire.store.resp.pack_items`). A
        frame's keys and ids come packed from its connection (:attr:`Frame.ids`,
        packed here once if not); the site's part once per site and batch.
        """
        calls: list[list[bytes]] = []
        routes: list[str] = []
        keys = self.keys
        # The arguments of a site, the same for each of its partitions, packed.
        site_args: dict[str, list[bytes]] = {}
        for tag, frames in by_tag.items():
            site = frames[0].site
            fargs = site_args.get(site)
            if fargs is None:
                fargs = site_args[site] = [bulk(a) for a in self._publish_args(site)]
            head = PublishKeys(keys.events(tag), keys.rejected(tag), keys.due(tag))
            routes.append(head.events)
            frame_keys: list[bytes] = []
            tail: list[bytes] = []
            count = 0
            for frame in frames:
                ids = frame.ids
                if ids is None or ids.session != frame.session:
                    ids = frame.ids = pack_frame_ids(
                        frame.producer_key, frame.session_key, frame.session
                    )
                frame_keys.append(ids.keys)
                tail.append(ids.args)
                tail.append(pack_items(frame.args))
                count += frame_count(frame.n)
            nkeys = len(head) + 2 * len(frames)
            start = ("FCALL", FN_PUBLISH, nkeys, *head)
            calls.append(
                [
                    b"*%d\r\n" % (len(start) + 2 * len(frames) + len(fargs) + count),
                    *map(bulk, start),
                    *frame_keys,
                    *fargs,
                    *tail,
                ]
            )
        return calls, routes

    async def _flush(self, call: _Call) -> None:
        """Run one call on a cluster (node by node, :class:`ClusterCalls`) and settle it."""
        call.done = True
        commands, routes = self._pack_batch(call.by_tag)
        started = time.perf_counter()
        try:
            results = await self._fcall(commands, routes)
        except Exception as exc:
            self._outage(exc)
            for frames in call.by_tag.values():
                for frame in frames:
                    frame.fail(self._why(exc))
            return
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        self._settle_results(call.by_tag, results)

    def _settle_results(self, by_tag: dict[str, list[Frame]], results: list[Any]) -> None:
        """Tell each frame of a call how it ended, from its tag's reply."""
        for frames, result in zip(by_tag.values(), results, strict=True):
            if isinstance(result, Exception):
                metrics.STORE_ERRORS.inc()
                if not isinstance(result, StoreUnavailable):  # a node down is logged once
                    log.error("publish_refused", error=str(result), frames=len(frames))
                for frame in frames:
                    frame.fail(f"redis error: {result}")
                continue
            try:
                counts, backlog = publish_counts(result, len(frames))
            except (ValueError, TypeError) as exc:
                metrics.STORE_ERRORS.inc()
                log.error("publish_reply_malformed", error=str(exc), frames=len(frames))
                for frame in frames:
                    frame.fail(f"redis answered: {exc}")
                continue
            self._settle(frames, counts, backlog)

    def _settle(self, frames: list[Frame], counts: list[int], backlog: int | None) -> None:
        """Tell each frame of one tag's call how it ended; note the stream's backlog.

        ``counts`` holds ``added, duplicate, status`` per frame (:func:`publish_counts`).
        """
        first = frames[0]
        tag, site = first.tag, first.site
        full = 0
        i = 0
        for frame in frames:
            status = counts[i + 2]
            if status == PUBLISH_FULL:
                full += 1
                # Nothing stored: nacked unavailable, and the frames behind it
                # on this connection wait (FrameOwner), so the order holds.
                frame.fail("persist backlog at max_backlog")
            elif status == PUBLISH_GONE:
                frame.sink.frame_gone(frame)
            else:
                frame.sink.frame_stored(frame, counts[i], counts[i + 1])
            i += 3
        if full:
            metrics.BACKLOG_NACKS.labels(site).inc(full)
            self._backpressured(tag, site, full, backlog)
        elif tag in self._full and (backlog or 0) <= self._max_backlog(site) // 2:
            # Hysteresis: a worker draining a full backlog while clients resend
            # brings it just under the cap many times; that is one episode.
            _, refused = self._full.pop(tag)
            log.info(
                "backlog_resumed", site=site, stream=self.keys.events(tag), refused=int(refused)
            )
        if backlog is not None:
            self._backlogs[tag] = backlog
            tags = self.tags(site)
            metrics.BACKLOG_ENTRIES.labels(site).set(sum(self._backlogs.get(t, 0) for t in tags))
            metrics.BACKLOG_MAX.labels(site).set(self._max_backlog(site) * len(tags))

    def _backpressured(self, tag: str, site: str, refused: int, backlog: int | None) -> None:
        """Note frames refused for a full backlog; warn at an episode's start."""
        now = time.monotonic()
        episode = self._full.get(tag)
        if episode is not None and now - episode[0] < BACKLOG_QUIET:
            episode[0] = now
            episode[1] += refused
            return
        self._full[tag] = [now, float(refused)]
        log.warning(
            "backlog_full",
            site=site,
            stream=self.keys.events(tag),
            backlog=backlog,
            max_backlog=self._max_backlog(site),
            hint="the persist workers are behind or stopped: frames are nacked "
            "unavailable (clients resend) until the backlog is half drained",
        )

    async def _fcall(self, commands: Sequence[list[bytes]], routes: Sequence[str]) -> list[Any]:
        """Run packed FCALLs in one round trip; load the library first if Redis lost it.

        ``routes`` holds one key of each command: on a cluster, the command
        goes to the node serving that key's slot (all its keys share it).
        """
        if self._cluster is not None:
            return await self._cluster.fcall(commands, routes)
        results = await self._pipeline(commands)
        await self._reload_missing(commands, results)
        return results

    async def _reload_missing(self, commands: Sequence[list[bytes]], results: list[Any]) -> None:
        """Send again, after loading the library, the commands whose function Redis lacked.

        Redis restarted without persistence, or was flushed. A call to a
        missing function did nothing, so it is sent again; its results
        replace those in ``results``. (A lane's later calls in flight hold
        other producers' frames only, so this one running after them keeps
        every producer's order.)

        Raises:
            StoreUnavailable: Redis is unreachable, or refused the library.
        """
        again = [i for i, r in enumerate(results) if missing_function(r)]
        if not again:
            return
        load = pack_args(LOAD_LIBRARY)
        retried = await self._pipeline([load, *(commands[i] for i in again)])
        if isinstance(retried[0], Exception):
            raise StoreUnavailable(f"cannot load the function library: {retried[0]}")
        for i, r in zip(again, retried[1:], strict=True):
            results[i] = r

    async def _pipeline(self, commands: Sequence[list[bytes]]) -> list[Any]:
        """Send packed commands in one write on a pooled connection and read their replies.

        redis-py's Pipeline object costs more per command than the whole Lua
        step at small frames, so commands come packed and this talks to one
        connection directly. Error replies are returned. Any failure drops
        that connection: a reply that arrives late must never be read as
        another command's.

        Raises:
            StoreUnavailable: Redis is unreachable or did not answer in time.
        """
        pool = self._pool
        conn: Any = None
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                conn = await pool.get_connection()
                results = await exchange(conn, commands)
        except OUTAGE as exc:
            if conn is not None:
                await conn.disconnect()
            raise StoreUnavailable(unreachable(exc)) from None
        except BaseException:
            if conn is not None:
                await conn.disconnect()
            raise
        finally:
            if conn is not None:
                await pool.release(conn)
        return results

    # -- look-ups ---------------------------------------------------------------

    async def record_rejected(self, site: str, uuid: str | None, record: bytes) -> bool:
        """Append one record to a customer's partition's rejected stream; False if Redis is away.

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
        except OUTAGE:
            # On a cluster, a slot moving (MOVED, ASK) is an outage of this call too.
            return False
        return True

    async def count_dropped_bots(self, site: str, n: int) -> bool:
        """Add ``n`` to the site's count of dropped bot events; False if Redis is away."""
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                await self.redis.incrby(self.keys.bots_dropped(self.tags(site)[0]), n)
        except (*OUTAGE, RedisError):
            return False
        return True

    async def shorten_producers(self, site: str, producers: Sequence[tuple[str, str]]) -> bool:
        """Let these ``(uuid, producer)`` keys expire after ``message_dedup_window``.

        The publish step keeps every producer for ``producer_ttl``; a Segment
        call is a producer of its own, kept only as long as its ``messageId``
        is to be remembered. ``LT`` never lengthens a key's life. One round
        trip for all; False if Redis is away (the keys then live
        ``producer_ttl``: longer de-duplication, nothing lost).
        """
        ttl_ms = int(self.settings.message_dedup_window * 1000)
        if not producers or self.settings.message_dedup_window >= self.settings.producer_ttl:
            return True
        pipe = self.redis.pipeline(transaction=False)
        for uuid, producer in producers:
            pipe.pexpire(self.keys.producer(self.tag(site, uuid), producer), ttl_ms, lt=True)
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                await pipe.execute(raise_on_error=False)
        except (*OUTAGE, RedisError):
            return False
        return True

    async def ping(self) -> bool:
        """Whether Redis answers PING within ``store_timeout``."""
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                return bool(await self.redis.ping())
        except (*OUTAGE, RedisError):
            # A health check: an error answer (LOADING, MASTERDOWN) is not healthy either.
            return False

    async def site_summary(self, site: str) -> SiteSnapshot:
        """A site's open sessions and both streams' ends, read in one round trip.

        See :func:`~eventwire.store.streams.read_site_summary`.

        Raises:
            StoreUnavailable: Redis is unreachable or slow.
        """
        return await read_site_summary(
            self.redis, self.keys, self.tags(site), self.settings.store_timeout
        )
