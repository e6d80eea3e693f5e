"""The fused path (issue 12): weighted_sum and add_difference fed their inputs as stored,
widened inside the arithmetic, write exactly the bytes of the plain path (inputs widened by
copies first), NaN payloads aside."""

from __future__ import annotations

import pytest
import torch
from helpers import save

from weightmix import api, engine
from weightmix.io import open_checkpoint

SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, -65504.0, 6e-8, 1e-40]


def model(path, seed: int, dtype: torch.dtype):
    """Random values over many magnitudes, the special values, and a chunk boundary crossed
    (CHUNK_ELEMENTS + 1000 elements)."""
    generator = torch.Generator().manual_seed(seed)
    count = engine.CHUNK_ELEMENTS + 1000
    values = (
        torch.randn(count, generator=generator)
        * 10 ** torch.randint(-6, 5, (count,), generator=generator).float()
    )
    values[: len(SPECIAL)] = torch.tensor(SPECIAL)
    values[len(SPECIAL) : 2 * len(SPECIAL)] = torch.tensor(SPECIAL).flip(0)
    small = values[:7].reshape(7, 1).to(dtype).clone()
    state = {"big.weight": values.to(dtype), "small.weight": small}
    return save(path, state)


def merged_bytes(recipe: dict, out) -> dict[str, bytes]:
    """Each merged tensor's bytes, every NaN written as the one quiet NaN: payloads are not
    part of the result (torch's vector and scalar loops give them differently, and so do the C
    loops of weightmix/kernels.py, which the fused path may take where the plain one does not)."""
    api.merge(recipe, out, overwrite=True)
    with open_checkpoint(out) as checkpoint:
        tensors = {key: checkpoint.read(info) for key, info in checkpoint.tensors.items()}
    return {key: torch.where(t.isnan(), torch.nan, t).view(torch.uint8).numpy().tobytes()
            for key, t in tensors.items()}  # fmt: skip


@pytest.mark.parametrize(
    ("stored", "compute", "out_dtype"),
    [
        ((torch.float16, torch.float16), "fp32", "fp16"),
        ((torch.bfloat16, torch.bfloat16), "fp32", "bf16"),
        ((torch.float16, torch.bfloat16), "fp32", "fp32"),
        ((torch.float32, torch.float32), "fp32", "fp16"),
        ((torch.float16, torch.float32), "fp64", "fp16"),
        ((torch.bfloat16, torch.float16), "fp64", "fp32"),
    ],
)
@pytest.mark.parametrize(
    "params", [{"alpha": 0.3}, {"alpha": 0.5}, {"alpha": 0.0}, {"alpha": 1.0}, {"alpha": 0.999}]
)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fused_weighted_sum_writes_the_plain_paths_bytes(
    tmp_path, monkeypatch, stored, compute, out_dtype, params, rounding
):
    paths = [model(tmp_path / f"m{n}.safetensors", n, dtype) for n, dtype in enumerate(stored)]
    recipe = {
        "models": {"a": str(paths[0]), "b": str(paths[1])},
        "merge": {"method": "weighted_sum", "inputs": ["a", "b"], **params},
        "dtype": out_dtype,
        "compute_dtype": compute,
        "rounding": rounding,
        "allow_nonfinite": True,  # inf − inf and overflows are part of what is compared
    }
    planned = api.make_plan(recipe)
    try:
        assert all(engine.fused_call(planned, key) is not None for key in planned.keys)
    finally:
        planned.close()
    fused = merged_bytes(recipe, tmp_path / "fused.safetensors")
    monkeypatch.setattr(engine, "fused_call", lambda plan, key: None)
    plain = merged_bytes(recipe, tmp_path / "plain.safetensors")
    assert fused == plain


MIXED = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.3, 1.7, 0.0])
@pytest.mark.parametrize(("stored", "compute"), [((torch.float16,) * 3, "fp32"), (MIXED, "fp64")])
def test_fused_add_difference_writes_the_plain_paths_bytes(
    tmp_path, monkeypatch, alpha, stored, compute
):
    paths = [model(tmp_path / f"m{n}.safetensors", n, dtype) for n, dtype in enumerate(stored)]
    recipe = {
        "models": {name: str(p) for name, p in zip("abc", paths)},
        "merge": {"method": "add_difference", "inputs": list("abc"), "alpha": alpha},
        "dtype": "fp16",
        "compute_dtype": compute,
        "allow_nonfinite": True,
    }
    fused = merged_bytes(recipe, tmp_path / "fused.safetensors")
    monkeypatch.setattr(engine, "fused_call", lambda plan, key: None)
    assert fused == merged_bytes(recipe, tmp_path / "plain.safetensors")


def test_fused_weighted_sum_of_three_models_with_weights(tmp_path, monkeypatch):
    paths = [model(tmp_path / f"m{n}.safetensors", n, torch.float16) for n in range(3)]
    recipe = {
        "models": {name: str(p) for name, p in zip("abc", paths)},
        "merge": {"method": "weighted_sum", "inputs": list("abc"), "weights": [0.2, 0.5, 1.3]},
        "dtype": "fp16",
        "allow_nonfinite": True,
    }
    fused = merged_bytes(recipe, tmp_path / "fused.safetensors")
    monkeypatch.setattr(engine, "fused_call", lambda plan, key: None)
    assert fused == merged_bytes(recipe, tmp_path / "plain.safetensors")


