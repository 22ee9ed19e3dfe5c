"""The supervisor's transition tables: the docs draw them, illegal moves raise under test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from nucleus_actors import LedgerConfig, LedgerEngine, Module, ModuleState, Phase
from nucleus_actors import _transitions as t

LIFECYCLE_MD = Path(__file__).parents[2] / "docs" / "lifecycle.md"


def _diagram(heading: str) -> str:
    text = LIFECYCLE_MD.read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    match = re.search(r"```mermaid\n(.*?)\n```", section, re.S)
    assert match is not None, f"no mermaid block under '## {heading}'"
    return match.group(1)


def test_lifecycle_md_draws_the_module_table() -> None:
    assert _diagram("Module states") == t.mermaid(t.MODULE_TABLE, "register()")


def test_lifecycle_md_draws_the_phase_table() -> None:
    assert _diagram("Ledger phases") == t.mermaid(t.PHASE_TABLE, "LedgerEngine(config)")


def test_every_state_is_reachable_and_every_event_used() -> None:
    reached = {ModuleState.REGISTERED} | set(t.MODULE_TABLE.values())
    assert reached == set(ModuleState)
    assert {event for _, event in t.MODULE_TABLE} == set(t.ModuleEvent)
    assert {event for _, event in t.PHASE_TABLE} == set(t.PhaseEvent)
    assert {Phase.CREATED} | set(t.PHASE_TABLE.values()) == set(Phase)


class _Stub(Module):
    id = "stub"


async def test_an_illegal_module_transition_raises_under_strict() -> None:
    assert t.STRICT  # tests/conftest.py
    engine = LedgerEngine(LedgerConfig(ledger_id="t"))
    handle = engine.register(_Stub())
    child = engine._supervisor.children["stub"]
    with pytest.raises(
        t.IllegalTransition, match="REGISTERED on 'ledger stopped before the group stopped it'"
    ):
        t.enter(child, t.ModuleEvent.STOP_WITHDRAWN)  # REGISTERED has no such edge
    with pytest.raises(t.IllegalTransition, match="REGISTERED on 'stop raised'"):
        t.enter(child, t.ModuleEvent.STOP_FAILED)
    assert handle.state is ModuleState.REGISTERED  # nothing moved
    await trio.lowlevel.checkpoint()


def test_an_illegal_transition_is_logged_and_ignored_when_not_strict(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(t, "STRICT", False)
    engine = LedgerEngine(LedgerConfig(ledger_id="t"))
    engine.register(_Stub())
    child = engine._supervisor.children["stub"]
    assert t.enter(child, t.ModuleEvent.ABANDONED) is ModuleState.REGISTERED
    assert "illegal transition of module 'stub': REGISTERED" in caplog.text


def test_phase_machine_failed_is_final_and_illegal_phase_moves_raise() -> None:
    seen: list[Phase] = []
    machine = t.PhaseMachine(seen.append)
    with pytest.raises(t.IllegalTransition, match="CREATED on 'every module stopped'"):
        machine.fire(t.PhaseEvent.STOPPED)
    assert machine.fire(t.PhaseEvent.STARTUP_FAILED) is Phase.FAILED
    assert machine.fire(t.PhaseEvent.STOPPED) is Phase.FAILED  # final, not an error
    assert seen == [Phase.FAILED]


async def test_an_illegal_transition_inside_an_actor_is_not_taken_for_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Raised while the actor reports "start ok", it reaches the `async with`, unwrapped,
    instead of being handled as a crash of the module (and hidden by a restart)."""
    table = dict(t.MODULE_TABLE)
    del table[(ModuleState.INITIALIZED, t.ModuleEvent.START_OK)]
    monkeypatch.setattr(t, "MODULE_TABLE", table)
    engine = LedgerEngine(LedgerConfig(ledger_id="t"))
    engine.register(_Stub())
    with pytest.raises(t.IllegalTransition, match="INITIALIZED on 'start ok'"):
        async with engine:
            await engine.init_all()
            await engine.start_all()
