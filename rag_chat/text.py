"""Small checks and clean-ups of user-written text, shared by the entry points."""

from __future__ import annotations

import unicodedata


def is_unicode(text: str) -> bool:
    """False for strings with lone UTF-16 surrogates (JSON escapes can make them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def one_line(text: str) -> str:
    """``text`` as one line: control characters (NUL, escapes, bells, newlines) become spaces,
    runs of whitespace one space, the ends trimmed (titles, rating comments)."""
    spaced = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(spaced.split())
