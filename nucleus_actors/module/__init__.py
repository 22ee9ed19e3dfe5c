"""Modules: the `Module` base class, its context, its spec, and the actor that runs it."""

from ._base import Module
from ._context import LedgerReader, ModuleContext
from ._isolation import Isolation
from ._spec import ModuleSpec, Overflow

__all__ = ["Isolation", "LedgerReader", "Module", "ModuleContext", "ModuleSpec", "Overflow"]
