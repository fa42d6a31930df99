"""Text from files made safe for a terminal: names are data, never terminal commands.

A tensor name is whatever a file says it is. Printed raw, a name holding ``ESC ]52;…`` writes
the clipboard, ``ESC ]0;…`` sets the window title, ``\\r`` or ``ESC [2K`` rewrites lines. Every
renderer meant for a terminal (the report's table and summary, the command line) passes names
through :func:`printable`, which shows control characters as escapes (``\\x1b``).
"""

from __future__ import annotations

import re

__all__ = ["byte_size", "printable"]

# C0 controls (tab and newline included: a name must not start a new line), DEL and C1 controls,
# and the Unicode line and paragraph separators and bidirectional overrides, which reorder text
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape (``"a\\x1b[2Kb"``)."""
    return _UNSAFE.sub(_escape, text)


def byte_size(n: float) -> str:
    """A byte count for people: ``40.7 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
