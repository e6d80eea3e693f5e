"""Start-up: the garbage collector is paused while weightmix imports torch and the imported
objects are frozen while a command runs; both leave the interpreter as they found it."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from weightmix.cli import main


@pytest.mark.parametrize("enabled", [True, False])
def test_importing_weightmix_leaves_the_collector_as_it_was(enabled):
    setting = "gc.enable()" if enabled else "gc.disable()"
    code = f"import gc; {setting}; import weightmix; print(gc.isenabled(), gc.get_freeze_count())"
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert shown == [str(enabled), "0"]


IMPORT_WATCH = """
import gc, sys
during = []
def watch(phase, info):  # a collection that starts while weightmix imports its modules
    package = sys.modules.get("weightmix")
    importing = "weightmix.api" in sys.modules and not hasattr(package, "__all__")
    if phase == "start" and importing:
        during.append(info["generation"])
gc.callbacks.append(watch)
import weightmix
print(len(during), len(sys.modules) > 500)
"""


def test_no_collection_runs_while_weightmix_imports_torch():
    shown = subprocess.run(
        [sys.executable, "-c", IMPORT_WATCH], capture_output=True, text=True, check=True
    )
    assert shown.stdout.split() == ["0", "True"]


def test_a_command_thaws_what_it_froze(run, models):
    before = gc.get_freeze_count()
    assert run("merge", models["A"], models["B"], "--dry-run").code == 0
    assert gc.get_freeze_count() == before
    assert main(["merge", "--no-such-flag"]) == 2  # an error path thaws too
    assert gc.get_freeze_count() == before


def test_a_command_freezes_the_imported_objects_while_it_runs(monkeypatch, run, models):
    counts = []
    monkeypatch.setattr("weightmix.cli._run", lambda argv: counts.append(gc.get_freeze_count()))
    main(["--version"])
    assert counts and counts[0] > 100_000  # torch's modules, functions and tables
