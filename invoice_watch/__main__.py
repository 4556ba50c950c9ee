"""``python -m invoice_watch`` runs the command line."""

from invoice_watch.cli import main

raise SystemExit(main())
