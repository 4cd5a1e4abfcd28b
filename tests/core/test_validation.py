"""eventwire/core/validation.py: per-event rules, without I/O."""

from __future__ import annotations

import msgspec
import pytest

from eventwire.core.protocol import WireEvent
from eventwire.core.rules import Verdict
from eventwire.core.validation import (
    Identity,
    Limits,
    Rejected,
    action_problem,
    default_label,
    judge_event,
)

NOW = 1_764_160_000_000
WHO = Identity(site="shop", uuid="u-1", session="s-1", producer="p-00000001")
LIMITS = Limits(max_event_bytes=2048, max_clock_skew_ms=300_000, max_event_age_ms=7 * 86_400_000)


def judge(**fields: object) -> dict[str, object] | Rejected:
    event = msgspec.convert({"seq": 1, "action": "product.view", **fields}, WireEvent)
    out = judge_event(event, WHO, NOW, LIMITS)
    return out if isinstance(out, Rejected) else msgspec.json.decode(out)


@pytest.mark.parametrize(
    "action", ["page.visit", "a.b", "context.activity", "x_1.y-2.z", "A" * 16 + "." + "b" * 15]
)
def test_well_formed_actions(action: str) -> None:
    """context.activity names of 3-32 characters are accepted."""
    assert action_problem(action) is None


@pytest.mark.parametrize(
    "action", ["ab", "nodot", ".lead", "trail.", "a..b", "a b.c", "a.b/c", "é.b", "a" * 30 + ".bc"]
)
def test_malformed_actions(action: str) -> None:
    """Names without a dot, with other characters or over 32 characters are refused."""
    assert action_problem(action) is not None
    result = judge(action=action)
    assert isinstance(result, Rejected)
    assert result.code == "invalid_action"


def test_stored_event_has_every_field() -> None:
    """The stored JSON carries the section 7 fields, with the connection's identity."""
    out = judge(label="Viewed", time=NOW - 5, params={"sku": "A1", "nested": {"k": [1, 2]}})
    assert out == {
        "site": "shop",
        "uuid": "u-1",
        "session": "s-1",
        "producer": "p-00000001",
        "seq": 1,
        "action": "product.view",
        "label": "Viewed",
        "time": NOW - 5,
        "received": NOW,
        "params": {"sku": "A1", "nested": {"k": [1, 2]}},
    }


def test_default_labels() -> None:
    """Missing labels get the protocol's defaults."""
    assert default_label("page.visit", {"url": "/", "title": "Home"}) == "Visited page Home"
    assert default_label("page.visit", {"url": "/p"}) == "Visited page /p"
    assert default_label("session.start", {}) == "Started session"
    assert default_label("session.end", {}) == "Session end"
    assert default_label("product.buy", {}) == "product.buy"
    out = judge(action="page.visit", params={"url": "https://x/", "title": "X"})
    assert not isinstance(out, Rejected)
    assert out["label"] == "Visited page X"


def test_missing_time_is_receive_time() -> None:
    """An event without time gets the receive time."""
    out = judge()
    assert not isinstance(out, Rejected)
    assert out["time"] == NOW
    assert "original_time" not in out


def test_future_time_is_corrected() -> None:
    """A time beyond the clock skew is replaced and kept as original_time."""
    out = judge(time=NOW + 300_001)
    assert not isinstance(out, Rejected)
    assert out["time"] == NOW
    assert out["original_time"] == NOW + 300_001
    within = judge(time=NOW + 299_000)
    assert not isinstance(within, Rejected)
    assert within["time"] == NOW + 299_000


def test_too_old() -> None:
    """An event older than max_event_age is rejected too_old."""
    result = judge(time=NOW - 7 * 86_400_000 - 1)
    assert isinstance(result, Rejected)
    assert result.code == "too_old"
    assert "7 days" in result.detail


@pytest.mark.parametrize("params", [None, {}, {"title": "x"}, {"url": ""}, {"url": 5}])
def test_page_visit_requires_url(params: dict[str, object] | None) -> None:
    """page.visit without a non-empty string url is rejected missing_param."""
    result = judge(action="page.visit", params=params)
    assert isinstance(result, Rejected)
    assert result.code == "missing_param"
    assert "params.url" in result.detail


def test_site_required_params() -> None:
    """Required params named by the caller are enforced."""
    event = msgspec.convert({"seq": 1, "action": "product.view", "params": {}}, WireEvent)
    result = judge_event(event, WHO, NOW, LIMITS, Verdict(False, False, ("sku",)))
    assert isinstance(result, Rejected)
    assert result.detail == "product.view requires params.sku"


