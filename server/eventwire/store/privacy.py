"""The Redis side of a customer's privacy: keyed hashes, aliases, suppression, forget, the audit.

Where things live (docs/protocol.md section 17): an anonymous uuid's merge
(``alias:<uuid>`` -> its customer) in the anonymous uuid's partition, a
customer's ``aliases:<uuid>`` set in the customer's, each suppressed
customer's keyed hash in the ``suppressed`` set of its own partition, and a
site's ``audit`` stream and the deployment's HMAC secret under no partition.

:class:`Subjects` makes the keyed hashes: HMAC-SHA256 of ``site NUL uuid``
under a secret the first process generates and keeps in Redis (``SET NX``),
or the one the operator names with ``privacy_key_env``. The server hashes a
uuid once per hello, identify or batch, never per frame.

:func:`forget_customers` removes a set of uuids from every stream and key of
a site: each events, rejected and dead stream of every partition is read
whole (``XRANGE`` pages) and the entries of those uuids are deleted
(``XDEL``); their sessions, connections, producers' seqs and alias keys go
too. Its cost is one read of every stream of the site (see the README).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

import msgspec

from eventwire.core.errors import ConfigError, StoreUnavailable
from eventwire.store.client import OUTAGE, RedisClient, RedisError, unreachable
from eventwire.store.keys import Keys
from eventwire.store.replies import reply_text

#: Entries per XRANGE page while a stream is searched, and ids per XDEL.
PAGE: Final = 1000
#: Seconds the ids a forget deleted from an events stream are kept (:meth:`Keys.forgotten`).
FORGOTTEN_KEEP_S: Final = 30 * 86_400
#: Actions whose ``params.previous_uuid`` names a customer too: an event of a
#: merge belongs to both uuids, and forgetting either removes it.
MERGE_ACTIONS: Final = frozenset({"client.identify", "client.alias"})


class _Who(msgspec.Struct):
    """What a forget looks at in a stream entry's JSON (everything else is ignored)."""

    uuid: str | None = None
    producer: str | None = None
    action: str | None = None
    params: dict[str, Any] | None = None


_who: Final = msgspec.json.Decoder(_Who)


def names_customer(raw: bytes, uuids: frozenset[str], needles: Sequence[bytes]) -> _Who | None:
    """The entry's record if it belongs to one of ``uuids``, else None.

    An entry belongs to a uuid when its ``uuid`` is that uuid, or when it is
    a merge event (:data:`MERGE_ACTIONS`) whose ``params.previous_uuid`` is.
    ``needles`` (each uuid as a JSON string) skip most entries without
    decoding them.
    """
    if not any(n in raw for n in needles):
        return None
    try:
        who = _who.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if who.uuid in uuids:
        return who
    if who.action in MERGE_ACTIONS and who.params and who.params.get("previous_uuid") in uuids:
        return who
    return None


def _needles(uuids: Iterable[str]) -> list[bytes]:
    return [msgspec.json.encode(u) for u in uuids]


class Subjects:
    """Keyed hashes of uuids (HMAC-SHA256), under one secret for the whole deployment.

    Args:
        client: Redis, where a generated secret is kept.
        keys: key names.
        key_env: ``privacy_key_env``: the variable holding the secret, or "".
    """

    def __init__(self, client: RedisClient, keys: Keys, key_env: str = "") -> None:
        self.client = client
        self.keys = keys
        self.key_env = key_env
        self._secret: bytes | None = None
        #: One reader of Redis' secret at a time: the first hellos come together.
        self._loading = asyncio.Lock()

    async def secret(self) -> bytes:
        """The secret: from ``privacy_key_env``, else Redis' (made there on first use).

        Raises:
            ConfigError: ``privacy_key_env`` names an unset or short variable.
            StoreUnavailable: Redis did not answer.
        """
        if self._secret is not None:
            return self._secret
        if self.key_env:
            value = os.environ.get(self.key_env, "")
            if len(value) < 16:
                raise ConfigError(
                    f"privacy_key_env: environment variable {self.key_env} must hold "
                    "at least 16 characters"
                )
            self._secret = value.encode()
            return self._secret
        async with self._loading:
            secret = self._secret or await self._from_redis()
            self._secret = secret
        return secret

    async def _from_redis(self) -> bytes:
        key = self.keys.privacy_secret()
        while True:
            try:
                await self.client.set(key, secrets.token_hex(32), nx=True)
                found = await self.client.get(key)
            except (*OUTAGE, RedisError) as exc:
                raise StoreUnavailable(unreachable(exc)) from None
            if found is not None:  # else deleted between the two calls: again
                return reply_text(found).encode()

    def known(self) -> bool:
        """Whether the secret is loaded (:meth:`of` may be called)."""
        return self._secret is not None

    def of(self, site: str, uuid: str) -> str:
        """The keyed hash of a site's uuid (after :meth:`secret`): 64 hex digits."""
        assert self._secret is not None, "Subjects.secret() first"
        return hmac.new(self._secret, f"{site}\0{uuid}".encode(), hashlib.sha256).hexdigest()

    async def subject(self, site: str, uuid: str) -> str:
        """The keyed hash of a site's uuid, loading the secret first when needed."""
        if self._secret is None:
            await self.secret()
        return self.of(site, uuid)


