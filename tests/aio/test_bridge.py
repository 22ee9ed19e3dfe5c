"""`nucleus_actors.aio`: a ledger driven from asyncio, with the engine's semantics and errors."""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import (
    EventLoopError,
    Hash,
    InvalidRecord,
    LedgerConfig,
    LedgerEngine,
    LedgerFailed,
    LifecycleError,
    Module,
    ModuleContext,
    ModuleError,
    ModuleSpec,
    ModuleState,
    Phase,
    Record,
    RecordRejected,
    RegistryError,
    aio,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage

from .conftest import run


def config(**options: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="aio-test", **options)


class Validator(Module):
    """Refuses records whose payload has `bad`."""

    id = "validator"

    async def before_append(self, record: Record) -> Record | None:
        if record.payload.get("bad"):
            raise RecordRejected(f"bad is {record.payload['bad']!r}")
        return None


class Counter(Module):
    """Counts committed records; logs its lifecycle into a shared list."""

    id = "counter"

    def __init__(self, log: list[str] | None = None) -> None:
        self.log = [] if log is None else log
        self.count = 0

    async def init(self, ctx: ModuleContext) -> None:
        self.log.append("init")

    async def stop(self, ctx: ModuleContext) -> None:
        self.log.append("stop")

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.count += 1


class Gate(Module):
    """`before_append` tells the host it is waiting (`run_in_host`), then waits for `open`."""

    id = "gate"

    def __init__(self, entered: asyncio.Event) -> None:
        self.entered = entered

    async def init(self, ctx: ModuleContext) -> None:
        self.open = trio.Event()

    async def before_append(self, record: Record) -> Record | None:
        async def notify() -> None:
            self.entered.set()

        await aio.run_in_host(notify)
        await self.open.wait()
        return None


# -- the API, from asyncio ------------------------------------------------------------------


def test_append_read_get_verify_state_from_asyncio() -> None:
    async def main() -> None:
        async with aio.open_ledger(config(), modules=[Validator(), Counter()]) as ledger:
            receipt = await ledger.append(Record("order", {"n": 0}))
            assert receipt.seq == 0
            receipts = await asyncio.gather(
                *(ledger.append(Record("order", {"n": n})) for n in range(1, 101))
            )
            assert sorted(r.seq for r in receipts) == list(range(1, 101))
            many = await ledger.append_many(Record("bulk", {"n": n}) for n in range(500))
            assert [r.seq for r in many] == list(range(101, 601))

            state = await ledger.state()
            assert (state.phase, state.length) == (Phase.RUNNING, 601)
            assert await ledger.verify() == state.head
            entry = await ledger.get(5)
            assert (entry.seq, entry.record.kind) == (5, "order")

            seqs = [entry.seq async for entry in ledger.read()]
            assert seqs == list(range(601))  # more than one chunk
            assert [e.seq async for e in ledger.read(250, 260)] == list(range(250, 260))
            assert await ledger.wait_length(601) == 601
            assert (await ledger.statistics()).appends == 601

            counter = await ledger.modules.get(Counter)
            assert counter.id == "counter"
            assert await counter.ask(lambda module: module.count) == 601
            assert [s.id for s in await ledger.modules.status()] == ["validator", "counter"]
            assert (await ledger.modules.counts()).running == 2

    run(main)


def test_errors_are_the_engines_own_not_wrapped() -> None:
    async def main() -> None:
        async with aio.open_ledger(config(), modules=[Validator()]) as ledger:
            with pytest.raises(RecordRejected, match="bad is 1") as rejected:
                await ledger.append(Record("order", {"bad": 1}))
            assert rejected.value.module_id == "validator"
            with pytest.raises(RecordRejected) as in_batch:
                await ledger.append_many([Record("a", {}), Record("a", {"bad": 2})])
            assert in_batch.value.index == 1
            with pytest.raises(InvalidRecord, match="takes a Record"):
                await ledger.append("not a record")  # type: ignore[arg-type]
            with pytest.raises(IndexError, match="seq 3 is not in ledger"):
                await ledger.get(3)
            with pytest.raises(RegistryError, match="no module with id 'nope'"):
                await ledger.modules.get("nope")
            assert (await ledger.state()).length == 0
        with pytest.raises(LifecycleError, match="ledger 'aio-test' is closed"):
            await ledger.append(Record("late", {}))
        with pytest.raises(LifecycleError, match="is closed"):
            ledger.read()

    run(main)


def test_read_closes_early_and_reports_range_errors_on_first_step() -> None:
    async def main() -> None:
        async with aio.open_ledger(config()) as ledger:
            await ledger.append_many(Record("a", {"n": n}) for n in range(10))
            reader = ledger.read(2)
            assert (await reader.__anext__()).seq == 2
            await reader.aclose()  # type: ignore[attr-defined]
            with pytest.raises(StopAsyncIteration):
                await reader.__anext__()
            with pytest.raises(ValueError, match="-1"):
                await ledger.read(-1).__anext__()

    run(main)


def test_dynamic_modules_and_handles() -> None:
    async def main() -> None:
        async with aio.open_ledger(config()) as ledger:
            handle = await ledger.add(Counter())
            assert await handle.state() is ModuleState.RUNNING
            await ledger.append(Record("a", {}))
            await ledger.terminate("counter")
            assert await handle.wait_state(ModuleState.STOPPED) is ModuleState.STOPPED
            with pytest.raises(ModuleError, match="cannot ask module 'counter'"):
                await handle.ask(lambda module: module.count)
            await ledger.restart("counter")
            assert (await handle.status()).restarts == 1
            await ledger.terminate("counter")
            await ledger.remove("counter")
            assert await ledger.modules.status() == []
            with pytest.raises(RegistryError, match="'counter'"):
                await ledger.terminate("counter")

    run(main)


# -- batching --------------------------------------------------------------------------------


def test_concurrent_callers_share_crossings() -> None:
    async def main() -> None:
        async with aio.open_ledger(config(), modules=[Counter()]) as ledger:
            bridge = ledger._bridge
            calls, crossings, returns = bridge.calls, bridge.crossings, bridge.returns
            await asyncio.gather(*(ledger.append(Record("a", {"n": n})) for n in range(200)))
            assert bridge.calls - calls == 200
            # All 200 are sent in one pass of the host loop: a handful of wake-ups carry them.
            assert bridge.crossings - crossings <= 20
            assert bridge.returns - returns <= 100

    run(main)


# -- cancellation ----------------------------------------------------------------------------


def test_cancelled_append_is_withdrawn_before_storage() -> None:
    async def main() -> None:
        entered = asyncio.Event()
        gate = Gate(entered)
        async with aio.open_ledger(config(), modules=[gate]) as ledger:
            task = asyncio.create_task(ledger.append(Record("a", {"n": 1})))
            await entered.wait()  # the record is in before_append: not yet stored
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The trio side has settled it by now: withdrawn, nothing stored.
            assert (await ledger.state()).length == 0

            async def release(engine: LedgerEngine) -> None:
                gate.open.set()

            await ledger.run_in_trio(release)
            receipt = await ledger.append(Record("a", {"n": 2}))
            assert receipt.seq == 0
            assert (await ledger.get(0)).record.payload == {"n": 2}

    run(main)


def test_cancelled_wait_and_timeout_work_as_in_asyncio() -> None:
    async def main() -> None:
        async with aio.open_ledger(config()) as ledger:
            loop = asyncio.get_running_loop()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout_at(loop.time()):
                    await ledger.wait_length(1)
            task = asyncio.current_task()
            assert task is not None
            assert task.cancelling() == 0
            waiter = asyncio.create_task(ledger.wait_length(5))
            await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await ledger.append(Record("a", {}))  # the bridge still works

    run(main)


def test_leaving_the_block_stops_modules() -> None:
    log: list[str] = []

    async def main() -> None:
        async with aio.open_ledger(config(), modules=[Counter(log)]) as ledger:
            await ledger.append(Record("a", {}))
            assert log == ["init"]
            follower = asyncio.create_task(ledger.wait_length(10))
            await asyncio.sleep(0)
        assert log == ["init", "stop"]
        assert "closed" in repr(ledger)
        # A call still waiting when the ledger stopped gets the engine's answer.
        with pytest.raises(LifecycleError, match="will not grow: it is STOPPED with 1 entries"):
            await follower

    run(main)


def test_an_exception_in_the_block_stops_cleanly_and_propagates() -> None:
    log: list[str] = []
    storage = MemoryStorage()
    boom = ValueError("boom")

    async def main() -> None:
        async with aio.open_ledger(config(), modules=[Counter(log)], storage=storage) as ledger:
            await ledger.append(Record("a", {}))
            raise boom

    with pytest.raises(ValueError, match="boom") as raised:
        run(main)
    assert raised.value is boom
    assert log == ["init", "stop"]

    async def reopen() -> None:  # everything committed before the error is there
        async with open_ledger(config(), storage=storage) as engine:
            assert engine.state.length == 1

    trio.run(reopen)


def test_cancelling_the_block_stops_modules_and_stays_cancelled() -> None:
    log: list[str] = []

    async def block(started: asyncio.Event) -> None:
        async with aio.open_ledger(config(), modules=[Counter(log)]) as ledger:
            await ledger.append(Record("a", {}))
            started.set()
            await asyncio.Event().wait()

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(block(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)
    assert log == ["init", "stop"]


def test_stop_deadlines_apply_when_leaving() -> None:
    class Stubborn(Module):
        id = "stubborn"

        async def stop(self, ctx: ModuleContext) -> None:
            await trio.sleep_forever()

    async def main() -> None:
        clock = trio.testing.MockClock(autojump_threshold=0)
        opened = aio.open_ledger(config(), modules=[Stubborn()], _clock=clock)
        async with opened as ledger:
            await ledger.append(Record("a", {}))
        status = opened._engine.modules.get("stubborn").status
        assert status.state is ModuleState.STOPPED
        assert status.stop_result is not None

    run(main)


# -- failures ----------------------------------------------------------------------------------


def test_ledger_failed_cancels_the_block_and_comes_out_as_itself() -> None:
    class Crasher(Module):
        id = "crasher"

        async def after_append(self, record: Record, hash: Hash) -> None:
            raise RuntimeError("crash in after_append")

    async def main() -> None:
        with pytest.raises(LedgerFailed) as failed:
            async with aio.open_ledger(config(max_restarts=0), modules=[Crasher()]) as ledger:
                await ledger.append(Record("a", {}))
                await asyncio.Event().wait()  # cancelled when the ledger fails
        assert isinstance(failed.value.__cause__, RuntimeError)
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0  # the cancellation we used is withdrawn
        await asyncio.sleep(0)  # and no cancellation is left pending

    run(main)


def test_a_failing_init_raises_from_the_async_with() -> None:
    class BadInit(Module):
        id = "bad-init"

        async def init(self, ctx: ModuleContext) -> None:
            raise OSError("no database")

    async def main() -> None:
        with pytest.raises(ModuleError, match="bad-init") as failed:
            async with aio.open_ledger(config(), modules=[BadInit()]):
                pytest.fail("the block must not run")
        assert isinstance(failed.value.__cause__, OSError)

    run(main)


def test_cancelled_while_opening() -> None:
    class SlowInit(Module):
        id = "slow-init"

        def __init__(self, entered: asyncio.Event) -> None:
            self.entered = entered

        async def init(self, ctx: ModuleContext) -> None:
            async def notify() -> None:
                self.entered.set()

            await aio.run_in_host(notify)
            await trio.sleep_forever()

    async def main() -> None:
        entered = asyncio.Event()

        async def opener() -> None:
            # As in trio, the cancelled init is rolled back within the module's shutdown
            # deadline (5 s): virtual time on the trio side skips it.
            clock = trio.testing.MockClock(autojump_threshold=0)
            spec = ModuleSpec(SlowInit(entered), timeout=None)
            async with aio.open_ledger(config(), modules=[spec], _clock=clock):
                pytest.fail("the block must not run")

        task = asyncio.create_task(opener())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)


# -- loops -------------------------------------------------------------------------------------


def test_trio_open_ledger_under_asyncio_says_what_to_use() -> None:
    message = "nucleus_actors runs on trio; from asyncio use nucleus_actors.aio.open_ledger"

    async def with_open_ledger() -> None:
        async with open_ledger(config()):
            pytest.fail("must not open")

    async def with_engine() -> None:
        async with LedgerEngine(config()):
            pytest.fail("must not open")

    for main in (with_open_ledger, with_engine):
        with pytest.raises(EventLoopError, match=re.escape(message)):
            run(main)


def test_a_ledger_belongs_to_the_loop_that_opened_it() -> None:
    kept: list[aio.Ledger] = []

    async def first() -> None:
        async with aio.open_ledger(config()) as ledger:
            kept.append(ledger)

    async def second() -> None:
        with pytest.raises(EventLoopError, match="belongs to the event loop that opened it"):
            await kept[0].append(Record("a", {}))

    run(first)
    run(second)


async def test_run_in_host_needs_a_bridged_ledger() -> None:
    async def nothing() -> None:
        pass

    coro = nothing()
    with pytest.raises(EventLoopError, match="run_in_host needs the trio loop"):
        await aio.run_in_host(lambda: coro)
    coro.close()


def test_two_ledgers_in_one_loop_each_with_its_thread() -> None:
    async def main() -> None:
        async with (
            aio.open_ledger(LedgerConfig(ledger_id="one")) as one,
            aio.open_ledger(LedgerConfig(ledger_id="two")) as two,
        ):
            names = {t.name for t in threading.enumerate()}
            assert {"nucleus-aio ledger 'one'", "nucleus-aio ledger 'two'"} <= names
            await asyncio.gather(one.append(Record("a", {})), two.append(Record("b", {})))
            assert (await one.state()).head != (await two.state()).head
        # Each thread has ended by the time its `async with` is left.
        names = {t.name for t in threading.enumerate()}
        assert not any(name.startswith("nucleus-aio") for name in names)

    run(main)


def test_run_in_host_runs_on_the_host_loop() -> None:
    class Notifier(Module):
        id = "notifier"

        def __init__(self, seen: list[tuple[int, bool]]) -> None:
            self.seen = seen

        async def after_append(self, record: Record, hash: Hash) -> None:
            async def on_host(seq: int) -> int:
                self.seen.append((seq, asyncio.get_running_loop() is host_loop))
                return seq * 2

            assert await aio.run_in_host(on_host, record.payload["n"]) == record.payload["n"] * 2

    seen: list[tuple[int, bool]] = []
    host_loop: asyncio.AbstractEventLoop | None = None

    async def main() -> None:
        nonlocal host_loop
        host_loop = asyncio.get_running_loop()
        async with aio.open_ledger(config(), modules=[Notifier(seen)]) as ledger:
            await ledger.append_many(Record("a", {"n": n}) for n in range(3))
            handle = await ledger.modules.get("notifier")
            await handle.ask(lambda module: None)  # after_append deliveries are done

    run(main)
    assert seen == [(0, True), (1, True), (2, True)]


def test_cancelled_ask_returns_once_trio_has_cancelled_it() -> None:
    class Slow(Module):
        id = "slow"

        async def init(self, ctx: ModuleContext) -> None:
            self.release = trio.Event()
            self.finished = 0

    async def main() -> None:
        async with aio.open_ledger(config()) as ledger:
            slow = Slow()
            handle = await ledger.add(slow)
            entered = asyncio.Event()

            async def slow_question(module: Slow) -> str:
                async def notify() -> None:
                    entered.set()

                await aio.run_in_host(notify)
                await module.release.wait()
                module.finished += 1
                return "late answer"

            task = asyncio.create_task(handle.ask(slow_question))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            async def release(engine: LedgerEngine) -> None:
                slow.release.set()

            await ledger.run_in_trio(release)
            # As in trio: the running ask finished inside the actor, its result discarded.
            assert await handle.ask(lambda module: module.finished) == 1

    run(main)


def test_append_many_of_nothing_and_run_in_trio() -> None:
    async def main() -> None:
        async with aio.open_ledger(config()) as ledger:
            assert await ledger.append_many([]) == []

            async def length(engine: LedgerEngine) -> int:
                await trio.lowlevel.checkpoint()
                return engine.state.length

            assert await ledger.run_in_trio(length) == 0

    run(main)


def test_guest_mode_design_still_works() -> None:
    """The other design (trio guest mode on the asyncio loop), kept for bench_aio.py."""

    async def main() -> None:
        opened = aio.open_ledger(config(), modules=[Validator()], _guest=True)
        async with opened as ledger:
            receipts = await asyncio.gather(*(ledger.append(Record("a", {})) for _ in range(10)))
            assert sorted(r.seq for r in receipts) == list(range(10))
            assert [e.seq async for e in ledger.read()] == list(range(10))
            with pytest.raises(RecordRejected):
                await ledger.append(Record("a", {"bad": 1}))

    run(main)


async def test_aio_open_ledger_under_trio_says_what_to_use() -> None:
    with pytest.raises(EventLoopError, match=re.escape("from trio use nucleus_actors.open_ledger")):
        async with aio.open_ledger(config()):
            pytest.fail("must not open")


def test_run_in_host_raises_the_host_error_in_trio() -> None:
    async def main() -> None:
        async with aio.open_ledger(config()) as ledger:
            handle = await ledger.add(Counter())

            async def fails_on_host() -> None:
                raise KeyError("host side")

            async def question(module: Counter) -> None:
                await aio.run_in_host(fails_on_host)

            # `ask` raises what its function raised (not a crash): here the host's own error.
            with pytest.raises(KeyError, match="host side"):
                await handle.ask(question)
            assert (await handle.status()).crashes == 0

    run(main)


def test_leaving_by_cancellation_caps_unbounded_stops_with_exit_timeout() -> None:
    class Stubborn(Module):
        id = "stubborn"

        async def stop(self, ctx: ModuleContext) -> None:
            await trio.sleep_forever()

    async def block(started: asyncio.Event) -> None:
        clock = trio.testing.MockClock(autojump_threshold=0)
        spec = ModuleSpec(Stubborn(), shutdown=None)  # an orderly exit would wait forever
        async with aio.open_ledger(config(exit_timeout=30.0), modules=[spec], _clock=clock):
            started.set()
            await asyncio.Event().wait()

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(block(started))
        await started.wait()
        task.cancel()  # a trio cancellation of the block: exit_timeout bounds the stop
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)


