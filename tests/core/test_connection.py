"""eventwire.core.connection: every answer of the protocol, without a socket, Redis or loop.

Each test feeds a :class:`Connection` frames, store and session results and
the time, and checks the commands it returns, as the driver (``ingest``)
would carry them out.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest

from eventwire.core.auth import LEEWAY
from eventwire.core.commands import (
    Close,
    Command,
    LeaveSession,
    OpenSession,
    RecordUndecodable,
    ResubmitFrame,
    Send,
    SubmitFrame,
    SwitchCustomer,
)
from eventwire.core.config import Settings
from eventwire.core.connection import Connection, Counts, close_reason
from eventwire.core.frames import COUNT_ONLY, EVENT, REJECT, REJECT_ALWAYS
from eventwire.core.protocol import JSON_CODEC, MSGPACK_CODEC
from eventwire.core.records import RejectedRecord, StoredEvent
from eventwire.core.rules import SiteConfig, SiteRules, SitesBook
from eventwire.core.visitor import Visitor
from tests.keys import SECRET, SECRET_ENV, token

#: The receive time of every frame unless a test moves it.
NOW = 1_764_160_000_000
DAY_MS = 86_400_000
SETTINGS = Settings(max_batch=5, max_inflight_frames=3, retry_after_ms=70)
KEYS = [{"alg": "HS256", "secret_env": SECRET_ENV}]
SITES: dict[str, dict[str, Any]] = {
    "app": {"allow_no_origin": True},
    "shop": {
        "allow_no_origin": True,
        "allow": ["page.*", "product.*", "form.submit", "client.*", "session.*"],
        "deny": ["product.secret"],
        "required": {"product.*": ["sku"]},
        "keys": KEYS,
    },
    "vault": {"allow_no_origin": True, "auth": "token", "keys": KEYS},
    "slow": {
        "allow_no_origin": True,
        "rate": {"events_per_second": 50, "burst": 10, "close_after": 0.4},
    },
}


def sites_book() -> SitesBook:
    """The test sites, compiled (the HS256 secret given as their environment)."""
    env = {SECRET_ENV: SECRET}
    return SitesBook(
        None,
        {
            name: SiteRules(name, msgspec.convert(cfg, SiteConfig), env=env)
            for name, cfg in SITES.items()
        },
    )


def connection(site: str = "app", settings: Settings = SETTINGS) -> Connection:
    """A connection of ``site`` that has received nothing yet."""
    return Connection(sites_book(), site, settings, JSON_CODEC, Counts())


def frame(msg: Any) -> bytes:
    """One client frame of the JSON subprotocol (a dict as JSON; str and bytes as they are)."""
    if isinstance(msg, bytes):
        return msg
    return (msg if isinstance(msg, str) else json.dumps(msg)).encode()


def hello(uuid: str = "u-1", producer: str = "p-12345678", **extra: Any) -> bytes:
    """A hello frame."""
    return frame({"type": "hello", "uuid": uuid, "producer": producer, **extra})


def track(*events: dict[str, Any]) -> bytes:
    """A track frame of ``events``."""
    return frame({"type": "track", "events": list(events)})


def ev(seq: int, action: str = "product.view", **fields: Any) -> dict[str, Any]:
    """A wire event with a sku param."""
    return {"seq": seq, "action": action, "params": {"sku": f"S{seq}"}, **fields}


def message(command: Command) -> dict[str, Any]:
    """The message a Send command carries, decoded."""
    assert isinstance(command, Send), command
    out: dict[str, Any] = json.loads(command.data)
    return out


def messages(commands: list[Command]) -> list[dict[str, Any]]:
    """Every message the commands send, decoded, in order."""
    return [message(c) for c in commands if isinstance(c, Send)]


def welcomed(
    site: str = "app",
    uuid: str = "u-1",
    settings: Settings = SETTINGS,
    session: str = "s-1",
    **extra: Any,
) -> Connection:
    """A connection past its hello, in session ``session``."""
    conn = connection(site, settings)
    (open_session,) = conn.receive(hello(uuid, **extra), NOW)
    assert isinstance(open_session, OpenSession)
    (welcome,) = conn.session_opened(session, False, 0, NOW)
    assert message(welcome)["type"] == "welcome"
    return conn


def submitted(conn: Connection, data: bytes, now: int = NOW) -> SubmitFrame:
    """Feed one track frame and return the frame it submits."""
    (command,) = conn.receive(data, now)
    assert isinstance(command, SubmitFrame), command
    return command


def stored_ack(
    conn: Connection, sub: SubmitFrame, added: int, duplicate: int = 0
) -> dict[str, Any]:
    """Report a frame stored and return its ack (the only answer due)."""
    (ack,) = conn.frame_stored(sub, added, duplicate)
    return message(ack)


def closed_with(commands: list[Command], code: int, error: str | None) -> dict[str, Any] | None:
    """Assert the commands end with (error and) a close of ``code``; returns the error."""
    close = commands[-1]
    assert isinstance(close, Close), commands
    assert close.code == code
    assert close.error == error
    if error is None:
        return None
    err = message(commands[-2])
    assert err["type"] == "error"
    assert err["code"] == error
    assert close.reason == close_reason(err["detail"])
    assert close.detail == err["detail"]
    return err


def items_of(sub: SubmitFrame) -> list[tuple[int, bytes, bytes]]:
    """A submitted frame's items as (seq, kind, payload) triples."""
    it = sub.items
    return [(it[i], it[i + 1], it[i + 2]) for i in range(0, len(it), 3)]


