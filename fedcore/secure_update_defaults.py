"""Defaults of a plan's ``secagg`` section that both sides need, without torch.

:mod:`fedcore.secure_updates` (which encodes updates with torch) and the plan language (which
documents them all) read them from here, so checking a plan loads no torch.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CLIP", "DEFAULT_MAX_EXAMPLES"]

DEFAULT_CLIP = 1.0
DEFAULT_MAX_EXAMPLES = 1_000_000
