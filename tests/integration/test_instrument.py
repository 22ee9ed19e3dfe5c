"""The instrumentation seam: observers around every callback, per ledger or per instance."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from nucleus_actors import (
    CallbackCall,
    CallbackOutcome,
    CallbackResult,
    Hash,
    Injection,
    Instrument,
    LedgerConfig,
    LedgerEngine,
    Module,
    ModuleContext,
    ModuleState,
    Record,
    RecordRejected,
    attach_instrument,
    attached_instruments,
    detach_instrument,
    open_ledger,
)


class Spy(Instrument):
    def __init__(self) -> None:
        self.before: list[tuple[str, str, int]] = []
        self.after: list[tuple[str, str, CallbackOutcome, bool]] = []
        self.durations: list[float] = []

    def before_callback(self, call: CallbackCall) -> Injection | None:
        self.before.append((call.module_id, call.callback, call.incarnation))
        return None

    def after_callback(self, call: CallbackCall, result: CallbackResult) -> None:
        self.after.append((call.module_id, call.callback, result.outcome, result.completed))
        self.durations.append(result.duration)


class Worker(Module):
    id = "worker"

    async def start(self, ctx: ModuleContext) -> None:
        ctx.spawn(trio.sleep_forever)

    async def after_append(self, record: Record, hash: Hash) -> None:
        await trio.sleep(0.5)


class Gate(Module):
    id = "gate"

    async def before_append(self, record: Record) -> Record | None:
        if record.payload == "no":
            raise RecordRejected("said no")
        return None


async def test_ledger_instruments_see_every_callback_the_runtime_runs(
    mock_clock: trio.testing.MockClock,
) -> None:
    spy = Spy()
    engine = LedgerEngine(LedgerConfig(ledger_id="i"))
    engine.add_instrument(spy)
    engine.add_instrument(spy)  # no-op
    engine.register(Worker())
    engine.register(Gate())
    async with engine:
        await engine.init_all()
        await engine.start_all()
        await engine.append(Record("k", "yes"))
        with pytest.raises(RecordRejected):
            await engine.append(Record("k", "no"))
        await engine.wait_length(1)
        await trio.sleep(1)
        await engine.stop_all()
    assert spy.before == [
        ("worker", "init", 1),
        ("gate", "init", 1),
        ("worker", "start", 1),
        ("worker", "background", 1),
        ("gate", "start", 1),
        ("gate", "before_append", 1),
        ("worker", "after_append", 1),
        ("gate", "before_append", 1),
        ("gate", "stop", 1),
        ("worker", "stop", 1),
    ]  # gate has no after_append and worker no before_append: never observed
    outcomes = {(m, c): (o, done) for m, c, o, done in spy.after}
    assert outcomes[("gate", "before_append")] == (CallbackOutcome.REJECTED, True)
    assert outcomes[("worker", "after_append")] == (CallbackOutcome.RETURNED, True)
    assert outcomes[("worker", "background")] == (CallbackOutcome.CANCELLED, False)
    after = spy.after.index(("worker", "after_append", CallbackOutcome.RETURNED, True))
    assert spy.durations[after] >= 0  # wall-clock seconds (the mocked clock does not count)
    engine.remove_instrument(spy)
    with pytest.raises(KeyError, match="was not added"):
        engine.remove_instrument(spy)
    with pytest.raises(TypeError, match="add_instrument takes an Instrument, got int"):
        engine.add_instrument(1)  # type: ignore[arg-type]


async def test_an_attached_injection_crashes_one_instance_only(
    mock_clock: trio.testing.MockClock,
) -> None:
    class CrashOnce(Instrument):
        fired = False

        def before_callback(self, call: CallbackCall) -> Injection | None:
            if call.callback != "after_append" or self.fired:
                return None
            self.fired = True

            async def crash() -> None:
                raise RuntimeError("injected")

            return Injection(entry=crash)

    worker = Worker()
    crash = CrashOnce()
    attach_instrument(worker, crash)
    attach_instrument(worker, crash)  # no-op
    assert attached_instruments(worker) == (crash,)
    async with open_ledger(LedgerConfig(ledger_id="i"), modules=[worker]) as engine:
        await engine.append(Record("k", 1))
        handle = engine.modules.get("worker")
        await handle.wait_state(ModuleState.RUNNING)
        await trio.sleep(1)
        assert handle.status.crashes == 1
        assert handle.status.incarnation == 2
        assert handle.status.processed == 1  # redelivered to the new incarnation
    detach_instrument(worker, crash)
    assert attached_instruments(worker) == ()
