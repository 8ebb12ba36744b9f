"""Text that others typed, made safe to put in front of a person: names in a terminal, a table, a dashboard.

A model name, an OpenAI `user` or an account name is whatever a client or an operator sent. Printed as it is,
an escape sequence in it (`\\x1b[2J`) clears the operator's terminal or the dashboard's screen, a line break
forges a row, and a bidirectional control (U+202E) reorders the text shown after it. `unsafe_at` finds such a
character (for a name llamakit keeps, which refuses it); `shown` writes each one as a visible escape (for
text llamakit only displays).
"""

from __future__ import annotations

import unicodedata
from typing import Final

__all__ = ["check_name", "shown", "unsafe_at"]

# Unicode general categories that are never text a name needs: control characters (C0, DEL, C1), lone
# surrogates (which no database stores), and line and paragraph separators.
_UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cs", "Zl", "Zp"})
# The bidirectional controls: marks, embeddings, overrides and isolates (Unicode's Bidi_Control property).
_BIDI_CONTROLS: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Format characters (Cf) a name may hold: the zero-width non-joiner and joiner, and the tag characters of emoji
# flag sequences (U+E0020-E007F).
_NAME_FORMAT_CHARACTERS: Final = frozenset({"\u200c", "\u200d", *map(chr, range(0xE0020, 0xE0080))})


def _unsafe(char: str) -> bool:
    return char in _BIDI_CONTROLS or unicodedata.category(char) in _UNSAFE_CATEGORIES


def unsafe_at(text: str) -> int | None:
    """The index of the first character of `text` that must not be shown as it is, or None."""
    return next((at for at, char in enumerate(text) if _unsafe(char)), None)


def check_name(name: str) -> str:
    """`name`, if a name may be it; ValueError naming the first character it may not hold: an unsafe one (see
    `unsafe_at`), or an invisible format character (U+200B, U+FEFF, a soft hyphen …) that would let two names
    look the same. The joiners U+200C and U+200D and the tag characters stay allowed: emoji sequences and some
    scripts need them."""
    for at, char in enumerate(name):
        if _unsafe(char) or (unicodedata.category(char) == "Cf" and char not in _NAME_FORMAT_CHARACTERS):
            raise ValueError(
                f"name must not contain control or invisible characters, got U+{ord(char):04X} at position {at}; "
                "give a name on one line of plain text"
            )
    return name


def shown(text: str) -> str:
    """`text` with each unsafe character written as a visible escape: ESC as `\\x1b`, U+202E as `\\u202e`."""
    if unsafe_at(text) is None:
        return text
    return "".join((f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") if _unsafe(c) else c for c in text)
