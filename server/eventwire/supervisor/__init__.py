"""``eventwire serve --workers N``: N server processes on one port under one supervisor.

This package owns the supervisor process and the children's end of the
socket each child shares with it, in four modules:

- :mod:`~eventwire.supervisor.processes`: :class:`Supervisor`: the reserved
  port, the children's start, restart policy and stop.
- :mod:`~eventwire.supervisor.lifeline`: the socket pair a child reports on,
  which ends the child when the supervisor goes.
- :mod:`~eventwire.supervisor.admin_proxy`: the supervisor's admin listener:
  ``/healthz``, ``/readyz``, and every other request passed to a child.
- :mod:`~eventwire.supervisor.scrape`: ``/metrics``: every child's metrics
  with the ``worker`` label.

The supervisor serves no connection itself:

- It resolves the public port (port 0 becomes one concrete free port) and
  keeps it with a bound, never-listening ``SO_REUSEPORT`` socket: no other
  program takes the port while a child restarts, and the kernel hands
  connections only to listening sockets, so this one never gets any.
- It starts N children, each ``python -m eventwire`` with the command line the
  supervisor was given plus ``--workers 1``, the concrete ``--listen`` and a
  private ``--admin 127.0.0.1:0``. Each runs the ordinary single-process
  server and binds the public port with ``SO_REUSEPORT``: the kernel spreads
  new connections across the children. Children share nothing but Redis.
- Each child inherits one end of a socket pair, its *lifeline*. Once it
  listens it writes one JSON line there (pid, port, admin port); when the
  supervisor's end closes (the supervisor exited, even by SIGKILL) the child
  drains and exits by itself, so no child outlives its supervisor.
- A child that exits while the supervisor is not stopping is restarted after
  a backoff (:class:`RestartPolicy`); a child that exits ``crash_limit``
  times within ``crash_window`` makes the supervisor give up: it drains the
  others and exits 1.
- SIGHUP (reload the sites file) is forwarded to every listening child.
- On SIGTERM or SIGINT it sends SIGTERM to every child, which acks what it
  holds and closes its connections 1001 (up to ``drain_timeout``), and waits
  ``drain_timeout + stop_margin`` for them; a child still running then is
  killed.
- Its admin listener (the ``admin`` setting) answers three paths itself:
  ``/healthz`` (the supervisor runs), ``/readyz`` (some child listens and
  every listening child is ready) and ``/metrics``: every child's metrics,
  each sample labelled ``worker="1".."N"``, plus ``eventwire_workers``,
  ``eventwire_worker_up{worker}`` and ``eventwire_worker_restarts_total{worker}``,
  so one scrape target sees every child's counters (``admin_token`` guards
  it as it guards a child's). Every other request (the dashboard, ``/v1/...``,
  the live relay's WebSocket) is passed through, bytes as they are, to one
  listening child's admin listener: those routes read Redis, so any child
  gives the same answer, and the child checks the token.

Exit codes of :meth:`Supervisor.run`: :data:`EXIT_OK` (every child drained
and exited 0), :data:`EXIT_FAILED` (a child did not start, crash-looped or
failed while stopping), :data:`EXIT_KILLED` (a child did not stop in time and
was killed).
"""

from eventwire.supervisor.lifeline import LIFELINE_ENV, Lifeline
from eventwire.supervisor.processes import (
    EXIT_FAILED,
    EXIT_KILLED,
    EXIT_OK,
    WORKER_ENV,
    RestartPolicy,
    Supervisor,
    child_command,
    reserve_port,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_KILLED",
    "EXIT_OK",
    "LIFELINE_ENV",
    "WORKER_ENV",
    "Lifeline",
    "RestartPolicy",
    "Supervisor",
    "child_command",
    "reserve_port",
]
