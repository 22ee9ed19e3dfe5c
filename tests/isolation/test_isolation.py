"""Modules in worker processes (`Isolation.PROCESS`): faults are crashes of that module only.

These tests start real worker processes, so they run on trio's real clock (a mocked clock
would jump ahead while a worker computes); every wait is bounded by a generous `fail_after`,
and no assertion depends on how long something took.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from nucleus_actors import (
    Isolation,
    LedgerConfig,
    LedgerFailed,
    ModuleError,
    ModuleSpec,
    ModuleState,
    Overflow,
    Phase,
    Record,
    RecordRejected,
    RegistryError,
    RemoteError,
    Strategy,
    open_ledger,
)
from nucleus_actors.module import Module
from nucleus_actors.storage import MemoryStorage
from nucleus_actors.testing import FaultPlan

from .modules import Counter, Gate, Seen, add, fail, read_seen, total

PROCESS = Isolation.PROCESS
ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def wait_until(predicate: Any, seconds: float = 30.0) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.01)


def seen_spec(path: Path, **options: Any) -> ModuleSpec[Any]:
    config = {"path": str(path), **options.pop("config", {})}
    return ModuleSpec(Seen, isolation=PROCESS, config=config, **options)


async def crash_and_recover(tmp_path: Path, kind: str, **options: Any) -> tuple[Any, str]:
    """Append 0..4, then `kind` (the fault), then 6..9; wait for the restart; return the
    module's status and its last error. Every acknowledged append reached the module."""
    path = tmp_path / "seen.txt"
    async with open_ledger(
        LedgerConfig(ledger_id="iso"), modules=[seen_spec(path, **options)]
    ) as ledger:
        handle = ledger.modules.get("seen")
        first_pid = handle.status.pid
        assert first_pid is not None
        assert alive(first_pid)
        acknowledged = [(await ledger.append(Record("k", {"i": i}))).seq for i in range(5)]
        acknowledged.append((await ledger.append(Record(kind, {}))).seq)
        await wait_until(
            lambda: handle.status.restarts >= 1 and handle.state is ModuleState.RUNNING
        )
        acknowledged += [(await ledger.append(Record("k", {"i": i}))).seq for i in range(6, 10)]
        await wait_until(lambda: set(acknowledged) <= set(read_seen(path)))
        status = handle.status
        assert not alive(first_pid)
        assert status.pid is not None
        assert status.pid != first_pid
        assert alive(status.pid)
        assert ledger.state.phase is Phase.RUNNING
        last = status.last_error
    assert last is not None
    assert not alive(status.pid)  # gone after stop_all
    # At least once, in order: what the dead worker had not reported (the delivery it died
    # on, and the ones of its batch it finished but had not reported) is delivered again.
    seen = read_seen(path)
    assert sorted(set(seen)) == acknowledged
    assert list(dict.fromkeys(seen)) == acknowledged
    return status, last


async def test_sigsegv_is_a_crash_of_the_module(tmp_path: Path) -> None:
    status, last = await crash_and_recover(tmp_path, "segv")
    assert status.crashes == 1
    assert status.restarts == 1
    assert status.incarnation == 2
    assert "worker exited by signal 11 (SIGSEGV)" in last


async def test_os_exit_is_a_crash(tmp_path: Path) -> None:
    _, last = await crash_and_recover(tmp_path, "exit3")
    assert "worker exited by code 3" in last


async def test_memory_limit_makes_a_hog_crash(tmp_path: Path) -> None:
    _, last = await crash_and_recover(tmp_path, "hog", memory_limit=1 << 30)
    assert "MemoryError" in last or "worker exited" in last


async def test_blocking_hook_past_timeout_kills_the_worker(tmp_path: Path) -> None:
    _, last = await crash_and_recover(tmp_path, "block", timeout=0.5)
    assert "TimeoutError" in last
    assert "after_append exceeded the module's timeout" in last


async def test_an_exception_crosses_as_type_name_args_repr(tmp_path: Path) -> None:
    _, last = await crash_and_recover(tmp_path, "raise")
    assert last == "ValueError('refusing seq 5')"


