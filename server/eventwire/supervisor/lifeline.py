"""The lifeline: the socket pair a child reports on, which ends the child when the supervisor goes.

Each child inherits one end of a socket pair (its file descriptor named by
``EVENTWIRE_SUPERVISOR_FD``). Once the child listens it writes one JSON line
there, a :class:`ReadyReport`; the supervisor writes nothing. When the
supervisor's end closes (the supervisor exited, even by SIGKILL) the child
reads end of file, drains and exits by itself, so no child outlives its
supervisor.

:class:`SupervisorEnd` is the supervisor's end, :class:`Lifeline` the child's.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import MutableMapping
from typing import Final

import msgspec

#: The environment variable naming the lifeline's file descriptor in a child.
LIFELINE_ENV: Final = "EVENTWIRE_SUPERVISOR_FD"
#: Longest ready line a child may write on its lifeline.
READY_LINE_LIMIT: Final = 4096


class ReadyReport(msgspec.Struct):
    """What a child says once it listens: its pid and its public and admin ports."""

    pid: int
    port: int
    admin_port: int


_report_decoder: Final = msgspec.json.Decoder(ReadyReport)


class SupervisorEnd:
    """The supervisor's end of one child's lifeline.

    Give the child :attr:`child_sock` (``pass_fds``, :meth:`child_env`), call
    :meth:`release_child_sock` once it is spawned, then :meth:`read_report`.
    Closing this end tells the child, if it still runs, to drain and exit.
    """

    def __init__(self) -> None:
        self._sock, self.child_sock = socket.socketpair()
        self._writer: asyncio.StreamWriter | None = None

    def child_env(self) -> dict[str, str]:
        """The environment that names the child's end to the child."""
        return {LIFELINE_ENV: str(self.child_sock.fileno())}

    def release_child_sock(self) -> None:
        """Close this process's copy of the child's end (the child holds its own)."""
        self.child_sock.close()

    async def read_report(self) -> tuple[ReadyReport | None, bytes]:
        """Wait for the child's ready line (the caller bounds the wait).

        Returns:
            The report and the line; None for the report when the child
            closed its end first, or wrote an overlong line or no report.
        """
        reader, self._writer = await asyncio.open_connection(
            sock=self._sock, limit=READY_LINE_LIMIT
        )
        try:
            line = await reader.readline()
        except ValueError:  # an overlong line
            return None, b""
        try:
            return _report_decoder.decode(line), line
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None, line

    def close(self) -> None:
        """Close this end."""
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()


class Lifeline:
    """A child's end of its supervisor's socket: says when it listens, notices the supervisor go.

    Args:
        sock: the inherited socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Lifeline | None:
        """The lifeline named by ``EVENTWIRE_SUPERVISOR_FD`` (removed from the environment).

        Returns:
            None when this process has no supervisor.

        Raises:
            SystemExit: the variable names no usable socket.
        """
        value = (os.environ if environ is None else environ).pop(LIFELINE_ENV, None)
        if value is None:
            return None
        try:
            return cls(socket.socket(fileno=int(value)))
        except (ValueError, OSError) as exc:
            raise SystemExit(f"eventwire: {LIFELINE_ENV}={value!r} is no socket: {exc}") from None

    async def report(self, port: int, admin_port: int) -> None:
        """Tell the supervisor this process listens."""
        self._reader, self._writer = await asyncio.open_connection(sock=self.sock)
        line = ReadyReport(pid=os.getpid(), port=port, admin_port=admin_port)
        self._writer.write(msgspec.json.encode(line) + b"\n")
        await self._writer.drain()

    async def wait_closed(self) -> None:
        """Return when the supervisor's end closes (it exited, whatever the way)."""
        assert self._reader is not None, "report() first"
        try:
            while await self._reader.read(256):
                pass  # the supervisor sends nothing; anything read is ignored
        except OSError:
            pass

    def close(self) -> None:
        """Close this end."""
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()
