"""Methods that need whole-tensor statistics (TIES and breadcrumbs' magnitude cuts, slerp's and
model stock's dot products) run on the CPU in chunks after statistics passes. On tensors of
several chunks their output must equal, bit for bit, the whole-tensor function (the GPU path)
and a dense formula written here, and never take the whole-tensor path."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers import load, save

import weightmix
from weightmix import engine
from weightmix.api import make_plan
from weightmix.io.reader import SafetensorsCheckpoint
from weightmix.methods import METHODS
from weightmix.methods.selection import StreamedTopK

SHAPES = {"big": (700, 1000), "odd": (3, 262_145), "small": (5, 7)}  # 2.7 and 3.0 chunks


def fine_tunes(tmp_path, count: int, dtype, coarse: bool = False):
    """A base and fine-tunes; `coarse` deltas take four values, so magnitudes tie massively
    and the cut falls inside a run of equal magnitudes spread over every chunk."""
    generator = torch.Generator().manual_seed(11)
    base = {k: torch.randn(s, generator=generator).to(dtype) for k, s in SHAPES.items()}
    states = [base]
    for _ in range(count - 1):
        if coarse:
            choice = {k: torch.randint(0, 4, s, generator=generator) for k, s in SHAPES.items()}
            deltas = {k: torch.tensor([-2.0, -1.0, 1.0, 2.0])[c] / 8 for k, c in choice.items()}
        else:
            deltas = {k: 0.05 * torch.randn(s, generator=generator) for k, s in SHAPES.items()}
        states.append({k: (base[k].double() + deltas[k]).to(dtype) for k in SHAPES})
    paths = [save(tmp_path / f"m{i}.safetensors", s) for i, s in enumerate(states)]
    return states, paths


def merged_streaming(tmp_path, monkeypatch, paths, method, compute="fp32", threads=2, **params):
    """Merge through the engine with the whole-tensor path switched off."""

    def no_whole_tensors(plan, key, *_):
        raise AssertionError(f"{key.key} took the whole-tensor path")

    monkeypatch.setattr(engine, "compute_key", no_whole_tensors)
    names = [f"M{i}" for i in range(len(paths))]
    recipe = {
        "models": dict(zip(names, map(str, paths))),
        "merge": {"method": method, "inputs": names, **params},
        "compute_dtype": compute,
    }
    out = tmp_path / f"{method}-{threads}.safetensors"
    weightmix.merge(recipe, out, overwrite=True, threads=threads)
    return load(out)


def whole_tensor(states, method, params, key, dtype):
    """The method's own function on whole tensors (what a GPU merge runs)."""
    tensors = [s[key].to(dtype) for s in states]
    return METHODS[method](*tensors, **params)


