"""fp8 and mixed dtypes: reading, writing, casting to nearest and stochastic rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import POSITION_IDS, digest, load, random_state, save

import weightmix
from weightmix import engine
from weightmix.errors import WeightmixError
from weightmix.io import dtypes, header, open_checkpoint
from weightmix.rounding import stochastic_round, uniform

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _merge(tmp_path, paths, out_name="out.safetensors", **extra):
    recipe = {
        "models": {n: str(p) for n, p in paths.items()},
        "merge": {"method": "weighted_sum", "inputs": list(paths), "alpha": 0.3},
        **extra,
    }
    out = tmp_path / out_name
    weightmix.merge(recipe, out, overwrite=True)
    return load(out), out


@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_fp8_output_rounds_to_nearest_like_torch(tmp_path, fp8):
    states = {n: random_state(s, torch.float32) for s, n in ((1, "A"), (2, "B"))}
    paths = {n: save(tmp_path / f"{n}.safetensors", st) for n, st in states.items()}
    name = "fp8_e4m3fn" if fp8 == torch.float8_e4m3fn else "fp8_e5m2"
    merged, _ = _merge(tmp_path, paths, dtype=name)
    for key, tensor in merged.items():
        if key == POSITION_IDS:
            continue
        expected = (0.7 * states["A"][key] + 0.3 * states["B"][key]).to(fp8)
        assert tensor.dtype == fp8
        assert tensor.view(torch.uint8).equal(expected.view(torch.uint8)), key


@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_fp8_inputs_are_computed_in_fp32(tmp_path, fp8):
    a = {k: v.to(fp8) for k, v in random_state(1, torch.float32).items() if k != POSITION_IDS}
    b = random_state(2, torch.float16)
    del b[POSITION_IDS]
    paths = {"A": save(tmp_path / "A.safetensors", a), "B": save(tmp_path / "B.safetensors", b)}
    merged, _ = _merge(tmp_path, paths, dtype="fp16")
    for key, tensor in merged.items():
        expected = (0.7 * a[key].float() + 0.3 * b[key].float()).half()
        torch.testing.assert_close(tensor, expected, msg=key)


def _all_finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an 8- or 16-bit float dtype, sorted (brute force, as reference)."""
    bits = torch.finfo(dtype).bits
    patterns = torch.arange(2**bits, dtype=torch.int32)
    view = torch.uint8 if bits == 8 else torch.int16
    values = patterns.to(view).view(dtype).float()
    return values[torch.isfinite(values)].unique()


def test_stochastic_rounding_is_unbiased_and_between_neighbours():
    values = torch.randn(400_000) * 4
    for dtype in (*FP8, torch.bfloat16, torch.float16):
        rounded = stochastic_round(values, dtype, uniform(7, 0, values.numel())).float()
        grid = _all_finite_values(dtype)
        upper_index = torch.searchsorted(grid, values).clamp(max=len(grid) - 1)
        upper = grid[upper_index]
        lower = grid[(upper_index - 1).clamp(min=0)]
        lower = torch.where(upper == values, upper, lower)
        assert bool(((rounded == lower) | (rounded == upper)).all()), dtype
        nearest = values.to(dtype).float()
        bias = (rounded - values).mean().abs()
        assert bias < (nearest - values).abs().mean() * 0.05, dtype
        assert bool((rounded != nearest).any())


