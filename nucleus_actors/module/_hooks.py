"""`check_hooks`: a module's callbacks must be coroutine functions the runtime can call.

A wrong signature (`after_append(self, record)`) or a plain `def` hook would otherwise be found
only when the hook first runs: a crash, then a crash loop. `register` calls this instead, so
the mistake is a `RegistryError` naming the hook, before anything runs.
"""

from __future__ import annotations

import inspect
from typing import Any, Final

from ..errors import RegistryError
from ._base import Module

__all__ = ["HOOK_ARGUMENTS", "check_hooks"]

HOOK_ARGUMENTS: Final = {
    "init": ("ctx",),
    "start": ("ctx",),
    "stop": ("ctx",),
    "before_append": ("record",),
    "after_append": ("record", "hash"),
    "resume_after": ("ctx",),
}
"""The arguments (after `self`) the runtime passes to each callback, positionally."""


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def check_hooks(module: Module, module_id: str) -> None:
    """Check every callback `module` defines or overrides (the defaults of `Module` are fine).

    Each must be an `async def` accepting exactly the arguments the runtime passes
    (`HOOK_ARGUMENTS`), positionally; extra parameters need defaults.

    Raises:
        RegistryError: naming the module, the hook, its signature and what it must accept.
    """
    cls = type(module)
    own = getattr(module, "__dict__", {})
    for name, arguments in HOOK_ARGUMENTS.items():
        if name not in own and getattr(cls, name, None) is getattr(Module, name, None):
            continue  # not defined, or Module's own default
        hook = getattr(module, name, None)
        if hook is None:
            continue
        expected = f"async def {name}(self, {', '.join(arguments)})"
        if not callable(hook):
            raise RegistryError(
                f"module {module_id!r}: {name} is {type(hook).__name__}, not a method; "
                f"write `{expected}`",
                module_id=module_id,
            )
        if not _is_async(hook):
            raise RegistryError(
                f"module {module_id!r}: {name} is a plain function, the runtime awaits it: "
                f"write `{expected}`",
                module_id=module_id,
            )
        try:
            signature = inspect.signature(hook)
        except (TypeError, ValueError):  # no introspectable signature (a C callable): trust it
            continue
        try:
            signature.bind(*arguments)
        except TypeError:
            bare = signature.replace(  # shown without annotations
                parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                return_annotation=signature.empty,
            )
            raise RegistryError(
                f"module {module_id!r}: {name}{bare} cannot be called with the "
                f"{len(arguments)} argument(s) the runtime passes ({', '.join(arguments)}): "
                f"write `{expected}`",
                module_id=module_id,
            ) from None
