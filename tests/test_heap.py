"""eventwire.heap: the long-lived heap frozen, thawed and collected after enough churn."""

from __future__ import annotations

import gc
import weakref

from eventwire.heap import MIN_CHURN, MIN_OPEN, HeapKeeper


def test_freezes_and_thaws_after_a_quarter_turnover() -> None:
    """A step freezes what survived; a quarter turnover of connections brings a full collection."""
    counts = {"open": 40_000, "closed": 0}
    keeper = HeapKeeper(lambda: counts["open"], lambda: counts["closed"])
    try:
        keeper.step()
        assert gc.get_freeze_count() > 0
        assert keeper.thaws == 0
        counts["closed"] = 9_999  # under a quarter of 40,000 open
        assert not keeper.due()
        keeper.step()
        assert keeper.thaws == 0

        # A cycle frozen with the rest is collected only by the thaw.
        class Node:
            other: object = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        keeper.step()  # frozen
        del a, b
        gc.collect()
        assert gone() is not None  # a frozen cycle outlives a full collection
        counts["closed"] = 10_000
        assert keeper.due()
        keeper.step()
        assert keeper.thaws == 1
        assert gone() is None
        assert not keeper.due()  # counted from the thaw
    finally:
        gc.unfreeze()


def test_small_servers_never_thaw_for_a_few_closes() -> None:
    """Below MIN_CHURN closed connections there is no full collection, however few are open."""
    counts = {"open": 10, "closed": MIN_CHURN - 1}
    keeper = HeapKeeper(lambda: counts["open"], lambda: counts["closed"])
    try:
        assert not keeper.due()
        counts["closed"] = MIN_CHURN
        assert keeper.due()
    finally:
        gc.unfreeze()


def test_nothing_frozen_below_min_open() -> None:
    """With few connections open nothing is frozen, and what was frozen is thawed."""
    counts = {"open": MIN_OPEN, "closed": 0}
    keeper = HeapKeeper(lambda: counts["open"], lambda: counts["closed"])
    try:
        keeper.step()
        assert gc.get_freeze_count() > 0
        counts["open"] = MIN_OPEN - 1
        keeper.step()
        assert gc.get_freeze_count() == 0
        assert keeper.thaws == 1
    finally:
        gc.unfreeze()
