"""The agent's exit codes, shared by the command line and the connection loop.

Apart from :mod:`clientagent.connection` (which loads torch for training) so that the commands
that train nothing (``--help``, ``init``, ``check``, ``plans``, ``log``, ``steward-key``) start
without it.
"""

from __future__ import annotations

__all__ = ["EXIT_AUTH", "EXIT_CONFIG", "EXIT_ERROR", "EXIT_OK", "EXIT_POLICY"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3  # the server refused the token; reconnecting cannot help
EXIT_POLICY = 4  # the server is not the consortium [policy] consortium names