# ---- hello -> welcome -------------------------------------------------------


def test_hello_opens_the_session_and_welcome_has_every_field() -> None:
    """hello asks for the session; welcome has session, resumed, acked, server_time, max_batch."""
    conn = connection()
    assert not conn.readable
    (command,) = conn.receive(hello("u-1", "p-12345678", context={"url": "https://a/"}), NOW)
    assert command == OpenSession("u-1", "p-12345678", {"url": "https://a/"}, renew=False)
    assert conn.state == "opening"
    assert not conn.readable
    (welcome,) = conn.session_opened("s-9", True, 16, NOW + 5)
    assert message(welcome) == {
        "type": "welcome",
        "session": "s-9",
        "resumed": True,
        "acked": 16,
        "server_time": NOW + 5,
        "max_batch": 5,
    }
    assert conn.readable
    assert conn.who is not None
    assert (conn.who.uuid, conn.who.session, conn.who.producer) == ("u-1", "s-9", "p-12345678")
    assert conn.who.authenticated is False


def test_welcome_in_msgpack() -> None:
    """The MessagePack subprotocol gets the same welcome, as MessagePack."""
    conn = Connection(sites_book(), "app", SETTINGS, MSGPACK_CODEC)
    conn.receive(
        msgspec.msgpack.encode({"type": "hello", "uuid": "u", "producer": "p-12345678"}), NOW
    )
    (welcome,) = conn.session_opened("s-1", False, 0, NOW)
    assert isinstance(welcome, Send)
    assert msgspec.msgpack.decode(welcome.data)["session"] == "s-1"


def test_hello_timeout_closes_1008() -> None:
    """No hello within hello_timeout: error hello_timeout, close 1008."""
    conn = connection()
    err = closed_with(conn.hello_timed_out(), 1008, "hello_timeout")
    assert err is not None
    assert "5 s" in err["detail"]
    assert conn.state == "closed"
    assert conn.hello_timed_out() == []


@pytest.mark.parametrize(
    "first",
    [
        {"type": "hello", "uuid": "has space", "producer": "p-12345678"},
        {"type": "hello", "uuid": "u", "producer": "short"},
        {"type": "track", "events": [{"seq": 1, "action": "a.b"}]},
        {"type": "identify", "uuid": "u-2"},
    ],
)
def test_bad_hello_closes_1008(first: dict[str, Any]) -> None:
    """A first message that is not a valid hello: error bad_hello, close 1008."""
    conn = connection()
    closed_with(conn.receive(frame(first), NOW), 1008, "bad_hello")
    assert conn.state == "closed"


