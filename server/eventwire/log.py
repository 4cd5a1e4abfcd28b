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

import ipaddress
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
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

#: Anything that looks like an IPv4 or IPv6 address (with an optional port) in a
#: dependency's line: aiohttp names the peer in "Error handling request from ...".
_ADDRESS_RE = re.compile(
    r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|\[?[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}\]?)"
    r"(?::\d{1,5})?(?![\w:]|\.\d)"
)


def _mask(match: re.Match[str]) -> str:
    """An address found (a version string or a clock time is left as it is)."""
    text = match.group(0)
    host = text[1 : text.index("]")] if text.startswith("[") and "]" in text else text
    if host.count(":") == 1:  # v4:port
        host = host.split(":", 1)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return text
    return "[address]"


class _NoAddresses(logging.Filter):
    """Masks client addresses in the lines of dependencies (README "Privacy").

    Our own lines never hold one; a dependency's warning or error may name
    the peer. Those lines are rare (WARNING and above), so formatting each
    here costs nothing that matters.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = _ADDRESS_RE.sub(_mask, message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


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
    handler.addFilter(_NoAddresses())
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


class Episodes:
    """A warning for what comes in bursts, one line per episode instead of one per case.

    :meth:`note` writes ``event`` at the first case after a quiet spell, then
    at most one line per ``every`` seconds, each with how many cases came
    since the line before (the ``count`` field, named by ``count_as``) and
    since the start (``total``); the cases of an episode's last seconds are
    only counted (a metric beside it counts each). The fields of the call
    that writes the line go with it, as do the logger's context variables
    (the connection of the first case).

    Args:
        logger: where the lines go.
        event: the lines' event name.
        every: the least seconds between two lines.
        count_as: the name of the field with the count since the line before.
        clock: monotonic seconds (a test's own).
    """

    def __init__(
        self,
        logger: Any,
        event: str,
        every: float,
        count_as: str = "count",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.event = event
        self.every = every
        self._count_as = count_as
        self._clock = clock
        #: Cases since the start.
        self.total = 0
        #: Cases since the last line, and when that line was written (monotonic).
        self._unlogged = 0
        self._logged_at: float | None = None

    def note(self, **fields: Any) -> None:
        """One case: counted, and written with ``fields`` unless a line came within ``every``."""
        self.total += 1
        self._unlogged += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self.every:
            return
        self._log.warning(
            self.event, **{self._count_as: self._unlogged}, total=self.total, **fields
        )
        self._unlogged = 0
        self._logged_at = now
