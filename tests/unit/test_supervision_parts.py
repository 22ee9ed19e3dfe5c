"""Unit tests of the supervisor's parts: `Mailbox`, `IntensityWindow` and `Backoff`."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from nucleus_actors import Backoff, Hash, ModuleError, Overflow, Record
from nucleus_actors.module._mailbox import Ask, Lifecycle, LifecycleOp, Mailbox
from nucleus_actors.supervision import IntensityWindow


def _items(n: int) -> list[tuple[Record, Hash]]:
    return [(Record("k", i), Hash(bytes(32))) for i in range(n)]


# -- Mailbox -----------------------------------------------------------------------------------
def test_mailbox_block_queues_up_to_capacity_and_reports_the_rest() -> None:
    box = Mailbox(2, lambda: None)
    assert box.deliver_nowait(_items(5), Overflow.BLOCK) == 2
    assert (box.depth, box.dropped) == (2, 0)


@pytest.mark.parametrize(
    ("policy", "kept"),
    [(Overflow.DROP_OLDEST, [3, 4]), (Overflow.DROP_NEWEST, [0, 1])],
)
def test_mailbox_drop_policies_keep_the_right_items(policy: Overflow, kept: list[int]) -> None:
    box = Mailbox(2, lambda: None)
    assert box.deliver_nowait(_items(5), policy) == 5
    assert (box.depth, box.dropped) == (2, 3)
    queued = [box.next_delivery() for _ in range(2)]
    assert [item[0].payload for item in queued if item is not None] == kept


def test_mailbox_fail_policy_calls_on_overflow_per_dropped_item() -> None:
    overflowed: list[int] = []
    box = Mailbox(1, lambda: overflowed.append(1))
    box.deliver_nowait(_items(3), Overflow.FAIL)
    assert (box.depth, box.dropped, len(overflowed)) == (1, 2, 2)


def test_mailbox_take_and_give_back_keep_places_and_order() -> None:
    box = Mailbox(4, lambda: None)
    box.deliver_nowait(_items(3), Overflow.BLOCK)
    first = box.next_delivery()
    assert first is not None
    run = box.take_deliveries(first, Overflow.BLOCK)
    assert [r.payload for r, _ in run] == [0, 1, 2]
    assert box.depth == 3  # places are held until delivered()
    box.delivered(1)
    box.give_back(run[1:])  # a crash: the rest go to the next incarnation first
    assert box.depth == 2
    assert [box.next_delivery()[0].payload for _ in range(2)] == [1, 2]  # type: ignore[index]


def test_mailbox_drop_policy_takes_one_at_a_time() -> None:
    box = Mailbox(4, lambda: None)
    box.deliver_nowait(_items(3), Overflow.DROP_OLDEST)
    first = box.next_delivery()
    assert first is not None
    assert len(box.take_deliveries(first, Overflow.DROP_OLDEST)) == 1


def test_mailbox_shut_refuses_requests_and_reopen_accepts_again() -> None:
    box = Mailbox(2, lambda: None)
    ask = Ask(lambda m: m, ())
    box.put(ask)
    box.deliver_nowait(_items(1), Overflow.BLOCK)
    box.shut(ModuleError("module 'm' is STOPPED", module_id="m"))
    assert box.is_shut
    assert box.depth == 0
    assert isinstance(ask.reply.error, ModuleError)
    later = Lifecycle(LifecycleOp.STOP)
    box.put_front(later)
    assert str(later.reply.error) == "module 'm' is STOPPED"
    assert box.deliver_nowait(_items(2), Overflow.BLOCK) == 2  # discarded, not queued
    assert box.depth == 0
    box.reopen()
    assert not box.is_shut
    box.put(Ask(lambda m: m, ()))
    assert not box.has_lifecycle()


def test_mailbox_drop_lifecycle_fails_only_lifecycle_messages() -> None:
    box = Mailbox(2, lambda: None)
    stop, ask = Lifecycle(LifecycleOp.STOP), Ask(lambda m: m, ())
    box.put(stop)
    box.put(ask)
    assert box.has_lifecycle()
    box.drop_lifecycle(ModuleError("gone", module_id="m"))
    assert str(stop.reply.error) == "gone"
    assert not ask.reply.done
    assert not box.has_lifecycle()


async def test_mailbox_block_waits_for_room_and_a_drain_stop_waits_for_the_batch() -> None:
    box = Mailbox(1, lambda: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.deliver, _items(3), Overflow.BLOCK)
        await trio.testing.wait_all_tasks_blocked()
        stop = Lifecycle(LifecycleOp.STOP)
        box.put_after_deliveries(stop)  # deferred: the batch in flight comes first
        seen = []
        while len(seen) < 3:
            item = await box.get()
            assert type(item) is tuple
            seen.append(item[0].payload)
            box.delivered(1)
    assert seen == [0, 1, 2]
    assert await box.get() is stop


# -- IntensityWindow ---------------------------------------------------------------------------
def test_intensity_window_admits_exactly_max_restarts() -> None:
    window = IntensityWindow(3, 5.0)
    assert [window.admit(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert window.admit(3.0) is False  # the 4th within 5 s


def test_intensity_window_keeps_a_restart_exactly_window_old() -> None:
    window = IntensityWindow(1, 5.0)
    assert window.admit(0.0)
    assert not window.admit(5.0)  # OTP keeps R >= Now - Period: 0.0 still counts
    window = IntensityWindow(1, 5.0)
    assert window.admit(0.0)
    assert window.admit(5.001)  # older than the window: forgotten


def test_intensity_window_of_zero_restarts_never_admits() -> None:
    assert IntensityWindow(0, 5.0).admit(0.0) is False


# -- Backoff -----------------------------------------------------------------------------------
def test_backoff_grows_caps_and_jitters_within_bounds() -> None:
    plain = Backoff(initial=0.1, multiplier=2.0, max=0.5)
    assert [plain.delay(k) for k in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = Backoff(initial=1.0, multiplier=1.0, jitter=0.1, rng=random.Random(7))
    delays = [jittered.delay(0) for _ in range(200)]
    assert all(0.9 <= d <= 1.1 for d in delays)
    assert len(set(delays)) > 100
    again = Backoff(initial=1.0, multiplier=1.0, jitter=0.1, rng=random.Random(7))
    assert [again.delay(0) for _ in range(200)] == delays  # seeded: reproducible


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("initial", -1.0, r"Backoff\.initial must be a finite number >= 0, got -1\.0"),
        ("max", float("inf"), r"Backoff\.max must be a finite number >= 0, got inf"),
        ("multiplier", 0.5, r"Backoff\.multiplier must be >= 1, got 0\.5"),
        ("jitter", 2.0, r"Backoff\.jitter must be within \[0, 1\], got 2\.0"),
    ],
)
def test_backoff_refuses_out_of_range_options(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**{field: value})  # type: ignore[arg-type]
