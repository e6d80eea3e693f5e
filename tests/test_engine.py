"""The streaming engine end to end: atomic output, reproducibility, sharding, dry runs,
provenance, progress and which bytes are read."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from collections import Counter

import pytest
import torch
import yaml
from helpers import POSITION_IDS, digest, folder_listing, load, random_state, save

import weightmix
from weightmix import engine
from weightmix.io import open_checkpoint
from weightmix.io.reader import Checkpoint, SafetensorsCheckpoint
from weightmix.io.writer import _TempFile
from weightmix.progress import BarProgress, make_progress
from weightmix.provenance import KEY_INPUTS, KEY_RECIPE, fingerprint


def two_model_recipe(models, **extra):
    return {
        "models": {"A": str(models["A"]), "B": str(models["B"])},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.25},
        **extra,
    }


@pytest.mark.parametrize("where", ["compute", "write", "interrupt"])
def test_failure_mid_merge_leaves_nothing_at_destination(tmp_path, models, monkeypatch, where):
    out = tmp_path / "out.safetensors"
    before = folder_listing(tmp_path)
    calls = Counter()
    if where == "compute":
        original = engine.run_task

        def failing(plan, writer, task, buffers, *_):
            calls["n"] += 1
            if calls["n"] == 10:
                raise RuntimeError("injected compute failure")
            return original(plan, writer, task, buffers)

        monkeypatch.setattr(engine, "run_task", failing)
        error = RuntimeError
    else:
        original = _TempFile.write_at
        error = OSError if where == "write" else KeyboardInterrupt

        def failing(self, data, offset):
            calls["n"] += 1
            if calls["n"] == 10:
                raise error("injected") if error is OSError else KeyboardInterrupt
            return original(self, data, offset)

        monkeypatch.setattr(_TempFile, "write_at", failing)
    with pytest.raises((error, weightmix.WeightmixError)):
        weightmix.merge(two_model_recipe(models), out)
    assert calls["n"] >= 10
    assert folder_listing(tmp_path) == before  # no output, no temporary file


def test_interrupt_through_cli_exits_130_and_writes_nothing(run, tmp_path, models, monkeypatch):
    original = _TempFile.write_at
    calls = Counter()

    def interrupted(self, data, offset):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, data, offset)

    monkeypatch.setattr(_TempFile, "write_at", interrupted)
    before = folder_listing(tmp_path)
    result = run("merge", models["A"], models["B"], "-o", tmp_path / "out.safetensors")
    assert result.code == 130 and "nothing was written" in result.err
    assert folder_listing(tmp_path) == before


def test_sigterm_through_cli_exits_130_and_the_callers_handler_comes_back(
    run, tmp_path, models, monkeypatch
):
    original = _TempFile.write_at
    calls = Counter()

    def terminated(self, data, offset):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, data, offset)

    def callers_handler(signum, frame):
        calls["caller"] += 1

    monkeypatch.setattr(_TempFile, "write_at", terminated)
    before = signal.signal(signal.SIGTERM, callers_handler)
    try:
        result = run("merge", models["A"], models["B"], "-o", tmp_path / "out.safetensors")
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.code == 130 and "nothing was written" in result.err
    assert calls["caller"] == 0  # the CLI's handler, not the caller's, took the merge's signal
    assert not (tmp_path / "out.safetensors").exists()


def test_a_long_task_does_not_hold_back_the_tasks_behind_it(tmp_path, models, monkeypatch):
    """The first key's task waits until every other task has run: with tasks yielded in
    plan order but started as workers free up, they all run meanwhile (the scheduler used to
    stop at 4 tasks per worker behind the first)."""
    original = engine.run_task
    plan = weightmix.make_plan(two_model_recipe(models))
    keys = [key.key for key in plan.keys]  # plan order: keys[0] is the first task
    plan.close()
    done, gate, seen = [], threading.Event(), []

    def first_waits(plan, writer, task, *rest):
        if task.key.key == keys[0]:
            gate.wait(20)
            seen.append(len(done))
        original(plan, writer, task, *rest)
        done.append(task.key.key)
        if len(done) == len(keys) - 1:
            gate.set()

    monkeypatch.setattr(engine, "run_task", first_waits)
    assert len(keys) > 4 * 2 + 2
    weightmix.merge(two_model_recipe(models), tmp_path / "out.safetensors", threads=2)
    assert seen == [len(keys) - 1]


def test_same_recipe_gives_identical_bytes_twice_and_across_threads(tmp_path, models):
    recipe = {
        "models": {n: str(p) for n, p in models.items()},
        "merge": {
            "method": "weighted_sum",
            "inputs": [{"method": "add_difference", "inputs": ["A", "B", "C"]}, "B"],
            "alpha": 0.4,
        },
        "dtype": "bf16",
        "title": "reproducible",  # else each output's title is its own file name
    }
    digests = set()
    for threads in (1, 1, 2, 3):
        out = tmp_path / f"out{threads}.safetensors"
        weightmix.merge(recipe, out, threads=threads, overwrite=True, budget=4096)
        digests.add(digest(out))
    assert len(digests) == 1


def test_worker_threads_write_one_at_a_time(tmp_path, models, monkeypatch):
    """Workers take turns at the output file's writes (the kernel would make them spin for
    its inode lock); the bytes are those of one thread."""
    from weightmix.io import writer

    inside, most, real = [0], [0], writer.os.pwrite
    guard = threading.Lock()

    def pwrite(fd, data, offset):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            threading.Event().wait(0.0005)  # room for another writer to come in
            return real(fd, data, offset)
        finally:
            with guard:
                inside[0] -= 1

    one = tmp_path / "one.safetensors"
    weightmix.merge(two_model_recipe(models, title="t"), one, threads=1)
    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    monkeypatch.setattr(engine, "TASK_ELEMENTS", 4096)  # many tasks, all workers busy
    four = tmp_path / "four.safetensors"
    weightmix.merge(two_model_recipe(models, title="t"), four, threads=4)
    assert most[0] == 1
    assert digest(four) == digest(one)


def test_sharded_output_matches_single_file_and_reads_back(tmp_path, models):
    single = tmp_path / "single.safetensors"
    weightmix.merge(two_model_recipe(models), single)
    sharded = tmp_path / "sharded" / "model.safetensors"
    sharded.parent.mkdir()
    result = weightmix.merge(two_model_recipe(models, max_shard_size="100KB"), sharded)
    assert len(result.files) > 2
    assert result.files[-1].name == "model.safetensors.index.json"
    for shard in result.files[:-1]:
        with open_checkpoint(shard) as part:
            data = sum(t.nbytes for t in part.tensors.values())
            assert data <= 100_000 or len(part.tensors) == 1  # a bigger tensor gets its own
    expected = load(single)
    with open_checkpoint(sharded.parent) as ckpt:
        assert set(ckpt.tensors) == set(expected)
        for key, tensor in expected.items():
            assert ckpt.read(ckpt.tensors[key]).equal(tensor)
        assert KEY_RECIPE in ckpt.metadata


def test_sharded_inputs_merge_like_single_files(tmp_path, models):
    single = tmp_path / "single.safetensors"
    weightmix.merge(two_model_recipe(models), single)
    shards = tmp_path / "b_sharded"
    shards.mkdir()
    weightmix.merge(
        {"models": {"B": str(models["B"])}, "merge": "B", "max_shard_size": "50KB"},
        shards / "b.safetensors",
    )
    recipe = two_model_recipe(models)
    recipe["models"]["B"] = str(shards / "b.safetensors.index.json")
    out = tmp_path / "from_shards.safetensors"
    weightmix.merge(recipe, out)
    merged, expected = load(out), load(single)
    assert set(merged) == set(expected)
    assert all(merged[k].equal(expected[k]) for k in expected)


def test_provenance_metadata_and_inspect(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    recipe = two_model_recipe(models, seed=7)
    weightmix.merge(recipe, out)
    with open_checkpoint(out) as ckpt:
        metadata = ckpt.metadata
    written = yaml.safe_load(metadata[KEY_RECIPE])
    assert written["merge"] == recipe["merge"] and written["seed"] == 7
    assert metadata["weightmix.version"] == weightmix.__version__
    inputs = json.loads(metadata[KEY_INPUTS])
    assert [i["name"] for i in inputs] == ["A", "B"]
    with open_checkpoint(models["A"]) as a:
        assert inputs[0]["fingerprint"] == fingerprint(a)
        assert inputs[0]["size"] == models["A"].stat().st_size
    result = run("inspect", out)
    assert result.code == 0
    assert f"tensors: {len(load(out))}" in result.out
    assert "fp16" in result.out and "i64 1" in result.out
    assert "alpha: 0.25" in result.out and "A: A.safetensors" in result.out


def test_fingerprint_changes_with_content_and_full_mode_covers_every_byte(tmp_path):
    state = {"w": torch.zeros(600_000)}  # 2.4 MB: sampled mode reads only 16 blocks
    path = save(tmp_path / "m.safetensors", state)
    with open_checkpoint(path) as ckpt:
        sampled, full = fingerprint(ckpt), fingerprint(ckpt, "full")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte lies in the last sampled block
    path.write_bytes(bytes(data))
    with open_checkpoint(path) as ckpt:
        assert fingerprint(ckpt) != sampled and fingerprint(ckpt, "full") != full


def test_dry_run_reads_only_headers(run, tmp_path, models, monkeypatch):
    for owner, name in ((Checkpoint, "read"), (SafetensorsCheckpoint, "read_range")):
        monkeypatch.setattr(owner, name, lambda *a, **k: pytest.fail("tensor read"))
    out = tmp_path / "out.safetensors"
    result = run(
        "merge", models["A"], models["B"], "--take", "cond_stage_model.*=B", "-o", out, "--dry-run"
    )
    assert result.code == 0, result.err
    text = result.out
    total = len(load(models["A"]))
    clip = sum(1 for k in load(models["A"]) if k.startswith("cond_stage_model."))
    assert f"plan: {total} tensors" in text
    assert f"{total - clip:6d}  weighted_sum(A, B)  (reads A, B)" in text
    assert f"{clip:6d}  copied from B: taken by rule 1 (cond_stage_model.*)  (reads B)" in text
    assert "estimated peak memory" in text and "output:" in text
    assert not out.exists()


def test_only_needed_tensors_are_read(tmp_path, models, monkeypatch):
    read_bytes = Counter()
    original = SafetensorsCheckpoint.read_range

    def counting(self, info, start, out):
        read_bytes[(self.path.stem, info.key)] += memoryview(out).nbytes
        return original(self, info, start, out)

    monkeypatch.setattr(SafetensorsCheckpoint, "read_range", counting)
    recipe = two_model_recipe(models)
    recipe["rules"] = [
        {"keys": "cond_stage_model.*", "take": "B"},
        {"regex": "input_blocks", "drop": True},
    ]
    weightmix.merge(recipe, tmp_path / "out.safetensors")
    keys = load(models["A"])
    for key, tensor in keys.items():
        size = tensor.numel() * tensor.element_size()
        if "input_blocks" in key:
            expected = (0, 0)
        elif key.startswith("cond_stage_model."):
            expected = (0, size)
        else:
            expected = (size, size)
        assert (read_bytes[("A", key)], read_bytes[("B", key)]) == expected, key
    merged = load(tmp_path / "out.safetensors")
    assert not any("input_blocks" in k for k in merged)
    assert merged[POSITION_IDS].equal(keys[POSITION_IDS] + 1)  # B's ids: seed 2 vs seed 1


def test_rules_later_wins_and_scoped_parameters(tmp_path):
    states = {n: random_state(s, torch.float32) for s, n in enumerate("ABC", 1)}
    paths = {n: save(tmp_path / f"{n}.safetensors", st) for n, st in states.items()}
    recipe = {
        "models": {n: str(p) for n, p in paths.items()},
        "merge": {
            "method": "weighted_sum",
            "alpha": 0.5,
            "inputs": [
                {"method": "add_difference", "name": "diff", "inputs": ["A", "B", "C"]},
                "B",
            ],
        },
        "rules": [
            {"keys": "model.*", "params": {"alpha": 0.1}},  # both nodes have alpha
            {"keys": "model.*", "params": {"diff.alpha": 0.3}},  # later, scoped: wins for diff
            {"regex": r"\.bias$", "take": "C"},
            {"regex": r"input_blocks\.0\.0\.bias$", "take": "A"},  # later take wins
        ],
    }
    out = tmp_path / "out.safetensors"
    weightmix.merge(recipe, out)
    merged = load(out)
    a, b, c = (states[n] for n in "ABC")
    for key, tensor in merged.items():
        if key == POSITION_IDS:
            continue
        if key == "model.diffusion_model.input_blocks.0.0.bias":
            expected = a[key]
        elif key.endswith(".bias"):
            expected = c[key]
        elif key.startswith("model."):
            expected = 0.9 * (a[key] + 0.3 * (b[key] - c[key])) + 0.1 * b[key]
        else:
            expected = 0.5 * (a[key] + (b[key] - c[key])) + 0.5 * b[key]
        torch.testing.assert_close(tensor, expected, msg=key)


def test_on_missing_keep_and_skip(run, tmp_path, models):
    state = random_state(2)
    dropped = sorted(k for k in state if k != POSITION_IDS)[:3]
    for key in dropped:
        del state[key]
    partial = save(tmp_path / "partial.safetensors", state)
    kept, skipped = tmp_path / "kept.safetensors", tmp_path / "skipped.safetensors"
    result = run("merge", models["A"], partial, "--on-missing", "keep", "-o", kept)
    assert result.code == 0 and "3 keys missing from some models were copied" in result.err
    a = load(models["A"])
    merged = load(kept)
    assert set(merged) == set(a) and all(merged[k].equal(a[k]) for k in dropped)
    assert run("merge", models["A"], partial, "--on-missing", "skip", "-o", skipped).code == 0
    assert set(load(skipped)) == set(a) - set(dropped)


def test_integer_buffers_some_models_lack_are_kept_without_asking(run, tmp_path, models):
    state = random_state(2)
    del state[POSITION_IDS]  # diffusers folders do not save this buffer; LDM files do
    partial = save(tmp_path / "partial.safetensors", state)
    out = tmp_path / "out.safetensors"
    result = run("merge", partial, models["A"], "-o", out)
    assert result.code == 0, result.err
    assert "1 integer key that some models lack is copied from a model that has it" in result.err
    assert load(out)[POSITION_IDS].equal(load(models["A"])[POSITION_IDS])


def test_rule_matching_nothing_is_reported(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    result = run("merge", models["A"], models["B"], "--take", "*guidance*=B", "-o", out)
    assert result.code == 0
    assert "rule 1 (*guidance*) matches no key" in result.err


def test_cli_flags_and_recipe_file_make_the_same_merge(run, tmp_path, models):
    by_flags, by_file = tmp_path / "flags.safetensors", tmp_path / "file.safetensors"
    saved = tmp_path / "saved.yaml"
    args = ["merge", models["A"], models["B"], models["C"], "-m", "add_difference"]
    args += ["--alpha", "0.6", "--dtype", "fp32", "--take", "*bias=C", "-q", "--title", "t"]
    assert run(*args, "-o", by_flags, "--save-recipe", saved).code == 0
    assert run("merge", saved, "-o", by_file, "-q").code == 0
    assert digest(by_flags) == digest(by_file)
    merged, a, b, c = load(by_file), *(load(models[n]) for n in "ABC")
    key = next(k for k in merged if k.endswith("weight"))
    expected = a[key].float() + 0.6 * (b[key].float() - c[key].float())
    torch.testing.assert_close(merged[key], expected)


def test_named_models_on_the_command_line(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    args = ("merge", f"base={models['A']}", f"tuned={models['B']}", "--take", "*bias=tuned")
    assert run(*args, "-o", out, "-q").code == 0
    with open_checkpoint(out) as ckpt:
        assert "tuned" in yaml.safe_load(ckpt.metadata[KEY_RECIPE])["models"]


def test_progress_lines_when_not_a_terminal(run, tmp_path, models):
    result = run("merge", models["A"], models["B"], "-o", tmp_path / "out.safetensors")
    assert result.code == 0
    last = [line for line in result.err.splitlines() if "tensors," in line][-1]
    total = len(load(models["A"]))
    assert f"{total}/{total} tensors" in last and "/s" in last and "ETA" in last
    assert "wrote" in result.out


def test_cuda_device_matches_the_formula_when_a_gpu_is_present(tmp_path, models):
    """On a GPU, (1 − α)·A + α·B computed in fp32 and cast to the inputs' fp16, against the
    formula written here (not the CPU path's output); without one, a clear error."""
    if not torch.cuda.is_available():
        with pytest.raises(weightmix.WeightmixError, match="no CUDA GPU"):
            weightmix.merge(two_model_recipe(models, device="cuda"), tmp_path / "g.safetensors")
        assert not (tmp_path / "g.safetensors").exists()
        return
    weightmix.merge(two_model_recipe(models, device="cuda"), tmp_path / "g.safetensors")
    a, b, gpu = load(models["A"]), load(models["B"]), load(tmp_path / "g.safetensors")
    assert set(gpu) == set(a)
    for key, tensor in gpu.items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, a[key])
            continue
        expected = (0.75 * a[key].double() + 0.25 * b[key].double()).half()
        assert tensor.dtype == torch.float16
        torch.testing.assert_close(tensor, expected, msg=key)  # fp16 tolerance: GPUs fuse ops


def test_progress_bar_on_a_terminal(tmp_path, models):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = make_progress(True, stream)
    assert isinstance(progress, BarProgress)
    planned = weightmix.make_plan(two_model_recipe(models), tmp_path / "out.safetensors")
    engine.run(planned, {}, progress=progress)
    planned.close()
    total = len(load(models["A"]))
    text = stream.getvalue()
    assert f"{total}/{total} tensors" in text and "B/s" in text and "100%" in text
