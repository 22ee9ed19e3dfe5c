"""Write `ledger-format-1.db` and `.json` (run with the format-1 code, e.g. commit fc21b87).

    git worktree add /tmp/v1 fc21b87
    cd /tmp/v1 && PYTHONPATH=$PWD python /path/to/tests/data/make_format_1.py OUT_PREFIX

The committed files were written this way; tests copy the .db before opening it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from nucleus_actors import LedgerConfig, Record, open_ledger
from nucleus_actors.storage import SQLiteStorage


async def write(out: str) -> dict[str, object]:
    clock = iter(range(1_700_000_000_000_000, 1_800_000_000_000_000, 1_000_003))
    config = LedgerConfig(ledger_id="format-1", wall_clock=lambda: next(clock))
    async with open_ledger(config, storage=SQLiteStorage(out + ".db")) as ledger:
        await ledger.append(Record("order.created", {"id": 1, "items": ["a", "b"], "total": 12.5}))
        await ledger.append(
            Record(
                "note",
                {"text": "héllo ✓ 𝄞", "nested": {"z": 1, "a": [True, None]}},
                meta={"source": "gen"},
            )
        )
        await ledger.append_many([Record("tick", {"n": n}) for n in range(30)])
        await ledger.append(Record("empty", None))
        state = ledger.state
    return {
        "ledger_id": "format-1",
        "format_version": 1,
        "length": state.length,
        "head": state.head.hex(),
        "written_by": "nucleus_actors at commit fc21b87 (storage/sqlite.py as at 4e527ec), "
        "by tests/data/make_format_1.py",
    }


if __name__ == "__main__":
    facts = trio.run(write, sys.argv[1])
    Path(sys.argv[1] + ".json").write_text(json.dumps(facts, indent=2) + "\n")
