"""Exception groups (trio nurseries always raise them): flatten to the leaf exceptions."""

from __future__ import annotations

__all__ = ["leaves"]


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside `exc`, depth first (`[exc]` if it is not a group)."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    found: list[BaseException] = []
    for sub in exc.exceptions:
        found.extend(leaves(sub))
    return found
