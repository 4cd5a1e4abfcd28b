"""docs/protocol.md: every JSON example in it is what the code takes, sends or stores.

Each fenced ``json`` block of the document names what it holds in its info
string (```` ```json client ````); a block may hold several JSON values, one
after another (a relay conversation). :data:`CHECKS` says how each kind is
held against the code:

- ``client``: decodes with the server's codec in both subprotocols (the JSON
  as it is, and MessagePack after re-encoding it), both to the same message,
  and every field the example writes is a field of that message (the server
  ignores unknown fields, so a misspelt one would otherwise pass unseen).
- ``server``: decodes with the client's decoder (``Codec.decode_server``) in
  both subprotocols, and is exactly what the server encodes for that message.
- ``stored-event``, ``rejected-record``: decode as :class:`StoredEvent` /
  :class:`RejectedRecord` (and, for events, with the persist worker's own
  decoder) and re-encode to exactly the example, so no field is unknown,
  missing or written where the server omits it.
- ``live``: decodes as a relay message and is exactly what the relay
  encodes; the record inside ``event`` / ``rejected`` is checked as above,
  and ids, cursors and ``p`` follow the block's ``hello``.
- ``sites``, ``summary``, ``rollups``: the admin listener's JSON bodies.
- ``tail``: a ``tail --json`` line, as :func:`decode_entry` makes it.

A block without a kind, or with one not listed here, is a failure, and so is
a message type of the code that the document never shows.
"""

from __future__ import annotations

import base64
import json
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest

from eventwire.admin import _Sites, _Summary  # the bodies of /v1/sites and .../summary
from eventwire.commands.tail import decode_entry
from eventwire.core.errors import UndecodableFrame
from eventwire.core.protocol import JSON_CODEC, MSGPACK_CODEC, Ack, ClientMessage, ServerMessage
from eventwire.core.records import RejectedRecord, StoredEvent, record_encoder
from eventwire.core.rules import SERVER_ACTIONS
from eventwire.core.validation import (
    DENIED,
    INVALID,
    INVALID_ACTION,
    MISSING_PARAM,
    TOO_LARGE,
    TOO_OLD,
    UNAUTHORIZED,
    action_problem,
    default_label,
)
from eventwire.live import LiveMessage
from eventwire.persist.ranges import RangeView  # the body of .../rollups
from eventwire.persist.sinks import decode_event

ROOT: Final = Path(__file__).resolve().parents[2]
PROTOCOL_MD: Final = ROOT / "docs" / "protocol.md"

#: The reject codes an ack may carry (PROTOCOL.md v1 section 3).
REJECT_CODES: Final = frozenset(
    {INVALID, INVALID_ACTION, MISSING_PARAM, TOO_LARGE, TOO_OLD, DENIED, UNAUTHORIZED}
)
#: What the rejected stream records: every reject code but ``denied``, and undecodable frames.
RECORDED_CODES: Final = (REJECT_CODES - {DENIED}) | {"undecodable"}
#: ``raw`` in the rejected stream is cut to 4 KiB (PROTOCOL.md v1 section 7).
RAW_LIMIT: Final = 4096

_OPEN_FENCE: Final = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_STREAM_ID: Final = re.compile(r"\d+-\d+")
_live_decoder: Final = msgspec.json.Decoder(LiveMessage)


class ExampleError(AssertionError):
    """An example of the document does not match the code; the message says where and why."""


def expect(condition: bool, why: str) -> None:
    """Raise :class:`ExampleError` with ``why`` unless ``condition`` holds."""
    if not condition:
        raise ExampleError(why)


@dataclass
class Example:
    """One fenced ``json`` block: its kind, its first line in the file, its values."""

    kind: str
    line: int
    values: list[Any] = field(default_factory=list)


