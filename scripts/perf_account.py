"""Account a py-spy profile of the server by the parts of a frame's life.

Reads py-spy's collapsed stacks (``py-spy record --format raw``) and charges
each sample to the innermost frame that names one of the parts below:
socket read and the event loop (uvloop and asyncio: the loop's own Python
frame, where its C code, epoll and the read and write system calls show),
WebSocket framing (websockets' parser), the driver (``ingest``, the
connection's ``process_event``), decode, judge (``core/frames``,
``core/validation``, ``core/rules``), the protocol state
(``core/connection``), the Lua call (packing, the round trip, the reply,
settling), ack encode and the socket write. Prints each part's share.

usage: perf_account.py PROFILE.txt [PROFILE2.txt]   (two: side by side)

py-spy samples wall time of a thread that is not idle: on a machine whose
cores are all busy, a runnable thread waiting for a core is sampled where it
was preempted, which is mostly in system calls (a loopback ``write`` wakes
the peer). Compare profiles taken back to back, and read the CPU per frame
(``bench/loadgen.py``'s server CPU % over frames/s) beside them.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

Rule = tuple[str, Callable[[str], bool]]

RULES: list[Rule] = [
    ("decode", lambda f: "Codec.decode" in f or "split_track" in f),
    (
        "judge (frames, validation, rules)",
        lambda f: any(
            m in f for m in ("eventwire/core/frames.py", "core/validation.py", "core/rules.py")
        ),
    ),
    ("ack encode", lambda f: "Codec.encode" in f),
    (
        "socket write (acks; Redis commands)",
        lambda f: "send_now" in f or "send_data" in f or "writelines" in f,
    ),
    ("Lua call: pack", lambda f: "_pack_batch" in f or "eventwire/store/resp.py" in f),
    (
        "Lua call: reply parse",
        lambda f: "publish_counts" in f or "parse_publish" in f or "read_response" in f,
    ),
    (
        "Lua call: round trip (exchange, redis-py)",
        lambda f: (
            "exchange (eventwire/store/client.py" in f
            or "Store._pipeline" in f
            or "redis/asyncio" in f
        ),
    ),
    ("Lua call: settle", lambda f: "Store._settle" in f or "Store._flush" in f),
    (
        "publisher lane (submit, queue)",
        lambda f: "Store._run" in f or "Store.submit" in f or "Store.resubmit" in f,
    ),
    (
        "WebSocket framing (parse)",
        lambda f: (
            "websockets/frames.py" in f
            or "websockets/streams.py" in f
            or "Protocol.parse" in f
            or "Protocol.receive_data" in f
        ),
    ),
    (
        "websockets recv (assembler, futures)",
        lambda f: "websockets/asyncio/messages.py" in f or "Connection.recv (websockets" in f,
    ),
    ("WebSocket send framing", lambda f: "send_text" in f or "Frame.serialize" in f),
    ("protocol state (core/connection)", lambda f: "eventwire/core/" in f),
    (
        "ingest driver",
        lambda f: "eventwire/ingest.py" in f or "process_event (eventwire/gateway.py" in f,
    ),
    ("metrics", lambda f: "prometheus_client" in f or "eventwire/metrics.py" in f),
    ("websockets, other", lambda f: "websockets/" in f),
    (
        "event loop, socket read (uvloop, asyncio)",
        lambda f: "Runner.run" in f or "asyncio/" in f or "uvloop" in f,
    ),
]


def part_of(stack: list[str]) -> str:
    """The part the innermost matching frame names."""
    for frame in reversed(stack):
        for name, matches in RULES:
            if matches(frame):
                return name
    return "other"


def account(path: str) -> tuple[int, Counter[str]]:
    """Samples in all, and per part."""
    parts: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        n = int(count)
        parts[part_of(stack.split(";"))] += n
        total += n
    return total, parts


def main() -> int:
    paths = sys.argv[1:]
    if not 1 <= len(paths) <= 2:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    results = [account(p) for p in paths]
    names = [name for name, _ in RULES] + ["other"]
    head = "| part | " + " | ".join(paths) + " |"
    print(head)
    print("| --- |" + " ---: |" * len(paths))
    for name in names:
        cells = [f"{100 * parts[name] / total:.1f} %" if total else "-" for total, parts in results]
        if any(parts[name] for _, parts in results):
            print(f"| {name} | " + " | ".join(cells) + " |")
    print("| samples | " + " | ".join(str(total) for total, _ in results) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
