"""The records written to Redis (docs/protocol.md section 7), declared once.

:class:`StoredEvent` is the JSON of an events stream entry's ``event`` field,
:class:`RejectedRecord` that of a rejected stream entry. Both are JSON
whatever the subprotocol the client spoke; :data:`record_encoder` writes
them, and :func:`event_text` renders a rejected event's ``raw``. Readers
(the persist worker, the relay, tail) decode with these Structs.
"""

from __future__ import annotations

import reprlib
from typing import Any, Final

import msgspec
from msgspec import Struct

from eventwire.core.protocol import WireEvent


class StoredEvent(Struct, kw_only=True, omit_defaults=True):
    """The JSON in the ``event`` field of ``ew:{site}:events``."""

    site: str
    uuid: str
    session: str
    producer: str
    seq: int
    action: str
    label: str
    time: int
    received: int
    params: dict[str, Any]
    original_time: int | None = None
    authenticated: bool = False
    #: The connection was found to be a bot and its site flags them (``bots = "flag"``).
    #: Always the last field, so readers may test an entry's tail cheaply.
    bot: bool = False


def _part_of_stored(name: str, first: int, last: int | None, doc: str) -> type[Struct]:
    """A struct of :class:`StoredEvent`'s fields ``first`` to ``last``, as they are there."""
    fields = msgspec.structs.fields(StoredEvent)[first:last]
    return msgspec.defstruct(
        name,
        [
            (f.name, f.type) if f.default is msgspec.NODEFAULT else (f.name, f.type, f.default)
            for f in fields
        ],
        omit_defaults=True,
        module=__name__,
        namespace={"__doc__": doc},
    )


#: The first fields of a :class:`StoredEvent`: the sender, the same for a frame's
#: events. A frame's events are encoded as the head's JSON once
#: (:func:`stored_prefix`) and each event's :data:`StoredTail`: together the bytes
#: of the whole :class:`StoredEvent` (``tests/core/test_frames.py`` holds the bytes
#: equal). Both are made from StoredEvent's own fields, so they cannot drift.
StoredHead: Final = _part_of_stored("StoredHead", 0, 4, "StoredEvent's sender fields.")
#: The fields of a :class:`StoredEvent` after :data:`StoredHead`'s, in order.
StoredTail: Final = _part_of_stored("StoredTail", 4, None, "StoredEvent's fields after its head.")


class RejectedRecord(Struct, kw_only=True, omit_defaults=True):
    """The JSON in the ``event`` field of ``ew:{site}:rejected``.

    ``raw_base64`` is an extension: true when ``raw`` holds base64 of a binary
    frame that was not decodable.
    """

    site: str
    uuid: str | None
    producer: str | None
    seq: int | None
    code: str
    detail: str
    received: int
    raw: str
    raw_base64: bool = False


#: Stored records are JSON whatever the subprotocol (docs/protocol.md section 7).
record_encoder: Final = msgspec.json.Encoder()


def stored_prefix(site: str, uuid: str, session: str, producer: str) -> bytes:
    """The JSON a :class:`StoredEvent` of this sender starts with: its head's, without the ``}``.

    The stored event's JSON is this, then a ``,`` and what
    :data:`record_encoder` writes for the :class:`StoredTail` after its ``{``:
    the bytes it writes for the whole :class:`StoredEvent`.
    """
    return record_encoder.encode(StoredHead(site, uuid, session, producer))[:-1]


class _ShortRepr(reprlib.Repr):
    """A repr a few levels and items deep: cheap even for params nested to the recursion limit."""

    def __init__(self) -> None:
        super().__init__()  # Python 3.11's Repr takes its limits as attributes only
        self.maxlevel, self.maxdict, self.maxlist = 4, 16, 16
        self.maxstring, self.maxother = 256, 64

    # reprlib looks up repr_<type name>.
    def repr_Ext(self, obj: msgspec.msgpack.Ext, level: int) -> str:
        return f"Ext({obj.code}, {self.repr1(obj.data, level - 1)})"


#: Renders params that have no JSON form for the rejected stream.
_params_repr: Final = _ShortRepr()


def event_text(event: WireEvent) -> str:
    """A decoded event as JSON text, for the rejected stream; never raises.

    Params JSON cannot hold (MessagePack extension types, array or nil map
    keys, nesting at the recursion limit) are kept as a short ``repr``.
    """
    try:
        return record_encoder.encode(event).decode()
    except (TypeError, ValueError, RecursionError):
        shown = msgspec.structs.replace(event, params={"repr": _params_repr.repr(event.params)})
        return record_encoder.encode(shown).decode()