def json_values(text: str, line: int) -> list[Any]:
    """The JSON values of a block, one after another (whitespace between them)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            break
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise ExampleError(f"line {line}: not JSON: {exc}") from None
        values.append(value)
    expect(bool(values), f"line {line}: an empty json block")
    return values


def examples(markdown: str) -> list[Example]:
    """Every fenced ``json`` block of a Markdown text (CommonMark fences).

    Raises:
        ExampleError: a ``json`` block names no kind, or one that :data:`CHECKS`
            does not know, or does not hold JSON.
    """
    found: list[Example] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        opening = _OPEN_FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        words = opening["info"].split()
        start = i + 1
        i += 1
        body: list[str] = []
        while i < len(lines):
            closing = lines[i].strip()
            if closing.startswith(fence[0] * len(fence)) and set(closing) == {fence[0]}:
                break
            body.append(lines[i])
            i += 1
        i += 1
        if not words or not words[0].lower().startswith("json"):
            continue
        kinds = words[1:]
        expect(
            len(kinds) == 1 and kinds[0] in CHECKS,
            f"line {start}: a json block must name one kind of {sorted(CHECKS)}, "
            f"got {' '.join(kinds) or 'none'}",
        )
        found.append(Example(kinds[0], start, json_values("\n".join(body), start)))
    return found


# ---- comparing ----------------------------------------------------------------


def same(got: Any, want: Any) -> bool:
    """Equal as JSON: key order aside, but ``1``, ``1.0`` and ``true`` all differ."""
    return json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def covers(example: Any, decoded: Any, path: str = "$") -> None:
    """Every field of ``example`` is in ``decoded`` with the same value (absent ones may default).

    Raises:
        ExampleError: ``example`` writes a field the message does not have, or
            a value it does not keep.
    """
    if isinstance(example, dict) and isinstance(decoded, dict):
        for key, value in example.items():
            expect(key in decoded, f"{path}.{key} is not a field of the message")
            covers(value, decoded[key], f"{path}.{key}")
    elif isinstance(example, list) and isinstance(decoded, list):
        expect(len(example) == len(decoded), f"{path}: {len(decoded)} items kept")
        for i, (a, b) in enumerate(zip(example, decoded, strict=True)):
            covers(a, b, f"{path}[{i}]")
    else:
        expect(same(example, decoded), f"{path}: decoded as {decoded!r}")


def decoding(what: str, decode: Callable[[], Any]) -> Any:
    """Run a decoder; its errors become :class:`ExampleError` naming ``what``."""
    try:
        return decode()
    except (msgspec.DecodeError, UndecodableFrame, ValueError) as exc:
        raise ExampleError(f"does not decode as {what}: {exc}") from None


def exactly(value: Any, encoded: bytes, what: str) -> None:
    """``encoded`` (JSON) is the example, field for field."""
    back = json.loads(encoded)
    expect(same(back, value), f"{what} encodes as {back}, not as written")


# ---- the kinds ------------------------------------------------------------------


def check_client(value: Any, context: dict[str, Any]) -> None:
    """A client message: both codecs take it, to the same message, and know every field."""
    msg = decoding("a client message (JSON)", lambda: JSON_CODEC.decode(json.dumps(value)))
    packed = msgspec.msgpack.encode(value)
    other = decoding("a client message (MessagePack)", lambda: MSGPACK_CODEC.decode(packed))
    expect(other == msg, f"MessagePack decodes to {other!r}, JSON to {msg!r}")
    covers(value, msgspec.to_builtins(msg))


def check_server(value: Any, context: dict[str, Any]) -> None:
    """A server message: the client's decoder takes it; it is what the server sends."""
    text = json.dumps(value)
    msg = decoding("a server message (JSON)", lambda: JSON_CODEC.decode_server(text))
    packed = msgspec.msgpack.encode(value)
    other = decoding("a server message (MessagePack)", lambda: MSGPACK_CODEC.decode_server(packed))
    expect(other == msg, f"MessagePack decodes to {other!r}, JSON to {msg!r}")
    exactly(value, JSON_CODEC.encode(msg), "the server")
    expect(
        same(msgspec.msgpack.decode(MSGPACK_CODEC.encode(msg)), value),
        "MessagePack encodes other fields than JSON",
    )
    if isinstance(msg, Ack):
        for r in msg.rejected:
            expect(r.code in REJECT_CODES, f"{r.code!r} is no reject code")


