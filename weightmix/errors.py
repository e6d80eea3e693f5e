"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WeightmixError(Exception):
    """A problem with the user's input (files, recipe, flags). The CLI prints it and exits 2.

    The message is kept one printable line whatever names it quotes from a stranger's file: line
    breaks are written as \\n and \\r, lone surrogates (from JSON escapes such as \\ud800) as
    escapes too, so that neither a terminal nor a strict UTF-8 stream can break it."""

    exit_code = 2

    def __init__(self, message: str = "", *args: object):
        super().__init__(one_line(str(message)), *args)


def one_line(text: str) -> str:
    """`text` as one line that encodes as UTF-8: line breaks and lone surrogates escaped."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
