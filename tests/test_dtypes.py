"""fp8 and mixed dtypes: reading, writing, casting to nearest and stochastic rounding."""

from __future__ import annotations

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


def test_counter_based_noise_matches_a_plain_python_splitmix64():
    mask = (1 << 64) - 1

    def reference(stream: int, index: int) -> float:
        z = (index * 0x9E3779B97F4A7C15 + stream) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return ((z ^ (z >> 31)) >> 40) / 2**24

    for stream in (0, 12345, -987654321):
        got = uniform(stream, 1000, 50).tolist()
        assert got == [reference(stream & mask, i) for i in range(1000, 1050)]


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
