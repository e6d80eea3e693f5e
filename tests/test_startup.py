"""Start-up: the garbage collector is paused while weightmix imports torch and the imported
objects are frozen while a command runs; called from Python, both leave the interpreter as
they found it; the executable leaves them frozen for the interpreter's exit."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from weightmix import __version__
from weightmix.cli import command, main


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


def test_the_executable_exits_with_the_imports_still_frozen(monkeypatch, capsys):
    """The interpreter's last collection at exit then passes them by."""
    monkeypatch.setattr(sys, "argv", ["weightmix", "--version"])
    try:
        with pytest.raises(SystemExit) as exited:
            command()
        assert exited.value.code == 0 and __version__ in capsys.readouterr().out
        assert gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()


def test_python_dash_m_weightmix_runs_the_executable():
    shown = subprocess.run(
        [sys.executable, "-m", "weightmix", "--version"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and __version__ in shown.stdout


def test_a_failed_import_leaves_the_collector_on():
    code = (
        "import gc, sys\n"
        "sys.modules['torch'] = None\n"
        "try:\n    import weightmix\nexcept ImportError:\n    pass\n"
        "print(gc.isenabled())"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["True"]


def test_a_command_leaves_what_its_caller_froze_frozen(run, models):
    """Freezing does not nest: main() freezes and thaws only when nothing was frozen."""
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert run("merge", models["A"], models["B"], "--dry-run").code == 0
        # thawed would leave next to none frozen; a few frozen objects may be freed meanwhile
        # (the suite's own: a full run once saw 2 of 768,139 go)
        assert gc.get_freeze_count() > frozen * 0.99
    finally:
        gc.unfreeze()
