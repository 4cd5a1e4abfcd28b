"""eventwire/tasks.py: owned tasks stop for certain, even when one cancellation is lost."""

from __future__ import annotations

import asyncio

from eventwire.tasks import cancel_and_wait


async def test_task_that_loses_a_cancellation_still_stops() -> None:
    """A loop that swallows its first cancellation (as 3.11's wait_for can) is cancelled again."""
    rounds = 0
    swallowed = 0

    async def loop() -> None:
        nonlocal rounds, swallowed
        while True:
            rounds += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # the fault injected: the step "completed" instead

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        await cancel_and_wait([task])
    assert task.cancelled()
    assert swallowed == 1


async def test_done_tasks_are_left_alone() -> None:
    """Finished tasks keep their result; nothing is awaited twice."""

    async def answer() -> int:
        return 42

    task = asyncio.create_task(answer())
    await task
    await cancel_and_wait([task])
    assert task.result() == 42
