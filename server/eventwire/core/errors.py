"""The exception tree of eventwire.

Every error the server raises on purpose derives from :class:`EventwireError`.
Each one maps to exactly one protocol answer, chosen at one boundary
(``ingest`` for messages, ``gateway`` for connections, ``cli`` for startup)::

    EventwireError
    ├── ConfigError          startup stops with the message (exit 2)
    ├── ProtocolViolation    ``error`` message, then close (code on the instance)
    │   └── UndecodableFrame close 1007, raw bytes recorded as rejected
    └── StoreUnavailable     ``nack unavailable`` with ``retry_after_ms``
"""

from __future__ import annotations


class EventwireError(Exception):
    """Root of every error eventwire raises on purpose."""


class ConfigError(EventwireError):
    """A setting or a sites file is wrong; the message names the key."""


class ProtocolViolation(EventwireError):
    """The client broke the protocol; the connection ends with an error message.

    Args:
        code: the ``error.code`` sent to the client.
        detail: a sentence a client developer understands.
        close_code: the WebSocket close code that follows the error message.
    """

    def __init__(self, code: str, detail: str, close_code: int = 1008) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.close_code = close_code


class UndecodableFrame(ProtocolViolation):
    """A frame is not a message of this subprotocol (close 1007)."""

    def __init__(self, detail: str) -> None:
        super().__init__("undecodable", detail, close_code=1007)


class StoreUnavailable(EventwireError):
    """Redis did not answer in time or refused; nothing of the frame is promised."""
