"""A module's inbox: one FIFO of messages, bounded in `after_append` deliveries (records).

Control messages (lifecycle, `before_append` batches, asks) are not counted against the capacity:
each one has a caller waiting for its reply, so they are bounded by the number of waiting tasks.
Deliveries are counted from the moment they are queued until the module has processed them, so
`depth <= capacity` always holds for deliveries queued or in progress. The mailbox belongs to the
registered module, not to one incarnation: it survives restarts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import trio

from .._future import Future
from ..errors import ModuleError
from ..record import Hash, Record
from ._spec import Overflow

__all__ = ["Ask", "Before", "Delivery", "Lifecycle", "LifecycleOp", "Mailbox", "Reply"]

Delivery = tuple[Record, Hash]
"""An `after_append` delivery: the committed record and its chain hash."""


class Reply(Future):
    """A one-shot result slot that one waiter awaits."""

    __slots__ = ("abandoned", "error", "value")

    def __init__(self) -> None:
        super().__init__()
        self.value: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        """Set by a waiter that was cancelled: the actor may skip the work."""

    def set(self, value: Any = None) -> None:
        if not self._done:
            self.value = value
            self._resolve()

    def fail(self, error: BaseException) -> None:
        if not self._done:
            self.error = error
            self._resolve()

    async def wait(self) -> Any:
        """Wait for the result; cancelling the wait abandons it (the work may still run)."""
        try:
            await self._wait()
        except BaseException:
            self.abandoned = True
            raise
        if self.error is not None:
            raise self.error
        return self.value


class LifecycleOp(StrEnum):
    """What a lifecycle message asks of an actor."""

    INIT = "init"
    START = "start"
    BOOT = "boot"  # init then start, in one message (a restart, add, restart(id))
    STOP = "stop"


class Lifecycle:
    """`init`, `start`, `boot` (init then start) or `stop`, with a reply."""

    __slots__ = ("op", "reply")

    def __init__(self, op: LifecycleOp) -> None:
        self.op = op
        self.reply = Reply()


class Before:
    """A batch of records for `before_append`; `results` grows as records are processed.

    Each result is the record to pass on, or the exception that refused/failed that record.
    Fewer results than records means the actor stopped part-way (crash, kill, shutdown): the
    rest were not seen by this module.
    """

    __slots__ = ("records", "reply", "results")

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.results: list[Record | BaseException] = []
        self.reply = Reply()


class Ask:
    """Run `fn(module, *args)` inside the actor and reply with its result."""

    __slots__ = ("args", "fn", "reply", "target")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], target: int = 0) -> None:
        self.fn = fn
        self.args = args
        self.reply = Reply()
        self.target = target
        """Ledger length when asked: a durable module catches up to it before answering."""


class Mailbox:
    """Bounded inbox of one module (see the module docstring for what is counted)."""

    __slots__ = (
        "_deferred",
        "_get_lot",
        "_put_lot",
        "_putting",
        "_queue",
        "_shut",
        "capacity",
        "depth",
        "dropped",
        "lagging",
        "on_overflow",
    )

    def __init__(self, capacity: int, on_overflow: Callable[[], None]) -> None:
        self.capacity = capacity
        self.depth = 0
        """Deliveries queued or being processed."""
        self.dropped = 0
        """Deliveries dropped by the overflow policy."""
        self.on_overflow = on_overflow
        self.lagging = False
        """CATCH_UP: deliveries were not queued (inbox full); the module reads them back."""
        self._queue: deque[Any] = deque()
        self._get_lot = trio.lowlevel.ParkingLot()
        self._put_lot = trio.lowlevel.ParkingLot()
        self._shut: ModuleError | None = None
        self._putting = 0  # deliver() calls in progress (a producer mid-batch)
        self._deferred: list[Any] = []  # messages queued once those deliveries are in

    @property
    def is_shut(self) -> bool:
        return self._shut is not None

    def _refuse(self, msg: Any) -> None:
        assert self._shut is not None
        err = ModuleError(str(self._shut), module_id=self._shut.module_id)
        if isinstance(msg, (Before, Ask, Lifecycle)):
            msg.reply.fail(err)

    def put(self, msg: Any) -> None:
        """Queue a control message at the back (behind every queued delivery)."""
        if self._shut is not None:
            self._refuse(msg)
            return
        self._queue.append(msg)
        self._get_lot.unpark()

    def put_front(self, msg: Any) -> None:
        """Queue a message ahead of everything (lifecycle on restart, a redelivery)."""
        if self._shut is not None:
            self._refuse(msg)
            return
        self._queue.appendleft(msg)
        self._get_lot.unpark()

    def put_after_deliveries(self, msg: Any) -> None:
        """Queue a control message at the back, but behind a delivery batch still being put
        (a drain-stop must come after every delivery of the batch in flight)."""
        if self._putting:
            self._deferred.append(msg)
        else:
            self.put(msg)

    def deliver_nowait(self, items: list[Delivery], overflow: Overflow) -> int:
        """Queue what can be queued without waiting; return how many items were handled.

        Every item is handled (queued or dropped by policy) unless the policy is BLOCK and the
        inbox fills up: then the rest, from the returned index, must go through `deliver`.
        """
        queue = self._queue
        handled = 0
        for item in items:
            if self._shut is not None:
                return len(items)
            if self.depth < self.capacity:
                queue.append(item)
                self.depth += 1
            elif overflow is Overflow.BLOCK:
                break
            elif overflow is Overflow.CATCH_UP:
                self.lagging = True  # not queued, not dropped: read back from storage later
            elif overflow is Overflow.DROP_OLDEST and self._drop_oldest():
                queue.append(item)
                self.depth += 1
            else:
                self.dropped += 1
                if overflow is Overflow.FAIL:
                    self.on_overflow()
            handled += 1
        self._get_lot.unpark()
        return handled

    async def deliver(self, items: list[Delivery], overflow: Overflow) -> None:
        """Queue deliveries, applying the overflow policy when the inbox is full.

        With BLOCK this waits for room (a checkpoint only when it has to wait). Deliveries to a
        shut mailbox are discarded. Cancellation: deliveries queued before it stay queued.
        """
        self._putting += 1
        try:
            start = 0
            while start < len(items):
                start += self.deliver_nowait(items[start:], overflow)
                if start < len(items):  # BLOCK and full: wait for the actor to make room
                    await self._put_lot.park()
        finally:
            self._putting -= 1
            if not self._putting and self._deferred:
                deferred, self._deferred = self._deferred, []
                for msg in deferred:
                    self.put(msg)

    def _drop_oldest(self) -> bool:
        for index, msg in enumerate(self._queue):
            if type(msg) is tuple:
                del self._queue[index]
                self.depth -= 1
                self.dropped += 1
                return True
        return False

    async def get(self) -> Any:
        """Next message; waits (a checkpoint) only when the inbox is empty."""
        while not self._queue:
            await self._get_lot.park()
        return self._queue.popleft()

    def next_delivery(self) -> Delivery | None:
        """Pop the next message if it is a delivery (lets the actor run deliveries in a row)."""
        queue = self._queue
        if queue and type(queue[0]) is tuple:
            item: Delivery = queue.popleft()
            return item
        return None

    def take_deliveries(self, first: Delivery, overflow: Overflow) -> list[Delivery]:
        """`first` plus the deliveries queued right behind it, for the actor to run in a row.

        They keep their places (`depth`) until `delivered()`. With a drop policy only `first`
        is taken: queued deliveries must stay droppable (DROP_OLDEST drops the oldest queued).
        """
        run = [first]
        if overflow is Overflow.BLOCK:
            queue = self._queue
            while queue and type(queue[0]) is tuple:
                run.append(queue.popleft())
        return run

    def give_back(self, items: list[Delivery]) -> None:
        """Put unprocessed deliveries back at the front, in order (for the next incarnation)."""
        if self._shut is None:
            self._queue.extendleft(reversed(items))

    def delivered(self, count: int = 1) -> None:
        """`count` deliveries were processed: free their places and wake a blocked producer."""
        self.depth -= count
        if self._put_lot:
            self._put_lot.unpark_all()

    def discard_deliveries(self) -> None:
        """Remove every queued delivery (a durable module re-reads them from storage)."""
        if any(type(msg) is tuple for msg in self._queue):
            kept: deque[Any] = deque(msg for msg in self._queue if type(msg) is not tuple)
            self.depth -= len(self._queue) - len(kept)
            self._queue = kept
            if self._put_lot:
                self._put_lot.unpark_all()

    @property
    def empty(self) -> bool:
        """Nothing queued (the actor would wait in `get`)."""
        return not self._queue

    def has_lifecycle(self) -> bool:
        """Whether a lifecycle message is waiting (queued or deferred)."""
        return any(isinstance(msg, Lifecycle) for msg in (*self._queue, *self._deferred))

    def drop_lifecycle(self, error: ModuleError) -> None:
        """Fail and remove queued lifecycle messages: they were addressed to an incarnation
        that has ended (a stop the supervisor gave up waiting for, a start never reached)."""
        if any(isinstance(msg, Lifecycle) for msg in self._queue):
            kept: deque[Any] = deque()
            for msg in self._queue:
                if isinstance(msg, Lifecycle):
                    msg.reply.fail(error)
                else:
                    kept.append(msg)
            self._queue = kept
        for msg in self._deferred:
            if isinstance(msg, Lifecycle):
                msg.reply.fail(error)
        self._deferred = [msg for msg in self._deferred if not isinstance(msg, Lifecycle)]

    def shut(self, error: ModuleError) -> None:
        """The module is down for good: refuse requests with `error`, discard deliveries."""
        self._shut = error
        queue, self._queue = self._queue, deque()
        deferred, self._deferred = self._deferred, []
        self.depth = 0
        for msg in [*queue, *deferred]:
            self._refuse(msg)
        self._put_lot.unpark_all()

    def reopen(self) -> None:
        """Accept messages again (the module is being started again)."""
        self._shut = None
