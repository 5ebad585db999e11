"""``python -m collafuse.server`` runs the server CLI."""

from collafuse.server.cli import main

raise SystemExit(main())
