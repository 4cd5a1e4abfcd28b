"""Sessions and the server-made events that mark them, on top of ``store``.

First step of PROTOCOL.md section 6: one session per connection. A hello
opens a session and publishes ``session.start``; the connection's end (or an
``identify`` to another customer) publishes ``session.end``. Server-made
events use the producer ``srv:<session>`` with seqs of their own, so they go
through the same exactly-once step as client events: publishing one twice
stores it once.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Final

from server.protocol import StoredEvent, record_encoder
from server.store import EVENT, Store
from server.validation import default_label

START: Final = "session.start"
END: Final = "session.end"
IDENTIFY: Final = "client.identify"


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def new_session_id() -> str:
    """A random session id: 16 URL-safe characters, 96 bits."""
    return secrets.token_urlsafe(12)


class Session:
    """One customer session as this process sees it.

    Args:
        site: the site id.
        uuid: the customer.
        session_id: the id carried by every event of the session.
    """

    __slots__ = ("events", "first_activity", "id", "last_activity", "next_seq", "site", "uuid")

    def __init__(self, site: str, uuid: str, session_id: str) -> None:
        self.site = site
        self.uuid = uuid
        self.id = session_id
        self.first_activity = now_ms()
        self.last_activity = self.first_activity
        self.events = 0
        self.next_seq = 1

    @property
    def producer(self) -> str:
        """The producer of the server-made events of this session."""
        return f"srv:{self.id}"


class Sessions:
    """Opens and ends sessions, publishing their events through the store.

    Args:
        store: the Redis room.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    async def open(
        self, site: str, uuid: str, producer: str, context: dict[str, Any] | None
    ) -> Session:
        """Open a session and publish its ``session.start``.

        Raises:
            StoreUnavailable: Redis did not take the event; no session exists.
        """
        session = Session(site, uuid, new_session_id())
        await self.publish(
            session,
            START,
            {"session": session.id, "producer": producer, "context": context or {}},
        )
        return session

    async def end(self, session: Session, reason: str) -> None:
        """Publish the session's ``session.end``.

        Raises:
            StoreUnavailable: Redis did not take the event.
        """
        await self.publish(
            session,
            END,
            {
                "session": session.id,
                "reason": reason,
                "duration_ms": session.last_activity - session.first_activity,
                "events": session.events,
            },
        )

    async def publish(
        self, session: Session, action: str, params: dict[str, Any], uuid: str | None = None
    ) -> None:
        """Publish one server-made event in the session.

        Raises:
            StoreUnavailable: Redis did not take the event.
        """
        seq = session.next_seq
        session.next_seq += 1
        received = now_ms()
        record = record_encoder.encode(
            StoredEvent(
                site=session.site,
                uuid=uuid or session.uuid,
                session=session.id,
                producer=session.producer,
                seq=seq,
                action=action,
                label=default_label(action, params),
                time=received,
                received=received,
                params=params,
            )
        )
        await self.store.publish(session.site, session.producer, [seq, EVENT, record])