def test_undecodable_hello_is_recorded_and_closes_1007() -> None:
    """A first frame that does not decode is recorded (no uuid yet): error undecodable, 1007."""
    conn = connection()
    commands = conn.receive(b'{"type": "hello", "uu', NOW)
    record = commands[0]
    assert isinstance(record, RecordUndecodable)
    assert record.uuid is None
    stored = msgspec.json.decode(record.record, type=RejectedRecord)
    assert (stored.code, stored.uuid, stored.seq, stored.raw) == (
        "undecodable",
        None,
        None,
        '{"type": "hello", "uu',
    )
    closed_with(commands, 1007, "undecodable")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({}, "no token was given"),
        ({"token": "not-a-jwt"}, "token is not a JWT"),
        ({"token": token("someone-else", "vault")}, "token subject is not this uuid"),
        ({"token": token("u-1", "shop")}, "token audience is not this site"),
    ],
)
def test_token_site_needs_a_valid_token(extra: dict[str, Any], problem: str) -> None:
    """auth = "token": a hello without a valid token gets error unauthorized, close 1008."""
    conn = connection("vault")
    err = closed_with(conn.receive(hello("u-1", **extra), NOW), 1008, "unauthorized")
    assert err is not None
    assert problem in err["detail"]


def test_token_site_with_a_valid_token_is_authenticated() -> None:
    """A valid token opens the session on a token site; the connection is authenticated."""
    conn = welcomed("vault", token=token("u-1", "vault"))
    assert conn.who is not None
    assert conn.who.authenticated is True


def test_session_unavailable_at_hello_closes_1013() -> None:
    """Redis cannot open the session at hello: error unavailable, close 1013."""
    conn = connection()
    conn.receive(hello(), NOW)
    err = closed_with(conn.session_unavailable("redis timed out"), 1013, "unavailable")
    assert err is not None
    assert err["detail"] == "redis timed out"


def test_removed_site_closes_1008() -> None:
    """A site removed from the sites file: its connections' next message closes 1008."""
    conn = welcomed()
    del conn.book.sites["app"]
    err = closed_with(conn.receive(track(ev(1)), NOW), 1008, "unknown_site")
    assert err is not None


def test_second_hello_closes_1008() -> None:
    """A hello after the hello: error bad_message, close 1008."""
    conn = welcomed()
    closed_with(conn.receive(hello(), NOW), 1008, "bad_message")


# ---- track -> ack -----------------------------------------------------------


def test_accepted_events_are_submitted_as_stored_records() -> None:
    """Accepted events become EVENT items holding the section 7 record of the connection."""
    conn = welcomed()
    sub = submitted(conn, track(ev(1, time=NOW - 1000), ev(2, label="Saw")))
    assert (sub.seq, sub.low, sub.uuid, sub.session) == (2, 1, "u-1", "s-1")
    assert sub.rejections == []
    (one, two) = items_of(sub)
    assert (one[0], one[1], two[0], two[1]) == (1, EVENT, 2, EVENT)
    first = msgspec.json.decode(one[2], type=StoredEvent)
    assert (first.site, first.uuid, first.session, first.producer) == (
        "app",
        "u-1",
        "s-1",
        "p-12345678",
    )
    assert (first.seq, first.action, first.label, first.time, first.received) == (
        1,
        "product.view",
        "product.view",
        NOW - 1000,
        NOW,
    )
    assert msgspec.json.decode(two[2], type=StoredEvent).label == "Saw"
    assert conn.frames == 1
    assert conn.tally.frames == 1


def test_ack_fields() -> None:
    """The ack: seq is the frame's highest seq, then accepted, duplicate and the rejections."""
    conn = welcomed()
    sub = submitted(conn, track(ev(3), ev(5, action="nodot"), ev(7)))
    ack = stored_ack(conn, sub, added=1, duplicate=1)
    assert ack == {
        "type": "ack",
        "seq": 7,
        "accepted": 1,
        "duplicate": 1,
        "rejected": [
            {
                "seq": 5,
                "code": "invalid_action",
                "detail": "action 'nodot' must be context.activity: dot-separated words of "
                "letters, digits, '_' or '-'",
            }
        ],
    }
    assert (conn.accepted, conn.duplicate, conn.rejected) == (1, 1, 1)
    assert (conn.tally.accepted, conn.tally.duplicate, conn.tally.rejected) == (1, 1, 1)


