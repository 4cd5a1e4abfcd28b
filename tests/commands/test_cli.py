"""eventwire/commands/cli.py: the eventwire command as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from eventwire.commands.cli import STATS_RANGES
from eventwire.core.config import Settings
from eventwire.gateway import EventwireServer
from eventwire.persist.ranges import RANGES
from eventwire.persist.sinks import DEFAULT_DSN
from tests.procs import UNIT, RedisProcess
from tests.wire import client_events

REPO = Path(__file__).resolve().parents[2]

#: Runs ``eventwire ARGS`` and, on the way out, prints the imported modules to stderr.
PROBE = """
import atexit, json, sys
atexit.register(lambda: print("modules:", json.dumps(sorted(sys.modules)), file=sys.stderr))
from eventwire.commands.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
#: Rooms and libraries an operator command has no use for: the server, the HTTP
#: listener, visitors, the persist worker, the supervisor and what they load.
HEAVY = (
    "eventwire.gateway",
    "eventwire.ingest",
    "eventwire.admin",
    "eventwire.http",
    "eventwire.live",
    "eventwire.persist",
    "eventwire.supervisor",
    "eventwire.core.connection",
    "eventwire.core.visitor",
    "aiohttp",
    "asyncpg",
    "ua_parser",
    "user_agents",
    "crawlerdetect",
    "websockets",
)


def imported(stderr: str) -> set[str]:
    """The modules a :data:`PROBE` run printed."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("modules: ")]
    return set(json.loads(line.removeprefix("modules: ")))


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """Those of ``packages`` that are in ``modules``, or a module of theirs."""
    return [p for p in packages if any(m == p or m.startswith(p + ".") for m in modules)]


def eventwire(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m eventwire ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "eventwire", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=30,
        check=False,
    )


def test_check_config_prints_effective_settings() -> None:
    """check-config prints settings with their sources and the sites, secrets masked."""
    out = eventwire(
        "check-config", "--listen", "0.0.0.0:9000",
        env={
            "EVENTWIRE_REDIS_URL": "redis://:s3cret@db:6379/0",
            "EVENTWIRE_MAX_BATCH": "50",
            "EVENTWIRE_PERSIST_PG_WRITERS": "3",
        },
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["settings"]["persist_pg_writers"] == 3
    assert config["sources"]["persist_pg_writers"] == "EVENTWIRE_PERSIST_PG_WRITERS"
    assert config["settings"]["listen"] == "0.0.0.0:9000"
    assert config["sources"]["listen"] == "command line"
    assert config["settings"]["max_batch"] == 50
    assert config["sources"]["max_batch"] == "EVENTWIRE_MAX_BATCH"
    assert "s3cret" not in out.stdout
    assert "demo" in config["sites"]


def test_config_error_exits_2() -> None:
    """A wrong setting stops startup with exit 2 and a message naming key and source."""
    out = eventwire("serve", env={"EVENTWIRE_HELLO_TIMEOUT": "soon"})
    assert out.returncode == 2
    assert "hello_timeout" in out.stderr
    assert "EVENTWIRE_HELLO_TIMEOUT" in out.stderr


def test_missing_sites_file_exits_2(tmp_path: Path) -> None:
    """A missing sites file is named in the error."""
    out = eventwire("serve", "--sites", str(tmp_path / "nope.toml"))
    assert out.returncode == 2
    assert "nope.toml" in out.stderr


async def test_send(server: EventwireServer, redis: aioredis.Redis) -> None:
    """eventwire send stores one event and says so; a bad action is reported, exit 1."""

    async def send(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventwire", "send", "--url", f"{server.url}/v1/track/app", *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await send("--uuid", "cli-1", "product.view", 'sku="A-1"', "price=12.5")
    assert code == 0
    assert out.startswith("stored: product.view for cli-1")
    (stored,) = await client_events(redis)
    assert stored["params"] == {"sku": "A-1", "price": 12.5}
    code, _, err = await send("nodot")
    assert code == 1
    assert err.startswith("rejected invalid_action")


def test_help_imports_no_room() -> None:
    """Every subcommand's --help is answered without importing Redis or any async room."""
    commands = ("serve", "check-config", "send", "tail", "stats", "persist", "activity")
    commands += ("forget", "unsuppress", "export")
    for command in (*commands, "--version"):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, command, "--help"],
            capture_output=True, text=True, cwd=REPO, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(("usage: eventwire", "eventwire 0")), out.stdout
        modules = imported(out.stderr)
        assert loaded(modules, (*HEAVY, "redis", "asyncio", "eventwire.store")) == [], command


async def test_tail_imports_no_heavy_room(
    redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """``eventwire tail`` prints an event and stops without loading the server's rooms.

    What keeps its start quick: the flags are parsed without importing any
    room (commands/cli.py), and tail imports only the store and core.
    """
    await redis.xadd("ew:{app}:events", {"event": json.dumps({"site": "app", "uuid": "u-1"})})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, "tail", "--redis", redis_proc.url, "--sites", str(sites_file),
        "--since", "0", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        env={**os.environ, "EVENTWIRE_CONFIG": os.devnull},
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10 * UNIT))
    assert line["uuid"] == "u-1"
    proc.send_signal(signal.SIGINT)
    err = (await asyncio.wait_for(proc.stderr.read(), 10 * UNIT)).decode()
    assert await proc.wait() == 0, err
    modules = imported(err)
    assert "eventwire.commands.tail" in modules
    assert "redis" in modules
    assert loaded(modules, HEAVY) == []


def test_flags_name_what_the_rooms_define() -> None:
    """The defaults cli.py names without importing persist are persist's own."""
    assert list(STATS_RANGES) == list(RANGES)
    assert Settings().persist_dsn == DEFAULT_DSN
