"""Byte sizes as users write them ('5GB', '500MiB', '2e9') and as we print them."""

from __future__ import annotations

import re

from weightmix.errors import WeightmixError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# one way to match each number (`[0-9]*\.?[0-9]+` tried every split of a digit run: quadratic)
_SIZE = re.compile(
    r"^\s*((?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE
)
MAX_SIZE_TEXT = 100  # characters: no size needs more


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in `text`: a plain number or a number with a unit (KB, MB, GB, KiB, MiB, GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        if len(str(text)) > MAX_SIZE_TEXT:
            shown = str(text)[:20]
            raise WeightmixError(
                f"{what} '{shown}...' ({len(str(text))} characters) is not a size: write e.g."
                " 5GB, 500MB or 2GiB"
            )
        match = _SIZE.match(str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise WeightmixError(f"{what} '{text}' is not a size: write e.g. 5GB, 500MB or 2GiB")
        number = float(match.group(1)) * _UNITS[unit]
        if number > 2**63:
            raise WeightmixError(f"{what} '{text}' is too large: write e.g. 5GB, 500MB or 2GiB")
        size = int(number)
    if size <= 0:
        raise WeightmixError(f"{what} '{text}' must be more than 0 bytes")
    return size


def format_size(size: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks and hubs report them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"


def count(number: int, noun: str, plural: str | None = None) -> str:
    """'1 key', '2 keys', '3 entries' (plural given when it is not noun + s)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
