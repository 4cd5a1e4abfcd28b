"""eventwire.heap: the long-lived heap frozen, thawed and collected after enough churn."""

from __future__ import annotations

import gc
import weakref

from eventwire.heap import MIN_CHURN, MIN_OPEN, SMALL_THAW_INTERVAL, HeapKeeper


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


def test_settle_freezes_what_the_process_holds() -> None:
    """At start one full collection, then everything alive leaves the collector's walk."""

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    keeper = HeapKeeper(lambda: 0, lambda: 0)
    try:
        keeper.settle()
        assert gone() is None  # garbage from before the start is collected, not frozen
        assert gc.get_freeze_count() > 1_000  # the imports at least
        assert keeper.thaws == 0
    finally:
        gc.unfreeze()


def test_small_servers_thaw_on_an_interval() -> None:
    """Below MIN_OPEN a full pass runs every SMALL_THAW_INTERVAL; above, only churn brings one."""
    now = [0.0]
    counts = {"open": MIN_OPEN - 1, "closed": 0}
    keeper = HeapKeeper(lambda: counts["open"], lambda: counts["closed"], clock=lambda: now[0])
    try:
        keeper.settle()
        now[0] = SMALL_THAW_INTERVAL - 1
        keeper.step()
        assert keeper.thaws == 0
        assert gc.get_freeze_count() > 0  # a small heap is frozen too
        now[0] = SMALL_THAW_INTERVAL
        assert keeper.due()
        keeper.step()
        assert keeper.thaws == 1
        assert not keeper.due()  # counted from the thaw
        counts["open"] = MIN_OPEN
        now[0] = 10 * SMALL_THAW_INTERVAL
        assert not keeper.due()
    finally:
        gc.unfreeze()