async def test_init_failing_on_restart_escalates(tmp_path: Path) -> None:
    path = tmp_path / "seen.txt"
    config = LedgerConfig(ledger_id="iso", max_restarts=2, restart_window=60.0)
    spec = seen_spec(path, config={"fail_init_after": 1})
    acknowledged = []
    with pytest.raises(LedgerFailed, match="more than 2 restarts"):
        async with open_ledger(config, modules=[spec]) as ledger:
            handle = ledger.modules.get("seen")
            pids = [handle.status.pid]
            acknowledged = [(await ledger.append(Record("k", {}))).seq for _ in range(3)]
            acknowledged.append((await ledger.append(Record("segv", {}))).seq)
            await wait_until(lambda: ledger.state.phase is Phase.FAILED)
            status = handle.status
            assert status.state is ModuleState.FAILED
            assert "init refuses incarnation" in (status.last_error or "")
            assert status.crashes >= 3
            assert not any(alive(pid) for pid in pids if pid is not None)
    # every acknowledged append before the crash was delivered (the fault came after them)
    assert set(acknowledged[:3]) <= set(read_seen(path))


async def test_one_for_all_restarts_the_group(tmp_path: Path) -> None:
    path = tmp_path / "seen.txt"
    config = LedgerConfig(ledger_id="iso", strategy=Strategy.ONE_FOR_ALL)
    modules = [ModuleSpec(Counter), seen_spec(path), ModuleSpec(Gate, isolation=PROCESS)]
    async with open_ledger(config, modules=modules) as ledger:
        gate_pid = ledger.modules.get("gate").status.pid
        await ledger.append(Record("k", {}))
        await ledger.append(Record("exit3", {}))
        seen = ledger.modules.get("seen")
        await wait_until(
            lambda: all(
                h.status.restarts == 1 and h.state is ModuleState.RUNNING for h in ledger.modules
            )
        )
        assert seen.status.crashes == 1
        assert ledger.modules.get("counter").status.incarnation == 2
        new_gate_pid = ledger.modules.get("gate").status.pid
        assert gate_pid is not None
        assert new_gate_pid not in (None, gate_pid)
        assert not alive(gate_pid)
        receipt = await ledger.append(Record("k", {}))
        entry = await ledger.get(receipt.seq)
        assert entry.record.meta["checked_by"] == str(new_gate_pid)


async def test_ask_round_trip() -> None:
    async with open_ledger(
        LedgerConfig(ledger_id="iso"), modules=[ModuleSpec(Counter, isolation=PROCESS)]
    ) as ledger:
        handle = ledger.modules.get(Counter)
        for _ in range(3):
            await ledger.append(Record("k", {}))
        assert await handle.ask(total) == 3
        assert await handle.ask(add, 4) == 7
        assert await handle.ask(Counter.pid) == handle.status.pid != os.getpid()
        with pytest.raises(TypeError, match="needs a picklable function"):
            await handle.ask(lambda module: module.count)
        with pytest.raises(TypeError, match="result of ask cannot be pickled"):
            await handle.ask(Counter.unpicklable)
        with pytest.raises(LookupError, match="no such thing"):
            await handle.ask(fail)
        status = handle.status
        assert status.state is ModuleState.RUNNING
        assert status.crashes == 0


async def test_before_append_batches_reject_and_transform() -> None:
    async with open_ledger(
        LedgerConfig(ledger_id="iso"), modules=[ModuleSpec(Gate, isolation=PROCESS)]
    ) as ledger:
        pid = ledger.modules.get("gate").status.pid
        receipts = await ledger.append_many([Record("k", {"i": i}) for i in range(20)])
        for receipt in receipts:
            entry = await ledger.get(receipt.seq)
            assert entry.record.meta == {"checked_by": str(pid)}
        with pytest.raises(RecordRejected, match="kind bad refused") as info:
            await ledger.append(Record("bad", {}))
        assert type(info.value) is RecordRejected
        assert info.value.module_id == "gate"
        with pytest.raises(ModuleError, match="crashed in before_append") as crash:
            await ledger.append(Record("boom", {}))
        assert isinstance(crash.value.__cause__, KeyError)
        await wait_until(lambda: ledger.modules.get("gate").status.restarts == 1)


async def test_logs_reach_the_parent_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nucleus_actors.module.seen")
    async with open_ledger(
        LedgerConfig(ledger_id="iso"), modules=[seen_spec(tmp_path / "s")]
    ) as ledger:
        pid = ledger.modules.get("seen").status.pid
    records = [r for r in caplog.records if r.name == "nucleus_actors.module.seen"]
    assert [r.getMessage() for r in records] == [f"seen: init incarnation 1 in pid {pid}"]
    assert records[0].process == pid != os.getpid()


def local_factory() -> Module:
    class Local(Module):
        id = "local"

    return Local()


