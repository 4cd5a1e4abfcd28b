"""Logging: structlog configured once, JSON off a TTY, console on a TTY.

Handlers bind ``connection_id``, ``site``, ``uuid`` and ``session`` with
contextvars at the top of a connection, so every line of that connection
carries them; the closing line of a connection is the canonical one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import msgspec
import structlog

_encoder = msgspec.json.Encoder(enc_hook=repr)


def _serialize(obj: Any, **_: Any) -> str:
    # structlog passes default= to its serializer; msgspec takes enc_hook instead.
    return _encoder.encode(obj).decode()


def configure(
    level: str = "info", json: bool | None = None, fields: Mapping[str, Any] | None = None
) -> None:
    """Configure structlog and the stdlib loggers of our dependencies.

    Args:
        level: debug, info, warning or error.
        json: JSON lines; None means JSON unless stdout is a TTY.
        fields: added to every line of this process (a child's ``worker``).
    """
    if json is None:
        json = not sys.stdout.isatty()
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_serialize)
        if json
        else structlog.dev.ConsoleRenderer()
    )
    extra = dict(fields or {})

    def add_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in extra.items():
            event.setdefault(key, value)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([add_fields] if extra else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if json
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line: print() writes a line and its newline in two
        # calls, so processes sharing stdout (scripts/run, a supervisor and its
        # children) could interleave them ('{a}{b}' and then two newlines).
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # websockets and redis log through the stdlib; keep their warnings, on stderr.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
