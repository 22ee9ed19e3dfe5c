"""A one-shot, single-waiter future: the cheapest way for one task to wait for another.

`trio.Event` keeps a `ParkingLot` per event; requests and replies of the actors have exactly one
waiter each, so parking that one task directly (`wait_task_rescheduled`) is enough and avoids
allocating a lot per message on the append path.
"""

from __future__ import annotations

import trio

__all__ = ["Future"]


class Future:
    """Resolved once by `_resolve()`; awaited by at most one task at a time."""

    __slots__ = ("_done", "_task")

    def __init__(self) -> None:
        self._done = False
        self._task: trio.lowlevel.Task | None = None

    @property
    def done(self) -> bool:
        """Whether it was resolved."""
        return self._done

    def _resolve(self) -> None:
        self._done = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def _wait(self) -> None:
        """Wait until resolved. A checkpoint; cancellation stops waiting (nothing else)."""
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
