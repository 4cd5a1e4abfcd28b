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
from eventwire.core.records import StoredEvent, StoredTail, record_encoder, stored_prefix
from eventwire.core.rules import Verdict
from eventwire.core.source import source_cache, source_json

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


#: What a frame's judge keeps per action name: why it is refused, or the
#: site's required params, whether any param must be checked, and whether its
#: events are page visits to enrich.
_ActionStep = Rejected | tuple[tuple[str, ...], bool, bool]

#: Stored-event prefixes by sender (:func:`stored_prefix`), emptied past this many.
_PREFIXES_MAX: Final = 4096
_prefixes: dict[tuple[str, str, str, str], bytes] = {}


_encode_into: Final = record_encoder.encode_into


def _prefix_of(who: Identity) -> bytes:
    key = (who.site, who.uuid, who.session, who.producer)
    prefix = _prefixes.get(key)
    if prefix is None:
        if len(_prefixes) >= _PREFIXES_MAX:
            _prefixes.clear()
        prefix = _prefixes[key] = stored_prefix(*key)
    return prefix


class FrameJudge:
    """Judges the events of one frame: :func:`judge_event` with what a frame shares made once.

    Calling it with an event gives what :func:`judge_event` gives for it with
    the same arguments. What depends only on the action name (its form, the
    site's verdict, which params are required) is found once per name and
    frame, in the same order (the verdict is asked only for a well-formed
    name); the sender's part of the stored JSON is encoded once per sender
    (:class:`~eventwire.core.records.StoredHead`), each event's rest by itself.

    Args:
        who: the connection's site, customer, session and producer.
        received: the frame's receive time, ms since the epoch.
        limits: size and time limits.
        verdict: as for :func:`judge_event`.
    """

    __slots__ = (
        "_actions",
        "_ahead",
        "_at",
        "_authenticated",
        "_behind",
        "_bot",
        "_buffer",
        "_hosts",
        "_limits",
        "_max_bytes",
        "_received",
        "_verdict",
    )

    def __init__(
        self,
        who: Identity,
        received: int,
        limits: Limits,
        verdict: Verdict | Callable[[str], Verdict] | None = None,
    ) -> None:
        self._actions: dict[str, _ActionStep] = {}
        self._verdict = verdict
        self._authenticated = who.authenticated
        self._bot = who.bot
        self._hosts = who.hosts
        self._received = received
        self._limits = limits
        self._ahead = received + limits.max_clock_skew_ms
        self._behind = received - limits.max_event_age_ms
        self._max_bytes = limits.max_event_bytes
        # Each event's tail is written over the buffer's end, its "{" made a ",".
        self._buffer = bytearray(_prefix_of(who))
        self._at = len(self._buffer)

    def _action_step(self, action: str) -> _ActionStep:
        """What the action's name decides, the first steps of :func:`judge_event`."""
        problem = action_problem(action)
        if problem is not None:
            return Rejected(INVALID_ACTION, problem)
        required: tuple[str, ...] = ()
        verdict = self._verdict
        if verdict is not None:
            if callable(verdict):
                # Asked only now: the site caches a verdict per action name, and a
                # malformed name may be as long as a frame.
                verdict = verdict(action)
            if verdict.denied or (verdict.needs_auth and not self._authenticated):
                return site_refusal(action, verdict)
            required = verdict.required
        check = bool(required) or action in BUILTIN_REQUIRED
        return (required, check, action == "page.visit" and self._hosts is not None)

    def __call__(self, event: WireEvent) -> bytes | Rejected:
        """One event's stored JSON, or why it is rejected (see :func:`judge_event`)."""
        action = event.action
        step = self._actions.get(action)
        if step is None:
            step = self._actions[action] = self._action_step(action)
        # Asked of tuple, not of Rejected: isinstance() against a Struct class
        # goes through its metaclass, ~0.09 µs for every event that is taken.
        if not isinstance(step, tuple):
            return step
        required, check, visit = step
        params = event.params if event.params is not None else {}
        if check:
            problem = missing_params(action, params, required)
            if problem is not None:
                return Rejected(MISSING_PARAM, problem)
        if visit:
            # The decoded params are this event's own: set in place, no copy. The
            # JSON comes from a cache per (url, referrer): a visit costs a lookup.
            url = params["url"]
            referrer = params.get("referrer")
            if type(referrer) is not str:
                referrer = ""
            source = source_cache.get((url, referrer, self._hosts))  # type: ignore[arg-type]
            if source is None:
                source = source_json(url, referrer, self._hosts)  # type: ignore[arg-type]
            params["source"] = source
        time = event.time
        original_time = None
        received = self._received
        if time is None:
            time = received
        elif time > self._ahead:
            # A client clock far ahead is corrected, not punished; the original is kept.
            original_time, time = time, received
        elif time < self._behind:
            return too_old(time, self._limits)
        tail = StoredTail(
            event.seq,
            action,
            event.label if event.label is not None else default_label(action, params),
            time,
            received,
            params,
            original_time,
            self._authenticated,
            self._bot,
        )
        buffer, at = self._buffer, self._at
        try:
            _encode_into(tail, buffer, at)
        except (TypeError, ValueError) as exc:
            # MessagePack extension types and array or nil map keys have no JSON form.
            return Rejected(INVALID, f"params hold a value JSON cannot carry: {exc}")
        except RecursionError:
            # Decoded a few stack frames up, params nested at the recursion limit
            # can fail to encode here.
            return Rejected(INVALID, "params are nested too deeply to store")
        buffer[at] = 44  # ","
        size = len(buffer)
        if size > self._max_bytes:
            return Rejected(
                TOO_LARGE,
                f"event encodes to {size} bytes; max_event_bytes is {self._max_bytes}",
            )
        # The copy bytes() makes, in about half the time (bytearray is a valid %b).
        return b"%b" % buffer  # type: ignore[str-format]


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
    :func:`too_old` when far behind), and the encoding (as
    :func:`encode_stored`: no JSON form, or over ``max_event_bytes``).
    Each step is called only where it has work to do. The events of one
    frame are judged by one :class:`FrameJudge`, which gives the same.

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
    return FrameJudge(who, received, limits, verdict)(event)


def visit_source(params: dict[str, Any], hosts: frozenset[str]) -> msgspec.Raw:
    """The ``source`` of a page visit from its ``url`` and ``referrer`` params, as JSON."""
    referrer = params.get("referrer")
    return source_json(params["url"], referrer if isinstance(referrer, str) else "", hosts)
