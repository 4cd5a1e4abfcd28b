"""Stopping owned background tasks for certain.

One ``task.cancel()`` does not always stop a task on Python 3.11:
``asyncio.wait_for``, which redis-py uses to write to its socket, returns
the step's result and drops a cancellation that arrives as that step
completes. The task then carries on (a loop goes round again) and whoever
awaits it waits forever; a server that never exits after SIGTERM is the
visible symptom. :func:`cancel_and_wait` cancels again until the task ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

#: How long a cancelled task gets to end before it is cancelled again.
RECANCEL_AFTER: Final = 0.2


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel the tasks and wait until every one has ended, cancelling again as needed.

    Their results and exceptions are left in them (read by nobody): a
    cancelled task ends with CancelledError, which is what was asked.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER)
