"""`/docs`: the interactive API page, with Swagger UI's assets served by the daemon itself.

FastAPI's default page loads Swagger UI from a CDN, so it is blank without internet (an
air-gapped host, a laptop on a plane). The assets come from the `swagger-ui-bundle` package
and are served under `/docs/assets/`; the page needs nothing but the daemon.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Final

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

__all__ = ["ASSETS", "install_docs"]

ASSETS: Final = {
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
"""The files `/docs` needs, by name, with their media types."""


@cache
def _asset(name: str) -> bytes:
    import swagger_ui_bundle

    return (Path(swagger_ui_bundle.swagger_ui_path) / name).read_bytes()


def install_docs(app: FastAPI, *, title: str, openapi_url: str = "/openapi.json") -> None:
    """Serve `/docs` and its assets (create the app with `docs_url=None`)."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def asset(name: str, request: Request) -> Response:
        media = ASSETS.get(name)
        if media is None:
            return Response(status_code=404)
        return Response(
            _asset(name), media_type=media, headers={"Cache-Control": "public, max-age=86400"}
        )
