"""The Segment tracking API's routes on the HTTP listener (docs/protocol.md section 15).

``POST /v1/batch`` and the single-call routes (``/v1/track``, ``/v1/page``,
``/v1/screen``, ``/v1/identify``, ``/v1/alias``, ``/v1/group``) take HTTP
Basic auth with a write key as the user name; the key chooses the site.
Each call is mapped (:mod:`eventwire.http.segment`) to a batch of one event
under a producer of its own and run through the listener's batch path, so
it is judged, stored and de-duplicated as any event. The answer is what the
SDKs expect: ``200 {"success": true}`` (with counts) once every call is
judged, rejected ones included (they are in the rejected stream with the
reason); ``503`` with ``Retry-After`` when Redis did not take some call, so
the SDK sends the batch again and the stored calls count as duplicates.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from typing import Any, Final

import msgspec
from aiohttp import web

from eventwire.core.errors import StoreUnavailable
from eventwire.core.frames import undecodable_record
from eventwire.core.rules import SiteRules
from eventwire.http.batch import Answer, retry_after_header
from eventwire.http.listener import HttpListener, Refusal, error_body, read_body
from eventwire.http.segment import (
    MAX_BATCH_BYTES,
    MAX_MESSAGE_BYTES,
    TYPES,
    NotSegment,
    map_message,
)
from eventwire.sessions import now_ms

#: Calls of one request judged at once (each is a session step and a frame).
CONCURRENCY: Final = 32
#: A CORS preflight's answer for the browser SDKs.
SEGMENT_PREFLIGHT: Final = {
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Content-Encoding, Authorization",
    "Access-Control-Max-Age": "86400",
}


class SegmentApi:
    """The Segment routes of one listener.

    Args:
        listener: the HTTP listener whose batch path runs each call.
    """

    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener
        listener.routes["/v1/batch"] = self._batch
        for kind in TYPES:
            listener.routes[f"/v1/{kind}"] = self._single

    def site_of(self, request: web.BaseRequest, body_key: Any = None) -> tuple[str, SiteRules, int]:
        """The site and key number the request's write key chooses.

        The key is the Basic auth user name; without an ``Authorization``
        header, the body's ``writeKey`` (what browser SDKs send to avoid a
        CORS preflight).

        Raises:
            Refusal: 401 for a missing, malformed or unknown write key.
        """
        header = request.headers.get("Authorization")
        if header is None and isinstance(body_key, str) and body_key:
            user = body_key.encode()
        else:
            scheme, _, encoded = (header or "").partition(" ")
            if scheme.lower() != "basic" or not encoded:
                raise Refusal(401, "unauthorized", "send the write key as the Basic auth user name")
            try:
                user = base64.b64decode(encoded.strip(), validate=True).split(b":", 1)[0]
            except (binascii.Error, ValueError):
                raise Refusal(
                    401, "unauthorized", "the Basic auth header does not decode"
                ) from None
        for site, rules in self.listener.book.sites.items():
            for i, key in enumerate(rules.write_keys):
                if hmac.compare_digest(user, key):
                    return site, rules, i
        raise Refusal(401, "unauthorized", "unknown write key")

    async def _single(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._serve(request, request.path.rsplit("/", 1)[1])

    async def _batch(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._serve(request, None)

    async def _serve(self, request: web.BaseRequest, kind: str | None) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        # Browser SDKs: any page may send with the site's (public) write key,
        # which is what authenticates a Segment call, not its Origin.
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}
        if request.method == "OPTIONS":
            return web.Response(status=204, headers={**cors, **SEGMENT_PREFLIGHT})
        try:
            response = await self._calls(request, kind)
        except Refusal as exc:
            # The SDKs read "code" and "message" from an error answer.
            body = {"type": "error", "code": exc.code, "detail": exc.detail, "message": exc.detail}
            headers = {}
            if exc.status == 503:
                wait = self.listener.settings.retry_after_ms / 1000
                headers["Retry-After"] = retry_after_header(wait)
            response = web.Response(
                status=exc.status,
                body=msgspec.json.encode(body),
                content_type="application/json",
                headers=headers,
            )
        response.headers.update(cors)
        return response

    async def _calls(self, request: web.BaseRequest, kind: str | None) -> web.StreamResponse:
        if request.method != "POST":
            raise Refusal(405, "method_not_allowed", "POST Segment calls here")
        if "Authorization" in request.headers:
            self.site_of(request)  # a wrong key is refused before the body is read
        if self.listener.draining():
            raise Refusal(503, "shutting_down", "server shutting down")
        body = await read_body(request, MAX_BATCH_BYTES)
        try:
            doc = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise Refusal(400, "undecodable", f"the body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise Refusal(400, "bad_batch", "a Segment body is a JSON object")
        site, rules, key = self.site_of(request, doc.get("writeKey"))
        if kind is None:
            calls = doc.get("batch")
            if not isinstance(calls, list):
                raise Refusal(400, "bad_batch", "a Segment batch needs a batch array")
            context = doc.get("context") if isinstance(doc.get("context"), dict) else None
        else:
            calls, context = [doc], None
        for call in calls:
            if len(msgspec.json.encode(call)) > MAX_MESSAGE_BYTES:
                raise Refusal(413, "too_large", f"a call is over {MAX_MESSAGE_BYTES} bytes")
        answers = await self._run(site, rules, key, calls, kind, context, doc.get("sentAt"))
        return self._answer(answers)

    async def _run(
        self,
        site: str,
        rules: SiteRules,
        key: int,
        calls: list[Any],
        kind: str | None,
        context: dict[str, Any] | None,
        sent_at: Any,
    ) -> list[Answer]:
        """Map and run every call; an unmappable call is recorded as rejected."""
        received = now_ms()
        explicit = rules.config.segment_actions
        limit = asyncio.Semaphore(CONCURRENCY)
        store = self.listener.store

        async def one(call: Any) -> Answer:
            try:
                mapped = map_message(site, call, kind, explicit, context, sent_at, received)
            except NotSegment as exc:
                record = undecodable_record(
                    site, None, f"not a Segment call: {exc}", msgspec.json.encode(call), received
                )
                if not await store.record_rejected(site, None, record):
                    return Answer(503, error_body("unavailable", "Redis did not answer"), 0.5)
                return Answer(200, b'{"rejected":[{"code":"not_segment"}]}')
            event = mapped["events"][0]
            previous = event["params"].get("previous_uuid")
            verdict = rules.verdict(event["action"])
            taken = not verdict.denied and not verdict.needs_auth and rules.config.auth != "token"
            if previous is not None and taken:
                # Trusted by the write key: merged as an identify is, by the same rules.
                # (A call the site refuses merges nothing: Redis and the store agree.)
                try:
                    done = await self.listener.sessions.alias(site, previous, mapped["uuid"])
                except StoreUnavailable:
                    return Answer(503, error_body("unavailable", "Redis did not answer"), 0.5)
                event["params"]["merged"] = done.merged
                if not done.merged:
                    event["params"]["reason"] = done.reason
            async with limit:
                # The write key's rate bucket, shared by its calls.
                answer = await self.listener.run_batch(
                    site, rules, msgspec.json.encode(mapped), f"write_key:{key}"
                )
            if answer.status == 200:
                stored.append((mapped["uuid"], mapped["producer"]))
            return answer

        stored: list[tuple[str, str]] = []
        answers = list(await asyncio.gather(*(one(call) for call in calls)))
        # Each call's producer is its messageId: remembered message_dedup_window.
        await store.shorten_producers(site, stored)
        return answers

    def _answer(self, answers: list[Answer]) -> web.Response:
        accepted = duplicate = rejected = 0
        waits = [a.retry_after or 0.0 for a in answers if a.status in (429, 503)]
        if waits:
            status = 503 if any(a.status == 503 for a in answers) else 429
            return web.Response(
                status=status,
                body=msgspec.json.encode(
                    {
                        "type": "error",
                        "code": "unavailable" if status == 503 else "rate_limited",
                        "message": "some calls were not stored; send the batch again",
                    }
                ),
                content_type="application/json",
                headers={"Retry-After": retry_after_header(max(waits))},
            )
        for a in answers:
            if a.status == 200:
                ack = msgspec.json.decode(a.body)
                accepted += ack.get("accepted", 0)
                duplicate += ack.get("duplicate", 0)
                rejected += len(ack.get("rejected", []))
            else:
                # A call the batch path refused (an auth rule, a bad field): judged, final.
                rejected += 1
        body = {
            "success": True,
            "accepted": accepted,
            "duplicate": duplicate,
            "rejected": rejected,
        }
        return web.Response(body=msgspec.json.encode(body), content_type="application/json")
