"""The read-only dashboard at `GET /ui` (docs/dashboard.md), and the routes it reads besides
the core API (`events.install_events`).

The page is built from `clients/typescript/dashboard` (TypeScript, Vite) into `dashboard/` next
to this file; the built files are committed and ship in the wheel, so `pip install` serves it
with no Node.js on the host. Nothing is loaded from elsewhere: the Content-Security-Policy only
allows this daemon.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import TYPE_CHECKING, Final

from fastapi import FastAPI
from starlette.responses import FileResponse, RedirectResponse, Response

from .events import install_events
from .problems import Problem

if TYPE_CHECKING:
    from .host import DaemonState

__all__ = ["ASSETS", "install_ui"]

ASSETS: Final = Path(__file__).with_name("dashboard")
"""Where the built dashboard lives (index.html, assets/)."""

_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES: Final = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


def _headers(immutable: bool) -> dict[str, str]:
    return {
        "Content-Security-Policy": _CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache",
    }


def install_ui(app: FastAPI, state: DaemonState) -> None:
    """Add `/ui` (the dashboard's files) and the routes it reads (`events`, `statistics`)."""
    install_events(app, state)

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> Response:
        return RedirectResponse("/ui/", status_code=308)

    @app.get("/ui/", include_in_schema=False)
    async def ui_index() -> Response:
        index = ASSETS / "index.html"
        if not index.is_file():
            raise Problem("not-found", f"the dashboard is not built ({index} is missing)")
        return FileResponse(index, media_type="text/html", headers=_headers(False))

    @app.get("/ui/{name:path}", include_in_schema=False)
    async def ui_file(name: str) -> Response:
        root = ASSETS.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise Problem("not-found", f"no dashboard file {name!r}")
        media = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        # Vite names every asset after its content hash: cache them for good.
        immutable = path.parent.name == "assets"
        return FileResponse(
            path, media_type=media or "application/octet-stream", headers=_headers(immutable)
        )
