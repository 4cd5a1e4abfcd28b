"""Event rules of docs/protocol.md section 2: action form, sizes, time, required params.

Pure functions, no I/O. :func:`judge_event` turns one :class:`WireEvent` into
the JSON stored in Redis, or a reject code with a detail a client developer
understands. Site rules (allow/deny, site-required params, authentication)
live in ``rules``; this module holds what is true for every site.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import msgspec

from eventwire.core.protocol import WireEvent
from eventwire.core.records import StoredEvent, record_encoder
from eventwire.core.rules import Verdict
from eventwire.core.source import source_json

ACTION_MIN: Final = 3
ACTION_MAX: Final = 32
ACTION_RE: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+")

#: Reject codes of docs/protocol.md section 3.
INVALID: Final = "invalid"
INVALID_ACTION: Final = "invalid_action"
MISSING_PARAM: Final = "missing_param"
TOO_LARGE: Final = "too_large"
TOO_OLD: Final = "too_old"
DENIED: Final = "denied"
UNAUTHORIZED: Final = "unauthorized"

#: Params every site requires, by action.
BUILTIN_REQUIRED: Final[dict[str, tuple[str, ...]]] = {"page.visit": ("url",)}


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The per-event limits, in the units the hot path uses."""

    max_event_bytes: int
    max_clock_skew_ms: int
    max_event_age_ms: int


class Rejected(msgspec.Struct, frozen=True):
    """Why one event was not stored."""

    code: str
    detail: str


class Identity(msgspec.Struct, kw_only=True):
    """Who sends: copied onto every stored event of a connection."""

    site: str
    uuid: str
    session: str
    producer: str
    authenticated: bool = False
    #: Events are stored with ``"bot": true`` (a bot, on a site that flags them).
    bot: bool = False
    #: The site's own hosts for ``params.source`` of page visits; None: visits
    #: are not enriched (``enrich_visitors = false``).
    hosts: frozenset[str] | None = None


#: Action names already found well formed. Sites use a few dozen names, so a
#: set skips the regex on the hot path; it is emptied if it ever grows past
#: this many (about 100 bytes each).
_GOOD_ACTIONS_MAX: Final = 4096
_good_actions: set[str] = set()


def action_problem(action: str) -> str | None:
    """Say what is wrong with an action name, or None when it is well formed."""
    if action in _good_actions:
        return None
    if not ACTION_MIN <= len(action) <= ACTION_MAX:
        return f"action {action[:40]!r} must be {ACTION_MIN}-{ACTION_MAX} characters long"
    if ACTION_RE.fullmatch(action) is None:
        return (
            f"action {action!r} must be context.activity: dot-separated words of "
            "letters, digits, '_' or '-'"
        )
    if len(_good_actions) >= _GOOD_ACTIONS_MAX:
        _good_actions.clear()
    _good_actions.add(action)
    return None


def default_label(action: str, params: dict[str, Any]) -> str:
    """The label an event gets when the client sent none (docs/protocol.md section 2)."""
    if action == "page.visit":
        title = params.get("title")
        return f"Visited page {title if isinstance(title, str) and title else params.get('url')}"
    if action == "session.start":
        return "Started session"
    if action == "session.end":
        return "Session end"
    return action


def missing_params(action: str, params: dict[str, Any], required: tuple[str, ...]) -> str | None:
    """Name the first required param an event lacks, or None.

    The params every site requires (:data:`BUILTIN_REQUIRED`) come first, then
    the site's. A site's param is present when its value is neither null nor
    an empty string; ``page.visit``'s ``url`` must be a non-empty string.
    """
    if action in BUILTIN_REQUIRED:
        url = params.get("url")
        if not isinstance(url, str) or not url:
            return f"{action} requires params.url (a non-empty string)"
    for name in required:
        value = params.get(name)
        if value is None or value == "":
            return f"{action} requires params.{name}"
    return None


def site_refusal(action: str, verdict: Verdict) -> Rejected:
    """Why the site refuses an action it denies or keeps for proven customers."""
    if verdict.denied:
        return Rejected(DENIED, f"{action} is not taken by this site")
    return Rejected(UNAUTHORIZED, f"{action} needs an authenticated customer")


