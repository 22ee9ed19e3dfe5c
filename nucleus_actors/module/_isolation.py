"""What both sides of a module worker share: `Isolation`, the frame codec, how exceptions
cross the process boundary, and how a module is named so that a worker can import it.

Nothing here imports trio: the worker's reader thread uses the codec too.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import inspect
import io
import json
import os
import pickle
import struct
import sys
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from ..errors import RecordRejected, RegistryError, RemoteError

__all__ = [
    "Isolation",
    "decode_error",
    "encode_error",
    "frame",
    "import_target",
    "qualified_target",
    "read_frame",
]

_HEADER = struct.Struct(">I")


class Isolation(StrEnum):
    """Where a module's callbacks run."""

    TASK = "task"
    """In a trio task of the ledger's process (default): cheapest, but a module that blocks,
    burns CPU or crashes in native code affects the whole process."""
    PROCESS = "process"
    """In a worker process of its own, one per incarnation: a fault of the module (a signal,
    a blocking call, running out of memory) is a crash of that module only (docs/isolation.md)."""


# -- frames ------------------------------------------------------------------------------------
def frame(message: Any) -> bytes:
    """One length-prefixed pickle frame (raises whatever pickling raises)."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def read_frame(read: Callable[[int], bytes]) -> Any | None:
    """Read one frame with `read(n)` (a blocking read of up to n bytes); None at EOF."""
    header = _read_exactly(read, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    body = _read_exactly(read, size)
    if body is None:
        return None
    return pickle.loads(body)


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _MainPickler(pickle.Pickler):
    """Pickles functions and classes of `__main__` by their importable name (a worker's
    `__main__` is the worker itself, so `__main__.fn` would not resolve there)."""

    def __init__(self, file: io.BytesIO, main: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._main = main

    def reducer_override(self, obj: Any) -> Any:
        if (isinstance(obj, type) or inspect.isfunction(obj)) and getattr(
            obj, "__module__", None
        ) == "__main__":
            qualname = getattr(obj, "__qualname__", "")
            if "<" not in qualname:
                return import_target, (f"{self._main}:{qualname}",)
        return NotImplemented


def dumps(obj: Any) -> bytes:
    """`pickle.dumps` for something a worker will load (see `_MainPickler`)."""
    main = _main_name() if "__main__" in sys.modules else None
    if main is None:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buffer = io.BytesIO()
    _MainPickler(buffer, main).dump(obj)
    return buffer.getvalue()


# -- exceptions --------------------------------------------------------------------------------
def encode_error(exc: BaseException) -> tuple[str, str, tuple[Any, ...], str]:
    """`(type name, type's module, args, repr)`: how an exception crosses the boundary.

    Args that do not pickle are sent as their `repr`. A `RecordRejected` (or subclass) is
    sent as `("RecordRejected", ..., (reason,), repr)` so the parent rebuilds it as itself.
    """
    if isinstance(exc, RecordRejected):
        return ("RecordRejected", "nucleus_actors.errors", (exc.reason,), repr(exc))
    cls = type(exc)
    args: tuple[Any, ...] = exc.args
    try:
        pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        args = tuple(repr(arg) for arg in args)
    return (cls.__qualname__, cls.__module__, args, repr(exc))


def decode_error(encoded: tuple[str, str, tuple[Any, ...], str]) -> BaseException:
    """The parent's copy of an exception from a worker.

    `RecordRejected` is rebuilt as itself, a builtin exception (`ValueError`, `TypeError`,
    `MemoryError`, ...) as that builtin with the same args; anything else as `RemoteError`.
    """
    name, module, args, text = encoded
    if name == "RecordRejected" and module == "nucleus_actors.errors":
        return RecordRejected(str(args[0]) if args else text)
    if module == "builtins":
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(*args)
            except Exception:
                pass
    return RemoteError(text, type_name=f"{module}.{name}", remote_args=args)


# -- naming a module for a worker ---------------------------------------------------------------
def _main_name() -> str | None:
    """The importable name of `__main__` (a script run as `python path/x.py` whose directory
    is on `sys.path`, or `python -m pkg.x`), or None."""
    return _main_name_for(sys.modules.get("__main__"), tuple(sys.path))


@functools.lru_cache(maxsize=4)
def _main_name_for(main: Any, search: tuple[Any, ...]) -> str | None:
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return str(spec.name)
    path = getattr(main, "__file__", None)
    if not path:
        return None
    folder, file = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(file)
    if ext != ".py" or not stem.isidentifier():
        return None
    entries = {os.path.abspath(p or os.getcwd()) for p in search if isinstance(p, str)}
    return stem if folder in entries else None


def _importable(obj: object) -> str | None:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    if module == "__main__":
        main = _main_name()
        if main is None:
            return None
        module = main
    target = f"{module}:{qualname}"
    try:
        found = import_target(target)
    except Exception:
        return None
    if found is obj:
        return target
    # `__main__` imported again under its file's name holds another object of the same name
    same_name = getattr(found, "__qualname__", None) == qualname
    return target if getattr(obj, "__module__", None) == "__main__" and same_name else None


def qualified_target(module: object, module_id: str) -> str:
    """`"package.module:Qualname"` of the factory a worker imports to build `module`.

    `module` is what a `ModuleSpec` holds: such a string, or a class or top-level function
    (wrappers that set `__wrapped__`, like `functools.wraps` or `FaultPlan.wrap`, are followed
    to what they wrap).

    Raises:
        RegistryError: an instance, or a factory the worker could not import by name (defined
            in a function, a lambda, `__main__` of an interactive session...).
    """
    if isinstance(module, str):
        return module
    if not callable(module):
        raise RegistryError(
            f"module {module_id!r}: isolation=PROCESS needs a class, a top-level factory or "
            f"'package.module:Class' that a worker process can import, got an instance of "
            f"{type(module).__qualname__} (an instance cannot move to another process)",
            module_id=module_id,
        )
    seen: object = module
    while seen is not None:
        target = _importable(seen)
        if target is not None:
            return target
        seen = getattr(seen, "__wrapped__", None)
    name = getattr(module, "__qualname__", repr(module))
    raise RegistryError(
        f"module {module_id!r}: isolation=PROCESS needs a factory importable by qualified "
        f"name, and {name!r} (module {getattr(module, '__module__', '?')!r}) is not: define "
        "the class or factory at the top level of an importable module, or pass "
        "'package.module:Class'",
        module_id=module_id,
    )


def import_target(target: str) -> Any:
    """The object `"package.module:Qualname"` names.

    Raises:
        ValueError: not of that form. ImportError / AttributeError: it does not resolve.
    """
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"a module target must be 'package.module:Qualname', got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def json_config(config: Mapping[str, Any], module_id: str) -> str:
    """`config` as JSON for the worker.

    Raises:
        RegistryError: it is not JSON-serialisable (the message says why).
    """
    try:
        return json.dumps(dict(config), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(
            f"module {module_id!r}: isolation=PROCESS needs a JSON-serialisable config "
            f"(it is sent to the worker process as JSON): {exc}",
            module_id=module_id,
        ) from exc
