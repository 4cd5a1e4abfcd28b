"""Logging: structlog configured once, JSON off a TTY, console on a TTY.

Handlers bind ``connection_id``, ``site``, ``uuid`` and ``session`` with
contextvars at the top of a connection, so every line of that connection
carries them; the closing line of a connection is the canonical one.

Our dependencies (``websockets``, ``redis``, ``asyncpg``, ``asyncio``) log
through the standard library. A ``ProcessorFormatter`` on the root logger runs
their records through the same processors and renderer as our own lines, so
one stream holds one format; their lines add ``logger``, the stdlib logger
that wrote them. Our own lines do not pass through ``logging`` at all.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import msgspec
import structlog
from structlog.typing import Processor

_encoder = msgspec.json.Encoder(enc_hook=repr)

# Dependencies log from WARNING whatever our level: their INFO and DEBUG are
# per-connection chatter (websockets logs every plain HTTP answer as
# "connection rejected", and every frame at DEBUG).
_DEPENDENCY_FLOOR = logging.WARNING

_HANDLER_NAME = "eventwire"


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
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_serialize)
        if json
        else structlog.dev.ConsoleRenderer()
    )
    extra = dict(fields or {})

    def add_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in extra.items():
            event.setdefault(key, value)
        return event

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        *([add_fields] if extra else []),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if json else structlog.processors.StackInfoRenderer(),
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line: print() writes a line and its newline in two
        # calls, so processes sharing stdout (scripts/run, a supervisor and its
        # children) could interleave them ('{a}{b}' and then two newlines).
        # StreamHandler below also writes a record and its newline at once.
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(shared, renderer, max(numeric, _DEPENDENCY_FLOOR))


def _route_stdlib(shared: list[Processor], renderer: Processor, level: int) -> None:
    """Send every stdlib record to stdout through our processors and renderer."""
    handler = logging.StreamHandler(sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    # Called again (tests, a re-configure), the previous handler is replaced,
    # not doubled; handlers others installed (pytest's) stay.
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