def check_stored_event(value: Any, context: dict[str, Any]) -> None:
    """An ``event`` field of the events stream, as the server writes it."""
    raw = json.dumps(value).encode()
    event = decoding("a stored event", lambda: msgspec.json.decode(raw, type=StoredEvent))
    decoding("the persist worker's event", lambda: decode_event(raw))
    exactly(value, record_encoder.encode(event), "the stored event")
    expect(action_problem(event.action) is None, f"{event.action!r} is no action")
    if event.producer.startswith("srv:"):
        expect(event.producer == f"srv:{event.session}", "a server-made event's producer")
        expect(event.action in SERVER_ACTIONS, f"{event.action!r} is not server-made")
        expect(event.label == default_label(event.action, {}), "a server-made event's label")


def check_rejected_record(value: Any, context: dict[str, Any]) -> None:
    """An ``event`` field of the rejected stream, as the server writes it."""
    raw = json.dumps(value).encode()
    record = decoding("a rejected record", lambda: msgspec.json.decode(raw, type=RejectedRecord))
    exactly(value, record_encoder.encode(record), "the rejected record")
    expect(record.code in RECORDED_CODES, f"code {record.code!r} is never recorded")
    expect(len(record.raw) <= RAW_LIMIT, "raw is longer than 4 KiB")
    if record.code == "undecodable":
        expect(record.seq is None, "an undecodable frame has no seq")
    if record.raw_base64:
        decoding("base64", lambda: base64.b64decode(record.raw, validate=True))


def _ids(text: str) -> list[str]:
    ids = text.split(",")
    for one in ids:
        expect(_STREAM_ID.fullmatch(one) is not None, f"{one!r} is no stream id")
    return ids


def check_live(value: Any, context: dict[str, Any]) -> None:
    """A live relay message, as the relay encodes it; ``context`` carries the block's hello."""
    msg = decoding("a live relay message", lambda: _live_decoder.decode(json.dumps(value)))
    exactly(value, msgspec.json.encode(msg), "the relay")
    kind = value["type"]
    if kind == "hello":
        context["partitions"] = value.get("partitions", 1)
    partitions = context.get("partitions")
    expect(partitions is not None, "a relay conversation starts with its hello")
    if kind in ("hello", "ready"):
        expect(len(_ids(value["id"])) == partitions, "a cursor holds one id per partition")
        return
    _ids(value["id"])
    part = value.get("p")
    if partitions == 1:
        expect(part is None, "p is written only for a site of several partitions")
    else:
        expect(part is not None and 0 <= part < partitions, "p names the message's partition")
    if kind == "event":
        check_stored_event(value["event"], {})
    elif kind == "rejected":
        check_rejected_record(value["event"], {})


def check_sites(value: Any, context: dict[str, Any]) -> None:
    """The JSON body of ``GET /v1/sites``."""
    body = decoding("/v1/sites", lambda: msgspec.json.decode(json.dumps(value), type=_Sites))
    exactly(value, msgspec.json.encode(body), "/v1/sites")


def check_summary(value: Any, context: dict[str, Any]) -> None:
    """The JSON body of ``GET /v1/sites/{site}/summary``."""
    body = decoding("a summary", lambda: msgspec.json.decode(json.dumps(value), type=_Summary))
    exactly(value, msgspec.json.encode(body), "the summary")


def check_rollups(value: Any, context: dict[str, Any]) -> None:
    """The JSON body of ``GET /v1/sites/{site}/rollups?range=...``."""
    body = decoding("a range view", lambda: msgspec.json.decode(json.dumps(value), type=RangeView))
    exactly(value, msgspec.json.encode(body), "the range view")


def check_tail(value: Any, context: dict[str, Any]) -> None:
    """One ``eventwire tail --json`` line: the stored event plus its stream ``id``."""
    expect(isinstance(value, dict) and "id" in value, "a tail line carries the stream id")
    record = {k: v for k, v in value.items() if k != "id"}
    check_stored_event(record, {})
    line = decode_entry(value["id"].encode(), {b"event": json.dumps(record).encode()})
    expect(same(line, value), f"tail prints {line}")


