"""Fuzz eventwire's decoders and event rules with random and mutated frames.

Frames come from :class:`Frames`, seeded: valid frames, frames whose fields
hold arbitrary values, valid frames with bytes flipped, inserted, deleted or
cut off, random bytes, and hostile shapes (nesting deeper than the decoder
recurses, bad UTF-8, numbers no reader can hold, MessagePack extension types
and array map keys, NaN, empty and oversized batches, frame-long actions).

In process (the default), each frame goes through what the server does with
it, without a socket: strict decoding, then event by event
(``eventwire.core.protocol``), the rules of every event (``eventwire.core.validation`` with a
site's verdicts from ``eventwire.core.rules``), and the records written for bad
frames. A finding is any other exception, or an answer the protocol does not
allow (a reject code outside docs/protocol.md, a stored event that is not what was
sent, a decoded uuid outside its form, ...).

``--wire`` sends the frames over real WebSocket connections to an eventwire
server (a private ``redis-server`` and ``eventwire serve`` this script starts
on free loopback ports, or ``--url``/``--redis-url``). Each connection says
hello, then sends frames one at a time; a finding is an answer other than the
one the frame calls for (``ack``/``nack`` for a track frame, ``error`` and
close 1007/1008 for a bad one, close 1009 for an oversized one), a close
1011/1006, a server that stops answering, or, at the end, a stream whose
events differ from what the acks promised (each producer's stored events
must be exactly the acked ones, each as it was sent).

Either way it prints the counts of each outcome, the findings (each with its
frame saved under ``--save``) and the memory of the fuzzed process (this
process, or the server's) after warm-up and at the end. Exit code 1 when
anything was found.

usage: scripts/fuzz [-n FRAMES] [-t SECONDS] [--seed N] [--codec json|msgpack|both] [--save DIR]
       scripts/fuzz --wire [--concurrency 4] [--url ws://HOST:PORT --site SITE --redis-url URL]
       scripts/fuzz --replay FILE... [--codec json|msgpack]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import msgspec

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: the server package sits beside scripts/
    sys.path.insert(0, str(ROOT))

from eventwire.core.errors import UndecodableFrame  # noqa: E402
from eventwire.core.protocol import (  # noqa: E402
    JSON_CODEC,
    MAX_SEQ,
    MAX_TIME,
    MSGPACK_CODEC,
    Codec,
    Hello,
    Identify,
    Track,
    WireEvent,
)
from eventwire.core.records import RejectedRecord, StoredEvent, record_encoder  # noqa: E402
from eventwire.core.rules import SiteConfig, SiteRules  # noqa: E402
from eventwire.core.validation import Identity, Limits, Rejected, action_problem, judge_event  # noqa: E402
from eventwire.ingest import undecodable_record  # noqa: E402

#: Reject codes of docs/protocol.md section 3.
REJECT_CODES: Final = frozenset(
    {"invalid", "invalid_action", "missing_param", "too_large", "too_old", "denied", "unauthorized"}
)
#: The customer reference and producer id as docs/protocol.md section 2 words them.
UUID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PRODUCER_RE: Final = re.compile(r"[!-~]{8,64}")
#: The server's defaults (config/eventwire.toml): frames are judged against them.
MAX_BATCH: Final = 500
MAX_FRAME_BYTES: Final = 256 * 1024
LIMITS: Final = Limits(
    max_event_bytes=32 * 1024, max_clock_skew_ms=300_000, max_event_age_ms=7 * 86_400_000
)
#: The site frames are judged for: deny and allow lists, required params,
#: actions that need a proven customer, so every reject code can happen.
SITE_TOML: Final = """
[sites.fuzz]
allow_no_origin = true
deny = ["spam.*", "*.secret"]
authenticated = ["form.submit", "account.*"]
required = { "product.*" = ["sku"], "cart.add" = ["sku", "qty"] }
"""
SITE_CONFIG: Final = msgspec.toml.decode(SITE_TOML.encode())["sites"]["fuzz"]

#: Close codes a bad frame may get (docs/protocol.md section 3).
BAD_FRAME_CLOSES: Final = {1007: "undecodable", 1008: "policy", 1009: "too large"}


def rss_kib(pid: int | None = None) -> int:
    """Resident memory of a process (this one by default), KiB."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return int(time.time() * 1000)


# ---- frames -------------------------------------------------------------------------

#: Bytes that mean something to one of the two grammars (JSON, MessagePack) or to UTF-8.
SPECIAL_BYTES: Final = (
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b"\\",
    b",",
    b":",
    b"\xff",
    b"\xc1",
    b"\xdd",
    b"\x00",
)

GOOD_ACTIONS: Final = (
    "page.visit",
    "product.view",
    "cart.add",
    "form.submit",
    "account.login",
    "spam.bot",
    "user.secret",
    "session.start",
    "a.b",
)
TEXTS: Final = (
    "",
    "x",
    "Home",
    "https://shop.example/p?q=1",
    "é☃𝄞",
    "\x00\x01\x1f",
    "\u2028\u2029",
    "\\",
    '"',
    "a.b",
    " ",
)


