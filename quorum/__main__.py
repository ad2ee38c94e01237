"""``python -m quorum``: the same as the ``quorum`` command."""

import sys

from quorum.cli import main

sys.exit(main())