def too_old(time: int, limits: Limits) -> Rejected:
    """The rejection of an event whose time is further back than ``max_event_age``."""
    days = limits.max_event_age_ms / 86_400_000
    return Rejected(TOO_OLD, f"time {time} is more than {days:g} days before receipt")


def encode_stored(stored: StoredEvent, max_event_bytes: int) -> bytes | Rejected:
    """The JSON of a stored event, or why it cannot be stored (no JSON form, too large)."""
    try:
        encoded = record_encoder.encode(stored)
    except (TypeError, ValueError) as exc:
        # MessagePack extension types and array or nil map keys have no JSON form.
        return Rejected(INVALID, f"params hold a value JSON cannot carry: {exc}")
    except RecursionError:
        # Decoded a few stack frames up, params nested at the recursion limit
        # can fail to encode here.
        return Rejected(INVALID, "params are nested too deeply to store")
    if len(encoded) > max_event_bytes:
        return Rejected(
            TOO_LARGE,
            f"event encodes to {len(encoded)} bytes; max_event_bytes is {max_event_bytes}",
        )
    return encoded


def judge_event(
    event: WireEvent,
    who: Identity,
    received: int,
    limits: Limits,
    verdict: Verdict | Callable[[str], Verdict] | None = None,
) -> bytes | Rejected:
    """Validate one event and encode it as stored (docs/protocol.md sections 2 and 7).

    The steps, each rejecting with the first problem it finds: the action's
    form (:func:`action_problem`), the site's verdict (:func:`site_refusal`),
    required params (:func:`missing_params`), the time (corrected when ahead,
    :func:`too_old` when far behind), and the encoding (:func:`encode_stored`).
    It runs once per event: each step is called only where it has work to do.

    Args:
        event: the decoded wire event.
        who: the connection's site, customer, session and producer.
        received: the frame's receive time, ms since the epoch.
        limits: size and time limits.
        verdict: what the site says of the action (taken, authenticated,
            required params), or the site's lookup (``SiteRules.verdict``),
            asked only once the action is well formed; None for no site rules.

    Returns:
        The stored event's JSON, or why it is rejected.
    """
    action = event.action
    problem = action_problem(action)
    if problem is not None:
        return Rejected(INVALID_ACTION, problem)
    required: tuple[str, ...] = ()
    if verdict is not None:
        if callable(verdict):
            # Asked only now: the site caches a verdict per action name, and a
            # malformed name may be as long as a frame.
            verdict = verdict(action)
        if verdict.denied or (verdict.needs_auth and not who.authenticated):
            return site_refusal(action, verdict)
        required = verdict.required
    params = event.params if event.params is not None else {}
    if required or action in BUILTIN_REQUIRED:
        problem = missing_params(action, params, required)
        if problem is not None:
            return Rejected(MISSING_PARAM, problem)
    if action == "page.visit" and who.hosts is not None:
        # The decoded params are this event's own: set in place, no copy. The
        # JSON comes from a cache per (url, referrer): a visit costs a lookup.
        referrer = params.get("referrer")
        params["source"] = source_json(
            params["url"], referrer if type(referrer) is str else "", who.hosts
        )
    time = event.time
    original_time = None
    if time is None:
        time = received
    elif time > received + limits.max_clock_skew_ms:
        # A client clock far ahead is corrected, not punished; the original is kept.
        original_time, time = time, received
    elif time < received - limits.max_event_age_ms:
        return too_old(time, limits)
    stored = StoredEvent(
        site=who.site,
        uuid=who.uuid,
        session=who.session,
        producer=who.producer,
        seq=event.seq,
        action=action,
        label=event.label if event.label is not None else default_label(action, params),
        time=time,
        received=received,
        params=params,
        original_time=original_time,
        authenticated=who.authenticated,
        bot=who.bot,
    )
    return encode_stored(stored, limits.max_event_bytes)


def visit_source(params: dict[str, Any], hosts: frozenset[str]) -> msgspec.Raw:
    """The ``source`` of a page visit from its ``url`` and ``referrer`` params, as JSON."""
    referrer = params.get("referrer")
    return source_json(params["url"], referrer if isinstance(referrer, str) else "", hosts)