def test_each_reject_code() -> None:
    """invalid, invalid_action, missing_param, too_large, too_old: each from a real bad event."""
    conn = welcomed()
    sub = submitted(
        conn,
        track(
            ev(1, action="nodot"),
            {"seq": 2, "action": "page.visit", "params": {"title": "no url"}},
            ev(3, params={"blob": "x" * 40_000}),
            ev(4, time=NOW - 8 * DAY_MS),
            ev(5, label=42),
        ),
    )
    codes = {r.seq: r.code for r in sub.rejections}
    assert codes == {
        1: "invalid_action",
        2: "missing_param",
        3: "too_large",
        4: "too_old",
        5: "invalid",
    }
    label = next(r for r in sub.rejections if r.seq == 5)
    assert "$.events[4].label" in label.detail
    # Every rejection is recorded in the rejected stream, raw cut to 4 KiB.
    for seq, kind, payload in items_of(sub):
        assert kind == REJECT
        record = msgspec.json.decode(payload, type=RejectedRecord)
        assert (record.seq, record.code, record.uuid, record.producer) == (
            seq,
            codes[seq],
            "u-1",
            "p-12345678",
        )
        assert record.received == NOW
        assert len(record.raw) <= 4096


def test_repeated_seq_is_invalid_and_recorded_always() -> None:
    """A seq not above the one before it is rejected invalid and recorded as REJECT_ALWAYS."""
    conn = welcomed()
    sub = submitted(conn, track(ev(4), ev(4), ev(2)))
    assert [(r.seq, r.code) for r in sub.rejections] == [(4, "invalid"), (2, "invalid")]
    assert "is not above the seq before it (4)" in sub.rejections[0].detail
    assert [(s, k) for s, k, _ in items_of(sub)] == [
        (4, EVENT),
        (4, REJECT_ALWAYS),
        (2, REJECT_ALWAYS),
    ]
    assert (sub.seq, sub.low) == (4, 2)


def test_site_rules_denied_and_required() -> None:
    """denied events are counted and stored nowhere; a site's required param is missing_param."""
    conn = welcomed("shop")
    sub = submitted(
        conn,
        track(
            ev(1, action="product.secret"),
            ev(2, action="other.thing"),
            {"seq": 3, "action": "product.view", "params": {}},
            ev(4),
        ),
    )
    assert [(r.seq, r.code) for r in sub.rejections] == [
        (1, "denied"),
        (2, "denied"),
        (3, "missing_param"),
    ]
    assert "product.view requires params.sku" in sub.rejections[2].detail
    assert [(s, k) for s, k, _ in items_of(sub)] == [
        (1, COUNT_ONLY),
        (2, COUNT_ONLY),
        (3, REJECT),
        (4, EVENT),
    ]
    assert items_of(sub)[0][2] == b""
    assert (conn.tally.denied, conn.tally.rejected, conn.rejected) == (2, 1, 1)


def test_unauthorized_names_the_token_problem() -> None:
    """An anonymous form.submit is rejected unauthorized, with why no token proves the customer."""
    conn = welcomed("shop", token="not-a-jwt")
    sub = submitted(conn, track(ev(1, action="form.submit")))
    (rejection,) = sub.rejections
    assert rejection.code == "unauthorized"
    assert rejection.detail == "form.submit needs an authenticated customer; token is not a JWT"


def test_authenticated_event_is_stored_as_authenticated() -> None:
    """A proven customer's form.submit is accepted and its record says authenticated."""
    conn = welcomed("shop", token=token("u-1", "shop"))
    sub = submitted(conn, track(ev(1, action="form.submit")))
    ((_, kind, payload),) = items_of(sub)
    assert kind == EVENT
    assert msgspec.json.decode(payload, type=StoredEvent).authenticated is True


