"""Elementwise merges streamed through a device's chunk pipeline (device_chunks.py).

Without a GPU the pipeline runs on the CPU (plain buffers, synchronous copies): the chunk
and slot bookkeeping, the draws, the rounding and the non-finite screen are the same code, and
must give the CPU path's bytes. On a GPU, test_engine's CUDA test compares with the formula."""

from __future__ import annotations

import pytest
import torch
from helpers import fp8_copies, load, save

import weightmix
from weightmix import device_chunks, engine
from weightmix.api import make_plan


def through_the_pipeline(monkeypatch) -> list[tuple[str, int, int]]:
    """Route merged keys through the device pipeline here, in chunks of 1000 elements and
    tasks of 5000, so keys span several tasks and each task reuses both buffer slots; count
    the pipeline's calls."""
    calls = []
    original = engine.run_device_chunks

    def counted(plan, key, first, stop, *rest):
        calls.append((key.key, first, stop))
        return original(plan, key, first, stop, *rest)

    monkeypatch.setattr(engine, "on_device", lambda plan: True)
    monkeypatch.setattr(engine, "run_device_chunks", counted)
    monkeypatch.setattr(device_chunks, "DEVICE_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(engine, "TASK_ELEMENTS", 5000)
    return calls


RECIPES = {
    "weighted_sum": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.3},
    "add_difference": {"method": "add_difference", "inputs": ["A", "B", "C"], "alpha": 0.7},
    "dare_linear": {"method": "dare_linear", "inputs": ["A", "B", "C"], "density": 0.4},
}


def merged(tmp_path, models, name: str, merge: dict, **extra) -> dict[str, bytes]:
    """Each output tensor's bytes."""
    used = {n: str(p) for n, p in models.items() if n in merge["inputs"]}
    recipe = {"models": used, "merge": merge, "seed": 11}
    out = tmp_path / f"{name}.safetensors"
    weightmix.merge({**recipe, **extra}, out, threads=2)
    return {k: bytes(t.view(torch.uint8).numpy()) for k, t in load(out).items()}


@pytest.mark.parametrize("method", sorted(RECIPES))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_the_pipeline_gives_the_cpu_paths_bytes(tmp_path, models, monkeypatch, method, rounding):
    """Same bytes as the CPU path for fp16 inputs (round to nearest, or stochastic rounding
    drawn by element index), with DARE's draws split across chunks and tasks."""
    expected = merged(tmp_path, models, "cpu", RECIPES[method], rounding=rounding)
    calls = through_the_pipeline(monkeypatch)
    got = merged(tmp_path, models, "pipeline", RECIPES[method], rounding=rounding)
    assert got == expected
    spans = {}
    for key, first, stop in calls:
        spans.setdefault(key, []).append((first, stop))
    widest = max(spans.values(), key=len)
    assert len(widest) > 1 and any(stop - first > 1000 for first, stop in widest)
    a = load(models["A"])
    assert {k for k in a if a[k].is_floating_point()} <= set(spans)


OUTPUT_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@pytest.mark.parametrize("dtype", sorted(OUTPUT_DTYPES))
def test_the_pipeline_writes_wider_and_narrower_outputs(tmp_path, models, monkeypatch, dtype):
    """fp32, bf16 and fp8 outputs of fp16 inputs: the CPU path's bytes, in the dtype asked
    for (fp8 has no isfinite of its own: the screen widens it)."""
    merge = RECIPES["add_difference"]
    expected = merged(tmp_path, models, "cpu", merge, dtype=dtype)
    through_the_pipeline(monkeypatch)
    assert merged(tmp_path, models, "pipeline", merge, dtype=dtype) == expected
    a, got = load(models["A"]), load(tmp_path / "pipeline.safetensors")
    assert all(got[k].dtype == OUTPUT_DTYPES[dtype] for k in a if a[k].is_floating_point())


def test_the_pipeline_takes_fp8_inputs(tmp_path, models, monkeypatch):
    """fp8 checkpoints (as Flux ships): widened on the device, written back as fp8."""
    fp8 = fp8_copies(tmp_path, models)
    merge = RECIPES["weighted_sum"]
    expected = merged(tmp_path, fp8, "cpu", merge)
    through_the_pipeline(monkeypatch)
    assert merged(tmp_path, fp8, "pipeline", merge) == expected


def test_an_overflow_in_the_pipeline_is_refused_and_nothing_is_written(
    tmp_path, models, monkeypatch
):
    """A result that overflows fp16 in a late chunk of a key: the merge stops with the key
    named, the output path stays empty; --allow-nonfinite writes the infinities."""
    a = load(models["A"])
    key = max((k for k in a if a[k].is_floating_point()), key=lambda k: a[k].numel())
    b = {k: v.clone() for k, v in a.items()}
    b[key].view(-1)[-3] = 60000.0  # A + 2·(B − C) with C = A: 2·60000 > 65504
    paths = {
        "A": models["A"],
        "B": save(tmp_path / "big.safetensors", b),
        "C": models["A"],
    }
    calls = through_the_pipeline(monkeypatch)
    recipe = {
        "models": {n: str(p) for n, p in paths.items()},
        "merge": {"method": "add_difference", "inputs": ["A", "B", "C"], "alpha": 2.0},
    }
    out = tmp_path / "out.safetensors"
    with pytest.raises(weightmix.WeightmixError, match=f"key '{key}'.*1 value"):
        weightmix.merge(recipe, out)
    assert calls and not out.exists()
    weightmix.merge({**recipe, "allow_nonfinite": True}, out)
    assert int(torch.isinf(load(out)[key]).sum()) == 1


def test_the_memory_estimate_counts_the_pipelines_buffers(tmp_path, models, monkeypatch):
    recipe = {"models": {n: str(p) for n, p in models.items()}, "merge": RECIPES["add_difference"]}
    plan = make_plan(recipe, tmp_path / "o.safetensors")
    here = engine.estimate_peak(plan, threads=2)
    monkeypatch.setattr(engine, "on_device", lambda plan: True)
    assert engine.estimate_peak(plan, threads=2) - here == 2 * device_chunks.lane_bytes(3)
