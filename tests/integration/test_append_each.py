"""`append_each`: records appended individually, one outcome per record, in one pipeline trip."""

from __future__ import annotations

import re

import pytest
import trio
import trio.testing

from nucleus_actors import (
    InvalidRecord,
    LedgerConfig,
    LifecycleError,
    Module,
    Receipt,
    Record,
    RecordRejected,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage


class Veto(Module):
    id = "veto"

    async def before_append(self, record: Record) -> Record | None:
        if record.payload.get("bad"):
            raise RecordRejected(f"bad record {record.payload['n']}")
        return None


async def test_each_record_has_its_own_outcome_in_order() -> None:
    async with open_ledger(
        LedgerConfig(ledger_id="t", max_record_bytes=200), modules=[Veto()]
    ) as engine:
        records = [
            Record("k", {"n": 0}),
            Record("k", {"n": 1, "bad": True}),
            Record("k", {"n": 2, "text": "x" * 300}),  # too large
            Record("k", {"n": 3}),
        ]
        outcomes = await engine.append_each(records)
        assert isinstance(outcomes[0], Receipt)
        assert isinstance(outcomes[1], RecordRejected)
        assert "bad record 1" in str(outcomes[1])
        assert outcomes[1].index is None  # a record alone, not "record 1 of a batch"
        assert isinstance(outcomes[2], InvalidRecord)
        assert "max_record_bytes=200" in str(outcomes[2])
        assert isinstance(outcomes[3], Receipt)
        assert (outcomes[0].seq, outcomes[3].seq) == (0, 1)
        stored = [entry.record.payload["n"] async for entry in engine.read()]
        assert stored == [0, 3]
        # what append would say for the same record
        with pytest.raises(RecordRejected, match="bad record 1"):
            await engine.append(records[1])
        assert await engine.append_each([]) == []


async def test_append_each_groups_records_into_few_pipeline_batches() -> None:
    async with open_ledger(LedgerConfig(ledger_id="t")) as engine:
        before = engine._pipeline.batches_done
        outcomes = await engine.append_each([Record("k", n) for n in range(500)])
        assert [o.seq for o in outcomes if isinstance(o, Receipt)] == list(range(500))
        assert engine._pipeline.batches_done - before == 1


class SlowStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.entered = trio.Event()

    async def append(self, entries):  # type: ignore[no-untyped-def]
        self.entered.set()
        await self.gate.wait()
        await super().append(entries)


async def test_cancelled_append_each_withdraws_what_storage_has_not_got() -> None:
    storage = SlowStorage()
    async with open_ledger(LedgerConfig(ledger_id="t"), storage=storage) as engine:
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()

            async def in_storage() -> None:
                with first:
                    await engine.append_each([Record("k", "stored")])

            nursery.start_soon(in_storage)
            await storage.entered.wait()
            queued = trio.CancelScope()

            async def queued_behind() -> None:
                with queued:
                    await engine.append_each([Record("k", "withdrawn"), Record("k", "w2")])

            nursery.start_soon(queued_behind)
            await trio.testing.wait_all_tasks_blocked()
            queued.cancel()
            first.cancel()
            await trio.testing.wait_all_tasks_blocked()
            storage.gate.set()
        await engine._pipeline.wait_idle()
        assert [e.record.payload async for e in engine.read()] == ["stored"]


async def test_append_each_needs_a_running_ledger() -> None:
    async with open_ledger(LedgerConfig(ledger_id="t")) as engine:
        await engine.stop_all()
        with pytest.raises(LifecycleError, match="cannot append"):
            await engine.append_each([Record("k", 1)])


async def test_append_each_and_keyed_refuse_a_non_record_or_an_oversized_one_alone() -> None:
    async with open_ledger(LedgerConfig(ledger_id="t", max_record_bytes=200)) as engine:
        given: list[object] = [{"n": 0}, Record("k", {"text": "x" * 300}), Record("k", 2)]
        each = await engine.append_each(given)  # type: ignore[arg-type]
        keyed = await engine.append_each_keyed(given, [None] * 3)  # type: ignore[arg-type]
        for outcomes, name in ((each, "append_each"), (keyed, "append_each_keyed")):
            assert isinstance(outcomes[0], InvalidRecord)
            assert str(outcomes[0]) == f"{name} takes Records, got dict"
            assert isinstance(outcomes[1], InvalidRecord)
            assert re.fullmatch(
                r"record is \d+ canonical bytes, over max_record_bytes=200", str(outcomes[1])
            )
        assert isinstance(each[2], Receipt)
        assert isinstance(keyed[2], tuple)
        assert keyed[2][0].seq == 1
