"""Redis CPU of the ``publish`` function per frame and per event, measured in Redis alone.

Starts a private redis-server (a free port, no persistence), loads one or
more versions of ``server/eventwire/store/store.lua`` (``--lib NAME=PATH``;
default: this tree's), opens ``--connections`` customers with the real
``open`` function, then FCALLs ``publish`` with realistic arguments (the
typed layouts of ``eventwire.store.functions``, a ~330-byte stored event per
item, every seq new) for each scenario ``FRAMES_PER_CALL:EVENTS_PER_FRAME``.
As a reference it also runs ``node-dedup``'s Lua (bench/peers/node_dedup.js:
one EVALSHA per frame, GET + XADD + SET) on the same payloads.

Each library (and the reference) runs ``--rounds`` times, alternating
(A B ref A B ref ...), ``--calls`` calls per round, ``--depth`` calls in
flight. Per round it reads Redis' CPU (``INFO cpu``, user + sys) and
``INFO commandstats`` (``usec_per_call`` of fcall/evalsha and of the
commands the Lua issued) and prints medians with min-max:

    .venv/bin/python scripts/bench_lua.py
    .venv/bin/python scripts/bench_lua.py --lib old=/tmp/store-before.lua \\
        --lib new=server/eventwire/store/store.lua --rounds 5

A library must take the FCALL layout of this tree's functions.py.
``--group`` adds a ``persist`` consumer group to the stream (so publish's
backlog check and acknowledged-only trimming run, as with a persist worker).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))

from eventwire.core.config import Settings  # noqa: E402
from eventwire.store import (  # noqa: E402
    CustomerKeys,
    Keys,
    OpenArgs,
    PublishArgs,
    PublishFrameKeys,
    PublishKeys,
    session_end_record,
    session_start_record,
)
from eventwire.store.resp import bulk, frame_count, pack_args, pack_fcall, pack_items  # noqa: E402

SITE = "bench"


def node_dedup_lua() -> str:
    """The reference: the Lua of the node-dedup peer (bench/peers/node_dedup.js), as it runs."""
    text = (ROOT / "bench" / "peers" / "node_dedup.js").read_text()
    start = text.index("const PUBLISH_LUA = `") + len("const PUBLISH_LUA = `")
    return text[start : text.index("`;", start)]


NODE_DEDUP_LUA = node_dedup_lua()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Conn:
    """A raw RESP connection: pipelined commands, hiredis replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def send(self, parts: list[bytes]) -> None:
        self.sock.sendall(b"".join(parts))

    def recv(self) -> Any:
        while True:
            reply = self.reader.gets()
            if reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(str(reply))
                return reply
            data = self.sock.recv(1 << 20)
            if not data:
                raise RuntimeError("redis closed the connection")
            self.reader.feed(data)

    def cmd(self, *args: Any) -> Any:
        self.send(pack_args(args))
        return self.recv()


def library(path: Path) -> tuple[str, str]:
    """A store.lua's loadable text and its publish function's name, as functions.py makes them."""
    text = path.read_text()
    version = hashlib.sha1(text.encode()).hexdigest()[:12]
    return text.replace("VERSION", version), f"ew_{version}_publish"


def payload(uuid: str, session: str, producer: str, seq: int) -> bytes:
    """A stored event of the size the tracker's page events have (~330 bytes)."""
    return (
        f'{{"site":"bench","uuid":"{uuid}","session":"{session}","producer":"{producer}",'
        f'"seq":{seq},"action":"page.visit","label":"Visited page Home","time":1764160000000,'
        '"received":1764160000207,"params":{"url":"https://shop.example/products/'
        'a-long-path?ref=campaign","title":"Home","referrer":"https://search.example/"}}'
    ).encode()


@dataclass
class Customer:
    uuid: str
    producer: str
    producer_key: str
    session_key: str
    session: str = ""
    seq: int = 0


@dataclass
class Result:
    cpu_us_frame: list[float] = field(default_factory=list)
    cpu_us_event: list[float] = field(default_factory=list)
    call_us: list[float] = field(default_factory=list)
    lua_us: list[float] = field(default_factory=list)
    instr_frame: list[float] = field(default_factory=list)
    inner: dict[str, list[float]] = field(default_factory=dict)
    inner_us: dict[str, list[float]] = field(default_factory=dict)


