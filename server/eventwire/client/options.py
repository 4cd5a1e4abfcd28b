"""The Python client's options as one typed, validated object.

:class:`ClientOptions` holds everything an :class:`~eventwire.client.EventwireClient`
is configured with, and refuses at construction what the server would refuse
later (an invalid hello shows there only as endless 1008 closes).
:class:`~eventwire.client.delivery.Delivery` reads the delivery limits from it
and :mod:`eventwire.client.connection` the connection settings.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from uuid import uuid4

import msgspec
from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

from eventwire.core.protocol import CODECS, JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, Ack, Codec, Hello

CLIENT_NAME: Final = "eventwire-py/0.1"

#: Bytes a track frame adds around its events' encodings, rounded up; a single
#: event larger than ``max_frame_bytes`` minus this can never be sent.
FRAME_OVERHEAD: Final = 64

Encoding = Literal["json", "msgpack"]

_SUBPROTOCOLS: Final[dict[str, str]] = {"json": JSON_SUBPROTOCOL, "msgpack": MSGPACK_SUBPROTOCOL}


def random_uuid() -> str:
    """A random UUIDv4 string: the customer reference when none is given."""
    return str(uuid4())


def random_producer() -> str:
    """``py-`` and 24 random hex characters: a producer id for one client's lifetime."""
    return "py-" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How one client connects and delivers.

    Attributes:
        url: the full track URL, ``ws://host:port/v1/track/{site}``.
        uuid: the customer reference; a random UUIDv4 string by default.
        producer: the producer id; by default ``py-`` and 24 random hex
            characters. Seqs start at 1 for every client object, so a fixed
            producer must not be reused by a later client object within
            ``producer_ttl``: the server would report its events as already
            stored (``welcome.acked``).
        token: a JWT proving the customer, sent in the hello.
        encoding: ``json`` (text frames) or ``msgpack`` (binary frames).
        origin: an ``Origin`` header to send; none by default.
        context: free-form hints copied onto the server's ``session.start``.
        batch_size: the most events in one track frame (also capped by
            ``welcome.max_batch``).
        max_inflight: the most frames sent and not yet answered.
        linger: seconds to wait for more events after a partial frame before
            sending the next partial frame; a full frame goes at once.
        max_buffer: the most events held unacknowledged; ``track()`` raises
            :class:`~eventwire.client.BufferFull` beyond it.
        backoff_base: first reconnect delay bound, in seconds.
        backoff_max: reconnect delay bound, in seconds.
        on_ack: called with each ack and the seconds between sending its
            frame and receiving the ack. It runs in the receive loop: keep it
            short; an exception it raises is logged and ignored.
        max_frame_bytes: the most bytes of one encoded track frame; a larger
            batch is split. Keep it at or below the server's
            ``max_frame_bytes`` (default 256 KiB), which closes 1009 above it.

    Raises:
        ValueError: a URL, identifier or limit is not valid, or ``context``
            has no JSON form (it is copied onto a JSON record).
    """

    url: str
    uuid: str = field(default_factory=random_uuid)
    producer: str = field(default_factory=random_producer)
    token: str | None = None
    encoding: Encoding = "json"
    origin: str | None = None
    context: dict[str, Any] | None = None
    batch_size: int = 100
    max_inflight: int = 4
    linger: float = 0.005
    max_buffer: int = 100_000
    backoff_base: float = 0.1
    backoff_max: float = 10.0
    on_ack: Callable[[Ack, float], None] | None = None
    max_frame_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        try:
            parse_uri(self.url)
        except InvalidURI as exc:
            raise ValueError(str(exc)) from None
        if self.encoding not in _SUBPROTOCOLS:
            raise ValueError(f"encoding must be json or msgpack, got {self.encoding!r}")
        for name, value in (
            ("batch_size", self.batch_size),
            ("max_inflight", self.max_inflight),
            ("max_buffer", self.max_buffer),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.linger < 0 or self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            raise ValueError("need linger >= 0 and 0 < backoff_base <= backoff_max")
        if self.max_frame_bytes < 2 * FRAME_OVERHEAD:
            raise ValueError(f"max_frame_bytes must be at least {2 * FRAME_OVERHEAD}")
        hello = self.hello()
        try:
            # The server's own decoder is the authority on what a valid hello is;
            # a bad one here would otherwise only show as endless 1008 closes.
            self.codec.decode(hello)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid hello: {exc}") from None

    @property
    def codec(self) -> Codec:
        """The codec of the chosen encoding (the subprotocol offered)."""
        return CODECS[_SUBPROTOCOLS[self.encoding]]

    def hello(self) -> bytes:
        """The encoded hello every connection opens with.

        Raises:
            ValueError: ``context`` has no JSON form.
        """
        return self.codec.encode_client(
            Hello(
                uuid=self.uuid,
                producer=self.producer,
                token=self.token,
                client=CLIENT_NAME,
                context=self.context,
            )
        )