def test_token_expiring_while_connected() -> None:
    """A token counts to the last ms of its leeway; then authenticated actions are unauthorized."""
    exp = int(time.time()) + 60
    conn = welcomed("shop", token=token("u-1", "shop", exp=exp))
    edge = (exp + LEEWAY) * 1000
    assert submitted(conn, track(ev(1, action="form.submit")), edge).rejections == []
    late = submitted(conn, track(ev(2, action="form.submit")), edge + 1)
    (rejection,) = late.rejections
    assert rejection.code == "unauthorized"
    assert "the token expired; send identify with a fresh one" in rejection.detail
    assert conn.who is not None
    assert conn.who.authenticated is False
    # identify with a fresh token for the same customer proves it again, same session.
    assert (
        conn.receive(
            frame({"type": "identify", "uuid": "u-1", "token": token("u-1", "shop")}), edge + 2
        )
        == []
    )
    assert conn.who.session == "s-1"
    assert conn.who.authenticated is True


@pytest.mark.parametrize("events", [[], [ev(i) for i in range(1, 7)]], ids=["none", "over"])
def test_batch_limits_close_1007(events: list[dict[str, Any]]) -> None:
    """A track frame of no events, or more than max_batch: recorded undecodable, close 1007."""
    conn = welcomed()
    commands = conn.receive(track(*events), NOW)
    record = commands[0]
    assert isinstance(record, RecordUndecodable)
    assert record.uuid == "u-1"
    assert "it must hold 1 to 5" in msgspec.json.decode(record.record, type=RejectedRecord).detail
    closed_with(commands, 1007, "undecodable")


def test_undecodable_frame_waits_for_earlier_answers() -> None:
    """An undecodable frame is recorded at once; the error and close 1007 follow the acks due."""
    conn = welcomed()
    sub = submitted(conn, track(ev(1)))
    commands = conn.receive(b'{"type": "track", "events": [{', NOW)
    (record,) = commands
    assert isinstance(record, RecordUndecodable)
    assert (
        msgspec.json.decode(record.record, type=RejectedRecord).raw
        == '{"type": "track", "events": [{'
    )
    assert conn.state == "closing"
    assert not conn.readable
    assert conn.receive(track(ev(2)), NOW) == []  # read meanwhile: never answered
    answers = conn.frame_stored(sub, 1, 0)
    assert message(answers[0])["type"] == "ack"
    closed_with(answers, 1007, "undecodable")


def test_binary_undecodable_frame_is_kept_as_base64() -> None:
    """Undecodable bytes that are not UTF-8 are recorded as base64."""
    conn = Connection(sites_book(), "app", SETTINGS, MSGPACK_CODEC)
    conn.receive(
        msgspec.msgpack.encode({"type": "hello", "uuid": "u", "producer": "p-12345678"}), NOW
    )
    conn.session_opened("s-1", False, 0, NOW)
    record = conn.receive(b"\xc1\xff\x00garbage", NOW)[0]
    assert isinstance(record, RecordUndecodable)
    stored = msgspec.json.decode(record.record, type=RejectedRecord)
    assert stored.raw_base64 is True


# ---- answers in order, in flight, nacks ---------------------------------------


def test_answers_go_in_frame_order() -> None:
    """A later frame stored first waits: its ack goes right after the earlier frame's."""
    conn = welcomed()
    first = submitted(conn, track(ev(1)))
    second = submitted(conn, track(ev(2)))
    assert conn.frame_stored(second, 1, 0) == []
    assert [a["seq"] for a in messages(conn.frame_stored(first, 1, 0))] == [1, 2]
    assert conn.unanswered == 0


def test_max_inflight_frames() -> None:
    """Up to max_inflight_frames frames wait for the store; then the driver reads no more."""
    conn = welcomed()
    subs = [submitted(conn, track(ev(i))) for i in range(1, 4)]
    assert conn.unanswered == 3
    assert not conn.readable
    conn.frame_stored(subs[0], 1, 0)
    assert conn.readable


def test_store_failure_nacks_unavailable() -> None:
    """Nothing of a frame stored: nack unavailable with the settings' retry_after_ms."""
    conn = welcomed()
    sub = submitted(conn, track(ev(2), ev(3)))
    (nack,) = conn.frame_failed(sub)
    assert isinstance(nack, Send)
    assert nack.nack == "unavailable"
    assert message(nack) == {"type": "nack", "seq": 3, "code": "unavailable", "retry_after_ms": 70}
    assert conn.nacked == 1


