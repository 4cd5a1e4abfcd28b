"""Every Redis key name eventwire uses, and the consumer group name, in one place.

A key's hash tag is the site's *tag*: the site id, or ``site:p`` for
partition ``p`` of a site with ``partitions`` above 1 (docs/protocol.md section
7). Everything of one customer (its session, connections, producer seqs and
events) lives under the tag of its partition, so each atomic step stays
within one Redis Cluster slot. ``store.lua``'s header draws the same map from
the Redis side; the keys only known inside a function call (a customer's
``sess:`` and ``conns:``) are built there from :meth:`Keys.site_prefix`.
"""

from __future__ import annotations

import zlib
from typing import Final


class Keys:
    """The key names under one ``key_prefix``.

    Args:
        prefix: the ``key_prefix`` setting.
    """

    #: The consumer group every persistence worker shares, on every events
    #: stream (``eventwire stats`` shows its progress).
    PERSIST_GROUP: Final = "persist"

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

    def site_prefix(self, tag: str) -> str:
        """The prefix of every key of a tag, for keys built inside Redis functions."""
        return f"{self.prefix}:{{{tag}}}:"

    def events(self, tag: str) -> str:
        """The stream of accepted events of a site (or of one partition)."""
        return f"{self.prefix}:{{{tag}}}:events"

    def rejected(self, tag: str) -> str:
        """The stream of rejected events and undecodable frames of a site (or partition)."""
        return f"{self.prefix}:{{{tag}}}:rejected"

    def dead(self, tag: str) -> str:
        """The dead-letter stream of a site (or partition): entries the persist worker gave up on.

        It shares the events stream's tag, so the worker moves an entry there
        and acknowledges it in one MULTI, on a cluster too.
        """
        return f"{self.prefix}:{{{tag}}}:dead"

    def forgotten(self, tag: str) -> str:
        """The ids of events-stream entries a forget deleted (a site or partition's).

        A sorted set of :meth:`forgotten_member` names (score 0, so in id order
        by name), kept 30 days after the last forget: the persist worker tells
        from it that unread entries gone from the stream were forgotten, not
        trimmed (no ``persist_entries_trimmed_unread`` for them). It holds ids,
        never a uuid.
        """
        return f"{self.prefix}:{{{tag}}}:forgotten"

    @staticmethod
    def forgotten_member(entry_id: str) -> str:
        """A stream id as a name of :meth:`forgotten` that sorts as the id does (zero-padded)."""
        ms, _, seq = entry_id.partition("-")
        return f"{int(ms):020d}-{int(seq or 0):020d}"

    def producer(self, tag: str, producer: str) -> str:
        """The key holding a producer's highest stored seq (in one partition)."""
        return f"{self.prefix}:{{{tag}}}:producer:{producer}"

    def session(self, tag: str, uuid: str) -> str:
        """The hash of a customer's open session."""
        return f"{self.prefix}:{{{tag}}}:sess:{uuid}"

    def conns(self, tag: str, uuid: str) -> str:
        """The set of a customer's live connections."""
        return f"{self.prefix}:{{{tag}}}:conns:{uuid}"

    def live(self, tag: str) -> str:
        """Every live connection of a tag, scored by its heartbeat deadline."""
        return f"{self.prefix}:{{{tag}}}:live"

    def bots_dropped(self, tag: str) -> str:
        """Events of bots dropped by the site (``bots = "drop"``), counted: a string (INCRBY).

        Kept under the site's first tag (partition 0), for ``eventwire stats``.
        """
        return f"{self.prefix}:{{{tag}}}:bots_dropped"

    def due(self, tag: str) -> str:
        """Customers (of a tag) whose session must be looked at, scored by when."""
        return f"{self.prefix}:{{{tag}}}:due"

    # -- customers: aliases, suppression, the audit (docs/protocol.md section 17) --

    def alias(self, tag: str, uuid: str) -> str:
        """The customer an anonymous uuid merged into (a string, in the uuid's partition)."""
        return f"{self.prefix}:{{{tag}}}:alias:{uuid}"

    def aliases(self, tag: str, uuid: str) -> str:
        """The uuids merged into a customer (a set, in the customer's partition)."""
        return f"{self.prefix}:{{{tag}}}:aliases:{uuid}"

    def suppressed(self, tag: str) -> str:
        """Keyed hashes of the forgotten customers of a partition who stay forgotten (a set)."""
        return f"{self.prefix}:{{{tag}}}:suppressed"

    def audit(self, site: str) -> str:
        """The stream of a site's privacy operations (forget, unsuppress, export)."""
        return f"{self.prefix}:{{{site}}}:audit"

    def privacy_secret(self) -> str:
        """The HMAC secret of the keyed hashes, made on first use (unless ``privacy_key_env``)."""
        return f"{self.prefix}:privacy:secret"
