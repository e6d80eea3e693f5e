"""The `weightmix` command's entry point: hint the inputs to the page cache (readahead.py),
then import the command line (and with it torch) and run it."""

from __future__ import annotations

import sys

from weightmix import readahead


def main() -> int:
    readahead.start(sys.argv)
    from weightmix.cli import main as run_command_line

    return run_command_line()