def test_system_exit_in_the_block_stops_the_ledger_and_propagates() -> None:
    log: list[str] = []

    async def main() -> None:
        async with aio.open_ledger(config(), modules=[Counter(log)]):
            raise SystemExit(3)

    with pytest.raises(SystemExit) as exited:
        run(main)
    assert exited.value.code == 3
    assert log == ["init", "stop"]


def test_cancelled_while_stopping_the_stop_finishes_then_cancellation_is_raised() -> None:
    class SlowStop(Module):
        id = "slow-stop"

        def __init__(self, stopping: asyncio.Event, log: list[str]) -> None:
            self.stopping = stopping
            self.log = log

        async def init(self, ctx: ModuleContext) -> None:
            self.release = trio.Event()

        async def stop(self, ctx: ModuleContext) -> None:
            async def notify() -> None:
                self.stopping.set()

            await aio.run_in_host(notify)
            await self.release.wait()  # the host task is cancelled meanwhile
            self.log.append("stopped")

    log: list[str] = []

    async def main() -> None:
        stopping = asyncio.Event()
        module = SlowStop(stopping, log)
        opened: list[aio.Ledger] = []

        async def block() -> None:
            async with aio.open_ledger(config(), modules=[module]) as ledger:
                opened.append(ledger)  # and leave in order

        async def release(engine: LedgerEngine) -> None:
            module.release.set()

        task = asyncio.create_task(block())
        await stopping.wait()
        task.cancel()
        await asyncio.sleep(0)
        await opened[0].run_in_trio(release)  # the bridge serves calls while it stops
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["stopped"]  # the stop ran to its end first

    run(main)