def sorted_trim(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest |δ|, equal magnitudes by lower index: a stable sort."""
    flat = delta.reshape(-1)
    order = torch.sort(-flat.abs(), stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return (flat * mask).reshape(delta.shape)


def dense_ties(base, others, density):
    trimmed = [sorted_trim(m - base, max(1, math.floor(density * base.numel()))) for m in others]
    sign = torch.sign(sum(trimmed))
    agree = [(torch.sign(t) == sign) & (sign != 0) for t in trimmed]
    total = sum(torch.where(a, t, 0) for a, t in zip(agree, trimmed))
    count = sum(a.to(base.dtype) for a in agree)
    return base + total / torch.where(count == 0, 1, count)


@pytest.mark.parametrize("coarse", [False, True], ids=["spread", "tied"])
@pytest.mark.parametrize(
    ("dtype", "compute"),
    [(torch.float16, "fp32"), (torch.bfloat16, "fp32"), (torch.float32, "fp64")],
    ids=["fp16", "bf16", "fp32-in-fp64"],
)
def test_ties_in_chunks_equals_the_whole_tensor_and_the_sorted_formula(
    tmp_path, monkeypatch, dtype, compute, coarse
):
    states, paths = fine_tunes(tmp_path, 3, dtype, coarse)
    merged = merged_streaming(tmp_path, monkeypatch, paths, "ties", compute, density=0.3)
    wide = torch.float64 if compute == "fp64" else torch.float32
    params = {"density": 0.3, "lambda": 1.0, "weights": None, "normalize": True}
    for key in SHAPES:
        whole = whole_tensor(states, "ties", params | {"consensus": "sum"}, key, wide).to(dtype)
        assert torch.equal(merged[key], whole), key
        base, *others = (s[key].to(wide) for s in states)
        assert torch.equal(merged[key], dense_ties(base, others, 0.3).to(dtype)), key


@pytest.mark.parametrize(
    ("dtype", "compute"), [(torch.float16, "fp16"), (torch.bfloat16, "bf16")], ids=["fp16", "bf16"]
)
def test_ties_computed_in_a_half_dtype_cuts_the_deltas_it_masks(
    tmp_path, monkeypatch, dtype, compute
):
    """The cut is found on the deltas as the compute dtype rounds them (a review found it
    taken on float32 deltas while the masks saw fp16 ones: one element too few kept)."""
    generator = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()}
    states = [base, {k: 3 * torch.randn(v.shape, generator=generator) for k, v in base.items()}]
    states = [{k: v.to(dtype) for k, v in state.items()} for state in states]
    paths = [save(tmp_path / f"m{i}.safetensors", s) for i, s in enumerate(states)]
    merged = merged_streaming(tmp_path, monkeypatch, paths, "ties", compute, density=0.3)
    params = {"density": 0.3, "lambda": 1.0, "weights": None, "normalize": True}
    for key in SHAPES:
        whole = whole_tensor(states, "ties", params | {"consensus": "sum"}, key, dtype)
        assert torch.equal(merged[key], whole), key


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_in_chunks_equals_the_whole_tensor(tmp_path, monkeypatch, method):
    states, paths = fine_tunes(tmp_path, 3, torch.float16, coarse=True)
    merged = merged_streaming(tmp_path, monkeypatch, paths, method, density=0.4, gamma=0.2)
    params = {"density": 0.4, "gamma": 0.2, "lambda": 1.0, "weights": None, "normalize": False}
    if method == "breadcrumbs_ties":
        params["consensus"] = "sum"
    for key in SHAPES:
        whole = whole_tensor(states, method, params, key, torch.float32).half()
        assert torch.equal(merged[key], whole), key
        base, one = (s[key].float() for s in states[:2])
        n = base.numel()  # the band of model 1: ranks [⌊0.2n⌋, ⌊0.2n⌋ + ⌊0.4n⌋) by magnitude
        top, kept = math.floor(0.2 * n), math.floor(0.4 * n)
        band = sorted_trim(one - base, top + kept) - sorted_trim(one - base, top)
        assert int((band != 0).sum()) == kept, key


@pytest.mark.parametrize(
    ("method", "params", "count"),
    [
        ("slerp", {"t": 0.3}, 2),
        ("nuslerp", {"weights": [1.0, 3.0]}, 2),
        ("model_stock", {}, 3),
        ("model_stock", {}, 4),
        ("multislerp", {"weights": [1.0, 2.0, 0.5]}, 3),
        ("karcher", {}, 3),
        ("geometric_median", {"weights": [1.0, 2.0, 1.0, 0.5]}, 4),
    ],
)
def test_dot_product_methods_in_chunks_equal_the_whole_tensor(
    tmp_path, monkeypatch, method, params, count
):
    states, paths = fine_tunes(tmp_path, count, torch.float16)
    merged = merged_streaming(tmp_path, monkeypatch, paths, method, **params)
    full = METHODS[method].resolve_params(params, count, "test")
    for key in SHAPES:
        whole = whole_tensor(states, method, full, key, torch.float32).half()
        assert torch.equal(merged[key], whole), key


def test_slerp_in_chunks_matches_the_formula_and_keeps_endpoints(tmp_path, monkeypatch):
    states, paths = fine_tunes(tmp_path, 2, torch.float32)
    merged = merged_streaming(tmp_path, monkeypatch, paths, "slerp", t=0.7)
    a, b = (s["big"].double() for s in states)
    omega = torch.acos((a * b).sum() / (a.norm() * b.norm()))
    expected = (torch.sin(0.3 * omega) * a + torch.sin(0.7 * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(merged["big"].double(), expected, rtol=1e-5, atol=1e-6)
    for t, endpoint in ((0.0, states[0]), (1.0, states[1])):
        merged = merged_streaming(tmp_path, monkeypatch, paths, "slerp", t=t)
        assert all(torch.equal(merged[k], endpoint[k]) for k in SHAPES)


def test_model_stock_in_chunks_matches_the_papers_formula(tmp_path, monkeypatch):
    states, paths = fine_tunes(tmp_path, 3, torch.float32)
    merged = merged_streaming(tmp_path, monkeypatch, paths, "model_stock")
    base, one, two = (s["odd"].double() for s in states)
    d1, d2 = one - base, two - base
    cos = (d1 * d2).sum() / (d1.norm() * d2.norm())
    t = 2 * cos / (1 + cos)
    expected = t * (one + two) / 2 + (1 - t) * base
    torch.testing.assert_close(merged["odd"].double(), expected, rtol=1e-5, atol=1e-6)


def test_streamed_results_do_not_depend_on_threads(tmp_path, monkeypatch):
    _, paths = fine_tunes(tmp_path, 3, torch.float16, coarse=True)
    one = merged_streaming(tmp_path, monkeypatch, paths, "ties", threads=1, density=0.5)
    four = merged_streaming(tmp_path, monkeypatch, paths, "ties", threads=4, density=0.5)
    assert all(torch.equal(one[k], four[k]) for k in SHAPES)


def test_row_wise_variants_keep_the_whole_tensor_path(tmp_path):
    _, paths = fine_tunes(tmp_path, 3, torch.float32)
    recipe = {
        "models": {f"M{i}": str(p) for i, p in enumerate(paths)},
        "merge": {"method": "model_stock", "inputs": ["M0", "M1", "M2"], "filter_wise": True},
    }
    planned = make_plan(recipe, tmp_path / "out.safetensors")
    modes = {engine.mode(planned, key) for key in planned.keys}
    assert modes == {engine.WHOLE}
    assert "computed whole" in weightmix.api.dry_run(recipe)
    recipe["merge"]["filter_wise"] = False
    planned = make_plan(recipe, tmp_path / "out.safetensors")
    assert {engine.mode(planned, key) for key in planned.keys} == {engine.STREAMED}
    assert "3 keys in chunks after statistics passes" in weightmix.api.dry_run(recipe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_top_k_finds_the_exact_cut_over_chunks(dtype):
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(10_000, generator=generator).to(dtype)
    values[::7] = 0.5  # many equal magnitudes
    values[1::7] = -0.5
    chunks = values.split(999)
    for k in (1, 17, 2_857, 5_000, 9_999):
        top = StreamedTopK(k, values.numel(), dtype)
        while top.wants_pass():
            for chunk in chunks:
                top.observe(chunk)
            top.end_pass()
        mask = torch.cat([top.mask(chunk) for chunk in chunks])
        assert torch.equal(mask, _top(values, k))


def _top(values, k):
    order = torch.sort(-values.abs(), stable=True).indices
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@pytest.mark.parametrize(
    ("method", "count", "params"),
    [("ties", 3, {"density": 0.3}), ("slerp", 2, {"t": 0.3}), ("model_stock", 3, {})],
)
def test_held_inputs_and_inputs_read_each_pass_give_the_same_bytes(
    tmp_path, monkeypatch, method, count, params
):
    """A streamed key of inputs that cost more to read again than to hold (a LoRA's products:
    Checkpoint.reads_cheaply False), small enough (engine.HOLD_BYTES), is read once and held
    for its passes; files, and bigger keys, are read again each pass. All give the same
    output; holding reads each input byte once."""
    _, paths = fine_tunes(tmp_path, count, torch.float16)
    stored = sum(p.stat().st_size - (8 + int.from_bytes(p.read_bytes()[:8], "little"))
                 for p in paths)  # fmt: skip
    read = Counter()
    original = SafetensorsCheckpoint.read_range

    def counted(self, info, start, out):
        read["bytes"] += memoryview(out).nbytes
        return original(self, info, start, out)

    monkeypatch.setattr(SafetensorsCheckpoint, "read_range", counted)
    files = merged_streaming(tmp_path, monkeypatch, paths, method, **params)
    assert read["bytes"] >= 2 * stored  # a statistics pass and the output pass
    monkeypatch.setattr(SafetensorsCheckpoint, "reads_cheaply", lambda self, info: False)
    read.clear()
    held = merged_streaming(tmp_path, monkeypatch, paths, method, **params)
    assert read["bytes"] == stored  # every input byte once, whatever the passes
    monkeypatch.setattr(engine, "HOLD_BYTES", 0)
    read.clear()
    again = merged_streaming(tmp_path, monkeypatch, paths, method, **params)
    assert read["bytes"] >= 2 * stored
    for output in (files, again):
        assert all(torch.equal(held[k].view(-1).view(torch.uint8),
                               output[k].view(-1).view(torch.uint8)) for k in SHAPES)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("colinear", [False, True], ids=["slerp", "lerp"])
def test_slerp_of_chunks_as_stored_equals_slerp_of_widened_chunks(
    tmp_path, monkeypatch, dtype, colinear
):
    """slerp takes the chunks as stored (Streamer.takes_stored) and widens inside its sums
    and products: the same bytes as from chunks widened to the compute dtype first."""
    from weightmix.methods.spherical import SlerpStreamer

    states, paths = fine_tunes(tmp_path, 2, dtype)
    if colinear:  # B = 2·A: lerp
        paths[1] = save(tmp_path / "double.safetensors", {k: 2 * v for k, v in states[0].items()})
    stored = merged_streaming(tmp_path, monkeypatch, paths, "slerp", t=0.3)
    monkeypatch.setattr(SlerpStreamer, "takes_stored", False)
    widened = merged_streaming(tmp_path, monkeypatch, paths, "slerp", t=0.3)
    for key in SHAPES:
        assert torch.equal(stored[key].view(torch.int16), widened[key].view(torch.int16)), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_model_stock_of_chunks_as_stored_equals_model_stock_of_widened_chunks(
    tmp_path, monkeypatch, dtype
):
    """model_stock takes the chunks as stored and takes the deltas in the compute dtype
    itself: the same bytes as from chunks widened first."""
    from weightmix.methods.robust import StockStreamer

    _, paths = fine_tunes(tmp_path, 3, dtype)
    stored = merged_streaming(tmp_path, monkeypatch, paths, "model_stock")
    monkeypatch.setattr(StockStreamer, "takes_stored", False)
    widened = merged_streaming(tmp_path, monkeypatch, paths, "model_stock")
    for key in SHAPES:
        assert torch.equal(stored[key].view(torch.int16), widened[key].view(torch.int16)), key


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
def test_a_pickled_input_is_held_only_where_each_read_would_copy_it_whole(tmp_path, strided):
    """A pickle's tensor is in memory: a range of a contiguous one is a copy of those bytes
    (read again each pass), but a strided one (saved as a transpose) is copied whole for
    every range, so its key is held once for all passes. The output is the same."""
    generator = torch.Generator().manual_seed(3)
    paths = []
    for n in range(3):
        tensor = torch.randn(600, 500, generator=generator).half()
        path = tmp_path / f"m{n}.ckpt"
        torch.save({"w": tensor.t() if strided else tensor.t().contiguous()}, path)
        paths.append(path)
    recipe = {
        "models": {f"M{n}": str(p) for n, p in enumerate(paths)},
        "merge": {"method": "ties", "inputs": ["M0", "M1", "M2"], "density": 0.3},
    }
    plan = make_plan(recipe)
    try:
        (key,) = plan.keys
        assert (engine.held_bytes(plan, key) > 0) is strided
    finally:
        plan.close()
    weightmix.merge(recipe, tmp_path / "out.safetensors")
    expected = []
    for path in paths:  # the same values as contiguous tensors in a safetensors file
        expected.append(save(path.with_suffix(".safetensors"),
                             {"w": torch.load(path)["w"].contiguous()}))  # fmt: skip
    again = {**recipe, "models": {f"M{n}": str(p) for n, p in enumerate(expected)}}
    weightmix.merge(again, tmp_path / "again.safetensors")
    merged, reference = load(tmp_path / "out.safetensors"), load(tmp_path / "again.safetensors")
    assert torch.equal(merged["w"].view(torch.int16), reference["w"].view(torch.int16))
