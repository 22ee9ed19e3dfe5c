"""Command-line values coerced without pydantic, so that client commands start fast.

Typer (0.2x) coerces every command-line value through a pydantic `TypeAdapter`, so any typer
command imported pydantic (~0.2 s of a client command's start). The client commands only take
`str`, `bool`, `int`/`float` (with `min`/`max`), enums, `Path` and `list[str]` options: for
those, `install()` makes typer build a coercer that does what its adapter does (the same
values accepted, the same messages for the usual mistakes) without importing pydantic. Any
other parameter (a custom `parser`, `clamp`, dates, files, tuples, ...) keeps typer's own
adapter.

`install()` does nothing when typer's internals are not the ones this was written against
(then commands import pydantic again, as before; `tests/daemon/test_startup.py` notices).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

__all__ = ["install"]

Convert = Callable[[Any, Any, Any], Any]  # (value, param, ctx) -> value; ValueError if bad

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no", ""})


def _to_str(value: Any, param: Any, ctx: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(sys.getfilesystemencoding(), "replace")
    if value is None:
        raise ValueError("None is not a valid string")
    return str(value)


def _to_bool(value: Any, param: Any, ctx: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError("Input should be a valid boolean, unable to interpret input")


def _number(kind: type, minimum: float | None, maximum: float | None) -> Convert:
    name = "integer" if kind is int else "number"

    def convert(value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"Input should be a valid {name}")
        if isinstance(value, str):
            try:
                number: Any = kind(value.strip())
            except ValueError:
                raise ValueError(
                    f"Input should be a valid {name}, unable to parse string as an {name}"
                    if kind is int
                    else f"Input should be a valid {name}, unable to parse string as a {name}"
                ) from None
        else:
            number = kind(value)
        if minimum is not None and number < minimum:
            raise ValueError(f"Input should be greater than or equal to {minimum}")
        if maximum is not None and number > maximum:
            raise ValueError(f"Input should be less than or equal to {maximum}")
        return number

    return convert


def _leaf(annotation: Any, info: Any) -> Convert | None:
    """A converter for one value of `annotation`, or None (leave it to typer's adapter)."""
    from typer import _param_types as types

    if annotation is str:
        return _to_str
    if annotation is bool:
        return _to_bool
    if annotation in (int, float):
        return _number(annotation, info.min, info.max)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = list(annotation)
        sensitive = info.case_sensitive

        def choice(value: Any, param: Any, ctx: Any) -> Any:
            return types.coerce_cli_choice(
                value, choices=choices, case_sensitive=sensitive, ctx=ctx
            )

        return choice
    if isinstance(annotation, type) and issubclass(annotation, Path) and info.path_type is None:

        def path(value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, bytes):
                value = value.decode(sys.getfilesystemencoding(), "replace")
            if isinstance(value, str):
                value = annotation(value)
            return types.coerce_cli_path(value, info, path_type=annotation, param=param, ctx=ctx)

        return path
    return None


def _converter(descriptor: Any) -> Convert | None:
    info = descriptor.parameter_info
    if descriptor.file_annotation is not None or info.parser is not None or info.clamp:
        return None
    annotation = descriptor.annotation
    if get_origin(annotation) is list:
        args = get_args(annotation)
        item = _leaf(args[0], info) if len(args) == 1 else None
        if item is None:
            return None

        def many(value: Any, param: Any, ctx: Any) -> list[Any]:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [item(v, param, ctx) for v in values]

        return many
    return _leaf(annotation, info)


def install() -> None:
    """Make typer coerce simple parameters without pydantic (idempotent; see the module)."""
    try:
        from typer import _coercion, core
        from typer._click.exceptions import BadParameter
    except ImportError:  # pragma: no cover - another typer: leave it as it is
        return
    original = getattr(_coercion, "build_runtime_param", None)
    base = getattr(_coercion, "RuntimeParam", None)
    if original is None or base is None or getattr(core, "build_runtime_param", None) is None:
        return  # pragma: no cover - another typer
    if getattr(original, "nucleus_lite", False):
        return

    @dataclass(frozen=True)
    class LiteParam(base):  # type: ignore[misc, valid-type]
        convert: Convert

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.convert(value, param, ctx)
            except ValueError as exc:
                raise BadParameter(str(exc), ctx=ctx, param=param) from exc

    def build_runtime_param(descriptor: Any) -> Any:
        convert = _converter(descriptor)
        if convert is None:
            return original(descriptor)
        return LiteParam(
            parameter_info=descriptor.parameter_info,
            annotation=descriptor.annotation,
            convert=convert,
        )

    build_runtime_param.nucleus_lite = True  # type: ignore[attr-defined]
    _coercion.build_runtime_param = build_runtime_param
    setattr(core, "build_runtime_param", build_runtime_param)  # noqa: B010 (not re-exported)