async def test_register_refuses_what_a_worker_cannot_build(tmp_path: Path) -> None:
    config = LedgerConfig(ledger_id="iso")

    class Inner(Module):
        id = "inner"

    async with open_ledger(config) as ledger:
        with pytest.raises(RegistryError, match="importable by qualified name"):
            await ledger.add(ModuleSpec(Inner, isolation=PROCESS))
        with pytest.raises(RegistryError, match="an instance cannot move to another process"):
            await ledger.add(ModuleSpec(Counter(), isolation=PROCESS))
        with pytest.raises(RegistryError, match="JSON-serialisable config"):
            await ledger.add(ModuleSpec(Counter, isolation=PROCESS, config={"x": {1, 2}}))
        with pytest.raises(RegistryError, match="cannot be imported"):
            await ledger.add(ModuleSpec("tests.isolation.modules:Nope", isolation=PROCESS))
        handle = await ledger.add(
            ModuleSpec("tests.isolation.modules:Counter", isolation=PROCESS, id="c2")
        )
        assert handle.id == "c2"
        assert handle.status.pid is not None
        assert await handle.ask(Counter.pid) == handle.status.pid
    with pytest.raises(ValueError, match="memory_limit=100 needs isolation=PROCESS"):
        ModuleSpec(Counter, memory_limit=100)
    assert ModuleSpec(Counter).isolation is Isolation.TASK


async def test_remote_error_keeps_type_name() -> None:
    async with open_ledger(
        LedgerConfig(ledger_id="iso"), modules=[ModuleSpec(Counter, isolation=PROCESS)]
    ) as ledger:
        handle = ledger.modules.get(Counter)
        with pytest.raises(RemoteError, match="Fenced") as info:
            await handle.ask(raise_custom)
        assert info.value.type_name == "nucleus_actors.errors.Fenced"


def raise_custom(module: Module) -> None:
    from nucleus_actors import Fenced

    raise Fenced("another writer")


async def test_no_orphans_when_the_parent_is_killed(tmp_path: Path) -> None:
    """The parent dies by SIGKILL (no cleanup at all): its workers see EOF and end."""
    root = ROOT
    env = {**os.environ, "PYTHONPATH": str(root)}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.isolation.orphan_parent", str(tmp_path / "seen")],
        stdout=subprocess.PIPE,
        env=env,
        cwd=root,
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "the parent ended before it printed its workers"
                line += chunk
        pids = json.loads(line)
        assert len(pids) == 2
        assert all(alive(pid) for pid in pids)
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        # Not a performance assertion: the contract says gone within 2 s of the parent's death.
        with trio.move_on_after(2.0):
            while any(alive(pid) for pid in pids):
                await trio.sleep(0.01)
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_ctx_ledger_and_asks_to_other_modules_from_a_worker() -> None:
    from .modules import Reader

    storage = MemoryStorage()
    async with open_ledger(LedgerConfig(ledger_id="iso"), storage=storage) as ledger:
        for _ in range(300):  # more than one read request (256 entries each)
            await ledger.append(Record("k", {}))
        expected_root = (await ledger.root()).hex()
    modules = [ModuleSpec(Counter), ModuleSpec(Reader, isolation=PROCESS, config={"a": [1]})]
    async with open_ledger(
        LedgerConfig(ledger_id="iso"), storage=storage, modules=modules
    ) as ledger:
        handle = ledger.modules.get("reader")
        await ledger.append(Record("k", {}))
        await ledger.append(Record("ask", {}))
        report = await handle.ask(Reader.report)
    assert report["length_at_init"] == 300
    assert report["read_at_init"] == list(range(300))
    assert report["first"] == "k"
    assert report["root"] == expected_root
    assert report["asked"] == [2]  # the task module counted both deliveries before the ask
    assert report["config"] == {"a": [1]}


async def test_background_crash_and_exit_in_a_worker() -> None:
    from .modules import Spawner

    async with open_ledger(
        LedgerConfig(ledger_id="iso"), modules=[ModuleSpec(Spawner, isolation=PROCESS)]
    ) as ledger:
        handle = ledger.modules.get("spawner")
        await ledger.append(Record("spawn-crash", {}))
        await wait_until(
            lambda: handle.status.restarts == 1 and handle.state is ModuleState.RUNNING
        )
        assert handle.status.last_error == "OSError('background work failed')"
        assert handle.status.crashes == 1
    async with open_ledger(
        LedgerConfig(ledger_id="iso"), modules=[ModuleSpec(Spawner, isolation=PROCESS)]
    ) as ledger:
        handle = ledger.modules.get("spawner")
        pid = handle.status.pid
        await ledger.append(Record("exit", {}))
        await wait_until(
            lambda: handle.status.restarts == 1 and handle.state is ModuleState.RUNNING
        )
        status = handle.status
        assert status.crashes == 0
        assert status.pid != pid
        assert pid is not None
        assert not alive(pid)


