"""Plain files of ``server/static/`` served over HTTP: tracker, demo and dashboard.

The files are read once at import of a :class:`StaticFiles` and served as
they are (no build step). Each answer carries a strong ``ETag`` so browsers
revalidate with ``If-None-Match`` and get ``304``; a client that accepts gzip
gets the gzipped body, compressed once. Only names listed by the caller are
served, so nothing else in the directory is reachable from a URL.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Final

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

STATIC_DIR: Final = Path(__file__).parent / "static"

CONTENT_TYPES: Final = {
    ".js": "application/javascript; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}

#: Pages say where they may load from; the dashboard and demo need nothing
#: outside their own origin, except WebSockets to it (``connect-src``).
CSP: Final = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
)


class _File(msgspec.Struct, frozen=True):
    body: bytes
    gzipped: bytes
    etag: str
    content_type: str


class StaticFiles:
    """A fixed set of files from ``static/``, served by URL path.

    Args:
        routes: URL path -> file name in ``static/`` (e.g. ``{"/tracker.js": "tracker.js"}``).
        max_age: ``Cache-Control`` max-age in seconds (revalidation is cheap).
    """

    def __init__(self, routes: Mapping[str, str], max_age: int = 60) -> None:
        self._files: dict[str, _File] = {}
        self._cache = f"public, max-age={max_age}" if max_age else "no-cache"
        for path, name in routes.items():
            body = (STATIC_DIR / name).read_bytes()
            self._files[path] = _File(
                body=body,
                gzipped=gzip.compress(body, 9, mtime=0),
                etag='"' + hashlib.sha256(body).hexdigest()[:20] + '"',
                content_type=CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream"),
            )

    def substitute(self, path: str, marker: bytes, value: bytes) -> None:
        """Serve ``path`` with its one ``marker`` replaced by ``value`` (a setting known at start).

        Raises:
            KeyError: ``path`` is not one of the routes.
            ValueError: the file does not hold ``marker`` exactly once.
        """
        body = self._files[path].body
        if body.count(marker) != 1:
            raise ValueError(f"{path} must hold {marker!r} once")
        body = body.replace(marker, value)
        self._files[path] = msgspec.structs.replace(
            self._files[path],
            body=body,
            gzipped=gzip.compress(body, 9, mtime=0),
            etag='"' + hashlib.sha256(body).hexdigest()[:20] + '"',
        )

    def __contains__(self, path: str) -> bool:
        return path in self._files

    def size(self, path: str, gzipped: bool = False) -> int:
        """Bytes of one file as served, plain or gzipped."""
        file = self._files[path]
        return len(file.gzipped if gzipped else file.body)

    def respond(self, path: str, request: Request) -> Response:
        """The answer to ``GET path``: the file, or ``304`` when the client has it.

        Raises:
            KeyError: ``path`` is not one of the routes.
        """
        file = self._files[path]
        headers = Headers()
        headers["Content-Type"] = file.content_type
        headers["Cache-Control"] = self._cache
        headers["ETag"] = file.etag
        headers["Vary"] = "Accept-Encoding"
        headers["X-Content-Type-Options"] = "nosniff"
        if file.content_type.startswith("text/html"):
            headers["Content-Security-Policy"] = CSP
            headers["Referrer-Policy"] = "no-referrer"
        if request.headers.get("If-None-Match") == file.etag:
            return Response(HTTPStatus.NOT_MODIFIED.value, "Not Modified", headers, b"")
        body = file.body
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = file.gzipped
            headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(len(body))
        return Response(HTTPStatus.OK.value, "OK", headers, body)
