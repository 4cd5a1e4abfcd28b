"""A customer's privacy operations end to end: forget (and suppress), unsuppress, export.

Each operation spans Redis (:mod:`eventwire.store.privacy`) and the SQL
store (:mod:`eventwire.persist.privacy`); this room puts them in order and
writes the audit entry. Used by the admin route ``POST
/v1/sites/{site}/forget`` and by ``eventwire forget``, ``unsuppress`` and
``export`` (docs/protocol.md section 17).

Forget, in order: the customer's uuids (itself and every alias Redis or the
store knows); with ``suppress``, their keyed hashes join the suppressed sets
first, so a frame stored from now on opens no session again; Redis is
searched and cleaned; the persist group is given time to ack what it had
read of the deleted entries (a row written after the store's delete would
survive it); the store's rows are deleted; the audit gets one entry. A dry
run counts and changes nothing (and writes no audit entry).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from eventwire.core.errors import StoreUnavailable
from eventwire.persist.privacy import aliases_in_store, export_from_store, forget_in_store
from eventwire.persist.sinks import Sink, open_sink, sqlite_path
from eventwire.store import Keys, RedisClient
from eventwire.store.privacy import (
    Subjects,
    audit,
    forget_customers,
    linked,
    linked_subjects,
    pending_among,
    set_suppressed,
)

__all__ = ["ForgetIncomplete", "customer_links", "export", "forget", "open_store", "unsuppress"]

#: How long forget waits for the persist workers to ack entries they had read
#: before they were deleted (a batch is written within seconds).
PENDING_WAIT: Final = 10.0
#: How often it looks meanwhile.
PENDING_POLL: Final = 0.1


class ForgetIncomplete(Exception):
    """Part of a forget was done and part was not (the store did not answer).

    ``counts`` holds what was done; running forget again finishes it.
    """

    def __init__(self, why: str, counts: dict[str, Any]) -> None:
        super().__init__(why)
        self.counts = counts


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_store(dsn: str) -> Sink | None:
    """The store a DSN names, or None for a SQLite file that does not exist (no store yet)."""
    if not dsn.startswith(("postgresql://", "postgres://")) and not sqlite_path(dsn).exists():
        return None
    return open_sink(dsn)


async def customer_uuids(
    client: RedisClient, keys: Keys, sink: Sink | None, site: str, partitions: int, uuid: str
) -> list[str]:
    """The customer and every alias Redis or the store knows (the customer first)."""
    found = set((await linked(client, keys, site, partitions, uuid)).aliases)
    if sink is not None:
        found |= set(await aliases_in_store(sink, site, uuid))
    found.discard(uuid)
    return [uuid, *sorted(found)]


async def customer_links(
    client: RedisClient, keys: Keys, site: str, partitions: int, uuid: str
) -> dict[str, Any]:
    """What Redis knows of a uuid's merges: ``{uuid, alias_of, aliases}`` (the dashboard's)."""
    found = await linked(client, keys, site, partitions, uuid)
    return {"uuid": uuid, "alias_of": found.alias_of, "aliases": found.aliases}


async def _wait_for_acks(client: RedisClient, deleted: dict[str, list[str]], wait: float) -> int:
    """Wait (up to ``wait`` s) until the persist group holds none of the deleted entries."""
    deadline = time.monotonic() + wait
    while True:
        left = 0
        for key, ids in deleted.items():
            left += await pending_among(client, key, ids, Keys.PERSIST_GROUP)
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(PENDING_POLL)


async def forget(
    client: RedisClient,
    keys: Keys,
    subjects: Subjects,
    sink: Sink | None,
    site: str,
    partitions: int,
    uuid: str,
    suppress: bool = False,
    dry_run: bool = False,
    wait: float = PENDING_WAIT,
) -> dict[str, Any]:
    """Forget a customer and its aliases everywhere; the counts per place.

    Args:
        client: Redis.
        keys: key names.
        subjects: the keyed hashes.
        sink: the opened store, or None when there is none (its counts are then null).
        site: the site.
        partitions: the site's partitions.
        uuid: the customer.
        suppress: keep them forgotten: later events are denied and stored nowhere.
        dry_run: count, change nothing.
        wait: how long to wait for the persist workers' acks (see the module).

    Returns:
        ``{"site", "subject", "uuids", "suppress", "dry_run", "redis": {...},
        "store": {...} or None, "suppressed", "pending_unacked", "audit"}``.

    Raises:
        StoreUnavailable: Redis did not answer (nothing of the store was touched).
        ForgetIncomplete: Redis was cleaned, the store did not answer.
    """
    uuids = await customer_uuids(client, keys, sink, site, partitions, uuid)
    await subjects.secret()
    pairs = [(u, subjects.of(site, u)) for u in uuids]
    subject = pairs[0][1]
    result: dict[str, Any] = {
        "site": site,
        "subject": subject,
        "uuids": len(uuids),
        "suppress": suppress,
        "dry_run": dry_run,
        "suppressed": 0,
    }
    if suppress and not dry_run:
        result["suppressed"] = await set_suppressed(client, keys, site, partitions, pairs, True)
    counts, deleted = await forget_customers(client, keys, site, partitions, uuids, dry_run)
    result["redis"] = counts
    result["pending_unacked"] = 0 if dry_run else await _wait_for_acks(client, deleted, wait)
    result["store"] = None
    if sink is not None:
        try:
            result["store"] = await forget_in_store(sink, site, uuids, dry_run)
        except Exception as exc:
            raise ForgetIncomplete(f"the store did not answer: {exc!r}", result) from exc
    result["audit"] = None
    if not dry_run:
        entry = {
            "uuids": len(uuids),
            "suppress": suppress,
            "redis": counts,
            "store": result["store"],
            # The aliases' keyed hashes, so unsuppress can lift theirs too.
            "linked": [h for _, h in pairs[1:]],
        }
        result["audit"] = await audit(client, keys, site, "forget", subject, entry, _now_ms())
    return result


async def unsuppress(
    client: RedisClient, keys: Keys, subjects: Subjects, site: str, partitions: int, uuid: str
) -> dict[str, Any]:
    """Lift a suppression: the customer's hash and its aliases' (from the forget's audit entry).

    The hashes are removed from every partition's set (an alias' partition is
    not known any more: its uuid is forgotten).
    """
    subject = await subjects.subject(site, uuid)
    hashes = {subject} | await linked_subjects(client, keys, site, subject)
    removed = 0
    for tag in Keys.tags(site, partitions):
        for h in sorted(hashes):
            removed += int(await client.srem(keys.suppressed(tag), h))
    entry = await audit(client, keys, site, "unsuppress", subject, {"removed": removed}, _now_ms())
    return {"site": site, "subject": subject, "removed": removed, "audit": entry}


async def export(
    client: RedisClient | None,
    keys: Keys,
    subjects: Subjects | None,
    sink: Sink,
    site: str,
    partitions: int,
    uuid: str,
) -> list[bytes]:
    """A customer's and its aliases' rows from the store as JSON lines (see
    :func:`~eventwire.persist.privacy.export_from_store`). With Redis, its
    aliases are asked there too and the export is written to the audit."""
    uuids: list[str] | None = None
    if client is not None:
        try:
            uuids = await customer_uuids(client, keys, sink, site, partitions, uuid)
        except StoreUnavailable:
            client = None  # the store's aliases only; no audit entry either
    if uuids is None:
        uuids = [uuid, *[a for a in await aliases_in_store(sink, site, uuid) if a != uuid]]
    lines = await export_from_store(sink, site, uuids)
    if client is not None and subjects is not None:
        subject = await subjects.subject(site, uuid)
        await audit(client, keys, site, "export", subject, {"rows": len(lines)}, _now_ms())
    return lines
