"""Log lines that a peer cannot forge: control characters in a message become escapes.

A value received from the network (an agent's error reason, a server's refusal, a header) may hold
a newline; logged as is, ``"bad\\n2026-12-05 ... CRITICAL forged"`` shows up as a second line that
looks like the logger's own. :class:`EscapingFormatter` escapes C0/C1 control characters and the
Unicode line separators in the formatted message (the arguments are part of it), so one log call is
always one line; a traceback appended by the formatter keeps its own newlines. Used by the
server's logging configuration (config/settings.py) and the agent's (clientagent/cli.py).
"""

from __future__ import annotations

import logging
import re

__all__ = ["EscapingFormatter", "escape_control"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ...).

    Args:
        text: any string, typically a log message that holds values from the network.

    Returns:
        the same text on one line; unchanged when it holds no control character.
    """
    return _CONTROL.sub(_escape, text)


class EscapingFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose message part never spans more than one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        """Format with the record's message escaped (``record`` itself is left as it was)."""
        message = record.message
        record.message = escape_control(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message
