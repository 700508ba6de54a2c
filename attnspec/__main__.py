"""python -m attnspec: the command line (see attnspec.cli)."""

from attnspec.cli import main

raise SystemExit(main())
