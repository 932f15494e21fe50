"""`python -m batch embed|generate ...`: see batch/cli.py."""

from batch.cli import main

raise SystemExit(main())
