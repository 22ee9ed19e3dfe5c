"""Supervision side by side with Erlang/OTP's own `supervisor` (docs/supervision.md's table).

Each row of the scenario table in docs/supervision.md ("what OTP does / what we do") is one
test here. A scenario is a list of children (id, restart type, whether `init` fails on every
restart), a strategy, an intensity (max restarts within a long window) and steps (a child
crashes, exits normally, or is terminated by the operator). It runs twice:

* under real OTP 25+ (`otp/otp_scenario.erl`, an escript: gen_servers under a `supervisor`),
  when `escript` is installed (skipped otherwise, saying so);
* under our engine, with modules that log the same lines.

Both print one line per event: `start ID` (OTP `init` returned; ours `start` returned), `stop
ID` (OTP `terminate`; ours `stop`), `fail ID` (init refused on a restart), `escalated` (the
supervisor gave up; ours raised `LedgerFailed`), then `final ID running|stopped` per child.
The expected lines are written out in each test, so a row says what OTP does in plain text and
fails if either side stops doing it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from nucleus_actors import (
    LedgerConfig,
    LedgerEngine,
    LedgerFailed,
    Module,
    ModuleContext,
    ModuleState,
    Restart,
    Strategy,
)

SCRIPT = Path(__file__).parent / "otp" / "otp_scenario.erl"
ESCRIPT = shutil.which("escript")


@dataclass(frozen=True)
class Child:
    id: str
    restart: Restart = Restart.PERMANENT
    fail_init: bool = False  # init fails on every restart (not on the first start)

    def otp(self) -> str:
        return f"{self.id}:{self.restart.value}" + (":failinit" if self.fail_init else "")


class Scripted(Module):
    """Logs OTP-style lines; crashes or exits on command (from a background task)."""

    def __init__(self, child: Child, out: list[str]) -> None:
        self.id = child.id
        self.child = child
        self.out = out
        self.commands: trio.MemorySendChannel[str] | None = None

    async def init(self, ctx: ModuleContext) -> None:
        if self.child.fail_init and ctx.incarnation > 1:
            self.out.append(f"fail {self.id}")
            raise RuntimeError(f"{self.id}: init refused on restart")

    async def start(self, ctx: ModuleContext) -> None:
        send, receive = trio.open_memory_channel[str](1)
        self.commands = send
        ctx.spawn(self._obey, receive, ctx)
        self.out.append(f"start {self.id}")

    async def _obey(self, receive: trio.MemoryReceiveChannel[str], ctx: ModuleContext) -> None:
        command = await receive.receive()
        if command == "crash":
            raise RuntimeError(f"injected crash in {self.id}")
        ctx.exit()
        await trio.sleep_forever()

    async def stop(self, ctx: ModuleContext) -> None:
        self.out.append(f"stop {self.id}")


def run_otp(strategy: Strategy, max_r: int, children: list[Child], steps: list[str]) -> list[str]:
    if ESCRIPT is None:
        pytest.skip("Erlang/OTP's escript is not installed: the OTP side of this row is not run")
    args = [ESCRIPT, str(SCRIPT), strategy.value, str(max_r), ",".join(c.otp() for c in children)]
    done = subprocess.run([*args, *steps], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.splitlines()


async def run_ours(
    strategy: Strategy, max_r: int, children: list[Child], steps: list[str]
) -> list[str]:
    out: list[str] = []
    modules = {c.id: Scripted(c, out) for c in children}
    config = LedgerConfig(
        ledger_id="otp", strategy=strategy, max_restarts=max_r, restart_window=3600
    )
    engine = LedgerEngine(config)
    for child in children:
        engine.register(modules[child.id], restart=child.restart)
    try:
        async with engine:
            await engine.init_all()
            await engine.start_all()
            for step in steps:
                action, module_id = step.split(":")
                if action == "terminate":
                    await engine.terminate(module_id)
                elif action == "shutdown":
                    await engine.stop_all()
                else:
                    commands = modules[module_id].commands
                    assert commands is not None
                    await commands.send(action)
                await trio.sleep(1)  # virtual time: everything settles
            seen = len(out)  # leaving the block stops the modules: not part of the scenario
            final = [
                f"final {status.id} {_STATES.get(status.state, 'stopped')}"
                for status in engine.modules.status()
                if status.id not in _removed_by_otp(children, out)
            ]
    except LedgerFailed:
        out.append("escalated")
        return out
    return out[:seen] + final


_STATES = {ModuleState.RUNNING: "running"}


def _removed_by_otp(children: list[Child], out: list[str]) -> set[str]:
    """OTP forgets a TEMPORARY child once it ended; we keep it listed (a deliberate
    difference, see docs/supervision.md): leave it out of the comparison."""
    return {c.id for c in children if c.restart is Restart.TEMPORARY and f"stop {c.id}" in out}


async def check(
    strategy: Strategy,
    max_r: int,
    children: list[Child],
    steps: list[str],
    expected: list[str],
) -> None:
    ours = await run_ours(strategy, max_r, children, steps)
    assert ours == expected, "ours"
    otp = run_otp(strategy, max_r, children, steps)
    assert otp == expected, "OTP"


ABC = [Child("a"), Child("b"), Child("c")]
START = ["start a", "start b", "start c"]
RUNNING = ["final a running", "final b running", "final c running"]


async def test_one_for_one_crash(mock_clock: trio.testing.MockClock) -> None:
    await check(Strategy.ONE_FOR_ONE, 3, ABC, ["crash:b"], [*START, "stop b", "start b", *RUNNING])


async def test_one_for_all_crash(mock_clock: trio.testing.MockClock) -> None:
    expected = [*START, "stop b", "stop c", "stop a", *START, *RUNNING]
    await check(Strategy.ONE_FOR_ALL, 3, ABC, ["crash:b"], expected)


async def test_rest_for_one_crash(mock_clock: trio.testing.MockClock) -> None:
    expected = [*START, "stop b", "stop c", "start b", "start c", *RUNNING]
    await check(Strategy.REST_FOR_ONE, 3, ABC, ["crash:b"], expected)


async def test_escalation_stops_the_rest_in_reverse_order(
    mock_clock: trio.testing.MockClock,
) -> None:
    # max 1 restart: the second crash escalates; the others stop in reverse start order and
    # the caller sees the supervisor end (OTP: an exit signal; ours: LedgerFailed, bare).
    expected = [*START, "stop b", "start b", "stop b", "stop c", "stop a", "escalated"]
    await check(Strategy.ONE_FOR_ONE, 1, ABC, ["crash:b", "crash:b"], expected)


async def test_transient_exit_is_not_restarted(mock_clock: trio.testing.MockClock) -> None:
    children = [Child("a"), Child("b", Restart.TRANSIENT), Child("c")]
    expected = [*START, "stop b", "final a running", "final b stopped", "final c running"]
    await check(Strategy.ONE_FOR_ONE, 3, children, ["exit:b"], expected)


async def test_transient_crash_is_restarted(mock_clock: trio.testing.MockClock) -> None:
    children = [Child("a"), Child("b", Restart.TRANSIENT), Child("c")]
    expected = [*START, "stop b", "start b", *RUNNING]
    await check(Strategy.ONE_FOR_ONE, 3, children, ["crash:b"], expected)


async def test_temporary_crash_is_not_restarted(mock_clock: trio.testing.MockClock) -> None:
    children = [Child("a"), Child("b", Restart.TEMPORARY), Child("c")]
    expected = [*START, "stop b", "final a running", "final c running"]
    await check(Strategy.ONE_FOR_ONE, 3, children, ["crash:b"], expected)


async def test_temporary_member_of_a_group_is_stopped_not_restarted(
    mock_clock: trio.testing.MockClock,
) -> None:
    children = [Child("a"), Child("b", Restart.TEMPORARY), Child("c")]
    expected = [
        *START, "stop a", "stop c", "stop b", "start a", "start c",
        "final a running", "final c running",
    ]  # fmt: skip
    await check(Strategy.ONE_FOR_ALL, 3, children, ["crash:a"], expected)


# Regression: issue 13 §1, a group restart left an exited TRANSIENT member STOPPED.
@pytest.mark.parametrize("strategy", [Strategy.REST_FOR_ONE, Strategy.ONE_FOR_ALL])
async def test_group_restart_starts_an_exited_transient_member(
    strategy: Strategy, mock_clock: trio.testing.MockClock
) -> None:
    children = [Child("a"), Child("b", Restart.TRANSIENT), Child("c")]
    expected = [*START, "stop b", "stop a", "stop c", *START, *RUNNING]
    await check(strategy, 3, children, ["exit:b", "crash:a"], expected)


# Regression: issue 13 §1, a group restart left a terminated member STOPPED.
@pytest.mark.parametrize("strategy", [Strategy.REST_FOR_ONE, Strategy.ONE_FOR_ALL])
async def test_group_restart_starts_a_terminated_member(
    strategy: Strategy, mock_clock: trio.testing.MockClock
) -> None:
    expected = [*START, "stop b", "stop c", "stop a", *START, *RUNNING]
    if strategy is Strategy.REST_FOR_ONE:
        expected = [*START, "stop b", "stop a", "stop c", *START, *RUNNING]
    steps = ["terminate:b", "crash:a"]
    if strategy is Strategy.ONE_FOR_ALL:
        steps = ["terminate:b", "crash:c"]
    await check(strategy, 3, ABC, steps, expected)


async def test_failing_init_on_restart_is_a_new_crash(mock_clock: trio.testing.MockClock) -> None:
    # max 2 restarts: the crash and two refused inits use them up; the third attempt escalates.
    children = [Child("a"), Child("b", fail_init=True)]
    expected = ["start a", "start b", "stop b", "fail b", "fail b", "stop a", "escalated"]
    await check(Strategy.ONE_FOR_ONE, 2, children, ["crash:b"], expected)


async def test_shutdown_stops_in_reverse_start_order(mock_clock: trio.testing.MockClock) -> None:
    expected = [*START, "stop c", "stop b", "stop a"]
    ours = await run_ours(Strategy.ONE_FOR_ONE, 3, ABC, ["shutdown:all"])
    assert ours[: len(expected)] == expected
    assert ours[len(expected) :] == ["final a stopped", "final b stopped", "final c stopped"]
    otp = run_otp(Strategy.ONE_FOR_ONE, 3, ABC, ["shutdown:all"])
    assert otp == [*expected, "shut down"]


@pytest.mark.parametrize(("crashes", "escalates"), [(2, False), (3, True)])
async def test_intensity_boundary(
    crashes: int, escalates: bool, mock_clock: trio.testing.MockClock
) -> None:
    # max 2 restarts: exactly 2 crashes are restarted; the 3rd escalates.
    steps = ["crash:b"] * crashes
    if escalates:
        expected = [*START, *(["stop b", "start b"] * 2), "stop b", "stop c", "stop a"]
        expected.append("escalated")
    else:
        expected = [*START, *(["stop b", "start b"] * 2), *RUNNING]
    await check(Strategy.ONE_FOR_ONE, 2, ABC, steps, expected)
