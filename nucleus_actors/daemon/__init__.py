"""The ledger daemon: configuration, HTTP/JSON API and process lifecycle (`nucleus run`).

Needs the `daemon` extra (`pip install 'nucleus_actors[daemon]'`). See docs/daemon.md.
"""

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
