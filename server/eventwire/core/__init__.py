"""The synchronous core: the wire schema, the records, the rules and the settings.

Nothing here awaits, opens a socket or imports ``redis``: every module is
plain code tested without a server (``tests/core/``). The async rooms
(``gateway``, ``ingest``, ``store``, ``live``, ``persist``) build on it.
"""
