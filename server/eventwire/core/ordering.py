"""Ordering and pacing of one connection's frames, without I/O.

- :class:`FrameOwner`: which frames may still be stored after one failed, so
  that the producer's stored seq never passes an event that must be resent.
- :class:`TokenBucket`: the site's rate limit for one connection.
"""

from __future__ import annotations

import math

from eventwire.core.protocol import NackCode
from eventwire.core.rules import RateConfig


class FrameOwner:
    """Ordering state of the frames one connection has in flight.

    After a frame fails, every frame the connection sent before it could see
    the nack must fail too: storing them would raise the producer's stored seq
    above the failed frame's events, and their resend would then count as
    duplicate and be lost. Frames carry the ``epoch`` current when they were
    sent; a failure poisons its epoch; the connection starts a new epoch when
    the client resends from ``barrier_seq`` or below (docs/protocol.md's client
    resends everything unacked, in order).
    """

    __slots__ = ("barrier_seq", "code", "epoch", "failed_epoch")

    def __init__(self) -> None:
        self.epoch = 0
        self.failed_epoch = -1
        self.barrier_seq = 0
        #: The nack code of the failure that set the barrier.
        self.code: NackCode = "unavailable"

    def admit(self, first_seq: int) -> bool:
        """Whether a new frame may be stored; False means nack it at once."""
        if self.failed_epoch < self.epoch:
            return True
        if first_seq <= self.barrier_seq:
            self.epoch += 1
            return True
        return False

    def fail(self, epoch: int, first_seq: int, code: NackCode = "unavailable") -> None:
        """Record that a frame of ``epoch`` starting at ``first_seq`` failed."""
        if epoch > self.failed_epoch:
            self.failed_epoch = epoch
            self.barrier_seq = first_seq
            self.code = code


class TokenBucket:
    """A connection's rate limit: ``burst`` events at once, refilled at ``events_per_second``.

    A frame larger than the burst passes when the bucket is full, leaving it
    in debt, so a legal frame can never be refused for ever.
    """

    __slots__ = ("flood_start", "level", "rate", "stamp")

    def __init__(self, rate: RateConfig, now: int) -> None:
        self.rate = rate
        self.level = float(rate.burst)
        self.stamp = now
        self.flood_start = 0

    def take(self, n: int, now: int) -> int | None:
        """Take n events; None if they pass, else the ms until they would."""
        rate = self.rate
        self.level = min(
            float(rate.burst), self.level + (now - self.stamp) * rate.events_per_second / 1000
        )
        self.stamp = now
        need = min(n, rate.burst)
        if self.level >= need:
            self.level -= n
            self.flood_start = 0
            return None
        return max(1, math.ceil((need - self.level) * 1000 / rate.events_per_second))

    def refused(self, now: int) -> int:
        """Note a refused frame; returns how long (ms) every frame has been refused."""
        if not self.flood_start:
            self.flood_start = now
        return now - self.flood_start
