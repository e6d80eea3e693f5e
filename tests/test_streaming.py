"""The engine's two paths (chunked elementwise, whole-tensor), task splitting and the memory
budget, and that adding a method is one decorated function."""

from __future__ import annotations

import pytest
import torch
from helpers import POSITION_IDS, digest, load

import weightmix
from weightmix import engine
from weightmix.methods import METHODS, merge_method


def recipe_for(models, method="weighted_sum", names="AB", **params):
    return {
        "models": {n: str(models[n]) for n in names},
        "merge": {"method": method, "inputs": list(names), **params},
    }


def test_tiny_chunks_and_tasks_give_the_same_bytes(tmp_path, models, monkeypatch):
    recipe = recipe_for(models, "add_difference", "ABC", alpha=0.7)
    recipe["dtype"] = "bf16"
    recipe["title"] = "same"  # else each output's modelspec.title is its file name
    reference = tmp_path / "reference.safetensors"
    weightmix.merge(recipe, reference)
    # odd sizes: many chunks per task, many tasks per key, partial last chunks
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 37)
    monkeypatch.setattr(engine, "TASK_ELEMENTS", 37 * 5)
    split = tmp_path / "split.safetensors"
    weightmix.merge(recipe, split, threads=3)
    assert digest(split) == digest(reference)


@pytest.fixture
def rescale_method():
    """A whole-tensor method defined the way a contributor would: one decorated function."""

    @merge_method(inputs="weight", output="weight")
    def rescale_to_first(
        a: torch.Tensor, b: torch.Tensor, *, strength: float = 1.0
    ) -> torch.Tensor:
        """B scaled to A's norm (needs the whole tensor: not elementwise)."""
        scale = a.norm() / b.norm().clamp_min(1e-12)
        return torch.lerp(b, b * scale, strength)

    yield rescale_to_first
    del METHODS["rescale_to_first"]


@pytest.mark.parametrize("budget", [1, 10**9])
def test_whole_tensor_method_from_one_decorated_function(tmp_path, models, rescale_method, budget):
    assert not rescale_method.elementwise
    out = tmp_path / "out.safetensors"
    weightmix.merge(recipe_for(models, "rescale_to_first", strength=0.5), out, budget=budget)
    merged, a, b = load(out), load(models["A"]), load(models["B"])
    for key, tensor in merged.items():
        if key == POSITION_IDS:
            assert tensor.equal(a[key])
            continue
        fa, fb = a[key].float(), b[key].float()
        expected = torch.lerp(fb, fb * (fa.norm() / fb.norm()), 0.5).to(torch.float16)
        torch.testing.assert_close(tensor, expected)


def test_budget_bounds_whole_tensor_work_in_flight(tmp_path, models, rescale_method, monkeypatch):
    seen = []
    original = engine.run_task
    in_flight = {"now": 0}

    def tracking(plan, writer, task, buffers, *rest):
        in_flight["now"] += 1
        seen.append(in_flight["now"])
        try:
            return original(plan, writer, task, buffers, *rest)
        finally:
            in_flight["now"] -= 1

    monkeypatch.setattr(engine, "run_task", tracking)
    weightmix.merge(
        recipe_for(models, "rescale_to_first"), tmp_path / "o.safetensors", threads=4, budget=1
    )
    assert max(seen) == 1  # every key exceeds a 1-byte budget, so keys run one at a time


def test_dry_run_estimates_memory_from_the_plan(models, monkeypatch):
    monkeypatch.setenv("WEIGHTMIX_DIRECT_WRITES", "0")  # buffered (test_direct.py: direct)
    text = weightmix.dry_run(recipe_for(models))
    assert "estimated peak memory" in text
    planned = weightmix.make_plan(recipe_for(models))
    try:
        peak = engine.estimate_peak(planned, threads=2)
        assert peak == 2 * engine.CHUNK_ELEMENTS * 8 * (2 * 2 + 2)  # chunk buffers only
    finally:
        planned.close()


def test_the_memory_estimate_counts_what_ties_keeps_aside(models, monkeypatch):
    """A TIES key's cuts keep magnitude patterns aside in their first pass: an eighth of the
    tensor per model, at most KEPT_AT_MOST, as int32; the estimate adds the largest keys'."""
    from weightmix.methods.selection import KEPT_AT_MOST

    monkeypatch.setenv("WEIGHTMIX_DIRECT_WRITES", "0")  # buffered (test_direct.py: direct)
    planned = weightmix.make_plan(recipe_for(models, "ties", "ABC", density=0.5))
    try:
        streamed = [k for k in planned.keys if engine.mode(planned, k) == engine.STREAMED]
        kept = sorted((2 * min(k.numel // 8, KEPT_AT_MOST) * 4 for k in streamed), reverse=True)
        assert kept[0] > 0
        buffers = 2 * engine.CHUNK_ELEMENTS * 8 * (2 * 3 + 2)
        assert engine.estimate_peak(planned, threads=2) == buffers + sum(kept[:2])
    finally:
        planned.close()
