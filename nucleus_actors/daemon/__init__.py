"""The ledger daemon: configuration, HTTP/JSON API and process lifecycle (`nucleus run`).

Needs the `daemon` extra (`pip install 'nucleus_actors[daemon]'`). See docs/daemon.md.
"""

from .app import create_app
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
from .host import DaemonState, LedgerHost
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
]
