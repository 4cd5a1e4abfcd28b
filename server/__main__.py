"""``python -m server`` runs the ``eventwire`` command."""

from server.cli import main

raise SystemExit(main())
