"""`python -m nucleus_actors`: the `nucleus` command line (needs the `daemon` extra)."""

from __future__ import annotations

import sys

_DAEMON_DEPS = frozenset({"typer", "rich", "fastapi", "hypercorn", "pydantic", "starlette"})


def main() -> None:
    """Run the `nucleus` CLI, or explain how to install it when the daemon extra is missing."""
    try:
        from .cli import main as cli_main
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in _DAEMON_DEPS:
            raise
        sys.exit(
            f"the nucleus command needs the daemon extra ({exc.name} is missing): "
            "pip install 'nucleus_actors[daemon]'"
        )
    cli_main()


if __name__ == "__main__":
    main()
