"""eventwire/client/options.py: the client's options, validated before any connection."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from eventwire.client import ClientOptions, EventwireClient

URL = "ws://127.0.0.1:9/v1/track/app"


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"url": "http://x/v1/track/app"}, "isn't a valid URI"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"max_inflight": 0}, "max_inflight must be at least 1"),
        ({"max_buffer": 0}, "max_buffer must be at least 1"),
        ({"linger": -1.0}, "linger >= 0"),
        ({"backoff_base": 0.0}, "0 < backoff_base"),
        ({"backoff_base": 2.0, "backoff_max": 1.0}, "backoff_base <= backoff_max"),
        ({"max_frame_bytes": 100}, "max_frame_bytes must be at least 128"),
        ({"encoding": "xml"}, "encoding must be json or msgpack"),
        ({"uuid": "not a uuid!"}, "invalid hello"),
        ({"producer": "short"}, "invalid hello"),
    ],
)
def test_options_refuse_what_the_server_would(bad: dict[str, Any], match: str) -> None:
    """A bad URL, limit, encoding or hello field raises ValueError at construction."""
    with pytest.raises(ValueError, match=match):
        ClientOptions(**{"url": URL, **bad})


def test_a_context_without_json_form_is_refused() -> None:
    """A context value with no JSON form raises ValueError at construction."""
    with pytest.raises(ValueError, match="no JSON form"):
        ClientOptions(url=URL, context={"x": object()})


def test_defaults_and_hello() -> None:
    """Each options object gets its own uuid and py- producer; the hello carries them."""
    options = ClientOptions(url=URL, token="t", context={"app": "x"})
    assert options.producer.startswith("py-")
    assert len(options.producer) == 27
    assert options.uuid != ClientOptions(url=URL).uuid
    hello = msgspec.json.decode(options.hello())
    assert hello == {
        "type": "hello",
        "uuid": options.uuid,
        "producer": options.producer,
        "token": "t",
        "client": "eventwire-py/0.1",
        "context": {"app": "x"},
    }
    assert ClientOptions(url=URL, encoding="msgpack").codec.binary


def test_a_client_from_options_keeps_them() -> None:
    """EventwireClient.from_options builds the same client the keyword arguments would."""
    options = ClientOptions(url=URL, uuid="cust-1", batch_size=7, encoding="msgpack")
    client = EventwireClient.from_options(options)
    assert client.options == options
    assert (client.url, client.uuid, client.producer) == (URL, "cust-1", options.producer)
