"""`python -m minisail <command>`: see minisail/cli.py."""

from minisail.cli import main

raise SystemExit(main())