class Linked(NamedTuple):
    """A uuid's links in Redis: the customer it merged into, and the uuids merged into it."""

    alias_of: str | None
    aliases: list[str]


async def linked(client: RedisClient, keys: Keys, site: str, partitions: int, uuid: str) -> Linked:
    """What Redis knows of a uuid's merges (each key in its own uuid's partition)."""
    tag = Keys.tag(site, uuid, partitions)
    try:
        into = await client.get(keys.alias(tag, uuid))
        members = await client.smembers(keys.aliases(tag, uuid))
    except (*OUTAGE, RedisError) as exc:
        raise StoreUnavailable(unreachable(exc)) from None
    return Linked(
        reply_text(into) if into is not None else None, sorted(reply_text(m) for m in members)
    )


async def record_alias(
    client: RedisClient,
    keys: Keys,
    site: str,
    partitions: int,
    uuid: str,
    alias: str,
    ttl_ms: int,
) -> None:
    """Add ``alias`` to a customer's aliases set (after ``alias`` recorded the merge); with
    ``ttl_ms`` (the site's retain_days) the set lives that long after this merge."""
    key = keys.aliases(Keys.tag(site, uuid, partitions), uuid)
    pipe = client.pipeline(transaction=False)
    pipe.sadd(key, alias)
    if ttl_ms > 0:
        pipe.pexpire(key, ttl_ms)
    await pipe.execute()


class StreamsForgotten(NamedTuple):
    """Entries found (deleted unless a dry run) in one kind of stream, and their producers."""

    deleted: int
    producers: set[str]
    #: Ids of deleted events-stream entries by stream key (for the pending check).
    ids: dict[str, list[str]]


async def _forget_in_stream(
    client: RedisClient,
    key: str,
    uuids: frozenset[str],
    dry_run: bool,
    field: bytes = b"event",
    forgotten: str | None = None,
) -> tuple[int, set[str], list[str]]:
    """Search one stream whole; delete the entries of ``uuids``. Returns (count, producers, ids).

    ``forgotten``: the :meth:`Keys.forgotten` set that notes each id before it is deleted
    (events streams: the persist worker must not report them as trimmed).
    """
    needles = _needles(uuids)
    start = "-"
    found: list[str] = []
    producers: set[str] = set()
    while True:
        page = await client.xrange(key, min=start, max="+", count=PAGE)
        if not page:
            break
        for entry_id, fields in page:
            raw = (fields or {}).get(field)
            if not isinstance(raw, bytes):
                continue
            who = names_customer(raw, uuids, needles)
            if who is not None:
                found.append(reply_text(entry_id))
                if who.producer and not who.producer.startswith("srv:"):
                    producers.add(who.producer)
        if len(page) < PAGE:
            break
        start = "(" + reply_text(page[-1][0])
    if not dry_run:
        for i in range(0, len(found), PAGE):
            page_ids = found[i : i + PAGE]
            if forgotten is not None:  # noted before they go: never seen gone unexplained
                await client.zadd(forgotten, dict.fromkeys(map(Keys.forgotten_member, page_ids), 0))
                await client.expire(forgotten, FORGOTTEN_KEEP_S)
            await client.xdel(key, *page_ids)
    return len(found), producers, found