class Frames:
    """Random and mutated client frames from one seeded ``random.Random``.

    Args:
        rng: the source of randomness; the same seed gives the same frames.
        exclude: names of shapes never to produce (see :meth:`special`); the
            test suite leaves out the shapes of known, tracked bugs.
    """

    #: The hostile shapes of :meth:`special`.
    SHAPES: Final = (
        "deep_params",
        "deep_unknown",
        "deep_context",
        "bad_utf8",
        "huge_number",
        "nan",
        "empty_batch",
        "over_batch",
        "long_action",
        "msgpack_exotic",
        "duplicate_keys",
        "escapes",
        "oversized",
    )

    def __init__(self, rng: random.Random, exclude: frozenset[str] = frozenset()) -> None:
        self.rng = rng
        self.shapes = [s for s in self.SHAPES if s not in exclude]
        self.exotic = "msgpack_exotic" not in exclude
        self.long_actions = "long_action" not in exclude

    # -- values

    def text(self) -> str:
        """A short string, often one a parser finds awkward."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.5:
            return rng.choice(TEXTS)
        if pick < 0.8:
            return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(0, 24)))
        chars = [rng.randrange(0, 0x110000) for _ in range(rng.randrange(0, 8))]
        return "".join(chr(c) for c in chars if not 0xD800 <= c < 0xE000)

    def scalar(self, msgpack: bool) -> Any:
        """A scalar JSON (or MessagePack) can hold."""
        rng = self.rng
        kind = rng.randrange(12 if msgpack and self.exotic else 9)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.randrange(-1000, 1000)
        if kind == 3:
            return rng.choice([0, -1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1])
        if kind == 4:
            return rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan"), 1e-300])
        if kind in (5, 6, 7):
            return self.text()
        if kind == 8:
            return rng.randbytes(rng.randrange(0, 12)) if msgpack else self.text()
        if kind == 9:
            return msgspec.msgpack.Ext(rng.randrange(0, 128), rng.randbytes(rng.randrange(0, 8)))
        if kind == 10:
            return dt.datetime.fromtimestamp(rng.randrange(0, 2**33), dt.UTC)
        return (rng.randrange(5),)  # only useful as a map key: see key()

    def key(self, msgpack: bool) -> Any:
        """A map key: a string, or in MessagePack also a number, nil or an array."""
        rng = self.rng
        if not msgpack or not self.exotic or rng.random() < 0.7:
            return rng.choice(["url", "title", "sku", "qty", "type", "seq", "events", self.text()])
        return rng.choice([rng.randrange(-5, 5), None, (1, 2), 1.5, b"k"])

    def value(self, msgpack: bool, depth: int = 0) -> Any:
        """An arbitrary value, up to three levels deep."""
        rng = self.rng
        pick = rng.random()
        if depth >= 3 or pick < 0.6:
            out = self.scalar(msgpack)
            return list(out) if isinstance(out, tuple) else out
        if pick < 0.8:
            return [self.value(msgpack, depth + 1) for _ in range(rng.randrange(0, 4))]
        return {self.key(msgpack): self.value(msgpack, depth + 1) for _ in range(rng.randrange(4))}

    def action(self) -> str:
        """An action: mostly well formed, sometimes not."""
        rng = self.rng
        if rng.random() < 0.8:
            return rng.choice(GOOD_ACTIONS)
        return rng.choice(
            ["ab", "nodot", "a..b", ".a", "a.", "a b.c", "x" * 33, "é.b", self.text()]
        )

    def event(self, seq: int) -> dict[str, Any]:
        """A well-formed event (the site's rules may still reject it)."""
        rng = self.rng
        event: dict[str, Any] = {"seq": seq, "action": self.action()}
        params: dict[str, Any] = {}
        for name in ("url", "title", "sku", "qty"):
            if rng.random() < 0.7:
                params[name] = self.text() if rng.random() < 0.8 else self.value(False)
        if rng.random() < 0.9:
            event["params"] = params
        if rng.random() < 0.4:
            event["label"] = self.text()
        if rng.random() < 0.4:
            day = 86_400_000
            event["time"] = now_ms() + rng.choice([-1, 1]) * rng.randrange(0, 10 * day)
        return event

    def valid(self, seq: int) -> dict[str, Any]:
        """A valid track frame of 1-5 events, seqs increasing from ``seq``."""
        return {
            "type": "track",
            "events": [self.event(seq + i) for i in range(self.rng.randrange(1, 6))],
        }

    def hello(self) -> dict[str, Any]:
        """A valid hello."""
        rng = self.rng
        hello: dict[str, Any] = {
            "type": "hello",
            "uuid": f"fz-{rng.getrandbits(32):08x}",
            "producer": f"fz-{rng.getrandbits(64):016x}",
        }
        if rng.random() < 0.3:
            hello["context"] = {"url": self.text(), "title": self.text()}
        return hello

    def fuzz(self, obj: Any, msgpack: bool) -> Any:
        """Change a few fields of a frame: replaced by arbitrary values, dropped or added."""
        rng = self.rng
        for _ in range(rng.randrange(1, 4)):
            spots = list(_containers(obj))
            if not spots:
                return self.value(msgpack)
            box = rng.choice(spots)
            if isinstance(box, dict):
                op = rng.randrange(3)
                if op == 0 and box:
                    box[rng.choice(list(box))] = self.value(msgpack)
                elif op == 1 and box:
                    del box[rng.choice(list(box))]
                else:
                    box[self.key(msgpack)] = self.value(msgpack)
            elif box:
                box[rng.randrange(len(box))] = self.value(msgpack)
            else:
                box.append(self.value(msgpack))
        return obj

    def mutate(self, data: bytes) -> bytes:
        """Flip, insert, delete, duplicate or cut off a few bytes."""
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.randrange(1, 5)):
            at = rng.randrange(len(out) + 1)
            op = rng.randrange(5)
            if op == 0 and at < len(out):
                out[at] ^= 1 << rng.randrange(8)
            elif op == 1:
                out[at:at] = rng.choice([*SPECIAL_BYTES, rng.randbytes(rng.randrange(1, 4))])
            elif op == 2:
                del out[at : at + rng.randrange(1, 5)]
            elif op == 3:
                del out[at:]
            else:
                out[at:at] = out[at : at + rng.randrange(1, 17)]
        return bytes(out)

    def special(self, codec: Codec, seq: int) -> tuple[str, bytes]:
        """One hostile shape, named."""
        rng = self.rng
        shape = rng.choice(self.shapes)
        msgpack = codec.binary
        base = self.valid(seq)
        if shape.startswith("deep_"):
            depth = rng.choice([200, 990, 1000, 3000, 20_000])
            marker = "@@deep@@"
            if shape == "deep_context":
                base = {**self.hello(), "context": {"x": marker}}
            elif shape == "deep_params":
                base["events"][0]["params"] = {"x": marker}
            else:
                base["x"] = marker
            one = _encode(codec, 1)
            deep = (b"\x91" * depth + one) if msgpack else (b"[" * depth + one + b"]" * depth)
            return shape, _encode(codec, base).replace(_encode(codec, marker), deep)
        if shape == "bad_utf8":
            base["events"][0]["label"] = "@@@@"
            bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
            return shape, _encode(codec, base).replace(b"@@@@", bad.ljust(4, b"a"))
        if shape == "huge_number":
            number = rng.choice([2**63, 2**64 - 1, -(2**63) - 1 if not msgpack else -(2**63)])
            if not msgpack:
                number = rng.choice([number, 10**30, -(10**400)])
            event = base["events"][0]
            event[rng.choice(["time", "seq"])] = number
            return shape, _encode(codec, base)
        if shape == "nan":
            if msgpack:
                base["events"][0]["params"] = {"x": float("nan"), "y": float("-inf")}
                return shape, _encode(codec, base)
            base["events"][0]["params"] = {"x": 7777777}
            lit = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0"])
            return shape, _encode(codec, base).replace(b"7777777", lit)
        if shape == "empty_batch":
            return shape, _encode(codec, {"type": "track", "events": []})
        if shape == "over_batch":
            n = MAX_BATCH + 1
            return shape, _encode(
                codec,
                {"type": "track", "events": [{"seq": seq + i, "action": "a.b"} for i in range(n)]},
            )
        if shape == "long_action":
            base["events"][0]["action"] = f"{rng.getrandbits(64):x}." + "a" * rng.randrange(
                40, 100_000
            )
            return shape, _encode(codec, base)
        if shape == "msgpack_exotic" and msgpack:
            event = base["events"][0]
            event["params"] = {
                "x": rng.choice([msgspec.msgpack.Ext(1, b"z"), {(1, 2): 3}, {None: 1}])
            }
            if rng.random() < 0.5:
                event["action"] = "bad"
            return shape, _encode(codec, base)
        if shape == "duplicate_keys":
            if msgpack:
                return shape, b"\x83\xa4type\xa5track\xa4type\xa5hello\xa6events" + _encode(
                    codec, base["events"]
                )
            return shape, b'{"type":"track","type":"hello","events":' + _encode(
                codec, base["events"]
            ) + b"}"
        if shape == "escapes":
            base["events"][0]["label"] = '\x00\\"\u2028' * rng.randrange(1, 64)
            return shape, _encode(codec, base)
        if shape == "oversized":
            base["events"][0]["params"] = {"blob": "y" * (MAX_FRAME_BYTES + rng.randrange(1, 4096))}
            return shape, _encode(codec, base)
        return "valid", _encode(codec, base)

    def frame(self, codec: Codec, seq: int) -> tuple[str, bytes]:
        """One frame to send after the hello: its kind and its bytes."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.15:
            return "valid", _encode(codec, self.valid(seq))
        if pick < 0.5:
            obj = self.fuzz(self.valid(seq), codec.binary)
            try:
                return "fields", _encode(codec, obj)
            except (TypeError, ValueError, OverflowError):  # e.g. a nil map key in JSON
                return "valid", _encode(codec, self.valid(seq))
        if pick < 0.8:
            return "bytes", self.mutate(_encode(codec, self.valid(seq)))
        if pick < 0.9:
            return "random", rng.randbytes(rng.randrange(0, 64))
        return self.special(codec, seq)

    def first(self, codec: Codec) -> tuple[str, bytes]:
        """A first frame: mostly a valid hello, sometimes a mutated or fuzzed one."""
        rng = self.rng
        hello = self.hello()
        pick = rng.random()
        if pick < 0.85:
            return "hello", _encode(codec, hello)
        if pick < 0.88:
            # $ in a pattern matches before a trailing newline: the ids must not.
            hello[rng.choice(["uuid", "producer"])] += rng.choice(["\n", "\r\n", " "])
            return "newline", _encode(codec, hello)
        if pick < 0.93:
            return "bytes", self.mutate(_encode(codec, hello))
        try:
            return "fields", _encode(codec, self.fuzz(hello, codec.binary))
        except (TypeError, ValueError, OverflowError):
            return "hello", _encode(codec, hello)


def _containers(obj: Any) -> Iterator[dict[Any, Any] | list[Any]]:
    if isinstance(obj, dict | list):
        yield obj
        for child in obj.values() if isinstance(obj, dict) else obj:
            yield from _containers(child)


def _encode(codec: Codec, obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj) if codec.binary else msgspec.json.encode(obj)


# ---- the oracle: what the server must make of a frame --------------------------------


class Finding(Exception):
    """A frame got an outcome the protocol does not allow."""


@dataclass
class Judged:
    """What the server must answer to one frame after the hello.

    ``answer`` is ``ack`` (a track frame; ``events`` are the decodable ones,
    ``rejected`` the seqs whose events do not decode), ``none`` (identify), or
    the error code the connection closes with (``undecodable``: 1007,
    ``bad_message``: 1008).
    """

    answer: str
    events: list[WireEvent] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    detail: str = ""


def judge_frame(codec: Codec, data: bytes, max_batch: int = MAX_BATCH) -> Judged:
    """Decode one frame after the hello as ``ingest`` does.

    Raises:
        Finding: the decoders raised something else than their documented errors.
    """
    try:
        try:
            msg: Any = codec.decode(data)
        except msgspec.ValidationError:
            msg = codec.split_track(data)
    except UndecodableFrame as exc:
        if not exc.detail or exc.close_code != 1007:
            raise Finding(
                f"UndecodableFrame without a detail or with close {exc.close_code}"
            ) from None
        return Judged("undecodable", detail=exc.detail)
    except Exception as exc:
        raise Finding(f"decoding raised {type(exc).__name__}: {exc}") from exc
    if isinstance(msg, Hello):
        return Judged("bad_message")
    if isinstance(msg, Identify):
        if not UUID_RE.fullmatch(msg.uuid):
            raise Finding(f"identify decoded with uuid {msg.uuid!r}, outside its form")
        return Judged("none")
    events = msg.events if isinstance(msg, Track) else msg
    if not isinstance(events, list):
        raise Finding(f"decoding returned {type(msg).__name__}")
    if not 1 <= len(events) <= max_batch:
        return Judged("undecodable", detail=f"track holds {len(events)} events")
    judged = Judged("ack")
    for event in events:
        if isinstance(event, WireEvent):
            judged.events.append(event)
            continue
        seq, detail, _raw = event
        if not 1 <= seq <= MAX_SEQ or "$.events[" not in detail:
            raise Finding(f"an undecodable event came back as seq {seq}, detail {detail!r}")
        judged.rejected.append(seq)
    return judged


def check_hello(codec: Codec, data: bytes) -> str:
    """Decode a first frame as ``ingest.hello`` does; returns the outcome's name.

    Raises:
        Finding: an exception the decoders do not document, or a hello outside the protocol.
    """
    try:
        msg = codec.decode(data)
    except msgspec.ValidationError:
        return "bad_hello"
    except UndecodableFrame:
        return "undecodable"
    except Exception as exc:
        raise Finding(f"decoding a hello raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(msg, Hello):
        return "bad_hello"
    if not UUID_RE.fullmatch(msg.uuid) or not PRODUCER_RE.fullmatch(msg.producer):
        raise Finding(f"hello decoded with uuid {msg.uuid!r}, producer {msg.producer!r}")
    try:
        record_encoder.encode(msg.context)  # session.start carries it as JSON
    except Exception as exc:
        raise Finding(f"a decoded hello's context has no JSON form: {exc}") from exc
    return "welcome"


def check_stored(raw: bytes, event: WireEvent, who: Identity, received: int) -> None:
    """An accepted event's JSON is what was sent, as docs/protocol.md section 7 stores it.

    Raises:
        Finding: it is not.
    """
    try:
        stored = msgspec.json.decode(raw, type=StoredEvent)
    except msgspec.DecodeError as exc:
        raise Finding(f"a stored event does not decode: {exc}") from None
    problems = []
    if len(raw) > LIMITS.max_event_bytes:
        problems.append(f"{len(raw)} bytes stored")
    if (stored.seq, stored.action, stored.producer) != (event.seq, event.action, who.producer):
        problems.append("seq, action or producer differ")
    if action_problem(stored.action) is not None:
        problems.append(f"action {stored.action!r} stored")
    if event.label is not None and stored.label != event.label:
        problems.append("label differs")
    if stored.params != msgspec.json.decode(record_encoder.encode(event.params or {})):
        problems.append("params differ")
    limit = received + LIMITS.max_clock_skew_ms
    if event.time is not None and event.time <= limit and stored.time != event.time:
        problems.append("time differs")
    if not received - LIMITS.max_event_age_ms <= stored.time <= limit:
        problems.append(f"time {stored.time} stored")
    if stored.original_time is not None and not -MAX_TIME <= stored.original_time <= MAX_TIME:
        problems.append(f"original_time {stored.original_time} stored: readers cannot hold it")
    if problems:
        raise Finding("stored event: " + "; ".join(problems))


def check_frame(codec: Codec, data: bytes, rules: SiteRules, who: Identity) -> list[str]:
    """Everything the server does with a frame after the hello, without a socket.

    Returns:
        The outcomes' names (``undecodable``, ``accepted``, ``reject:CODE``, ...).

    Raises:
        Finding: an outcome the protocol does not allow.
    """
    judged = judge_frame(codec, data)
    received = now_ms()
    if judged.answer == "undecodable":
        try:
            record = msgspec.json.decode(
                undecodable_record("fuzz", who, judged.detail, data, received), type=RejectedRecord
            )
        except Exception as exc:
            raise Finding(f"the rejected record of an undecodable frame: {exc}") from exc
        if record.code != "undecodable":
            raise Finding(f"undecodable frame recorded as {record.code}")
        return ["undecodable"]
    if judged.answer != "ack":
        return [judged.answer]
    out = ["reject:invalid"] * len(judged.rejected)
    for event in judged.events:
        try:
            result = judge_event(event, who, received, LIMITS, rules.verdict)
        except Exception as exc:
            raise Finding(f"judge_event raised {type(exc).__name__}: {exc}") from exc
        if isinstance(result, Rejected):
            if result.code not in REJECT_CODES or not result.detail:
                raise Finding(f"rejected with code {result.code!r}, detail {result.detail!r}")
            out.append(f"reject:{result.code}")
        else:
            check_stored(result, event, who, received)
            out.append("accepted")
    return out


# ---- running ------------------------------------------------------------------------


@dataclass
class Report:
    """Counts, findings and memory of one run."""

    frames: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    findings: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    rss: list[tuple[str, int]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def find(self, what: str, codec: Codec, data: bytes) -> None:
        """Note a finding; one frame is kept for each message (numbers aside)."""
        key = re.sub(r"0x[0-9a-fA-F]+|\d+", "#", what)[:80]
        if key not in self.findings:
            self.findings[key] = (what, codec.name, data)

    def print(self, save: Path | None) -> None:
        """Print the summary; save each finding's frame under ``save``."""
        took = time.monotonic() - self.started
        print(f"frames: {self.frames} in {took:.1f} s ({self.frames / max(took, 1e-9):,.0f}/s)")
        print("kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())))
        print("outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items())))
        if self.rss:
            print("rss: " + ", ".join(f"{when} {kib / 1024:.1f} MiB" for when, kib in self.rss))
        print(f"findings: {len(self.findings)}")
        for i, (_key, (what, codec, data)) in enumerate(sorted(self.findings.items())):
            line = f"  {what} [{codec}, {len(data)} bytes]"
            if save is not None:
                save.mkdir(parents=True, exist_ok=True)
                name = f"finding-{i}.{'msgpack' if codec.endswith('msgpack') else 'json'}"
                (save / name).write_bytes(data)
                line += f" -> {save / name}"
            print(line)


def codecs_for(name: str) -> list[Codec]:
    """The codecs of ``--codec``."""
    return {"json": [JSON_CODEC], "msgpack": [MSGPACK_CODEC], "both": [JSON_CODEC, MSGPACK_CODEC]}[
        name
    ]


def run_in_process(args: argparse.Namespace, report: Report) -> None:
    """Fuzz the decoders and rules in this process."""
    rng = random.Random(args.seed)
    frames = Frames(rng, args.exclude)
    rules = SiteRules("fuzz", msgspec.convert(SITE_CONFIG, SiteConfig))
    codecs = codecs_for(args.codec)
    deadline = time.monotonic() + args.seconds if args.seconds else None
    warm = max(1, args.frames // 10) if args.frames else 1000
    report.rss.append(("start", rss_kib()))
    seq = 1
    while (args.frames is None or report.frames < args.frames) and (
        deadline is None or time.monotonic() < deadline
    ):
        codec = rng.choice(codecs)
        who = Identity(
            site="fuzz",
            uuid="fz-1",
            session="s-1",
            producer="fz-producer",
            authenticated=rng.random() < 0.5,
        )
        if rng.random() < 0.1:
            kind, data = frames.first(codec)
            report.kinds["hello:" + kind] += 1
            try:
                report.outcomes["hello:" + check_hello(codec, data)] += 1
            except Finding as exc:
                report.find(str(exc), codec, data)
        else:
            kind, data = frames.frame(codec, seq)
            report.kinds[kind] += 1
            try:
                report.outcomes.update(check_frame(codec, data, rules, who))
            except Finding as exc:
                report.find(str(exc), codec, data)
        seq += 5
        report.frames += 1
        if report.frames == warm:
            report.rss.append((f"after {warm} frames", rss_kib()))
    report.rss.append(("end", rss_kib()))


# ---- over the wire ------------------------------------------------------------------------


@dataclass
class WireLedger:
    """What the server told the fuzzer: acked events per producer."""

    accepted: Counter[str] = field(default_factory=Counter)
    #: Every event sent in an acked frame, by (producer, seq): one of them is stored.
    sent: dict[tuple[str, int], list[WireEvent]] = field(default_factory=dict)
    producers: set[str] = field(default_factory=set)


class WireFuzzer:
    """Sends random and mutated frames over WebSocket connections and checks each answer.

    Args:
        url: the server's base URL (``ws://HOST:PORT``).
        site: the site to track.
        frames: where frames come from.
        report: where outcomes and findings go.
        answer_timeout: how long an answer may take before it counts as a finding.
    """

    def __init__(
        self, url: str, site: str, frames: Frames, report: Report, answer_timeout: float = 10
    ) -> None:
        self.url = url
        self.site = site
        self.frames = frames
        self.report = report
        self.answer_timeout = answer_timeout
        self.ledger = WireLedger()
        self.connections = 0

    async def run(
        self,
        frames: int | None,
        seconds: float | None,
        concurrency: int,
        on_frame: Callable[[int], None] | None = None,
    ) -> None:
        """Send ``frames`` frames (or for ``seconds``), ``concurrency`` connections at a time."""
        deadline = time.monotonic() + seconds if seconds else None

        def more() -> bool:
            return (frames is None or self.report.frames < frames) and (
                deadline is None or time.monotonic() < deadline
            )

        async def worker() -> None:
            while more():
                await self.connection(more, on_frame)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def connection(
        self, more: Callable[[], bool], on_frame: Callable[[int], None] | None
    ) -> None:
        """One connection: a hello, then frames one at a time until it closes or has sent enough."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed
        from websockets.typing import Subprotocol

        rng = self.frames.rng
        report = self.report
        codec = rng.choice([JSON_CODEC, MSGPACK_CODEC])
        self.connections += 1
        async with connect(
            f"{self.url}/v1/track/{self.site}",
            subprotocols=[Subprotocol(codec.name)],
            compression=None,
            proxy=None,
            open_timeout=self.answer_timeout,
            max_size=None,
        ) as ws:
            kind, data = self.frames.first(codec)
            report.kinds["hello:" + kind] += 1
            report.frames += 1
            expect = check_hello(codec, data)
            await ws.send(data, text=not codec.binary)
            answer = await self._answer(ws, codec, data)
            if answer is None:
                return
            got = answer.get("type")
            if expect == "welcome" and got != "welcome":
                report.find(f"a valid hello got {_brief(answer)}", codec, data)
            if expect != "welcome":
                if got != "error" or answer.get("code") != expect:
                    report.find(f"a hello judged {expect} got {_brief(answer)}", codec, data)
                await self._closed(ws, codec, data, answer, {1007, 1008})
                return
            report.outcomes["welcome"] += 1
            hello = codec.decode(data)
            assert isinstance(hello, Hello)
            producer = hello.producer
            self.ledger.producers.add(producer)
            seq = int(answer["acked"]) + 1
            for _ in range(rng.randrange(1, 40)):
                if not more():
                    break
                kind, data = self.frames.frame(codec, seq)
                seq += 6
                report.kinds[kind] += 1
                report.frames += 1
                if on_frame is not None:
                    on_frame(report.frames)
                if len(data) > MAX_FRAME_BYTES:
                    await ws.send(data, text=not codec.binary)
                    await self._closed(ws, codec, data, None, {1009})
                    return
                try:
                    judged = judge_frame(codec, data)
                except Finding as exc:
                    report.find(str(exc), codec, data)
                    judged = Judged("unknown")
                # Text frames for JSON, binary for MessagePack; sometimes the other
                # kind: the server reads the bytes either way.
                text = (not codec.binary) != (rng.random() < 0.05)
                try:
                    await ws.send(data, text=text)
                except ConnectionClosed:
                    report.find("the server closed while a frame was sent", codec, data)
                    return
                if judged.answer == "none":
                    report.outcomes["identify"] += 1
                    continue
                answer = await self._answer(ws, codec, data)
                if answer is None:
                    return
                got = answer.get("type")
                if judged.answer == "ack" and got in ("ack", "nack"):
                    self._tally(producer, judged, answer, codec, data)
                    # Fuzzed seqs may jump ahead; later valid events go above them.
                    if got == "ack" and answer["seq"] < MAX_SEQ // 2:
                        seq = max(seq, answer["seq"] + 1)
                    continue
                if got != "error" or judged.answer not in (answer.get("code"), "unknown"):
                    report.find(f"a frame judged {judged.answer} got {_brief(answer)}", codec, data)
                await self._closed(ws, codec, data, answer, {1007, 1008})
                return

    def _tally(
        self, producer: str, judged: Judged, answer: dict[str, Any], codec: Codec, data: bytes
    ) -> None:
        report = self.report
        if answer["type"] == "nack":
            report.outcomes[f"nack:{answer.get('code')}"] += 1
            return
        seqs = [e.seq for e in judged.events] + judged.rejected
        rejected = answer.get("rejected", [])
        codes = [r.get("code") for r in rejected]
        report.outcomes["ack"] += 1
        report.outcomes["accepted"] += answer["accepted"]
        report.outcomes["duplicate"] += answer["duplicate"]
        report.outcomes.update(f"reject:{c}" for c in codes)
        if answer["seq"] != max(seqs) or answer["accepted"] + answer["duplicate"] + len(
            rejected
        ) != len(seqs):
            report.find(
                f"ack {_brief(answer)} does not count the frame's {len(seqs)} events", codec, data
            )
        if any(c not in REJECT_CODES for c in codes):
            report.find(f"ack with codes outside docs/protocol.md: {codes}", codec, data)
        self.ledger.accepted[producer] += answer["accepted"]
        for event in judged.events:
            self.ledger.sent.setdefault((producer, event.seq), []).append(event)

    async def _answer(self, ws: Any, codec: Codec, data: bytes) -> dict[str, Any] | None:
        """The next message; None (after noting why) when the connection closed without one."""
        from websockets.exceptions import ConnectionClosed

        try:
            raw = await asyncio.wait_for(ws.recv(), self.answer_timeout)
        except TimeoutError:
            self.report.find(f"no answer within {self.answer_timeout:g} s", codec, data)
            return None
        except ConnectionClosed:
            await self._closed(ws, codec, data, None, set())
            return None
        try:
            msg = codec.decode_server(raw if isinstance(raw, bytes) else raw.encode())
        except msgspec.DecodeError as exc:
            self.report.find(f"the server sent a message that does not decode: {exc}", codec, data)
            return None
        answer: dict[str, Any] = msgspec.to_builtins(msg)
        return answer

    async def _closed(
        self, ws: Any, codec: Codec, data: bytes, error: dict[str, Any] | None, allowed: set[int]
    ) -> None:
        """Wait for the close; note a finding unless its code is allowed here."""
        try:
            await asyncio.wait_for(ws.wait_closed(), self.answer_timeout)
        except TimeoutError:
            self.report.find("the server did not close after an error", codec, data)
            return
        code = ws.close_code
        self.report.outcomes[f"close:{code}" + (f":{error['code']}" if error else "")] += 1
        if code not in allowed:
            what = f"close {code} {ws.close_reason!r}" + (
                f" after {_brief(error)}" if error else ""
            )
            self.report.find(what, codec, data)

    async def verify(self, redis_url: str) -> None:
        """Check the stream against the acks: each producer's acked events, each as sent."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        Entries = list[tuple[bytes, dict[bytes, bytes]]]
        try:
            entries = cast(Entries, await client.xrange(f"ew:{{{self.site}}}:events"))
            rejected = cast(Entries, await client.xrange(f"ew:{{{self.site}}}:rejected"))
        finally:
            await client.aclose()
        stored: Counter[str] = Counter()
        seen: set[tuple[str, int]] = set()
        for _id, fields in entries:
            event = msgspec.json.decode(fields[b"event"], type=StoredEvent)
            if event.producer not in self.ledger.producers:
                continue
            key = (event.producer, event.seq)
            stored[event.producer] += 1
            if key in seen:
                self.report.find(f"seq {event.seq} stored twice", JSON_CODEC, fields[b"event"])
            seen.add(key)
            candidates = self.ledger.sent.get(key, [])
            if event.action == "page.visit":
                # The server's own addition (docs/protocol.md section 18), not the client's.
                event.params.pop("source", None)
            as_sent = any(
                (c.action, msgspec.json.decode(record_encoder.encode(c.params or {})))
                == (event.action, event.params)
                and (c.label is None or c.label == event.label)
                for c in candidates
            )
            if not as_sent:
                self.report.find(
                    "a stored event is not one that was sent", JSON_CODEC, fields[b"event"]
                )
        for producer in self.ledger.producers:
            if stored[producer] != self.ledger.accepted[producer]:
                self.report.find(
                    f"acks promised {self.ledger.accepted[producer]} events of a producer, "
                    f"the stream holds {stored[producer]}",
                    JSON_CODEC,
                    producer.encode(),
                )
        for _id, fields in rejected:
            try:
                msgspec.json.decode(fields[b"event"], type=RejectedRecord)
            except msgspec.DecodeError as exc:
                self.report.find(
                    f"a rejected record does not decode: {exc}", JSON_CODEC, fields[b"event"]
                )
        self.report.outcomes["stored"] = sum(stored.values())


def _brief(msg: dict[str, Any] | None) -> str:
    if msg is None:
        return "nothing"
    return json.dumps({k: msg[k] for k in ("type", "code") if k in msg})


async def run_wire(args: argparse.Namespace, report: Report) -> None:
    """Fuzz a server over WebSocket: a private one, or ``--url``."""
    from tests.procs import RedisProcess, ServerProcess

    redis_proc = server = None
    url, redis_url, site = args.url, args.redis_url, args.site
    pid: int | None = None
    try:
        if url is None:
            redis_proc = await asyncio.to_thread(RedisProcess().start)
            sites = Path(tempfile.mkdtemp(prefix="ew-fuzz-")) / "sites.toml"
            sites.write_text(SITE_TOML)
            server = await asyncio.to_thread(ServerProcess(redis_proc.url, sites).start)
            assert server.proc is not None
            url, redis_url, site, pid = (
                f"ws://127.0.0.1:{server.port}",
                redis_proc.url,
                "fuzz",
                server.proc.pid,
            )
            print(f"server pid {pid} at {url}, redis {redis_url}")
        fuzzer = WireFuzzer(url, site, Frames(random.Random(args.seed), args.exclude), report)
        warm = max(1, (args.frames or 2000) // 10)

        def on_frame(n: int) -> None:
            if pid is not None and n >= warm and len(report.rss) == 1:
                report.rss.append((f"server after {n} frames", rss_kib(pid)))

        if pid is not None:
            report.rss.append(("server start", rss_kib(pid)))
        await fuzzer.run(args.frames, args.seconds, args.concurrency, on_frame)
        if pid is not None:
            report.rss.append(("server end", rss_kib(pid)))
        report.outcomes["connections"] = fuzzer.connections
        if redis_url is not None:
            await fuzzer.verify(redis_url)
        await fresh_client(url, site, report)
    finally:
        if server is not None:
            code = await asyncio.to_thread(server.terminate)
            if code != 0:
                report.find(f"the server exited with {code} on SIGTERM", JSON_CODEC, b"")
        if redis_proc is not None:
            await asyncio.to_thread(redis_proc.stop)


async def fresh_client(url: str, site: str, report: Report) -> None:
    """A well-behaved client still gets a welcome and an ack after the fuzzing."""
    from websockets.asyncio.client import connect

    async with connect(f"{url}/v1/track/{site}", proxy=None, compression=None) as ws:
        await ws.send(
            json.dumps({"type": "hello", "uuid": "after-fuzz", "producer": "after-fuzz-1"})
        )
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        event = {"seq": welcome["acked"] + 1, "action": "product.view", "params": {"sku": "A"}}
        await ws.send(json.dumps({"type": "track", "events": [event]}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if ack.get("type") != "ack" or ack.get("accepted") != 1:
        report.find(f"a fresh client after the fuzzing got {ack}", JSON_CODEC, b"")
    else:
        report.outcomes["fresh_client_ok"] += 1


def replay(args: argparse.Namespace, report: Report) -> None:
    """Run saved frames through the in-process checks."""
    rules = SiteRules("fuzz", msgspec.convert(SITE_CONFIG, SiteConfig))
    who = Identity(site="fuzz", uuid="fz-1", session="s-1", producer="fz-producer")
    for path in args.replay:
        codec = MSGPACK_CODEC if path.suffix == ".msgpack" else codecs_for(args.codec)[0]
        data = path.read_bytes()
        report.frames += 1
        try:
            report.outcomes["hello:" + check_hello(codec, data)] += 1
            report.outcomes.update(check_frame(codec, data, rules, who))
        except Finding as exc:
            report.find(str(exc), codec, data)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, fuzz, print the report; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="scripts/fuzz", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("-n", "--frames", type=int, help="frames to send (default 10000)")
    parser.add_argument("-t", "--seconds", type=float, help="stop after this long")
    parser.add_argument("--seed", type=int, help="random seed (printed when not given)")
    parser.add_argument("--codec", choices=["json", "msgpack", "both"], default="both")
    parser.add_argument("--save", type=Path, default=Path(tempfile.gettempdir()) / "eventwire-fuzz")
    parser.add_argument("--wire", action="store_true", help="fuzz a server over WebSocket")
    parser.add_argument("--concurrency", type=int, default=4, help="--wire: connections at once")
    parser.add_argument("--url", help="--wire: a running server, ws://HOST:PORT")
    parser.add_argument("--site", default="fuzz", help="--wire --url: the site to track")
    parser.add_argument("--redis-url", help="--wire --url: its Redis, to verify the stream")
    parser.add_argument("--replay", type=Path, nargs="+", help="check saved frames")
    parser.add_argument(
        "--exclude",
        type=lambda v: frozenset(x for x in v.split(",") if x),
        default=frozenset(),
        help=f"shapes never to send, comma-separated ({', '.join(Frames.SHAPES)})",
    )
    args = parser.parse_args(argv)
    unknown = args.exclude - set(Frames.SHAPES)
    if unknown:
        parser.error(f"--exclude: no shape {', '.join(sorted(unknown))}")
    if args.frames is None and args.seconds is None:
        args.frames = 10_000
    if args.seed is None:
        args.seed = random.randrange(2**32)
    report = Report()
    if args.replay:
        replay(args, report)
    elif args.wire:
        print(f"seed {args.seed}")
        asyncio.run(run_wire(args, report))
    else:
        print(f"seed {args.seed}")
        run_in_process(args, report)
    report.print(args.save)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
