"""``python -m clientagent``: the same as ``quorum-agent``."""

from clientagent.cli import main

raise SystemExit(main())
