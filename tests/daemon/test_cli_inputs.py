"""Fuzzing the inputs of `nucleus append` (docs/cli.md: one `error:` line and exit 2 for
unusable input, never a traceback), against a real daemon."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from nucleus_actors.cli import app

from .conftest import DaemonProcess

runner = CliRunner()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = tmp_path_factory.mktemp("cli-inputs") / "nucleus.toml"
    config.write_text('[[ledgers]]\nid = "main"\nstorage = ":memory:"\n')
    daemon = DaemonProcess(config)
    try:
        yield daemon.wait_listening()
    finally:
        daemon.close()


def _check(result: Result, *, stdin_lines: int = 0) -> None:
    """Exit 0 (appended), or 2 with exactly one `error:` line and nothing else on stderr."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = result.stderr.splitlines()
    if result.exit_code == 0:
        assert not any(line.startswith("error:") for line in errors), result.stderr
        if not stdin_lines:
            assert json.loads(result.stdout)["seq"] >= 0
        return
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: "), result.stderr
    assert errors[0].isprintable()
    assert "Traceback" not in result.output


DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--kind", "s", "--json", '"\\ud800"'], "lone surrogate"),
        (["--kind", "s", "--json", '{"\\udc00": 1}'], "lone surrogate"),
        (["--kind", "s", "--json", DEEP], "nests too deeply"),
        (["--kind", "s", "--json", '{"a": 1, "a": 2}'], "more than once"),
        (["--kind", "s", "--json", "1e16"], "send it as a string"),
        (["--kind", "s\x9b", "--json", "1"], "U\\+009B"),
        (["--kind", "s", "--json", "1", "--meta", "k=\udcff"], "lone surrogate"),
        (["--kind", "s", "--json", "{"], "not JSON"),
    ],
)
def test_bad_json_option_is_one_error_line_and_exit_2(
    url: str, args: list[str], match: str
) -> None:
    result = runner.invoke(app, ["append", "--url", url, *args])
    _check(result)
    assert result.exit_code == 2
    assert re.search(match, result.stderr), result.stderr


@pytest.mark.parametrize(
    ("stdin", "args", "match"),
    [
        (b'{"kind":"a","payload":"\\ud800"}\n', [], "stdin line 1: .*lone surrogate"),
        (b'{"kind":"a","payload":{"\\ud800":1}}\n', [], "stdin line 1: .*lone surrogate"),
        (b"1\n2\n" + DEEP.encode() + b"\n", ["--kind", "k"], "stdin line 3: .*nests too"),
        (b'{"a":1,"a":1}\n', ["--kind", "k"], "stdin line 1: .*more than once"),
        (b"\xff\xfe\n", ["--kind", "k"], "stdin line 1"),
    ],
)
def test_bad_stdin_is_one_error_line_and_exit_2(
    url: str, stdin: bytes, args: list[str], match: str
) -> None:
    result = runner.invoke(app, ["append", "--url", url, *args], input=stdin)
    _check(result, stdin_lines=1)
    assert result.exit_code == 2
    assert re.search(match, result.stderr), result.stderr


_chars = st.characters(codec=None)  # every code point, lone surrogates included
_json_text = st.one_of(
    st.text(_chars, max_size=40),
    st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**64), 2**64),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(_chars, max_size=8),
        ),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(_chars, max_size=4), inner, max_size=4)
        ),
        max_leaves=12,
    ).map(lambda value: json.dumps(value, ensure_ascii=True)),
    st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),
    st.text(st.sampled_from('{}[]",:0123456789.eE-+truefalsnl\\u '), max_size=30),
)
_kinds = st.one_of(st.just("order.created"), st.text(_chars, min_size=0, max_size=6))
_meta = st.lists(
    st.tuples(st.text(_chars, max_size=4), st.text(_chars, max_size=4)).map("=".join),
    max_size=2,
)


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(kind=_kinds, payload=_json_text, meta=_meta)
def test_fuzzed_json_option_never_breaks_the_cli(
    url: str, kind: str, payload: str, meta: list[str]
) -> None:
    args = ["append", "--url", url, "--kind", kind, "--json", payload]
    for item in meta:
        args += ["--meta", item]
    _check(runner.invoke(app, args))


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    lines=st.lists(
        st.one_of(
            _json_text.map(lambda text: text.encode("utf-8", "surrogatepass")),
            st.binary(max_size=20),
        ),
        min_size=1,
        max_size=4,
    ),
    with_kind=st.booleans(),
)
def test_fuzzed_stdin_never_breaks_the_cli(url: str, lines: list[bytes], with_kind: bool) -> None:
    stdin = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    args = ["append", "--url", url, *(["--kind", "k"] if with_kind else [])]
    result = runner.invoke(app, args, input=stdin)
    _check(result, stdin_lines=len(lines))


def test_printable_ascii_kinds_still_append(url: str) -> None:
    kind = string.ascii_letters[:10] + ".x"
    _check(runner.invoke(app, ["append", "--url", url, "--kind", kind, "--json", "{}"]))
