"""The synchronous core: the wire schema, the connection's state machine, the rules.

Nothing here awaits, opens a socket or imports ``redis``: every module is
plain code tested without a server (``tests/core/``), and the connection's
decisions take the time as an argument (only a token's own ``exp``/``nbf``
check at hello and identify is PyJWT's, on the wall clock). The async rooms
(``gateway``, ``ingest``, ``store``, ``live``, ``persist``) build on it.

    protocol     wire messages as msgspec Structs, one codec per subprotocol
    records      the records written to Redis: StoredEvent, RejectedRecord
    validation   one event's rules: action form, sizes, time, required params
    rules        the sites file: origins, allow/deny, authenticated actions,
                 rate limits, partitions; reload
    auth         JWT verification with pinned algorithms
    config       typed settings from file, environment and flags
    errors       the exception tree
    connection   one tracking connection as a sans-I/O state machine: messages
                 and store results in, commands out
    commands     the commands ``connection`` returns (send, submit, close, ...)
    frames       a frame's items for the publish step and its records
    ordering     FrameOwner (what may be stored after a failure), TokenBucket
    positions    stream ids, ``since`` values and cursors across partitions
"""
