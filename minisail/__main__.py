"""`python -m minisail <command>`: see minisail/cli/."""

from minisail.cli import main

raise SystemExit(main())
