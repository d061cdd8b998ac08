"""The web playground: `/` serves service/static/index.html, `/static/*` its script and style sheet.

Plain files, no build step. The page talks to the public API (/v1/txt2img, /v1/jobs/...) like any
client; it needs no route of its own, and no API key to load (the key, when the server needs one,
is typed into the page and kept in the browser's localStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    # no-cache: the page is tiny, and a stale copy after an upgrade would call the API the old way
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
