"""`describe(module)`: what the daemon asks every module for its status page (an `ask`
function kept in a small module so that an isolated module's worker imports little to run it)."""

from __future__ import annotations

from typing import Any

__all__ = ["describe"]


def describe(module: Any) -> Any:
    """`module.describe()` if it has one, else None."""
    method = getattr(module, "describe", None)
    return method() if callable(method) else None
