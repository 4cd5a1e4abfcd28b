"""``python -m eventwire`` runs the ``eventwire`` command (the only importer of ``commands``)."""

from eventwire.commands.cli import main

raise SystemExit(main())
