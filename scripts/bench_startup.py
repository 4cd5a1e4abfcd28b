"""Start-up time of the ``eventwire`` command, for one source tree or two compared.

Measures, ``--rounds`` times each (two trees alternate A B, then B A):

- the import of ``eventwire.commands.cli`` (``python -X importtime``, ms);
- the wall time of ``eventwire tail --help``, ``send --help`` and ``stats --help``;
- the time until ``eventwire tail --since 0 --json`` prints its first line,
  against a private ``redis-server`` (free loopback port) holding one event.

Prints the median and the range of each, and the machine's CPU taken by other
jobs meanwhile. ``--base DIR`` names another tree's ``server/`` folder (for
example ``git archive main server | tar -x -C /tmp/base``) to compare with.

usage: .venv/bin/python scripts/bench_startup.py [--rounds 5] [--base DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES = ROOT / "config" / "sites.toml"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Tree:
    """One source tree's ``server/`` folder, run with this interpreter."""

    def __init__(self, server: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(server), "EVENTWIRE_CONFIG": os.devnull}

    def importtime(self) -> float:
        """ms of ``import eventwire.commands.cli``, as ``-X importtime`` counts it."""
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import eventwire.commands.cli"],
            env=self.env, capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
        (line,) = [ln for ln in out.splitlines() if ln.endswith("| eventwire.commands.cli")]
        return int(line.split("|")[1]) / 1000

    def wall(self, *args: str) -> float:
        """ms until ``python -m eventwire ARGS`` exits."""
        start = time.perf_counter()
        command = [sys.executable, "-m", "eventwire", *args]
        subprocess.run(command, env=self.env, capture_output=True, check=True)
        return (time.perf_counter() - start) * 1000

    def first_line(self, redis_url: str) -> float:
        """ms until ``eventwire tail --since 0`` prints the stored event; then SIGINT."""
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "eventwire", "tail", "--redis", redis_url,
             "--sites", str(SITES), "--since", "0", "--json"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        took = (time.perf_counter() - start) * 1000
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        if b'"startup-1"' not in line or proc.returncode != 0:
            raise SystemExit(f"tail printed {line!r}, exit {proc.returncode}: {err.decode()}")
        return took


def main() -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each case per tree (5)")
    parser.add_argument("--base", type=Path, help="another tree's server/ folder to compare with")
    args = parser.parse_args()
    trees = {"this": Tree(ROOT / "server")}
    if args.base is not None:
        trees = {"base": Tree(args.base), **trees}
    port = free_port()
    data = tempfile.mkdtemp(prefix="eventwire-startup-")
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--dir", data, "--logfile", f"{data}/redis.log"],
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        ping = ["redis-cli", "-p", str(port), "PING"]
        while subprocess.run(ping, capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.1)
        event = {"site": "demo", "uuid": "startup-1", "action": "page.visit", "time": 0}
        subprocess.run(
            ["redis-cli", "-p", str(port), "XADD", "ew:{demo}:events", "*",
             "event", json.dumps(event)],
            check=True, capture_output=True,
        )  # fmt: skip
        cases: dict[str, Callable[[Tree], float]] = {
            "import eventwire.commands.cli": Tree.importtime,
            "eventwire tail --help": lambda t: t.wall("tail", "--help"),
            "eventwire send --help": lambda t: t.wall("send", "--help"),
            "eventwire stats --help": lambda t: t.wall("stats", "--help"),
            "eventwire tail: first line": lambda t: t.first_line(url),
        }
        times: dict[tuple[str, str], list[float]] = {(c, t): [] for c in cases for t in trees}
        busy, own, began = machine_busy(), os.times(), time.monotonic()
        for n in range(args.rounds):
            order = list(trees) if n % 2 == 0 else list(trees)[::-1]
            for case, measure in cases.items():
                for name in order:
                    times[(case, name)].append(measure(trees[name]))
        elapsed = time.monotonic() - began
        mine = sum(os.times()[2:4]) - sum(own[2:4])
        others = (machine_busy() - busy - mine) / elapsed * 100
    finally:
        redis.terminate()
        redis.wait()
    print(f"{args.rounds} rounds in {elapsed:.0f} s; other jobs ~{others:.0f}% of one core")
    for case in cases:
        cells = []
        for name in trees:
            ms = times[(case, name)]
            cells.append(f"{name} {statistics.median(ms):.0f} ms ({min(ms):.0f}-{max(ms):.0f})")
        print(f"{case:32} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
