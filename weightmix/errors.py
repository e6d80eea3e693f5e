"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WeightmixError(Exception):
    """A problem with the user's input (files, recipe, flags). The CLI prints it and exits 2.

    The message is kept one printable line whatever names it quotes from a stranger's file: line
    breaks are written as \\n and \\r, other control characters (\\x1b, \\x1d ...), the line
    separators and lone surrogates (from JSON escapes such as \\ud800) as escapes too, so that
    neither a terminal nor a strict UTF-8 stream nor str.splitlines() can break it."""

    exit_code = 2

    def __init__(self, message: str = "", *args: object):
        super().__init__(one_line(str(message)), *args)


# control characters (C0 but tab, DEL, C1) and the line and paragraph separators: everything
# str.splitlines() breaks at, and the escapes a stranger's name could send to a terminal
_ESCAPES = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029)
    if code != 0x09
}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r"})


def one_line(text: str) -> str:
    """`text` as one printable line that encodes as UTF-8: line breaks, other control
    characters and lone surrogates escaped."""
    return text.translate(_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
