"""`/docs` that works offline: Swagger UI's files served by the app itself.

FastAPI's own /docs page loads Swagger UI from a CDN, so it is blank without the internet (an
air-gapped cluster, a laptop on a train). The files are vendored, unmodified, in
service/static/swagger/ (swagger-ui-dist, Apache-2.0; its LICENSE and NOTICE lie beside them; how to
update them: its README.md). ReDoc, which loads from a CDN too, is not served: create the app with
`docs_url=None, redoc_url=None` and call `install(app)`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

SWAGGER_DIR = Path(__file__).resolve().parent / "static" / "swagger"
DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
# No validator badge: it would send the schema to validator.swagger.io.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


def install(app: FastAPI) -> None:
    """Serve Swagger UI at /docs and its files at /docs/assets, neither in the OpenAPI schema."""
    app.mount(ASSETS_PATH, StaticFiles(directory=SWAGGER_DIR), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        # behind a proxy that strips a prefix, every URL the page loads must carry it
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
