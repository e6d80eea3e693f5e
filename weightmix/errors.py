"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WeightmixError(Exception):
    """A problem with the user's input (files, recipe, flags). The CLI prints it and exits 2."""

    exit_code = 2


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