def test_counter_based_noise_follows_its_documented_rule():
    """Element i: half (i mod 2) of output ⌊(i mod 2^16)/2⌋ of PCG64DXSM seeded with
    SeedSequence([stream mod 2^64, ⌊i / 2^16⌋]), top 24 of its 32 bits; computed one element
    at a time here, across a block boundary."""
    mask = (1 << 64) - 1

    def reference(stream: int, index: int) -> float:
        block, offset = divmod(index, 1 << 16)
        generator = np.random.PCG64DXSM(np.random.SeedSequence([stream & mask, block]))
        word = int(generator.random_raw(offset // 2 + 1)[offset // 2])
        half = (word >> (32 * (offset % 2))) & 0xFFFFFFFF
        return (half >> 8) / 2**24

    for stream in (0, 12345, -987654321):
        start = (1 << 16) - 25
        got = uniform(stream, start, 50).tolist()
        assert got == [reference(stream, i) for i in range(start, start + 50)]
    assert uniform(1, 0, 50).tolist() != uniform(2, 0, 50).tolist()


def test_stochastic_rounding_in_merges_is_seeded_and_chunk_independent(tmp_path, monkeypatch):
    states = {n: random_state(s, torch.float32) for s, n in ((1, "A"), (2, "B"))}
    paths = {n: save(tmp_path / f"{n}.safetensors", st) for n, st in states.items()}
    options = {"dtype": "fp8_e4m3fn", "rounding": "stochastic", "seed": 3, "title": "same"}
    first, out1 = _merge(tmp_path, paths, "s1.safetensors", **options)
    nearest, _ = _merge(tmp_path, paths, "n.safetensors", dtype="fp8_e4m3fn")
    _, out3 = _merge(tmp_path, paths, "s3.safetensors", **(options | {"seed": 4}))
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 53)
    monkeypatch.setattr(engine, "TASK_ELEMENTS", 53 * 3)
    _, out2 = _merge(tmp_path, paths, "s2.safetensors", **options)
    assert digest(out1) == digest(out2)  # same seed, other chunking: same bytes
    assert digest(out1) != digest(out3)
    changed = sum(
        int((first[k].view(torch.uint8) != nearest[k].view(torch.uint8)).sum()) for k in first
    )
    assert changed > 0


def test_stochastic_rounding_without_narrowing_is_reported(tmp_path, models):
    recipe = {
        "models": {"A": str(models["A"]), "B": str(models["B"])},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"]},
        "rounding": "stochastic",
        "dtype": "fp32",
    }
    planned = weightmix.make_plan(recipe)
    planned.close()
    assert any("stochastic changes nothing" in note for note in planned.notes)


def test_fp8_file_on_a_torch_without_fp8_is_a_clear_error(tmp_path, monkeypatch):
    path = save(tmp_path / "f8.safetensors", {"w": torch.ones(4).to(torch.float8_e4m3fn)})
    without = {k: v for k, v in dtypes.SAFETENSORS_DTYPES.items() if not k.startswith("F8")}
    monkeypatch.setattr(header, "SAFETENSORS_DTYPES", without)
    monkeypatch.setattr(dtypes, "UNSUPPORTED_HERE", {"F8_E4M3", "F8_E5M2"})
    with pytest.raises(WeightmixError, match="F8_E4M3 needs a newer torch"):
        open_checkpoint(path)


def _neighbours(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest value of `dtype` at or below each value, and the smallest at or above."""
    grid = _all_finite_values(dtype)
    upper_index = torch.searchsorted(grid, values).clamp(max=len(grid) - 1)
    upper = grid[upper_index]
    lower = torch.where(upper == values, upper, grid[(upper_index - 1).clamp(min=0)])
    return lower, upper


@pytest.mark.parametrize(
    ("source", "target", "name", "scale"),
    # bf16 -> fp16 loses bits where fp16 has fewer: its subnormals (|x| < 6e-5) and beyond 65504
    [(torch.float16, torch.bfloat16, "bf16", 3.0), (torch.bfloat16, torch.float16, "fp16", 1e-6)],
    ids=["fp16-to-bf16", "bf16-to-fp16"],
)
@pytest.mark.parametrize("how", ["copied", "taken"])
def test_stochastic_rounding_applies_to_casts_of_the_same_width(
    run, tmp_path, source, target, name, scale, how
):
    """fp16 <-> bf16 loses bits although both are 16-bit: stochastic rounding applies, for a
    model rewritten alone and for keys a rule takes unchanged from one model."""
    a = {
        k: (v * scale).to(source) if v.is_floating_point() else v
        for k, v in random_state(1, torch.float32).items()
    }
    b = {k: v.to(source) if v.is_floating_point() else v for k, v in random_state(2).items()}
    paths = [save(tmp_path / "A.safetensors", a), save(tmp_path / "B.safetensors", b)]
    args = paths[:1] if how == "copied" else (*paths, "--take", "*=A")
    stochastic, nearest = tmp_path / "s.safetensors", tmp_path / "n.safetensors"
    result = run("merge", *args, "--dtype", name, "--rounding", "stochastic", "-o", stochastic)
    assert result.code == 0, result.err
    assert "changes nothing" not in result.err
    assert run("merge", *args, "--dtype", name, "-o", nearest, "-q").code == 0
    got, near = load(stochastic), load(nearest)
    changed = total = 0
    for key, tensor in a.items():
        if not tensor.is_floating_point():
            assert torch.equal(got[key], tensor)
            continue
        values = tensor.float().reshape(-1)
        assert torch.equal(near[key].float().reshape(-1), values.to(target).float())
        lower, upper = _neighbours(values, target)
        rounded = got[key].float().reshape(-1)
        assert bool(((rounded == lower) | (rounded == upper)).all()), key
        changed += int((rounded != near[key].float().reshape(-1)).sum())
        total += values.numel()
    assert changed > total // 10  # many values fall between two values of the target


def test_stochastic_rounding_is_noted_only_when_no_cast_loses_precision(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in random_state(1, torch.float32).items()}
    path = save(tmp_path / "A.safetensors", state)
    for dtype, lossless in (("fp32", True), ("bf16", True), ("fp16", False)):
        planned = weightmix.make_plan(
            {"models": {"A": str(path)}, "merge": "A", "dtype": dtype, "rounding": "stochastic"}
        )
        planned.close()
        noted = any("stochastic changes nothing" in note for note in planned.notes)
        assert noted == lossless, dtype


@pytest.mark.parametrize("dtype", [*FP8, torch.bfloat16, torch.float16], ids=str)
def test_stochastic_rounding_casts_infinities_and_overflow_as_nearest_does(dtype):
    """Beyond the largest finite value the two roundings agree: inf stays inf where the dtype
    has one (fp16, bf16, fp8_e5m2); fp8_e4m3fn, which has none, saturates at ±448 in both."""
    limit = torch.finfo(dtype).max
    values = torch.tensor([math.inf, -math.inf, math.nan, limit * 4, -limit * 4, 1e30, 1.0])
    rounded = stochastic_round(values, dtype, uniform(3, 0, values.numel())).float()
    nearest = values.to(dtype).float()
    assert torch.equal(rounded.nan_to_num(7.0), nearest.nan_to_num(7.0))
    if dtype != torch.float8_e4m3fn:
        assert rounded[0] == math.inf and rounded[1] == -math.inf
    else:
        assert rounded[0] == 448 and rounded[1] == -448


def test_lossless_casts_are_known():
    fp16, bf16, fp32 = (dtypes.dtype_from_name(n) for n in ("fp16", "bf16", "fp32"))
    e4m3, e5m2 = (dtypes.dtype_from_name(n) for n in ("fp8_e4m3fn", "fp8_e5m2"))
    for source, target in ((bf16, fp32), (fp16, fp32), (e4m3, fp16), (e5m2, fp16), (e4m3, bf16)):
        values = _all_finite_values(source.torch)
        assert torch.equal(values.to(target.torch).float(), values)  # brute force: exact
        assert dtypes.holds_every_value(source, target)
    for source, target in ((fp16, bf16), (bf16, fp16), (e4m3, e5m2), (e5m2, e4m3), (fp32, fp16)):
        assert not dtypes.holds_every_value(source, target)
