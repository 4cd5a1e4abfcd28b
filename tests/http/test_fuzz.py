"""scripts/fuzz_http.py against a real server: only protocol answers, nothing acked lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import MakeServer
from tests.procs import RedisProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fuzz_http import fuzz_http

SITES = """
[sites.fuzz]
allow_no_origin = true
deny = ["spam.*", "*.secret"]
authenticated = ["form.submit", "account.*"]
required = { "product.*" = ["sku"], "cart.add" = ["sku", "qty"] }
"""


@pytest.mark.parametrize("seed", [1, 2])
async def test_fuzzed_requests(
    make_server: MakeServer, redis_proc: RedisProcess, seed: int
) -> None:
    """Fuzzed bodies, headers and gzip get protocol answers; every acked event is stored once."""
    srv = await make_server(sites=SITES, max_frame_bytes=64 * 1024)
    outcomes, findings = await fuzz_http(
        f"{srv.http_url}/v1/track/fuzz", redis_proc.url, "fuzz", 250, seed
    )
    assert findings == []
    assert outcomes["200"] > 20, outcomes
    assert outcomes["400"] > 20, outcomes
