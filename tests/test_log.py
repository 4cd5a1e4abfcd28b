"""eventwire/log.py: our lines and our dependencies' stdlib lines share one format."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from typing import Any

from tests.procs import ROOT, UNIT

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

#: Configures logging as ``eventwire serve`` does, binds a connection's
#: contextvars and logs once through structlog and through the stdlib.
PRELUDE = """
import logging, structlog
from eventwire.log import configure
configure({level!r}, json={json}, fields={{"worker": 2}})
structlog.contextvars.bind_contextvars(connection_id=7, site="app", uuid="cust-1")
ours = structlog.get_logger("eventwire.ingest")
"""


def run(body: str, level: str = "info", json_lines: bool = True) -> tuple[str, str]:
    """Run PRELUDE and ``body`` in a fresh interpreter; its stdout and stderr."""
    script = PRELUDE.format(level=level, json=json_lines) + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30 * UNIT,
        check=True,
    )
    return out.stdout, out.stderr


def lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line, each of which must be one JSON object."""
    return [json.loads(line) for line in stdout.splitlines()]


def test_websockets_and_redis_warnings_are_json_lines_with_our_fields() -> None:
    """A stdlib warning from websockets or redis is one JSON line with our fields and context."""
    stdout, stderr = run("""
        logging.getLogger("websockets.server").warning("handshake from %s failed", "10.0.0.9")
        logging.getLogger("redis.asyncio.connection").warning("reconnecting")
    """)
    assert stderr == ""
    got = lines(stdout)
    assert len(got) == 2
    for line in got:
        assert ISO_UTC.match(line.pop("timestamp"))
    context = {"connection_id": 7, "site": "app", "uuid": "cust-1", "worker": 2}
    assert got == [
        {
            "event": "handshake from [address] failed",  # README "Privacy"
            "logger": "websockets.server",
            "level": "warning",
            **context,
        },
        {
            "event": "reconnecting",
            "logger": "redis.asyncio.connection",
            "level": "warning",
            **context,
        },
    ]


def test_a_stdlib_exception_is_rendered_into_the_line() -> None:
    """An asyncio error with exc_info carries its traceback in ``exception``, like ours."""
    stdout, _ = run("""
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
    """)
    [line] = lines(stdout)
    assert line["logger"] == "asyncio"
    assert line["level"] == "error"
    assert line["event"] == "Task exception was never retrieved"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].endswith("ConnectionResetError: peer went away")


def test_our_structlog_lines_are_unchanged() -> None:
    """Our own line keeps its exact shape: no logger field, keys in the same order."""
    stdout, _ = run("""
        ours.info("connection_closed", events=3, code=1000)
    """)
    [line] = lines(stdout)
    # The contextvars come in the context's own order, which is not ours to fix.
    keys = list(line)
    assert keys[:3] == ["events", "code", "event"]
    assert keys[-3:] == ["worker", "level", "timestamp"]
    assert ISO_UTC.match(line.pop("timestamp"))
    assert line == {
        "events": 3,
        "code": 1000,
        "event": "connection_closed",
        "site": "app",
        "connection_id": 7,
        "uuid": "cust-1",
        "worker": 2,
        "level": "info",
    }


def test_dependency_chatter_stays_off_at_info() -> None:
    """At info, websockets' INFO and DEBUG lines are dropped; ours at info are kept."""
    stdout, _ = run("""
        logging.getLogger("websockets.server").info("connection rejected (200 OK)")
        logging.getLogger("websockets.server").debug("< TEXT '{}' [2 bytes]")
        logging.getLogger("asyncpg").info("notice")
        ours.debug("not at info")
        ours.info("kept")
    """)
    assert [line["event"] for line in lines(stdout)] == ["kept"]


def test_error_level_drops_dependency_warnings() -> None:
    """At error, a dependency's warning is dropped like ours, and its error kept."""
    stdout, _ = run(
        """
        logging.getLogger("redis").warning("slow")
        logging.getLogger("redis").error("gone")
        ours.warning("not at error")
        """,
        level="error",
    )
    assert [(line["logger"], line["event"]) for line in lines(stdout)] == [("redis", "gone")]


def test_configuring_twice_installs_one_handler() -> None:
    """A second configure replaces our stdlib handler instead of doubling every line."""
    stdout, _ = run("""
        configure("info", json=True)
        logging.getLogger("websockets.server").warning("once")
    """)
    [line] = lines(stdout)
    assert line["event"] == "once"
    assert "worker" not in line  # the second configure's fields, not the first's


def test_console_renders_stdlib_lines_like_ours() -> None:
    """On a console, a websockets line is rendered by the same ConsoleRenderer, named."""
    stdout, _ = run(
        """
        ours.warning("ours_here")
        logging.getLogger("websockets.server").warning("theirs here")
        """,
        json_lines=False,
    )
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stdout)
    ours, theirs = plain.splitlines()
    assert re.match(r"^\S+Z \[warning\s*\] ours_here\s+connection_id=7 site=app", ours)
    assert re.match(
        r"^\S+Z \[warning\s*\] theirs here\s+\[websockets\.server\] connection_id=7 site=app",
        theirs,
    )


def test_dependency_lines_never_hold_a_client_address() -> None:
    """An address in a dependency's line is masked; versions and clock times are left."""
    stdout, _ = run("""
        log = logging.getLogger("aiohttp.server")
        log.error("Error handling request from %s", "203.0.113.77")
        log.error("peer [2001:db8::17]:4711 and 198.51.100.2:80.")
        log.error("version 1.2.3.4.5 at 12:30:45")
    """)
    assert [line["event"] for line in lines(stdout)] == [
        "Error handling request from [address]",
        "peer [address] and [address].",
        "version 1.2.3.4.5 at 12:30:45",
    ]