async def test_durable_isolated_module_catches_up_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "seen.txt"
    storage = MemoryStorage()
    async with open_ledger(LedgerConfig(ledger_id="iso"), storage=storage) as ledger:
        for i in range(600):  # entries from before the module existed: read from storage
            await ledger.append(Record("k", {"i": i}))
    spec = seen_spec(path, durable=True, inbox=8)
    async with open_ledger(
        LedgerConfig(ledger_id="iso"), storage=storage, modules=[spec]
    ) as ledger:
        handle = ledger.modules.get("seen")
        acknowledged = [(await ledger.append(Record("k", {}))).seq for _ in range(20)]
        acknowledged.append((await ledger.append(Record("segv", {}))).seq)
        acknowledged += [(await ledger.append(Record("k", {}))).seq for _ in range(50)]
        await wait_until(lambda: handle.status.restarts == 1 and handle.status.lag == 0)
        await wait_until(lambda: set(range(len(acknowledged) + 600)) <= set(read_seen(path)))
        assert handle.status.cursor == 600 + len(acknowledged) - 1
    seen = read_seen(path)
    assert list(dict.fromkeys(seen)) == list(range(600 + len(acknowledged)))
    assert "SIGSEGV" in (handle.status.last_error or "")


async def test_fault_plan_kills_and_hangs_isolated_workers(tmp_path: Path) -> None:
    path = tmp_path / "seen.txt"
    plan = FaultPlan().crash("after_append", nth=3).hang("after_append", nth=6)
    spec = plan.wrap(seen_spec(path, timeout=2.0))
    async with open_ledger(LedgerConfig(ledger_id="iso"), modules=[spec]) as ledger:
        handle = ledger.modules.get("seen")
        for i in range(3):
            await ledger.append(Record("k", {"i": i}))
        await wait_until(lambda: handle.status.restarts == 1)
        assert "worker exited by signal 9 (SIGKILL)" in (handle.status.last_error or "")
        for i in range(3, 10):
            await ledger.append(Record("k", {"i": i}))
        await wait_until(
            lambda: (
                handle.status.restarts == 2
                and handle.state is ModuleState.RUNNING
                and set(range(10)) <= set(read_seen(path))
            )
        )
        status = handle.status
    assert status.crashes == 2
    assert "after_append exceeded the module's timeout of 2.0 s" in (status.last_error or "")
    fired = plan.fired("seen")
    assert [(e.fault.action.value, e.call, e.handled) for e in fired if e.fault] == [
        ("crash", 3, False),
        ("hang", 6, False),
    ]


async def test_a_module_the_worker_cannot_build_fails_init() -> None:
    from .modules import BrokenInWorker

    async with open_ledger(LedgerConfig(ledger_id="iso")) as ledger:
        with pytest.raises(ModuleError, match="failed in init") as info:
            await ledger.add(ModuleSpec(BrokenInWorker, isolation=PROCESS))
        cause = info.value.__cause__
        assert isinstance(cause, ModuleError)
        assert "worker could not build the module" in str(cause)
        assert isinstance(cause.__cause__, RuntimeError)
        assert "broken" not in ledger.modules


@pytest.mark.parametrize("overflow", [Overflow.BLOCK, Overflow.DROP_NEWEST])
async def test_the_inbox_bound_holds_across_the_boundary(overflow: Overflow) -> None:
    from .modules import Slow

    spec = ModuleSpec(Slow, isolation=PROCESS, inbox=4, overflow=overflow, config={"seconds": 0.05})
    async with open_ledger(LedgerConfig(ledger_id="iso"), modules=[spec]) as ledger:
        handle = ledger.modules.get("slow")
        depths: list[int] = []

        async def watch() -> None:
            while True:
                depths.append(handle.status.inbox_depth)
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for _ in range(30):
                await ledger.append(Record("k", {}))
            nursery.cancel_scope.cancel()
        await wait_until(lambda: handle.status.inbox_depth == 0)
        status = handle.status
    assert max(depths) <= 4
    assert status.processed + status.dropped == 30
    if overflow is Overflow.BLOCK:
        assert status.dropped == 0  # appends waited for room instead
    else:
        assert status.dropped > 0
