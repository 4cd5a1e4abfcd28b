"""``eventwire send``: send one event with the Python client and print the server's answer.

Exit codes: 0 stored, 1 rejected or not acked within :data:`SEND_TIMEOUT`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

import msgspec

from eventwire.client import EventwireClient
from eventwire.log import configure

#: How long ``eventwire send`` waits for its event to be acked.
SEND_TIMEOUT: Final = 5.0


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"eventwire send: param {text!r} is not KEY=VALUE")
    try:
        return key, msgspec.json.decode(value)
    except msgspec.DecodeError:
        return key, value


async def send(args: argparse.Namespace) -> int:
    """Send ``args.action`` with its params once; returns the exit code."""
    configure("error")  # the answer is printed below; the client's retries are noise here
    params = dict(_param(p) for p in args.params)
    client = EventwireClient(args.url, args.uuid, origin=args.origin)
    await client.start()
    seq = client.track(args.action, params, args.label)
    try:
        await client.flush(timeout=SEND_TIMEOUT)
    except TimeoutError:
        why = client.last_problem or f"no answer within {SEND_TIMEOUT:g} s"
        print(f"not stored: {why}", file=sys.stderr)
        return 1
    finally:
        await client.close(flush=False)
    for r in client.rejections:
        if r.seq == seq:
            print(f"rejected {r.code}: {r.detail}", file=sys.stderr)
            return 1
    assert client.welcome is not None
    print(f"stored: {args.action} for {client.uuid} in session {client.welcome.session}")
    return 0