def test_frames_after_a_failure_wait_for_the_resend() -> None:
    """After a failure, frames beyond it are nacked at once until the client resends from it."""
    conn = welcomed()
    failed = submitted(conn, track(ev(2), ev(3)))
    later = submitted(conn, track(ev(4)))  # sent before the nack could be seen
    conn.frame_failed(failed)
    # The store fails the later frame of the poisoned epoch too.
    assert later.epoch <= conn.owner.failed_epoch
    assert [m["type"] for m in messages(conn.frame_failed(later))] == ["nack"]
    # A frame that skips the nacked seqs: storing it would hide 2 and 3.
    (skip,) = conn.receive(track(ev(5)), NOW)
    assert message(skip) == {"type": "nack", "seq": 5, "code": "unavailable", "retry_after_ms": 70}
    assert conn.frames == 3
    # The resend from the failed seq starts a new epoch and is stored.
    resend = submitted(conn, track(ev(2), ev(3), ev(4), ev(5)))
    assert resend.epoch > conn.owner.failed_epoch
    assert stored_ack(conn, resend, 4)["seq"] == 5


def test_immediate_nack_waits_behind_earlier_frames() -> None:
    """A nack decided at once still goes out after the answers of the frames before it."""
    conn = welcomed("slow")
    first = submitted(conn, track(*[ev(i) for i in range(1, 6)]))
    second = submitted(conn, track(*[ev(i) for i in range(6, 11)]))
    assert conn.receive(track(ev(11)), NOW) == []  # over the rate: nacked behind the two
    conn.frame_stored(second, 5, 0)
    answers = messages(conn.frame_stored(first, 5, 0))
    assert [(a["type"], a["seq"]) for a in answers] == [("ack", 5), ("ack", 10), ("nack", 11)]
    assert answers[2]["code"] == "rate_limited"


def test_rate_limit_nacks_then_takes_the_resend() -> None:
    """Over the site's rate: nack rate_limited with the wait; after it the resend is taken."""
    conn = welcomed("slow")
    stored_ack(conn, submitted(conn, track(*[ev(i) for i in range(1, 6)])), 5)
    stored_ack(conn, submitted(conn, track(*[ev(i) for i in range(6, 11)])), 5)
    (nack,) = conn.receive(track(ev(11), ev(12)), NOW)
    assert isinstance(nack, Send)
    assert nack.nack == "rate_limited"
    answer = message(nack)
    assert (answer["type"], answer["seq"], answer["code"]) == ("nack", 12, "rate_limited")
    assert answer["retry_after_ms"] == 40  # 2 events at 50/s
    # A later frame that skips the nacked seqs is nacked too, with the same code.
    (skip,) = conn.receive(track(ev(13)), NOW + 1)
    assert message(skip)["code"] == "rate_limited"
    resend = submitted(conn, track(ev(11), ev(12)), NOW + 40)
    assert stored_ack(conn, resend, 2)["accepted"] == 2


def test_flood_closes_1008() -> None:
    """A client sending over the rate for close_after is closed: error rate_limited, 1008."""
    conn = welcomed("slow")
    stored_ack(conn, submitted(conn, track(*[ev(i) for i in range(1, 6)])), 5)
    stored_ack(conn, submitted(conn, track(*[ev(i) for i in range(6, 11)])), 5)
    seq, now, commands = 11, NOW, []
    while conn.state == "open":
        commands = conn.receive(track(ev(seq), ev(seq + 1)), now)
        seq, now = seq + 2, now + 5
    err = closed_with(commands, 1008, "rate_limited")
    assert err is not None
    assert "over 50 events/s for 0.4 s" in err["detail"]
    assert now - NOW > 400


# ---- identify -------------------------------------------------------------------