#: How each kind of example is checked; the kind is the fence's second word.
CHECKS: Final[dict[str, Callable[[Any, dict[str, Any]], None]]] = {
    "client": check_client,
    "server": check_server,
    "stored-event": check_stored_event,
    "rejected-record": check_rejected_record,
    "live": check_live,
    "sites": check_sites,
    "summary": check_summary,
    "rollups": check_rollups,
    "tail": check_tail,
}


def check_example(example: Example) -> None:
    """Check every value of one block; errors name the block's line.

    Raises:
        ExampleError: a value does not match the code.
    """
    context: dict[str, Any] = {}
    for n, value in enumerate(example.values, 1):
        try:
            CHECKS[example.kind](value, context)
        except ExampleError as exc:
            raise ExampleError(f"line {example.line}, {example.kind} value {n}: {exc}") from None
        except (KeyError, TypeError) as exc:  # a value of the wrong shape for its kind
            raise ExampleError(f"line {example.line}, {example.kind} value {n}: {exc!r}") from None


def check_document(markdown: str) -> list[Example]:
    """Check every example of a document; all failures are reported at once.

    Raises:
        ExampleError: one or more examples do not match the code.
    """
    found = examples(markdown)
    failures = []
    for example in found:
        try:
            check_example(example)
        except ExampleError as exc:
            failures.append(str(exc))
    expect(not failures, "\n".join(failures))
    return found


def message_tags(union: Any) -> set[str]:
    """The ``type`` tags of a tagged union of Structs."""
    return {cls.__struct_config__.tag for cls in typing.get_args(union)}


# ---- the document -----------------------------------------------------------------


def test_every_example_matches_the_code() -> None:
    """Every json block of docs/protocol.md names its kind and matches the code."""
    found = check_document(PROTOCOL_MD.read_text())
    assert {e.kind for e in found} == set(CHECKS), "every kind of example is shown"


def test_every_message_has_an_example() -> None:
    """Each client, server and live relay message the code defines is shown at least once."""
    shown: dict[str, set[str]] = {"client": set(), "server": set(), "live": set()}
    for example in examples(PROTOCOL_MD.read_text()):
        if example.kind in shown:
            shown[example.kind].update(v["type"] for v in example.values)
    assert shown["client"] == message_tags(ClientMessage)
    assert shown["server"] == message_tags(ServerMessage)
    assert shown["live"] == message_tags(LiveMessage)


def test_sections_keep_v1_numbering() -> None:
    """Sections 1-7 keep PROTOCOL.md v1's titles, so a v1 reader finds each one."""
    titles = re.findall(r"^## (\d+)\. (.+)$", PROTOCOL_MD.read_text(), re.MULTILINE)
    assert titles[1:8] == [
        ("1", "Connection"),
        ("2", "Client -> server"),
        ("3", "Server -> client"),
        ("4", "Delivery guarantee"),
        ("5", "Customer authentication"),
        ("6", "Sessions"),
        ("7", "Redis layout (the contract for readers)"),
    ]
    assert [int(n) for n, _ in titles] == list(range(len(titles))), "numbered in order"


# ---- the checker can fail ---------------------------------------------------------

EVENT = (
    '"site": "shop", "uuid": "u-1", "session": "s-1", "producer": "p-12345678", "seq": 1, '
    '"action": "cart.add", "label": "cart.add", "time": 1, "received": 1, "params": {}'
)

