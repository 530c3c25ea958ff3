"""``python -m otfx``: the command line (see :mod:`otfx.cli`)."""

from otfx.cli import main

raise SystemExit(main())
