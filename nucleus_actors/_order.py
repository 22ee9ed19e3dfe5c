"""Start order: registration order, except that a module comes after what it depends on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import RegistryError

if TYPE_CHECKING:
    from .module._actor import Child

__all__ = ["start_order"]


def start_order(registered: list[Child], by_id: Mapping[str, Child]) -> list[Child]:
    """Registration order, except that a module comes after the modules it depends on.

    Stable: among modules whose dependencies are placed, the earliest registered goes first.

    Raises:
        RegistryError: unknown dependency, or a cycle (the message draws it: a -> b -> a).
    """
    for child in registered:
        for dep in child.spec.depends_on:
            if dep not in by_id:
                raise RegistryError(
                    f"module {child.id!r} depends on unknown module {dep!r}",
                    module_id=child.id,
                )
    placed: list[Child] = []
    done: set[str] = set()
    remaining = list(registered)
    while remaining:
        for child in remaining:
            if all(dep in done for dep in child.spec.depends_on):
                placed.append(child)
                done.add(child.id)
                remaining.remove(child)
                break
        else:
            raise RegistryError(f"dependency cycle: {_cycle(remaining)}", module_id=remaining[0].id)
    return placed


def _cycle(remaining: list[Child]) -> str:
    waiting = {c.id: c for c in remaining}
    path = [remaining[0].id]
    while True:
        nxt = next(d for d in waiting[path[-1]].spec.depends_on if d in waiting)
        if nxt in path:
            return " -> ".join([*path[path.index(nxt) :], nxt])
        path.append(nxt)
