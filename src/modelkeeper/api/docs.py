"""Interactive API docs at ``/docs`` that work offline: Swagger UI's script and style sheet are
served from the package (``api/static/swagger-ui/``, vendored from npm's ``swagger-ui-dist``)
instead of a CDN, so the page is never blank on a machine without internet."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from modelkeeper.api.errors import error_body

ASSETS_PATH = "/docs/assets"
#: The vendored files served, by name, with their content type.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "LICENSE": "text/plain; charset=utf-8",
}
FAVICON = "/ui/icon.svg"  # the dashboard's icon


def _read(name: str) -> bytes:
    return (resources.files("modelkeeper.api") / "static" / "swagger-ui" / name).read_bytes()


def install(app: FastAPI) -> None:
    """Add ``/docs`` and its assets to ``app``, built with ``docs_url=None`` and ``redoc_url=None``."""
    bodies = {name: _read(name) for name in ASSETS}  # small and fixed: read once
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=FAVICON,
        )

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def swagger_asset(name: str) -> Response:
        if name not in bodies:
            return JSONResponse(error_body(f"no docs asset {name!r}", "NOT_FOUND", {"name": name}), 404)
        return Response(
            bodies[name], media_type=ASSETS[name], headers={"cache-control": "public, max-age=86400"}
        )
