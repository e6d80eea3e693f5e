"""A Ctrl-C wherever Python can deliver one in the main thread of `weightmix merge`: the command
ends (no hang), and either exits 130 saying truthfully whether the output was written, or, when
the interrupt came after everything was done, exits 0 with the output whole. No temporary
file is left and no worker thread runs on. interrupt_points.py runs the merges, one per point,
in a child process: a hang fails as its timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import weightmix
from weightmix import engine
from weightmix.cli import command
from weightmix.io.interrupts import uninterrupted

NOTHING = "weightmix: interrupted; nothing was written at the output"


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_a_ctrl_c_at_any_point_ends_the_merge_cleanly_and_says_what_was_written(tmp_path, shard):
    script = Path(__file__).parent / "interrupt_points.py"
    args = [sys.executable, str(script), str(tmp_path), "1", *([shard] if shard else [])]
    done = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    assert len(results) > 200  # every point of the main thread's part of a merge
    outcomes: Counter = Counter()
    for result in results:
        assert result["left"] == [], result  # no .partial, .commit or lock file
        assert result["threads"] == [], result
        out = Path(result["out"])
        named = out.with_name(out.stem + ".safetensors.index.json") if shard else out
        if result["code"] == 0:  # the interrupt came once the command was done
            assert result["whole"], result
            outcomes["done"] += 1
        elif result["made"]:
            assert result["code"] == 130 and result["whole"], result
            assert result["said"] == (
                f"weightmix: interrupted after writing {named} in full; nothing else was written"
            ), result
            outcomes["written"] += 1
        else:
            assert result["code"] == 130 and result["said"] == NOTHING, result
            outcomes["nothing"] += 1
    assert outcomes["written"] > 0 and outcomes["nothing"] > 0 and outcomes["done"] > 0


def test_a_signal_during_an_uninterrupted_block_comes_once_the_block_is_done():
    reached = []
    with pytest.raises(KeyboardInterrupt), uninterrupted():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python would have run the handler by now
        reached.append("end of block")
    assert reached == ["end of block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nested_blocks_deliver_at_the_outer_end_once_and_to_the_callers_handler(monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: calls.append(number))
    try:
        with uninterrupted():
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            assert calls == []  # handed to the outer block
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_the_block_runs_as_it_is():
    seen = []

    def body():
        with uninterrupted():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


def test_an_output_lost_to_an_interrupt_right_after_its_creation_is_removed(
    run, tmp_path, models, monkeypatch
):
    """Python can raise the KeyboardInterrupt as the creating call returns, before the
    caller holds the output: the CLI aborts every output not committed or aborted."""
    created = engine._open_output

    def lost(*args):
        created(*args)  # made, then dropped as the interrupt lands
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_open_output", lost)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("merge", models["A"], models["B"], "-o", tmp_path / "out.safetensors")
    assert result.code == 130 and result.err.strip() == NOTHING
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .partial, no lock file


def test_a_second_ctrl_c_during_the_clean_up_waits_until_it_is_done(tmp_path, models, monkeypatch):
    """The first Ctrl-C stops the merge; a second one landing while its files are removed
    comes once they are: nothing is left (library use, no CLI to sweep up)."""
    from weightmix.io.writer import _TempFile

    ran, discarded = Counter(), Counter()
    run_task, discard = engine.run_task, _TempFile.discard

    def interrupted(*args):
        ran["n"] += 1
        if ran["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return run_task(*args)

    def discard_interrupted(self):
        discarded["n"] += 1
        if discarded["n"] == 1:
            signal.raise_signal(signal.SIGINT)
        return discard(self)

    monkeypatch.setattr(engine, "run_task", interrupted)
    monkeypatch.setattr(_TempFile, "discard", discard_interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    recipe = {"models": {"A": str(models["A"]), "B": str(models["B"])},
              "merge": {"method": "weighted_sum", "inputs": ["A", "B"]}}  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        weightmix.merge(recipe, tmp_path / "out.safetensors", threads=2)
    assert discarded["n"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_ctrl_c_the_caller_ignores_stays_ignored(run, tmp_path, models, monkeypatch):
    """A shell's background job inherits SIGINT ignored: a Ctrl-C for the script does not
    stop the merge."""
    from weightmix.io.writer import _TempFile

    write_at, calls = _TempFile.write_at, Counter()

    def interrupted(self, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        return write_at(self, data, offset)

    monkeypatch.setattr(_TempFile, "write_at", interrupted)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = run("merge", models["A"], models["B"], "-o", tmp_path / "out.safetensors")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.code == 0, result.err
    assert calls["n"] > 3 and (tmp_path / "out.safetensors").exists()


def test_the_executable_ignores_signals_once_its_command_is_done(monkeypatch):
    """Ignored, not only handled by a handler that ignores them: Python puts its handlers
    back to the default while it finalizes, and a Ctrl-C then ended the process (-2)."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", ["weightmix", "methods"])
    try:
        with pytest.raises(SystemExit) as done:
            command()
        assert done.value.code == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_a_thread_that_cannot_start_is_the_error_reported(tmp_path, models, monkeypatch):
    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    recipe = {"models": {"A": str(models["A"]), "B": str(models["B"])},
              "merge": {"method": "weighted_sum", "inputs": ["A", "B"]}}  # fmt: skip
    with pytest.raises(RuntimeError, match="can't start new thread"):
        weightmix.merge(recipe, tmp_path / "out.safetensors", threads=2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_message_counts_outputs_the_record_no_longer_holds(tmp_path, capsys):
    """A preview grid writes one file per cell: the record keeps the last 64, the message
    counts the rest instead of leaving them out."""
    from weightmix import cli
    from weightmix.io import interrupts

    mark = interrupts.placed_count()
    for number in range(70):
        path = tmp_path / f"cell-{number}.png"
        path.write_bytes(b"png")
        interrupts.placed(path)
    assert cli._interrupted(mark) == 130
    said = capsys.readouterr().err.strip()
    assert said == (
        f"weightmix: interrupted after writing {tmp_path / 'cell-6.png'}, "
        f"{tmp_path / 'cell-7.png'}, {tmp_path / 'cell-8.png'} and 67 more in full; "
        "nothing else was written"
    )
