"""`NoPublicConstructor`: a metaclass for public classes that only the runtime creates (trio's)."""

from __future__ import annotations

from abc import ABCMeta
from typing import Any, NoReturn, TypeVar

__all__ = ["NoPublicConstructor"]

T = TypeVar("T")


class NoPublicConstructor(ABCMeta):
    """Calling the class raises `TypeError`; the runtime uses `Class._create(...)`."""

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor "
            "(the engine creates it; see docs/reference.md)"
        )

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc, no-any-return]
