"""Finding module classes: `use = "package.module:Class"` or the name of an installed module.

A configuration names a module class in one of two ways:

* `"package.module:Class"` imports `package.module` and takes `Class` (dotted for a nested
  class);
* a plain name (`"kind-counter"`, `"acme-audit"`) looks among the modules that ship with
  nucleus_actors (`BUILTIN_MODULES`), then among the entry points that installed
  distributions declare in the group `nucleus_actors.modules`:

  ```toml
  # the module's own pyproject.toml
  [project.entry-points."nucleus_actors.modules"]
  acme-audit = "acme_audit.module:AuditModule"
  ```

A built-in name always means the built-in: an entry point that reuses one is ignored (and shown
as shadowed by `nucleus modules`). Two distributions declaring the same name make that name
ambiguous: the error names both.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final

from .. import __version__
from ..module import Module

__all__ = [
    "BUILTIN_MODULES",
    "ENTRY_POINT_GROUP",
    "InstalledModule",
    "installed_modules",
    "resolve_use",
]

ENTRY_POINT_GROUP: Final = "nucleus_actors.modules"
"""The entry point group where distributions declare modules a configuration can name."""

BUILTIN_MODULES: Final[Mapping[str, str]] = {
    "require-fields": "nucleus_actors.daemon.modules:RequireFields",
    "json-schema": "nucleus_actors.daemon.modules:JsonSchemaValidator",
    "kind-counter": "nucleus_actors.daemon.modules:KindCounter",
    "jsonl-mirror": "nucleus_actors.daemon.modules:JsonlMirror",
}
"""Names of the modules that ship with the daemon -> their `package.module:Class`."""

_TARGET_RE: Final = re.compile(
    r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII
)
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", re.ASCII)


@dataclass(frozen=True, slots=True, kw_only=True)
class InstalledModule:
    """A module a configuration can name by `name` (what `nucleus modules` lists)."""

    name: str
    """The name to write in `use`."""
    target: str
    """The class it stands for, as `package.module:Class`."""
    distribution: str
    """The distribution that declares it (`nucleus_actors` for the built-ins)."""
    distribution_version: str
    """That distribution's version."""
    builtin: bool
    """True for the modules that ship with nucleus_actors."""
    shadowed: bool = False
    """True for an entry point whose name is taken by a built-in (it cannot be used by name)."""

    @property
    def origin(self) -> str:
        """Where it comes from, for humans: `built-in (nucleus_actors 0.1.0)` or
        `acme-audit 1.2.0 (entry point)`."""
        where = f"{self.distribution} {self.distribution_version}"
        return f"built-in ({where})" if self.builtin else f"{where} (entry point)"

    def load(self) -> type[Module]:
        """Import the class.

        Raises:
            ValueError: it does not import or is not a `Module` subclass (see `resolve_use`).
        """
        return _import_target(self.target, f"{self.name!r} = {self.target!r}")


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _distribution(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "?", "?"
    return str(dist.metadata["Name"] or dist.name), str(dist.version)


def installed_modules() -> list[InstalledModule]:
    """Every module a configuration can name: the built-ins, then entry points by name.

    Nothing is imported: `InstalledModule.load()` does that.
    """
    found = [
        InstalledModule(
            name=name,
            target=target,
            distribution="nucleus_actors",
            distribution_version=__version__,
            builtin=True,
        )
        for name, target in BUILTIN_MODULES.items()
    ]
    for ep in _entry_points():
        dist, version = _distribution(ep)
        found.append(
            InstalledModule(
                name=ep.name,
                target=ep.value,
                distribution=dist,
                distribution_version=version,
                builtin=False,
                shadowed=ep.name in BUILTIN_MODULES,
            )
        )
    return found


def _import_target(target: str, what: str) -> type[Module]:
    if _TARGET_RE.fullmatch(target) is None:
        raise ValueError(f"{what} is not of the form 'package.module:Class'")
    module_name, _, qualname = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a user module may raise anything at import time
        raise ValueError(
            f"cannot import {module_name!r} (from {what}): {type(exc).__name__}: {exc}"
        ) from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {qualname!r} ({what})") from None
    if not (isinstance(obj, type) and issubclass(obj, Module)):
        raise ValueError(f"{what} names {obj!r}, which is not a subclass of nucleus_actors.Module")
    return obj


def resolve_use(use: str) -> type[Module]:
    """The `Module` subclass that a configuration's `use` names.

    `"package.module:Class"` is imported directly; a plain name is a built-in module or an
    entry point of the group `nucleus_actors.modules` (see the module docstring).

    Raises:
        ValueError: the text is neither form; the name is unknown or declared by several
            distributions; the import fails (the message carries the import error); the
            attribute is missing; or it is not a `Module` subclass.
    """
    if not isinstance(use, str):
        raise ValueError(f"use must be a string, got {use!r}")
    if ":" in use:
        return _import_target(use, f"use = {use!r}")
    if _NAME_RE.fullmatch(use) is None:
        raise ValueError(
            f"use must be 'package.module:Class' or the name of an installed module, got {use!r}"
        )
    builtin = BUILTIN_MODULES.get(use)
    if builtin is not None:
        return _import_target(builtin, f"use = {use!r} (built-in {builtin!r})")
    matches = [ep for ep in _entry_points() if ep.name == use]
    if not matches:
        known = sorted({*BUILTIN_MODULES, *(ep.name for ep in _entry_points())})
        hint = " (did you mean 'package.module:Class'?)" if "." in use else ""
        raise ValueError(
            f"use = {use!r}: no installed module has this name{hint}: it is not built in and "
            f"no installed distribution declares it in the entry point group "
            f"{ENTRY_POINT_GROUP!r} (known names: {', '.join(known)})"
        )
    if len({ep.value for ep in matches}) > 1:
        owners = ", ".join(
            f"{_distribution(ep)[0]} ({ep.value})" for ep in sorted(matches, key=lambda e: e.value)
        )
        raise ValueError(f"use = {use!r} is ambiguous: several distributions declare it: {owners}")
    ep = matches[0]
    dist, version = _distribution(ep)
    return _import_target(
        ep.value, f"use = {use!r} (entry point of {dist} {version}: {ep.value!r})"
    )
