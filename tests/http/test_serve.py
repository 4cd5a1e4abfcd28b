"""eventwire serve --workers 2 serves HTTP ingest on one shared port; protocol.md's curl works."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.procs import UNIT, RedisProcess, ServerProcess
from tests.wire import client_events

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workers2(redis_proc: RedisProcess, sites_file: Path) -> Iterator[ServerProcess]:
    """``eventwire serve --workers 2`` on free ports; SIGTERMed at teardown."""
    srv = ServerProcess(redis_proc.url, sites_file, workers=2).start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.terminate()


def doc_curl() -> str:
    """The curl example of docs/protocol.md section 14, as a shell command."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("## 14. HTTP ingest") :]
    found = re.search(r"```sh\n(curl .*?)```", section, re.DOTALL)
    assert found is not None, "section 14 shows a curl example"
    return found.group(1)


async def test_doc_curl_through_workers(workers2: ServerProcess, redis: aioredis.Redis) -> None:
    """The documented curl, sent twice to the supervisor's HTTP port: acked, stored once."""
    command = doc_curl().replace("127.0.0.1:8782", f"127.0.0.1:{workers2.http_port}")
    answers = []
    for _ in range(2):
        out = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            timeout=10 * UNIT,
            check=True,
        )
        answers.append(json.loads(out.stdout))
    assert answers[0] == {"type": "ack", "seq": 1, "accepted": 1, "duplicate": 0, "rejected": []}
    assert (answers[1]["accepted"], answers[1]["duplicate"]) == (0, 1)
    stored = await client_events(redis, "shop")
    assert [(e["uuid"], e["action"], e["params"]) for e in stored] == [
        ("customer-42", "order.purchase", {"order_id": "o-9"})
    ]


def test_readme_shows_the_same_curl() -> None:
    """The README's HTTP example is the one protocol.md shows (and the test above runs)."""
    assert doc_curl() in (ROOT / "README.md").read_text()
