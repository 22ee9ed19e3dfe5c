"""kill -9 with durable modules: `resume_after` exactly once, the runtime cursor at least once.

A subprocess (`durable_crash_writer.py`) appends in a loop with two durable modules and prints
each acknowledged seq; this test SIGKILLs it at random moments, several rounds on the same
files, then opens the ledger once more with the same modules, lets them catch up, and checks
each module's own SQLite file. Real clock and a real process (a few seconds in all).
"""

from __future__ import annotations

import random
import sqlite3
import sys
from pathlib import Path

from nucleus_actors import LedgerConfig, open_ledger
from nucleus_actors.storage import SQLiteStorage
from tests.conftest import kill_after_lines
from tests.integration.durable_crash_writer import modules

WRITER = Path(__file__).with_name("durable_crash_writer.py")
ROUNDS = 6


async def _run_and_kill(path: Path, directory: Path, run: int, after: int) -> set[int]:
    command = [sys.executable, str(WRITER), str(path), str(directory), str(run)]
    lines = await kill_after_lines(command, after + 1)
    return {int(line) for line in lines[1:]}


async def test_kill_9_durable_modules(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acknowledged: set[int] = set()
    for run in range(ROUNDS):
        acknowledged |= await _run_and_kill(path, tmp_path, run, rng.randint(1, 300))
    config = LedgerConfig(ledger_id="crash")
    async with open_ledger(
        config, storage=SQLiteStorage(path), modules=modules(tmp_path, ROUNDS)
    ) as engine:
        length = engine.state.length
        for module_id in ("exactly", "atleast"):
            await engine.modules.get(module_id).ask(lambda m: None)  # caught up to length
    assert acknowledged, f"seed {seed}"
    assert max(acknowledged) < length, f"seed {seed}"
    with sqlite3.connect(tmp_path / "exactly.db") as db:
        exactly = [seq for (seq,) in db.execute("SELECT seq FROM seen ORDER BY rowid")]
    assert exactly == list(range(length)), f"seed {seed}: not exactly once, in order"
    with sqlite3.connect(tmp_path / "atleast.db") as db:
        rows = list(db.execute("SELECT seq, run FROM seen ORDER BY rowid"))
    assert {seq for seq, _ in rows} == set(range(length)), f"seed {seed}: a seq was missed"
    # Within one run, seqs come in order with no gap; a new run may repeat the tail of the
    # previous one (what came after the last stored cursor), never skip ahead.
    expected = 0
    duplicates = 0
    for seq, run in rows:
        assert seq <= expected, f"seed {seed}: gap before seq {seq} (run {run})"
        duplicates += seq < expected
        expected = max(expected, seq + 1)
    assert duplicates <= ROUNDS * 2000, f"seed {seed}: {duplicates} redeliveries"
