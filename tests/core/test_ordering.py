"""eventwire/core/ordering.py: frame ordering after a failure, and the rate limit's bucket."""

from __future__ import annotations

from eventwire.core.ordering import FrameOwner, TokenBucket
from eventwire.core.rules import RateConfig


def test_frame_owner_barrier() -> None:
    """After a failure, later frames are refused until the client resends from the failed seq."""
    owner = FrameOwner()
    assert owner.admit(1)
    epoch = owner.epoch
    owner.fail(epoch, 5)
    assert not owner.admit(9)  # sent before the client saw the nack
    assert owner.code == "unavailable"
    assert owner.admit(5)  # the resend starts a new epoch
    assert owner.epoch == epoch + 1
    assert owner.admit(12)
    owner.fail(epoch, 1)  # a late failure of the old epoch changes nothing
    assert owner.admit(13)


def test_token_bucket_burst_refill_and_debt() -> None:
    """A full bucket passes a burst, then waits what refilling takes; a big frame leaves debt."""
    rate = RateConfig(events_per_second=10, burst=5)
    bucket = TokenBucket(rate, now=0)
    assert bucket.take(5, now=0) is None
    assert bucket.take(1, now=0) == 100  # one event refills in 100 ms
    assert bucket.take(1, now=100) is None
    assert bucket.take(50, now=10_000) is None  # larger than the burst: passes when full
    assert bucket.take(1, now=10_000) is not None  # and leaves the bucket in debt
    assert bucket.refused(now=10_000) == 0
    assert bucket.refused(now=10_250) == 250
