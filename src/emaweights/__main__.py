"""``python -m emaweights`` runs the command-line interface."""

from emaweights.cli import main

raise SystemExit(main())
