"""``python -m server`` runs the ``eventwire`` command."""

from eventwire.commands.cli import main

raise SystemExit(main())