def test_identify_waits_for_earlier_frames_then_switches() -> None:
    """identify: earlier frames are answered first, then the customer moves; later ones are its."""
    conn = welcomed(uuid="anon-1", context={"url": "https://a/"})
    sub = submitted(conn, track(ev(1)))
    assert conn.receive(frame({"type": "identify", "uuid": "customer-42"}), NOW) == []
    assert conn.state == "identifying"
    assert not conn.readable
    answers = conn.frame_stored(sub, 1, 0)
    assert message(answers[0])["type"] == "ack"
    assert answers[1] == SwitchCustomer(
        "anon-1", "customer-42", "p-12345678", {"url": "https://a/"}
    )
    assert conn.frame_stored(sub, 1, 0) == []  # nothing is asked for twice
    assert conn.identified("s-2") == []
    assert conn.readable
    after = submitted(conn, track(ev(2)))
    assert (after.uuid, after.session) == ("customer-42", "s-2")


def test_identify_without_pending_frames_switches_at_once() -> None:
    """identify with every frame answered asks for the switch right away."""
    conn = welcomed(uuid="anon-1")
    (switch,) = conn.receive(frame({"type": "identify", "uuid": "customer-42"}), NOW)
    assert isinstance(switch, SwitchCustomer)
    assert (switch.old_uuid, switch.new_uuid) == ("anon-1", "customer-42")


def test_identify_same_customer_without_token_does_nothing() -> None:
    """identify naming the current customer without a token changes nothing."""
    conn = welcomed()
    assert conn.receive(frame({"type": "identify", "uuid": "u-1"}), NOW) == []
    assert conn.state == "open"


def test_identify_with_token_authenticates_the_new_customer() -> None:
    """identify with a valid token switches customer and the connection is authenticated."""
    conn = welcomed("shop", uuid="anon-7")
    (switch,) = conn.receive(
        frame({"type": "identify", "uuid": "cust-7", "token": token("cust-7", "shop")}), NOW
    )
    assert isinstance(switch, SwitchCustomer)
    conn.identified("s-7")
    assert conn.who is not None
    assert (conn.who.uuid, conn.who.session, conn.who.authenticated) == ("cust-7", "s-7", True)


def test_identify_refused_on_a_token_site_closes_1008() -> None:
    """identify without a valid token on a token site: error unauthorized, close 1008."""
    conn = welcomed("vault", token=token("u-1", "vault"))
    closed_with(conn.receive(frame({"type": "identify", "uuid": "u-2"}), NOW), 1008, "unauthorized")


def test_identify_failed_closes_1013() -> None:
    """Redis cannot move the connection at identify: error unavailable, close 1013."""
    conn = welcomed(uuid="anon-1")
    conn.receive(frame({"type": "identify", "uuid": "customer-42"}), NOW)
    err = closed_with(conn.identify_failed("redis timed out"), 1013, "unavailable")
    assert err is not None
    assert err["detail"] == "identify failed: redis timed out"


# ---- a session ending under frames on their way ---------------------------------


def test_session_gone_mid_frame_is_rebuilt_for_the_new_session() -> None:
    """Frames whose session ended are built again for the new one and sent again, in order."""
    conn = welcomed(session="s-old")
    first = submitted(conn, track(ev(1), ev(2, action="nodot"), ev(3)))
    second = submitted(conn, track(ev(4)))
    (renew,) = conn.frame_gone(first)
    assert renew == OpenSession("u-1", "p-12345678", None, renew=True)
    assert conn.readable  # the connection keeps reading meanwhile
    assert conn.frame_gone(second) == []  # one renewal at a time
    resends = conn.session_opened("s-new", False, 0, NOW)
    assert resends == [ResubmitFrame(first), ResubmitFrame(second)]
    assert conn.who is not None
    assert conn.who.session == "s-new"
    assert (first.session, second.session) == ("s-new", "s-new")
    fresh = welcomed(session="s-new")
    rebuilt = submitted(fresh, track(ev(1), ev(2, action="nodot"), ev(3)))
    # Exactly the records a frame sent in the new session gets (the rejection too).
    assert first.items == rebuilt.items
    assert [m["seq"] for m in messages(conn.frame_stored(first, 2, 0))] == [3]


