"""What a tracking connection asks its driver to do: the commands of ``core.connection``.

Every input of :class:`~eventwire.core.connection.Connection` returns a list
of these, in the order they must be carried out. Each is a small msgspec
``Struct`` (about 40 ns to make, less than a slots class), matched by class
in the driver (``match command: case Send(data=data): ...``). None of them
holds a reference back to the connection or the driver, so none can be part
of a reference cycle: they are left out of the garbage collector
(``gc=False``), which keeps the per-frame cost down.

- :class:`Send`: write one encoded message to the client now.
- :class:`SubmitFrame`: queue a frame's items for the publish step; the store
  answers with ``frame_stored``, ``frame_failed`` or ``frame_gone``.
- :class:`ResubmitFrame`: queue a frame again, rebuilt for a new session.
- :class:`OpenSession`: register the connection and join or open the
  customer's session (``session_opened`` or ``session_unavailable``).
- :class:`SwitchCustomer`: identify: leave the old customer's session with
  ``client.identify`` and join or open the new one's (``identified`` or
  ``identify_failed``).
- :class:`RecordUndecodable`: write an undecodable frame to the rejected stream.
- :class:`LeaveSession`: unregister the connection from its customer's session.
- :class:`Close`: close the socket with a code and reason (after the ``error``
  message, when there is one, which a :class:`Send` before it carries).
"""

from __future__ import annotations

from typing import Any

import msgspec

from eventwire.core.protocol import NackCode, Rejection


class Send(msgspec.Struct, gc=False):
    """Write one encoded message to the client now.

    ``nack`` names the code when the message is a nack (for the metrics).
    """

    data: bytes
    nack: NackCode | None = None


class SubmitFrame(msgspec.Struct, eq=False, gc=False):
    """A track frame to store, and its place in the queue of answers.

    The same object stays in the connection's queue until its answer went
    out; the driver hands it to the store as the frame's token and gives it
    back with the store's result. Compared and hashed by identity.

    Args:
        seq: the frame's highest seq (the ``seq`` of its ack or nack).
        low: the frame's lowest seq (for :class:`~eventwire.core.ordering.FrameOwner`).
        epoch: the ordering epoch it was sent in.
        uuid: the customer its events were encoded for.
        session: the session its events were encoded for.
        items: flat ``[seq, kind, payload, ...]`` (:mod:`~eventwire.core.frames`).
        rejections: the rejections its ack carries.
        reply: its encoded answer, once known.
        nack: the code of that answer when it is a nack.
    """

    seq: int
    low: int
    epoch: int
    uuid: str
    session: str
    items: list[Any]
    rejections: list[Rejection]
    reply: bytes | None = None
    nack: NackCode | None = None


class ResubmitFrame(msgspec.Struct, gc=False):
    """Queue a frame again: its ``items`` and ``session`` were rebuilt for the current session."""

    frame: SubmitFrame


class SessionStart(msgspec.Struct, gc=False):
    """What a connection adds to the ``session.start`` it may open (docs/protocol.md 18).

    Args:
        client: the ``client`` object (the visitor, under the site's ``ip`` policy).
        source: the session's attribution: the hello page's source.
        bot: the start is stored with ``"bot": true`` (``bots = "flag"``).
        quiet: a bot on a site that drops them: no server-made event is
            stored for a session it opens.
    """

    client: Any = None
    source: Any = None
    bot: bool = False
    quiet: bool = False


class OpenSession(msgspec.Struct, gc=False):
    """Register the connection and join or open the customer's session.

    ``renew`` is False for the hello (the driver waits for the result before
    it reads another frame) and True when the session ended under frames on
    their way (the connection keeps reading meanwhile).
    """

    uuid: str
    producer: str
    context: dict[str, Any] | None
    renew: bool = False
    start: SessionStart | None = None


class SwitchCustomer(msgspec.Struct, gc=False):
    """Move the connection from one customer to another (docs/protocol.md section 2, identify).

    Every earlier frame is answered before this is asked for.
    """

    old_uuid: str
    new_uuid: str
    producer: str
    context: dict[str, Any] | None
    #: Why the old uuid must not merge into the new one ('' lets Redis decide;
    #: docs/protocol.md section 17).
    refused: str = ""
    start: SessionStart | None = None


class RecordUndecodable(msgspec.Struct, gc=False):
    """Write the record of an undecodable frame to the sender's rejected stream."""

    uuid: str | None
    record: bytes


class LeaveSession(msgspec.Struct, gc=False):
    """Unregister the connection; the customer's session ends after the grace if it was last."""

    uuid: str


class Close(msgspec.Struct, gc=False):
    """Close the socket.

    Args:
        code: the WebSocket close code.
        reason: the close reason (fits a close frame).
        error: the ``error.code`` sent just before, or None (1001, shutting down).
        detail: the whole detail of the error, for the connection's log line.
    """

    code: int
    reason: str
    error: str | None = None
    detail: str = ""


Command = (
    Send
    | SubmitFrame
    | ResubmitFrame
    | OpenSession
    | SwitchCustomer
    | RecordUndecodable
    | LeaveSession
    | Close
)