async def forget_customers(
    client: RedisClient,
    keys: Keys,
    site: str,
    partitions: int,
    uuids: Iterable[str],
    dry_run: bool = False,
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Remove ``uuids`` from every stream and key of a site in Redis.

    Returns:
        The counts per place (``events``, ``rejected``, ``dead``, ``sessions``,
        ``connections``, ``producers``, ``aliases``), and the deleted ids of
        each events stream (for :func:`pending_among`). A dry run counts and
        deletes nothing.

    Raises:
        StoreUnavailable: Redis did not answer (what was deleted stays deleted;
            running it again finishes the job).
    """
    wanted = frozenset(uuids)
    counts = dict.fromkeys(
        ("events", "rejected", "dead", "sessions", "connections", "producers", "aliases"), 0
    )
    deleted_ids: dict[str, list[str]] = {}
    try:
        producers: set[str] = set()
        tags = Keys.tags(site, partitions)
        for tag in tags:
            n, found, ids = await _forget_in_stream(
                client, keys.events(tag), wanted, dry_run, forgotten=keys.forgotten(tag)
            )
            counts["events"] += n
            producers |= found
            if ids:
                deleted_ids[keys.events(tag)] = ids
            n, found, _ = await _forget_in_stream(client, keys.rejected(tag), wanted, dry_run)
            counts["rejected"] += n
            producers |= found
            n, _, _ = await _forget_in_stream(client, keys.dead(tag), wanted, dry_run)
            counts["dead"] += n
        for uuid in sorted(wanted):
            await _forget_customer_keys(
                client, keys, site, partitions, uuid, wanted, counts, dry_run
            )
        for producer in sorted(producers):
            for tag in tags:
                key = keys.producer(tag, producer)
                if dry_run:
                    counts["producers"] += int(await client.exists(key))
                else:
                    counts["producers"] += int(await client.delete(key))
    except (*OUTAGE, RedisError) as exc:
        raise StoreUnavailable(unreachable(exc)) from None
    return counts, deleted_ids


async def _forget_customer_keys(
    client: RedisClient,
    keys: Keys,
    site: str,
    partitions: int,
    uuid: str,
    wanted: frozenset[str],
    counts: dict[str, int],
    dry_run: bool,
) -> None:
    """One uuid's session, connections and alias keys (in its partition)."""
    tag = Keys.tag(site, uuid, partitions)
    session, conns = keys.session(tag, uuid), keys.conns(tag, uuid)
    members = [reply_text(m) for m in await client.smembers(conns)]
    counts["connections"] += len(members)
    if await client.exists(session):
        counts["sessions"] += 1
    alias_key, aliases_key = keys.alias(tag, uuid), keys.aliases(tag, uuid)
    into = await client.get(alias_key)
    own = [reply_text(m) for m in await client.smembers(aliases_key)]
    counts["aliases"] += (into is not None) + len(own)
    if dry_run:
        return
    if members:
        await client.zrem(keys.live(tag), *members)
    await client.delete(session, conns, alias_key, aliases_key)
    await client.zrem(keys.due(tag), uuid)
    if into is not None:
        # The customer it merged into keeps no trace of it either.
        target = reply_text(into)
        if target not in wanted:
            await client.srem(keys.aliases(Keys.tag(site, target, partitions), target), uuid)
    for alias in own:
        if alias not in wanted:  # a uuid merged into it but not forgotten: unlinked
            await client.delete(keys.alias(Keys.tag(site, alias, partitions), alias))


async def pending_among(client: RedisClient, key: str, ids: Sequence[str], group: str) -> int:
    """How many of ``ids`` (entries just deleted) the group still holds pending.

    A worker that read them before they were deleted writes their rows and
    then acks them; until it has, the store side of a forget must wait.
    """
    if not ids:
        return 0
    wanted = set(ids)
    try:
        reply = await client.xpending_range(key, group, min=ids[0], max=ids[-1], count=len(ids))
    except (*OUTAGE, RedisError):
        return 0  # no group (or no stream): nothing pending
    return sum(1 for p in reply if reply_text(p["message_id"]) in wanted)


async def set_suppressed(
    client: RedisClient,
    keys: Keys,
    site: str,
    partitions: int,
    subjects: Iterable[tuple[str, str]],
    on: bool,
) -> int:
    """Add (``on``) or remove keyed hashes in their uuids' partitions' suppressed sets.

    Args:
        subjects: (uuid, keyed hash) pairs; only the hash is stored.

    Returns:
        How many hashes were added (or removed).
    """
    changed = 0
    try:
        for uuid, subject in subjects:
            key = keys.suppressed(Keys.tag(site, uuid, partitions))
            if on:
                changed += int(await client.sadd(key, subject))
            else:
                changed += int(await client.srem(key, subject))
    except (*OUTAGE, RedisError) as exc:
        raise StoreUnavailable(unreachable(exc)) from None
    return changed


async def is_suppressed(
    client: RedisClient, keys: Keys, site: str, partitions: int, uuid: str, subject: str
) -> bool:
    """Whether a uuid's keyed hash is in its partition's suppressed set."""
    return bool(await client.sismember(keys.suppressed(Keys.tag(site, uuid, partitions)), subject))


async def audit(
    client: RedisClient,
    keys: Keys,
    site: str,
    operation: str,
    subject: str,
    counts: dict[str, Any],
    now_ms: int,
) -> str:
    """Append one operation to the site's audit stream; returns its id. Never a uuid.

    Fields: ``time`` (ms), ``operation`` (``forget``, ``unsuppress``,
    ``export``), ``subject`` (the keyed hash), ``counts`` (JSON).
    """
    try:
        entry = await client.xadd(
            keys.audit(site),
            {
                "time": str(now_ms),
                "operation": operation,
                "subject": subject,
                "counts": msgspec.json.encode(counts),
            },
        )
    except (*OUTAGE, RedisError) as exc:
        raise StoreUnavailable(unreachable(exc)) from None
    return reply_text(entry)


async def linked_subjects(client: RedisClient, keys: Keys, site: str, subject: str) -> set[str]:
    """The aliases' keyed hashes the site's audit recorded with each forget of ``subject``."""
    out: set[str] = set()
    start = "-"
    try:
        while True:
            page = await client.xrange(keys.audit(site), min=start, max="+", count=PAGE)
            for _, fields in page or []:
                f = fields or {}
                if f.get(b"subject") == subject.encode() and f.get(b"operation") == b"forget":
                    raw = f.get(b"counts", b"{}")
                    recorded = msgspec.json.decode(raw if isinstance(raw, bytes) else b"{}")
                    out |= {h for h in recorded.get("linked", []) if isinstance(h, str)}
            if not page or len(page) < PAGE:
                return out
            start = "(" + reply_text(page[-1][0])
    except (*OUTAGE, RedisError) as exc:
        raise StoreUnavailable(unreachable(exc)) from None
