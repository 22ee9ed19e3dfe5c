"""The pytest plugin (entry point `pytest11`), tested with pytester as pytest-trio tests itself."""

from __future__ import annotations

import re

import pytest

INI = """
[pytest]
trio_mode = true
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    return pytester


def test_the_plugin_is_installed_under_its_entry_point(project: pytest.Pytester) -> None:
    result = project.runpytest("--help")
    result.stdout.fnmatch_lines(
        ["*nucleus_actors fault injection*", "*--nucleus-seed=N*", "*--nucleus-chaos-runs=N*"]
    )


def test_every_fixture_is_documented(project: pytest.Pytester) -> None:
    result = project.runpytest("--fixtures")
    result.stdout.fnmatch_lines_random(
        [
            "nucleus_ledger -- *pytest_plugin.py:*",
            "*Open tracked ledgers whose invariants are checked on exit*",
            "nucleus_seed -- *",
            "*The seed of this test: `--nucleus-seed` if given, else stable per test id.",
            "nucleus_schedule -- *",
            "*A `FaultSchedule(nucleus_seed)`; its plans are printed when the test fails.",
            "nucleus_probe -- *",
            "nucleus_clock -- *",
            "nucleus_chaos_runs -- *",
        ]
    )


def test_nucleus_ledger_runs_on_the_autojump_mock_clock(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import trio, trio.testing
        from nucleus_actors import Record
        from nucleus_actors.testing import Probe, TrackedLedger

        async def test_virtual_time(nucleus_ledger):
            assert isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
            probe = Probe()
            async with nucleus_ledger(modules=[probe], max_restarts=7) as ledger:
                assert isinstance(ledger, TrackedLedger)
                assert ledger.config.ledger_id == "test"
                assert ledger.config.max_restarts == 7
                await trio.sleep(3600)          # an hour of virtual time, at once
                await ledger.append(Record("k", 1))
            assert probe.seen == [0]
        """
    )
    result = project.runpytest()
    result.assert_outcomes(passed=1)


def test_real_clock_marker_and_own_clocks_are_respected(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import pytest, trio, trio.testing

        @pytest.mark.nucleus_real_clock
        async def test_real(nucleus_ledger):
            assert not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)

        async def test_own_clock(nucleus_ledger, mock_clock):
            assert trio.lowlevel.current_clock() is mock_clock

        async def test_nucleus_clock_alone(nucleus_clock):
            assert trio.lowlevel.current_clock() is nucleus_clock
            assert nucleus_clock.autojump_threshold == 0
        """
    )
    result = project.runpytest("--strict-markers")
    result.assert_outcomes(passed=3)


def _seeds(output: str) -> dict[str, int]:
    return {name: int(seed) for name, seed in re.findall(r"SEED (\w+) (\d+)", output)}


def test_seeds_are_stable_per_test_and_replayable(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        def test_a(nucleus_seed):
            print("SEED a", nucleus_seed)

        def test_b(nucleus_seed, nucleus_schedule):
            assert nucleus_schedule.seed == nucleus_seed
            print("SEED b", nucleus_seed)
        """
    )
    first = _seeds(project.runpytest("-s").stdout.str())
    second = _seeds(project.runpytest("-s").stdout.str())
    assert first == second
    assert first["a"] != first["b"]
    replay = project.runpytest("-s", "--nucleus-seed=12345")
    assert _seeds(replay.stdout.str()) == {"a": 12345, "b": 12345}
    replay.stdout.fnmatch_lines(["nucleus_actors: replaying --nucleus-seed=12345"])


def test_a_failure_prints_the_seed_the_replay_command_and_the_faults(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_fails="""
        from nucleus_actors import Hash, Module, Record
        from nucleus_actors.testing import FaultPlan

        class Sink(Module):
            id = "sink"
            async def after_append(self, record: Record, hash: Hash) -> None:
                pass

        async def test_fails(nucleus_ledger, nucleus_schedule):
            nucleus_schedule.plan("extra")
            plan = FaultPlan(name="mine").crash("after_append", nth=2)
            async with nucleus_ledger(modules=[plan.wrap(Sink())]) as ledger:
                for n in range(3):
                    await ledger.append(Record("k", n))
                await ledger.wait_delivered()
            assert False, "the module misbehaved"
        """
    )
    result = project.runpytest()
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    [seed] = re.findall(r"seed (\d+); replay with", output)
    result.stdout.fnmatch_lines(
        [
            "*- nucleus_actors -*",
            f"seed {seed}; replay with: pytest 'test_fails.py::test_fails' --nucleus-seed={seed}",
            f"fault schedule seed={seed}",
            "  extra: *",
            "ledger #1: <TrackedLedger 'test' STOPPED length=3>",
            "  sink: crash after_append nth=2",
            "  fired: sink crash after_append nth=2 (call 2, incarnation 1, seq 1)",
            "  stop: StopReport(*)",
        ]
    )
    replay = project.runpytest(f"--nucleus-seed={seed}")
    replay.assert_outcomes(failed=1)
    schedule = [line for line in output.splitlines() if line.startswith("  extra: ")]
    assert schedule[0] in replay.stdout.str().splitlines()


def test_an_invariant_violation_fails_the_test(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from nucleus_actors import Module, Record

        class Stripper(Module):
            id = "stripper"
            async def before_append(self, record):
                return record.replace(meta={})

        async def test_strips(nucleus_ledger):
            async with nucleus_ledger(modules=[Stripper()]) as ledger:
                await ledger.append(Record("k", 1))
        """
    )
    result = project.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*InvariantViolation: 1 invariant violation(s):*",
            "*entry 0 has no 'nucleus.testing.tag'*",
        ]
    )


def test_nucleus_ledger_options(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import pytest
        from nucleus_actors import LedgerConfig

        async def test_config_or_fields(nucleus_ledger):
            with pytest.raises(TypeError, match="takes a config or LedgerConfig fields, not both"):
                nucleus_ledger(config=LedgerConfig(ledger_id="x"), max_restarts=2)
            async with nucleus_ledger(config=LedgerConfig(ledger_id="orders")) as ledger:
                assert ledger.config.ledger_id == "orders"
            assert [l.config.ledger_id for l in nucleus_ledger.ledgers] == ["orders"]
        """
    )
    project.runpytest().assert_outcomes(passed=1)


def test_chaos_runs_option(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        def test_runs(nucleus_chaos_runs, pytestconfig):
            print("RUNS", nucleus_chaos_runs)
        """
    )
    assert "RUNS None" in project.runpytest("-s").stdout.str()
    assert "RUNS 7" in project.runpytest("-s", "--nucleus-chaos-runs=7").stdout.str()
    bad = project.runpytest("--nucleus-chaos-runs=0")
    bad.stderr.fnmatch_lines(["*--nucleus-chaos-runs must be >= 1, got 0*"])
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