def test_frame_gone_after_renewal_is_sent_again_at_once() -> None:
    """A frame of the old session that comes back after the renewal is rebuilt at once."""
    conn = welcomed(session="s-old")
    first = submitted(conn, track(ev(1)))
    second = submitted(conn, track(ev(2)))
    conn.frame_gone(first)
    conn.session_opened("s-new", False, 0, NOW)
    (resend,) = conn.frame_gone(second)
    assert resend == ResubmitFrame(second)
    payload = items_of(second)[0][2]
    assert msgspec.json.decode(payload, type=StoredEvent).session == "s-new"


def test_renewal_failure_nacks_the_waiting_frames() -> None:
    """Redis cannot open the new session: the frames waiting for it are nacked unavailable."""
    conn = welcomed()
    first = submitted(conn, track(ev(1)))
    conn.frame_gone(first)
    answers = messages(conn.session_unavailable("redis timed out"))
    assert answers == [{"type": "nack", "seq": 1, "code": "unavailable", "retry_after_ms": 70}]
    assert conn.state == "open"
    (skip,) = conn.receive(track(ev(2)), NOW)
    assert message(skip)["type"] == "nack"


def test_frame_gone_after_the_socket_closed_opens_nothing() -> None:
    """A closed connection opens no session for frames that come back: they are nacked."""
    conn = welcomed()
    sub = submitted(conn, track(ev(1)))
    conn.connection_lost()
    assert messages(conn.frame_gone(sub))[0]["type"] == "nack"
    assert conn.unanswered == 0


# ---- closing ----------------------------------------------------------------------


def test_shutdown_answers_received_frames_then_closes_1001() -> None:
    """The server shuts down: frames received are answered, then close 1001 without an error."""
    conn = welcomed()
    sub = submitted(conn, track(ev(1)))
    assert conn.shutdown() == []
    assert not conn.readable
    answers = conn.frame_stored(sub, 1, 0)
    assert message(answers[0])["type"] == "ack"
    assert answers[1] == Close(1001, "server shutting down")
    assert conn.state == "closed"


def test_finish_leaves_the_session() -> None:
    """When the connection ends it leaves its customer's session; before a hello there is none."""
    conn = welcomed()
    conn.connection_lost()
    assert conn.finish() == [LeaveSession("u-1")]
    assert connection().finish() == []


def test_close_reason_fits_a_close_frame() -> None:
    """A close reason is cut to 120 bytes without splitting a character."""
    assert close_reason("é" * 100) == "é" * 60
    assert close_reason("short") == "short"


def test_frame_while_opening_is_a_driver_bug() -> None:
    """Feeding a frame while the hello's session opens raises: the driver must wait for readable."""
    conn = connection()
    conn.receive(hello(), NOW)
    with pytest.raises(RuntimeError, match="readable"):
        conn.receive(track(ev(1)), NOW)


def test_visitor_let_go_at_hello_its_start_kept_for_later_sessions() -> None:
    """The raw address lives no longer than the hello; renewals and identify reuse the start."""
    address = "203.0.113.9"
    seen = Visitor(address=address, user_agent="curl/8.5.0", language="de")
    conn = Connection(sites_book(), "app", SETTINGS, JSON_CODEC, Counts(), seen)
    (open_session,) = conn.receive(hello("u-1"), NOW)
    assert isinstance(open_session, OpenSession)
    assert conn.visitor is None
    start = open_session.start
    assert start is not None
    assert (start.client.ip, start.client.language, start.client.bot) == ("203.0.113.0", "de", True)
    assert address not in repr(start)
    conn.session_opened("s-1", False, 0, NOW)
    first = submitted(conn, track(ev(1)))
    (renew,) = conn.frame_gone(first)
    assert isinstance(renew, OpenSession)
    assert renew.renew
    assert renew.start is start
    conn.session_opened("s-2", False, 0, NOW)
    conn.frame_stored(first, 1, 0)
    (switch,) = conn.receive(frame({"type": "identify", "uuid": "customer-7"}), NOW)
    assert isinstance(switch, SwitchCustomer)
    assert switch.start is start
    # Nothing of the connection has an instance dict to grow.
    assert not hasattr(conn, "__dict__")