def test_the_fused_path_is_taken_only_where_it_is_exact(tmp_path):
    """fp8 inputs (torch promotes no float8 type), a compute dtype narrower than an input,
    and nested expressions take the plain path."""
    fp16 = model(tmp_path / "a.safetensors", 0, torch.float16)
    fp8 = model(tmp_path / "b.safetensors", 1, torch.float8_e4m3fn)
    fp32 = model(tmp_path / "c.safetensors", 2, torch.float32)

    def linear(models: dict, merge: dict, compute: str = "fp32") -> bool:
        recipe = {"models": {k: str(v) for k, v in models.items()}, "merge": merge,
                  "compute_dtype": compute}  # fmt: skip
        planned = api.make_plan(recipe)
        try:
            return engine.fused_call(planned, planned.keys[0]) is not None
        finally:
            planned.close()

    blend = {"method": "weighted_sum", "inputs": ["a", "b"], "alpha": 0.5}
    assert linear({"a": fp16, "b": fp16}, blend)
    assert not linear({"a": fp16, "b": fp8}, blend)
    assert not linear({"a": fp16, "b": fp32}, blend, compute="bf16")
    inner = {"method": "weighted_sum", "inputs": ["a", "b"], "alpha": 0.2}
    nested = {"method": "weighted_sum", "alpha": 0.5, "inputs": ["a", inner]}
    assert not linear({"a": fp16, "b": fp16}, nested)
    assert linear({"a": fp16, "b": fp16, "c": fp16},
                  {"method": "add_difference", "inputs": ["a", "b", "c"]})  # fmt: skip
    assert not linear({"a": fp16, "b": fp16}, {"method": "slerp", "inputs": ["a", "b"]})


@pytest.mark.parametrize(
    ("stored", "out_dtype", "merge", "rounding", "screened"),
    [
        (torch.float16, "fp16", {"alpha": 0.5}, "nearest", False),
        (torch.float16, "fp16", {"weights": [1.0, 2.0]}, "nearest", False),
        (torch.float16, "bf16", {"alpha": 0.25}, "nearest", False),
        (torch.bfloat16, "fp16", {"alpha": 0.5}, "nearest", True),  # bf16 reaches 3e38
        (torch.float32, "bf16", {"alpha": 0.5}, "nearest", True),
        (torch.float16, "fp16", {"weights": [2.0, -1.0]}, "nearest", True),  # not convex
        (torch.float16, "fp16", {"weights": [2.0, 1.0], "normalize": False}, "nearest", True),
        (torch.float16, "fp16", {"alpha": 0.5}, "stochastic", True),
    ],
)
def test_the_non_finite_screen_is_skipped_only_for_convex_blends_that_cannot_overflow(
    tmp_path, monkeypatch, stored, out_dtype, merge, rounding, screened
):
    """A convex blend of fp16 models written as fp16 cannot make inf or NaN from finite
    values: the screen is skipped there, and the output (inputs at ±65504, the largest fp16
    value, in every pairing) is finite. Everywhere else each chunk is screened."""
    import weightmix.engine as engine_module

    calls = []
    real = engine_module.check_gained
    monkeypatch.setattr(engine_module, "check_gained", lambda *args: calls.append(1) or real(*args))
    # the C cast (and blend) count non-finite values and call check_gained only on a find:
    # compute and cast in torch
    monkeypatch.setattr(engine_module.kernels, "cast", lambda result, out: None)
    monkeypatch.setattr(engine_module.kernels, "blend", lambda *args, **kwargs: None)
    edge = torch.tensor([65504.0, -65504.0, 65504.0, -65504.0, 1.0, 0.0])
    if screened:  # values that stay finite whatever the blend: the screen must still run
        edge = edge / 1024
    paths = [save(tmp_path / "a.safetensors", {"w": edge.to(stored)}),
             save(tmp_path / "b.safetensors", {"w": edge.flip(0).to(stored)})]  # fmt: skip
    recipe = {
        "models": {"a": str(paths[0]), "b": str(paths[1])},
        "merge": {"method": "weighted_sum", "inputs": ["a", "b"], **merge},
        "dtype": out_dtype,
        "rounding": rounding,
    }
    planned = api.make_plan(recipe)
    try:
        key = planned.keys[0]
        node = engine.fused_call(planned, key)
        assert engine.gains_no_nonfinite(planned, key, node) is not screened
    finally:
        planned.close()
    api.merge(recipe, tmp_path / "out.safetensors")
    assert bool(calls) is screened
    with open_checkpoint(tmp_path / "out.safetensors") as checkpoint:
        assert bool(torch.isfinite(checkpoint.read(checkpoint.tensors["w"]).float()).all())
