"""asyncio tests of `nucleus_actors.aio`.

The suite runs in pytest-trio's `trio_mode`, which claims every `async def` test. These tests
are therefore plain synchronous tests that call `asyncio.run(...)` themselves (`run` below):
nothing is ambiguous about which loop runs them, no second async plugin has to coexist with
`trio_mode`, and each test gets a fresh loop that is closed (and checked) at its end.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `main()` on a fresh asyncio loop (debug mode: slow callbacks and leaks reported)."""
    return asyncio.run(main(), debug=True)


def _ours(thread: threading.Thread) -> bool:
    # trio's cached worker threads (used by trio.to_thread, e.g. SQLite) linger ~10 s idle by
    # design and are reused; they are trio's, not ours.
    return not thread.name.startswith("Trio thread")


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Every test: no thread started during the test (trio's cache excepted) outlives it."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and _ours(t)]
    assert left == [], f"threads left behind: {left}"
