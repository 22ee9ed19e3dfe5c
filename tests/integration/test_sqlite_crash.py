"""kill -9 while appending to SQLiteStorage: every acknowledged append survives, the chain holds.

A subprocess (`sqlite_crash_writer.py`) appends in a loop and prints each receipt once its
append returned; this test SIGKILLs it at a random point (after a random number of receipts),
several times on the same file, and after each kill reopens the ledger, verifies the whole
chain and finds every printed receipt with the same hash. Real clock (worker threads and a real
process); a few seconds in all.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from nucleus_actors import Hash, LedgerConfig, LedgerEngine
from nucleus_actors.storage import SQLiteStorage, verify_file
from tests.conftest import kill_after_lines

WRITER = Path(__file__).with_name("sqlite_crash_writer.py")
KILLS = 4


async def _run_and_kill(path: Path, after: int) -> tuple[int, dict[int, Hash]]:
    """Start the writer, SIGKILL it once it printed `after` receipts; return what it printed."""
    # the "open <length>" line, then receipts
    lines = await kill_after_lines([sys.executable, str(WRITER), str(path)], after + 1)
    opened = int(lines[0].removeprefix("open "))
    receipts = {int(seq): Hash.from_hex(digest) for seq, digest in (x.split() for x in lines[1:])}
    return opened, receipts


async def test_kill_9_loses_no_acknowledged_append(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    printed: dict[int, Hash] = {}
    length = 0
    for kill in range(KILLS):
        opened, receipts = await _run_and_kill(path, rng.randint(1, 400))
        context = f"seed {seed}, kill {kill}"
        assert opened == length, context  # each run continued the chain it found
        assert receipts, context
        assert not printed.keys() & receipts.keys(), context  # seqs are never reused
        printed |= receipts
        async with LedgerEngine(LedgerConfig(ledger_id="crash"), SQLiteStorage(path)) as engine:
            length = engine.state.length
            assert length > max(printed), context
            assert await engine.verify() == engine.state.head, context
            for seq, digest in receipts.items():
                assert (await engine.get(seq)).hash == digest, f"{context}, seq {seq}"
        assert await verify_file(path) == (length, engine.state.head), context
