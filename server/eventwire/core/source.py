"""Where a visit came from: ``params.source`` of ``page.visit``, no I/O.

:func:`source_of` reads a page URL's campaign parameters (``utm_*``, click
ids) and its referrer and says the visit's ``medium`` and ``name``
(docs/protocol.md section 18):

1. ``utm_medium`` when the URL has one (lower-cased, as sent otherwise);
2. else ``paid`` when it carries a known click id (:data:`CLICK_IDS`);
3. else ``direct`` without a referrer, ``internal`` when the referrer is the
   page's own host or one of the site's origins, else the referrer host's
   medium in :data:`REFERRERS` (``search``, ``social``, ``email``), else
   ``referral``.

``name`` is the referrer's entry in :data:`REFERRERS` (Google, Facebook...),
else ``utm_source``, else the referrer host. No maintained referrer list is
published on PyPI (``referer-parser``, the Python port of Snowplow's list,
last shipped in 2016 with a list older still), so :data:`REFERRERS` is a
small table of the sources that bring most traffic: a host matches an entry
when it is the entry or a subdomain of it, and a name ending in ``.`` (such
as ``google.``) matches any top-level domain after it (google.de,
google.co.uk). Add rows here; tests/core/test_source.py shows how each
medium is told.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import msgspec

#: Click ids of ad networks: a visit with one is ``paid`` unless ``utm_medium`` says otherwise.
CLICK_IDS: Final = ("gclid", "gbraid", "wbraid", "fbclid", "msclkid", "ttclid", "li_fat_id")
UTM_FIELDS: Final = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
#: Longest value of a campaign parameter kept.
VALUE_MAX: Final = 200
#: Distinct (url, referrer, hosts) classifications kept per process (~1 KiB each).
SOURCE_CACHE: Final = 4096
#: Distinct lists of site origins whose hosts are kept (one per site and sites-file version).
HOSTS_CACHE: Final = 1024
#: Longest url or referrer whose classification is cached (longer: computed each time).
CACHED_URL_MAX: Final = 2048

#: Referrer hosts by medium: host (or ``name.`` for any TLD) -> source name.
REFERRERS: Final[dict[str, dict[str, str]]] = {
    "search": {
        "google.": "Google",
        "bing.com": "Bing",
        "duckduckgo.com": "DuckDuckGo",
        "search.yahoo.com": "Yahoo",
        "yahoo.co.jp": "Yahoo",
        "yandex.": "Yandex",
        "ya.ru": "Yandex",
        "baidu.com": "Baidu",
        "ecosia.org": "Ecosia",
        "qwant.com": "Qwant",
        "startpage.com": "Startpage",
        "search.brave.com": "Brave",
        "naver.com": "Naver",
        "seznam.cz": "Seznam",
        "perplexity.ai": "Perplexity",
        "kagi.com": "Kagi",
    },
    "social": {
        "facebook.com": "Facebook",
        "fb.com": "Facebook",
        "instagram.com": "Instagram",
        "t.co": "Twitter",
        "twitter.com": "Twitter",
        "x.com": "Twitter",
        "linkedin.com": "LinkedIn",
        "lnkd.in": "LinkedIn",
        "reddit.com": "Reddit",
        "pinterest.": "Pinterest",
        "youtube.com": "YouTube",
        "tiktok.com": "TikTok",
        "news.ycombinator.com": "Hacker News",
        "threads.net": "Threads",
        "bsky.app": "Bluesky",
        "mastodon.social": "Mastodon",
        "vk.com": "VKontakte",
        "whatsapp.com": "WhatsApp",
        "t.me": "Telegram",
    },
    "email": {
        "mail.google.com": "Gmail",
        "outlook.live.com": "Outlook",
        "outlook.office.com": "Outlook",
        "outlook.office365.com": "Outlook",
        "mail.yahoo.com": "Yahoo Mail",
        "mail.proton.me": "Proton Mail",
        "mail.aol.com": "AOL Mail",
        "e.mail.ru": "Mail.ru",
        "mail.yandex.ru": "Yandex Mail",
    },
}

#: Social hosts that are also mail hosts' parents are told by the longer entry first.
_ENTRIES: Final = sorted(
    ((host, medium, name) for medium, hosts in REFERRERS.items() for host, name in hosts.items()),
    key=lambda entry: -len(entry[0]),
)


class Source(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """``params.source`` of a page visit (and of ``session.start``: the session's attribution)."""

    medium: str
    name: str | None = None
    referrer_host: str | None = None
    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    utm_term: str | None = None
    utm_content: str | None = None


def referrer_entry(host: str) -> tuple[str, str] | None:
    """The (medium, name) :data:`REFERRERS` gives a host, or None."""
    labels = host.split(".")
    for entry, medium, name in _ENTRIES:
        if entry.endswith("."):
            # "google." : a label "google" followed by a public suffix of one or two labels.
            stem = entry[:-1]
            for i, label in enumerate(labels[:-1]):
                if label == stem and 1 <= len(labels) - i - 1 <= 2:
                    return medium, name
        elif host == entry or host.endswith("." + entry):
            return medium, name
    return None


def _host(url: str) -> str:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return ""
    return host[4:] if host.startswith("www.") else host


def source_of(url: str, referrer: str, own_hosts: frozenset[str] = frozenset()) -> Source:
    """Classify one visit of ``url`` from ``referrer`` ('' for none).

    Args:
        url: the page's URL.
        referrer: the page's referrer ('' when there was none).
        own_hosts: hosts of the site besides the page's (its origins'), whose
            referrals are ``internal``.
    """
    query: dict[str, str] = {}
    try:
        pairs = parse_qsl(urlsplit(url).query, max_num_fields=100)
    except ValueError:
        pairs = []
    for key, value in pairs:
        if (key in UTM_FIELDS or key in CLICK_IDS) and key not in query and value:
            query[key] = value[:VALUE_MAX]
    ref_host = _host(referrer) if referrer else ""
    entry = referrer_entry(ref_host) if ref_host else None
    utm_medium = query.get("utm_medium")
    if utm_medium is not None:
        medium = utm_medium.lower()
    elif any(k in query for k in CLICK_IDS):
        medium = "paid"
    elif not ref_host:
        medium = "direct"
    elif ref_host == _host(url) or ref_host in own_hosts:
        medium = "internal"
    elif entry is not None:
        medium = entry[0]
    else:
        medium = "referral"
    name = entry[1] if entry is not None else query.get("utm_source") or ref_host or None
    if medium == "internal":
        name = None
    return Source(
        medium=medium,
        name=name,
        referrer_host=ref_host or None,
        utm_source=query.get("utm_source"),
        utm_medium=utm_medium,
        utm_campaign=query.get("utm_campaign"),
        utm_term=query.get("utm_term"),
        utm_content=query.get("utm_content"),
    )


def shared_source(url: str, referrer: str, own_hosts: frozenset[str] = frozenset()) -> Source:
    """:func:`source_of`, one object per (url, referrer, hosts) when both fit
    :data:`CACHED_URL_MAX`: connections landing alike share it (it is frozen)."""
    if len(url) <= CACHED_URL_MAX and len(referrer) <= CACHED_URL_MAX:
        return _cached_source(url, referrer, own_hosts)
    return source_of(url, referrer, own_hosts)


@functools.lru_cache(maxsize=SOURCE_CACHE)
def _cached_source(url: str, referrer: str, own_hosts: frozenset[str]) -> Source:
    return source_of(url, referrer, own_hosts)


#: The JSON of each (url, referrer, hosts) classified by :func:`source_json`
#: (both fit :data:`CACHED_URL_MAX`), emptied when it holds :data:`SOURCE_CACHE`.
#: A dict, not ``functools.lru_cache``: a hit is one lookup (~0.2 µs less a
#: page visit than the LRU's wrapper and bookkeeping); emptied whole, it costs
#: a burst of misses where the LRU would miss one by one.
source_cache: Final[dict[tuple[str, str, frozenset[str]], msgspec.Raw]] = {}


def source_json(url: str, referrer: str, own_hosts: frozenset[str] = frozenset()) -> msgspec.Raw:
    """:func:`source_of` as JSON, for the hot path of page visits: cached per
    (url, referrer, hosts) when both fit :data:`CACHED_URL_MAX` (a page's URL
    repeats; the cache's keys stay within ~16 MiB whatever is sent).

    The hot path looks a visit up in :data:`source_cache` itself and calls
    this on a miss.
    """
    key = (url, referrer, own_hosts)
    raw = source_cache.get(key)
    if raw is None:
        raw = msgspec.Raw(_encoder.encode(source_of(url, referrer, own_hosts)))
        if len(url) <= CACHED_URL_MAX and len(referrer) <= CACHED_URL_MAX:
            if len(source_cache) >= SOURCE_CACHE:
                source_cache.clear()
            source_cache[key] = raw
    return raw


_encoder: Final = msgspec.json.Encoder()


def origin_hosts(origins: Sequence[str]) -> frozenset[str]:
    """The hosts of a site's exact origins (``www.`` stripped), for ``internal`` referrals.

    One set per distinct list of origins (:data:`HOSTS_CACHE` kept): every
    connection of a site shares it instead of holding its own.
    """
    return _origin_hosts(tuple(origins))


@functools.lru_cache(maxsize=HOSTS_CACHE)
def _origin_hosts(origins: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_host(o) for o in origins if "*" not in o and o != "null") - {""}