BAD_DOCUMENTS: Final = {
    "untagged block": ('```json\n{"type": "ack"}\n```', "must name one kind"),
    "unknown kind": ("```json bogus\n{}\n```", "must name one kind"),
    "two kinds": ("```json client server\n{}\n```", "must name one kind"),
    "not JSON": ("```json client\n{type: hello}\n```", "not JSON"),
    "misspelt required field in a stored event": (
        "```json stored-event\n{" + EVENT.replace('"session"', '"sesion"') + "}\n```",
        "does not decode as a stored event",
    ),
    "misspelt optional field in a stored event": (
        "```json stored-event\n{" + EVENT + ', "authenticatd": true}\n```',
        "not as written",
    ),
    "a field the server omits": (
        "```json stored-event\n{" + EVENT + ', "authenticated": false}\n```',
        "not as written",
    ),
    "a server-made event with the wrong label": (
        "```json stored-event\n{"
        + EVENT.replace('"p-12345678"', '"srv:s-1"').replace('"cart.add"', '"session.end"', 1)
        + "}\n```",
        "label",
    ),
    "misspelt optional field in a hello": (
        '```json client\n{"type": "hello", "uuid": "u-1", "producer": "p-12345678", '
        '"tokn": "t"}\n```',
        "not a field",
    ),
    "producer too short": (
        '```json client\n{"type": "hello", "uuid": "u-1", "producer": "p-1"}\n```',
        "does not decode as a client message",
    ),
    "an ack without its rejected list": (
        '```json server\n{"type": "ack", "seq": 1, "accepted": 1, "duplicate": 0}\n```',
        "not as written",
    ),
    "a reject code the server never sends": (
        '```json server\n{"type": "ack", "seq": 1, "accepted": 0, "duplicate": 0, "rejected": '
        '[{"seq": 1, "code": "nope", "detail": "x"}]}\n```',
        "no reject code",
    ),
    "a nack code the server never sends": (
        '```json server\n{"type": "nack", "seq": 1, "code": "busy", "retry_after_ms": 5}\n```',
        "does not decode as a server message",
    ),
    "a denied event in the rejected stream": (
        '```json rejected-record\n{"site": "shop", "uuid": "u-1", "producer": "p-12345678", '
        '"seq": 3, "code": "denied", "detail": "x", "received": 1, "raw": "{}"}\n```',
        "never recorded",
    ),
    "a live event with p on a site of one partition": (
        '```json live\n{"type": "hello", "site": "shop", "stream": "events", "id": "0-0", '
        '"now": 1, "queue": 10}\n{"type": "event", "id": "1-0", "event": {' + EVENT + '}, "p": 0}'
        "\n```",
        "p is written only",
    ),
    "a cursor of the wrong length": (
        '```json live\n{"type": "hello", "site": "big", "stream": "events", "id": "0-0", '
        '"now": 1, "queue": 10, "partitions": 4}\n```',
        "one id per partition",
    ),
    "a misspelt field inside a relayed event": (
        '```json live\n{"type": "hello", "site": "shop", "stream": "events", "id": "0-0", '
        '"now": 1, "queue": 10}\n{"type": "event", "id": "1-0", "event": {'
        + EVENT.replace('"label"', '"lable"')
        + "}}\n```",
        "does not decode as a stored event",
    ),
    "a misspelt field of /v1/sites": (
        '```json sites\n{"sites": [], "time_basis": "stream id", "stream_maxlen": 1, '
        '"persist_retian": 1.0}\n```',
        "does not decode as /v1/sites",
    ),
    "a tail line without its id": ("```json tail\n{" + EVENT + "}\n```", "carries the stream id"),
}


@pytest.mark.parametrize("name", list(BAD_DOCUMENTS))
def test_checker_refuses(name: str) -> None:
    """A wrong example fails the check, for the reason it is wrong."""
    markdown, why = BAD_DOCUMENTS[name]
    with pytest.raises(ExampleError, match=re.escape(why)):
        check_document("Some text.\n\n" + markdown + "\n")


def test_checker_takes_a_right_document() -> None:
    """The bad documents differ from good ones only by their fault."""
    good = (
        "```json stored-event\n{" + EVENT + "}\n```\n"
        '```sh\necho "not json, not checked"\n```\n'
        '```json client\n{"type": "hello", "uuid": "u-1", "producer": "p-12345678"}\n```\n'
    )
    assert [e.kind for e in check_document(good)] == ["stored-event", "client"]


def iter_fences(markdown: str) -> Iterator[str]:
    """The info strings of a text's fences (for the test below)."""
    for line in markdown.splitlines():
        m = _OPEN_FENCE.match(line)
        if m is not None and m["info"].strip():
            yield m["info"].strip()


def test_no_json_block_escapes_the_parser() -> None:
    """Every fence line of the document naming json is one the checker read."""
    text = PROTOCOL_MD.read_text()
    named = [info for info in iter_fences(text) if info.lower().startswith("json")]
    assert len(named) == len(examples(text)) > 0
