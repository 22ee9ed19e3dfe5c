"""Fault-inject your own module: crash it on its 3rd after_append; it must be restarted and
still see every record. Run it with `pytest examples/test_my_module.py` (pytest-trio installed;
the nucleus_actors pytest plugin comes with the package). Guide: docs/testing.md.
"""

import pytest

from nucleus_actors import Hash, Module, Record
from nucleus_actors.testing import FaultPlan

pytestmark = pytest.mark.trio  # not needed with `trio_mode = true` in your pytest config


class OrderIndex(Module):
    """Stands in for your module: indexes order ids."""

    id = "order-index"

    def __init__(self) -> None:
        self.ids: set[int] = set()

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.ids.add(record.payload["id"])


async def test_index_survives_a_crash(nucleus_ledger):
    plan = FaultPlan().crash("after_append", nth=3)
    async with nucleus_ledger(modules=[plan.wrap(OrderIndex())]) as ledger:
        for n in range(5):
            await ledger.append(Record("order.created", {"id": n}))
        await ledger.wait_delivered()
        index = ledger.modules.get(OrderIndex)
        assert index.status.restarts == 1
        assert await index.ask(lambda m: m.ids) == {0, 1, 2, 3, 4}
    assert plan.seen("order-index") == [0, 1, 2, 3, 4]  # the crashed delivery came again