def test_verdict_denied_and_unauthorized() -> None:
    """A site's verdict rejects denied actions, and authenticated ones from anonymous senders."""
    event = msgspec.convert({"seq": 1, "action": "form.submit"}, WireEvent)
    denied = judge_event(event, WHO, NOW, LIMITS, Verdict(True, False, ()))
    assert isinstance(denied, Rejected)
    assert denied.code == "denied"
    anon = judge_event(event, WHO, NOW, LIMITS, Verdict(False, True, ()))
    assert isinstance(anon, Rejected)
    assert anon.code == "unauthorized"
    proven = Identity(site="shop", uuid="u-1", session="s", producer="p-1", authenticated=True)
    stored = judge_event(event, proven, NOW, LIMITS, Verdict(False, True, ()))
    assert isinstance(stored, bytes)
    assert msgspec.json.decode(stored)["authenticated"] is True


def test_too_large() -> None:
    """An event whose stored form exceeds max_event_bytes is rejected too_large."""
    result = judge(params={"blob": "x" * 3000})
    assert isinstance(result, Rejected)
    assert result.code == "too_large"
    assert "2048" in result.detail


def test_params_without_json_form() -> None:
    """A MessagePack extension value in params is rejected invalid, not a crash."""
    event = WireEvent(seq=1, action="a.b", params={"x": msgspec.msgpack.Ext(1, b"z")})
    result = judge_event(event, WHO, NOW, LIMITS)
    assert isinstance(result, Rejected)
    assert result.code == "invalid"


def test_site_required_params_null_or_empty_are_missing() -> None:
    """A site's required param that is null or empty is missing; zero and false are present."""
    verdict = Verdict(False, False, ("sku", "qty"))
    for params, missing in [
        ({"sku": None, "qty": 1}, "sku"),
        ({"sku": "", "qty": 1}, "sku"),
        ({"sku": "A", "qty": ""}, "qty"),
        ({"sku": "A"}, "qty"),
    ]:
        event = msgspec.convert({"seq": 1, "action": "cart.add", "params": params}, WireEvent)
        result = judge_event(event, WHO, NOW, LIMITS, verdict)
        assert result == Rejected("missing_param", f"cart.add requires params.{missing}")
    event = msgspec.convert(
        {"seq": 1, "action": "cart.add", "params": {"sku": 0, "qty": False}}, WireEvent
    )
    assert isinstance(judge_event(event, WHO, NOW, LIMITS, verdict), bytes)


def test_builtin_url_is_checked_before_site_params() -> None:
    """page.visit's url comes before the site's own required params."""
    event = msgspec.convert({"seq": 1, "action": "page.visit", "params": {}}, WireEvent)
    result = judge_event(event, WHO, NOW, LIMITS, Verdict(False, False, ("lang",)))
    assert isinstance(result, Rejected)
    assert "params.url" in result.detail


def test_verdict_lookup_is_asked_only_for_well_formed_actions() -> None:
    """The site's lookup is not asked about a malformed name; a well-formed one is asked once."""
    asked: list[str] = []

    def lookup(action: str) -> Verdict:
        asked.append(action)
        return Verdict(False, False, ())

    bad = msgspec.convert({"seq": 1, "action": "x" * 500}, WireEvent)
    assert isinstance(judge_event(bad, WHO, NOW, LIMITS, lookup), Rejected)
    good = msgspec.convert({"seq": 2, "action": "form.submit"}, WireEvent)
    assert isinstance(judge_event(good, WHO, NOW, LIMITS, lookup), bytes)
    assert asked == ["form.submit"]


def test_first_problem_wins_in_step_order() -> None:
    """Action form, then the site's verdict, then params, then time, then size."""
    old = NOW - 8 * 86_400_000
    big = {"blob": "x" * 3000}

    def code(verdict: Verdict | None, **fields: object) -> str:
        event = msgspec.convert({"seq": 1, **fields}, WireEvent)
        result = judge_event(event, WHO, NOW, LIMITS, verdict)
        assert isinstance(result, Rejected)
        return result.code

    everything_wrong = Verdict(True, True, ("sku",))
    assert code(everything_wrong, action="nodot", time=old, params=big) == "invalid_action"
    assert code(everything_wrong, action="a.b", time=old, params=big) == "denied"
    assert code(Verdict(False, True, ("sku",)), action="a.b", time=old) == "unauthorized"
    assert code(Verdict(False, False, ("sku",)), action="a.b", time=old) == "missing_param"
    assert code(None, action="a.b", time=old, params=big) == "too_old"
    assert code(None, action="a.b", time=NOW + 10**9, params=big) == "too_large"
