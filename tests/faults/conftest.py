"""The chaos suite's report: how many fault schedules ran, what they did."""

from __future__ import annotations

import pytest

from tests.faults import test_chaos


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    runs = test_chaos.SUMMARIES
    if not runs:
        return
    fired = sum((r.faults_fired for r in runs), start=test_chaos.Counter())
    outcomes = test_chaos.Counter(r.outcome for r in runs)
    terminalreporter.write_sep("-", "nucleus_actors chaos suite")
    terminalreporter.write_line(
        f"{len(runs)} fault schedules ({sum(r.faults_planned for r in runs)} faults planned, "
        f"{sum(fired.values())} fired: {dict(sorted(fired.items()))}); "
        f"outcomes {dict(sorted(outcomes.items()))}"
    )
    terminalreporter.write_line(
        f"{sum(r.appended for r in runs)} entries committed, "
        f"{sum(r.failed_appends for r in runs)} appends failed, "
        f"{sum(r.cancelled_appends for r in runs)} cancelled, "
        f"{sum(r.restarts for r in runs)} module restarts; every invariant checked after each run"
    )
    durable = [r for r in runs if r.durable]
    terminalreporter.write_line(
        f"{len(durable)} runs with durable modules, each opened twice on the same storage; "
        f"second openings {dict(sorted(test_chaos.Counter(r.reopened for r in durable).items()))}"
    )
