"""Terminal output that text from researchers cannot take over.

Audit entries, job fields, problem details and names can carry text a researcher chose. Printed
raw, an ANSI escape sequence in it could recolour, move the cursor, rewrite earlier lines,
set the window title or, on some terminals, answer back; a bidirectional override could make
a line read differently from what it holds. ``escape_controls`` replaces every control
character (Unicode categories Cc and Cf, and the line and paragraph separators Zl and Zp) by
a visible escape (``\\u001b``, ``\\u202e``); ``ControlEscapingStream`` applies it to everything
the ``fedgate`` command prints (``gateway.cli.main``), keeping the newlines and tabs the
commands write themselves and the carriage return a progress bar starts each redraw with.
A field that must stay on its line is escaped with
``keep=""``, which escapes its newlines too.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import TextIO

_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _escaped(char: str) -> str:
    """``\\uXXXX`` (a UTF-16 surrogate pair beyond the BMP): the same escape JSON uses, so
    ``--json`` output stays valid JSON that decodes to the original text."""
    encoded = char.encode("utf-16-be")
    return "".join(f"\\u{int.from_bytes(encoded[i:i + 2], 'big'):04x}"
                   for i in range(0, len(encoded), 2))


def escape_controls(text: str, *, keep: str = "") -> str:
    """``text`` with every control character not in ``keep`` written as a visible escape."""
    if text.isprintable():
        return text  # nothing to escape: isprintable is False for every Cc, Cf, Zl and Zp
    return "".join(
        _escaped(char) if char not in keep and unicodedata.category(char) in _ESCAPED_CATEGORIES
        else char
        for char in text
    )


class ControlEscapingStream:
    """A text stream that writes to ``stream`` with control characters escaped, except the
    newlines and tabs of the output's own layout."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        # A progress bar redraws its line with one write that starts with a carriage return
        # (tqdm); that leading return is layout too. Any other one is escaped.
        redraw = "\r" if text.startswith("\r") else ""
        self.stream.write(redraw + escape_controls(text[len(redraw):], keep="\n\t"))
        return len(text)

    def __getattr__(self, name: str) -> object:  # flush, fileno, isatty, encoding, ...
        return getattr(self.stream, name)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """``rows`` as aligned columns under a header (the keys of the first row, or ``columns``);
    None shows as "—", every cell on its line (controls escaped, newlines too)."""
    names = list(columns if columns is not None else rows[0] if rows else [])
    cells = [names, *[["—" if row.get(name) is None else escape_controls(str(row[name]))
                       for name in names] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(names))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in cells)
