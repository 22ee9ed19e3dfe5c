"""The ledger daemon: configuration, HTTP/JSON API and process lifecycle (`nucleus run`).

Needs the `daemon` extra (`pip install 'nucleus_actors[daemon]'`). See docs/daemon.md.

Imports lazily (PEP 562), like the package itself: the client side (`DaemonClient`, used by
the `nucleus` client commands) loads neither trio, FastAPI, hypercorn nor pydantic.
"""

from __future__ import annotations as _annotations

import importlib as _importlib
import typing as _typing

# public name -> the submodule that defines it
_SOURCES: dict[str, str] = {
    "create_app": ".app",
    "ApiError": ".client",
    "ClientError": ".client",
    "DaemonClient": ".client",
    "DaemonUnreachable": ".client",
    "Unauthorized": ".client",
    "BackoffSettings": ".config",
    "ConfigError": ".config",
    "ConfigProblem": ".config",
    "DaemonConfig": ".config",
    "LedgerSettings": ".config",
    "ModuleSettings": ".config",
    "load_config": ".config",
    "parse_config": ".config",
    "BUILTIN_MODULES": ".discovery",
    "ENTRY_POINT_GROUP": ".discovery",
    "InstalledModule": ".discovery",
    "installed_modules": ".discovery",
    "resolve_use": ".discovery",
    "DaemonState": ".host",
    "LedgerHost": ".host",
    "DaemonMetrics": ".metrics",
    "EXIT_CONFIG": ".server",
    "EXIT_FAILURE": ".server",
    "EXIT_OK": ".server",
    "Daemon": ".server",
    "build_hosts": ".server",
}

if _typing.TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .app import create_app
    from .client import ApiError, ClientError, DaemonClient, DaemonUnreachable, Unauthorized
    from .config import (
        BackoffSettings,
        ConfigError,
        ConfigProblem,
        DaemonConfig,
        LedgerSettings,
        ModuleSettings,
        load_config,
        parse_config,
    )
    from .discovery import (
        BUILTIN_MODULES,
        ENTRY_POINT_GROUP,
        InstalledModule,
        installed_modules,
        resolve_use,
    )
    from .host import DaemonState, LedgerHost
    from .metrics import DaemonMetrics
    from .server import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, Daemon, build_hosts

__all__ = [
    "Daemon",
    "DaemonState",
    "LedgerHost",
    "build_hosts",
    "create_app",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_CONFIG",
    # configuration
    "DaemonConfig",
    "LedgerSettings",
    "ModuleSettings",
    "BackoffSettings",
    "ConfigError",
    "ConfigProblem",
    "load_config",
    "parse_config",
    # module discovery
    "BUILTIN_MODULES",
    "ENTRY_POINT_GROUP",
    "InstalledModule",
    "installed_modules",
    "resolve_use",
    # metrics
    "DaemonMetrics",
    # client
    "DaemonClient",
    "ClientError",
    "DaemonUnreachable",
    "ApiError",
    "Unauthorized",
]


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(source, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
