"""Static files on the public listener: content types, ETag revalidation, gzip."""

from __future__ import annotations

import asyncio
import gzip
import urllib.request
from http import HTTPStatus

import pytest

from eventwire.gateway import EventwireServer


async def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """GET in a thread: the server under test runs on this event loop."""
    return await asyncio.to_thread(_get_blocking, url, headers)


def _get_blocking(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _http(server: EventwireServer) -> str:
    return server.url.replace("ws://", "http://")


async def test_tracker_served_with_type_and_etag(server: EventwireServer) -> None:
    """/tracker.js is JavaScript with an ETag; the same ETag gets 304 and no body."""
    status, headers, body = await _get(_http(server) + "/tracker.js")
    assert status == HTTPStatus.OK
    assert headers["Content-Type"].startswith("application/javascript")
    assert int(headers["Content-Length"]) == len(body) > 0
    status, _, again = await _get(
        _http(server) + "/tracker.js", **{"If-None-Match": headers["ETag"]}
    )
    assert status == HTTPStatus.NOT_MODIFIED
    assert again == b""


async def test_gzip_when_accepted(server: EventwireServer) -> None:
    """A client that accepts gzip gets the same bytes, compressed."""
    _, _, plain = await _get(_http(server) + "/demo")
    _, headers, body = await _get(_http(server) + "/demo", **{"Accept-Encoding": "gzip, br"})
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == plain
    assert "Content-Security-Policy" in headers


@pytest.mark.parametrize("path", ["/", "/static/../gateway.py", "/tracker.js/x", "/demo.html"])
async def test_other_paths_not_found(server: EventwireServer, path: str) -> None:
    """Only the listed files are served; every other path is 404."""
    status, _, _ = await _get(_http(server) + path)
    assert status == HTTPStatus.NOT_FOUND