class Callgrind:
    """Instructions Redis runs between start() and stop(), counted by callgrind."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out, self.dumps = str(pid), out, 0

    def start(self) -> None:
        self.control("-z")
        self.control("-i", "on")

    def control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, self.pid], check=True, capture_output=True)

    def stop(self) -> int:
        self.control("-i", "off")
        self.control("-d")
        self.dumps += 1
        dump = self.out / f"cg.out.{self.dumps}"
        for line in dump.read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {dump}")


def med(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def redis_cpu(conn: Conn) -> float:
    info = conn.cmd("INFO", "cpu").decode()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def commandstats(conn: Conn) -> dict[str, tuple[int, float]]:
    """cmdstat name -> (calls, usec)."""
    out = {}
    for line in conn.cmd("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[len("cmdstat_") :].split(":", 1)
            f = dict(kv.split("=") for kv in rest.split(","))
            out[name] = (int(f["calls"]), float(f["usec"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lib", action="append", default=[], help="NAME=PATH of a store.lua")
    ap.add_argument(
        "--scenario", action="append", default=[],
        help="FRAMES_PER_CALL:EVENTS[:REPEAT]: REPEAT frames of each customer in a row",
    )  # fmt: skip
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=0, help="calls per round (default: ~20k events)")
    ap.add_argument("--depth", type=int, default=4, help="calls in flight")
    ap.add_argument("--group", action="store_true", help="a persist group on the stream")
    ap.add_argument("--no-ref", action="store_true", help="skip node-dedup's Lua")
    ap.add_argument("--usec", action="store_true", help="also each command's µs per frame")
    ap.add_argument(
        "--callgrind",
        action="store_true",
        help="run Redis under valgrind and count its instructions (exact, ~50x slower)",
    )
    ap.add_argument("--callgrind-out", help="keep callgrind's dumps (one per round) in this dir")
    opts = ap.parse_args()
    libs = [(n, Path(p)) for n, p in (s.split("=", 1) for s in opts.lib)] or [
        ("tree", ROOT / "server/eventwire/store/store.lua")
    ]
    scenarios = [tuple(int(x) for x in f"{s}:1".split(":")[:3]) for s in opts.scenario] or [
        (1, 1, 1),
        (3, 1, 1),
        (16, 1, 4),
        (4, 100, 1),
    ]
    settings = Settings()
    keys = Keys("ew")
    tag = SITE
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = []
        if opts.callgrind:
            prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                      f"--callgrind-out-file={opts.callgrind_out or tmp}/cg.out"]  # fmt: skip
        proc = subprocess.Popen(
            [*prefix, "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        grind_dir = Path(opts.callgrind_out or tmp)
        opts.grind = Callgrind(proc.pid, grind_dir) if opts.callgrind else None
        try:
            for _ in range(600):
                try:
                    conn = Conn(port)
                    conn.cmd("PING")
                    break
                except (OSError, RuntimeError):
                    time.sleep(0.05)
            else:
                raise SystemExit("redis-server did not start")
            run(conn, libs, scenarios, opts, settings, keys, tag)
        finally:
            proc.terminate()
            proc.wait()


def run(conn: Conn, libs: list[tuple[str, Path]], scenarios: list[tuple[int, ...]],
        opts: argparse.Namespace, settings: Settings, keys: Keys, tag: str) -> None:  # fmt: skip
    loaded = []
    for name, path in libs:
        text, fn = library(path)
        conn.cmd("FUNCTION", "LOAD", "REPLACE", text)
        loaded.append((name, text, fn))
    ref_sha = conn.cmd("SCRIPT", "LOAD", NODE_DEDUP_LUA).decode()
    head = PublishKeys(keys.events(tag), keys.rejected(tag), keys.due(tag))
    if opts.group:
        conn.cmd("XGROUP", "CREATE", head.events, "persist", "$", "MKSTREAM")
    timing_idle, timing_max = 30 * 60_000, 4 * 3600_000
    fixed = PublishArgs(
        events_maxlen=settings.stream_maxlen,
        rejected_maxlen=settings.rejected_maxlen,
        producer_ttl_ms=int(settings.producer_ttl * 1000),
        idle_ms=timing_idle,
        max_ms=timing_max,
        taken="sei",
        end_record=session_end_record(SITE),
        max_backlog=0 if settings.on_backlog == "trim" else settings.stream_maxlen,
    )
    customers = []
    for i in range(opts.connections):
        uuid = f"{i:08x}-7b4d-4e8a-9c1f-0d2b6a5e8f47"
        producer = f"js-{i:024x}"
        customers.append(
            Customer(uuid, producer, keys.producer(tag, producer), keys.session(tag, uuid))
        )
    # One open per customer and library version (each version's functions are its own).
    _, _, open_fn = loaded[0]
    open_name = open_fn.replace("_publish", "_open")
    for c in customers:
        ckeys = CustomerKeys(
            keys.session(tag, c.uuid), keys.conns(tag, c.uuid), keys.live(tag), keys.due(tag),
            keys.events(tag), c.producer_key, keys.suppressed(tag), keys.aliases(tag, c.uuid),
        )  # fmt: skip
        sid = f"s{c.uuid[:15]}"
        args = OpenArgs(
            c.uuid, f"p1:1:{c.uuid}", sid,
            session_start_record(SITE, c.uuid, sid, c.producer, {}, 1764160000000),
            15_000, 60_000, timing_idle, timing_max, settings.stream_maxlen, "sei",
            session_end_record(SITE), 0, int(settings.producer_ttl * 1000), "0" * 64, "", 0,
        )  # fmt: skip
        reply = conn.cmd(*pack_fcall_args(open_name, list(ckeys), list(args)))
        c.session = reply[0].decode()
    fixed_parts = [*fixed]
    runners: list[tuple[str, Any]] = [(name, fn) for name, _, fn in loaded]
    if not opts.no_ref:
        runners.append(("node-dedup (ref)", None))
    print(f"redis {conn.cmd('INFO', 'server').decode().split('redis_version:')[1].split()[0]}, "
          f"{opts.connections} customers, depth {opts.depth}, rounds {opts.rounds}, "
          f"group {'yes' if opts.group else 'no'}")  # fmt: skip
    for sc in scenarios:
        fpc, epf, repeat = sc
        calls = opts.calls or max(200, 20_000 // (fpc * epf))
        results = {name: Result() for name, _ in runners}
        cursor = 0
        for _ in range(opts.rounds):
            for name, fn in runners:
                # Build the round's calls first, so Python's packing is not timed in Redis' CPU.
                batches = []
                for _ in range(calls):
                    frames = []
                    for j in range(fpc):
                        frames.append(customers[cursor % len(customers)])
                        if j % repeat == repeat - 1:
                            cursor += 1
                    batches.append(frames)
                if fn is None:
                    packed = [pack_ref(ref_sha, head.events, settings, f, epf) for f in batches]
                    replies = fpc  # one EVALSHA per frame
                else:
                    packed = [pack_publish(fn, head, fixed_parts, f, epf) for f in batches]
                    replies = 1
                nframes = calls * fpc
                conn.cmd("CONFIG", "RESETSTAT")
                cpu0 = redis_cpu(conn)
                if opts.grind:
                    opts.grind.start()
                sent = done = 0
                for group in packed:
                    if sent - done >= opts.depth:
                        for _ in range(replies):
                            check(conn.recv())
                        done += 1
                    conn.send(group)
                    sent += 1
                while done < sent:
                    for _ in range(replies):
                        check(conn.recv())
                    done += 1
                instructions = opts.grind.stop() if opts.grind else 0
                cpu = redis_cpu(conn) - cpu0
                stats = commandstats(conn)
                r = results[name]
                r.instr_frame.append(instructions / nframes)
                r.cpu_us_frame.append(cpu * 1e6 / nframes)
                r.cpu_us_event.append(cpu * 1e6 / (nframes * epf))
                top = "fcall" if fn is not None else "evalsha"
                r.call_us.append(stats[top][1] / nframes)
                skip = ("info", "config|resetstat", top)
                inner_us = sum(u for cmd, (_, u) in stats.items() if cmd not in skip)
                r.lua_us.append((stats[top][1] - inner_us) / nframes)
                for cmd, (n, u) in stats.items():
                    if cmd in skip:
                        continue
                    r.inner.setdefault(cmd, []).append(n / nframes)
                    r.inner_us.setdefault(cmd, []).append(u / nframes)
        print(f"\n{fpc} frame(s) per call ({repeat} in a row per customer), {epf} event(s) "
              f"per frame, {calls} calls a round")  # fmt: skip
        print(f"{'':18} {'Redis CPU µs/frame':>22} {'µs/event':>20} {'µs in call/frame':>22} "
              f"{'of which Lua':>20}  redis.calls per frame")  # fmt: skip
        for name, _ in runners:
            r = results[name]
            inner = ", ".join(
                f"{cmd} {statistics.median(v):.2f}" for cmd, v in sorted(r.inner.items())
            )
            print(f"{name:18} {med(r.cpu_us_frame):>22} {med(r.cpu_us_event):>20} "
                  f"{med(r.call_us):>22} {med(r.lua_us):>20}  {inner}")  # fmt: skip
            if opts.usec:
                inner = ", ".join(
                    f"{cmd} {statistics.median(v):.2f}" for cmd, v in sorted(r.inner_us.items())
                )
                print(f"{'':18} µs per frame in each command: {inner}")
            if opts.callgrind:
                ir = statistics.median(r.instr_frame)
                print(f"{'':18} {ir:,.0f} instructions a frame, {ir / epf:,.0f} an event")
        if len(runners) > 1:
            base = results[runners[0][0]].cpu_us_frame
            if opts.callgrind:
                ib = statistics.median(results[runners[0][0]].instr_frame)
                for name, _ in runners[1:]:
                    ir = statistics.median(results[name].instr_frame)
                    print(f"  {name} / {runners[0][0]} instructions a frame: {ir / ib:.3f}")
            for name, _ in runners[1:]:
                ratios = [b / a for a, b in zip(base, results[name].cpu_us_frame, strict=True)]
                print(f"  {name} / {runners[0][0]} CPU per frame, round by round: {med(ratios)}")


def check(reply: Any) -> None:
    if isinstance(reply, list) and reply and isinstance(reply[0], int):
        return
    raise RuntimeError(f"unexpected reply {reply!r}")


def pack_fcall_args(function: str, keys: list[Any], args: list[Any]) -> list[Any]:
    return ["FCALL", function, len(keys), *keys, *args]


def pack_publish(fn: str, head: PublishKeys, fixed: list[Any], frames: list[Customer],
                 epf: int) -> list[bytes]:  # fmt: skip
    """One publish call: the layouts' keys and arguments, items packed as the publisher does."""
    frame_keys: list[Any] = []
    tail: list[bytes] = []
    count = 0
    for c in frames:
        frame_keys.extend(PublishFrameKeys(c.producer_key, c.session_key))
        items: list[Any] = []
        for _ in range(epf):
            c.seq += 1
            items.extend((c.seq, b"e", payload(c.uuid, c.session, c.producer, c.seq)))
        tail.append(bulk(c.session))
        tail.append(pack_items(items))
        count += frame_count(epf)
    return pack_fcall(fn, [*head, *frame_keys], fixed, tail, count)


def pack_ref(sha: str, stream: str, settings: Settings, frames: list[Customer],
             epf: int) -> list[bytes]:  # fmt: skip
    """node-dedup's calls: one EVALSHA per frame, pipelined together."""
    parts: list[bytes] = []
    for c in frames:
        args: list[Any] = ["EVALSHA", sha, 2, stream, c.producer_key + ":ref",
                           settings.stream_maxlen, int(settings.producer_ttl)]  # fmt: skip
        for _ in range(epf):
            c.seq += 1
            args.extend((c.seq, payload(c.uuid, c.session, c.producer, c.seq)))
        parts.extend(pack_args(args))
    return parts


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
