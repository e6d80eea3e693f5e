"""`--device cuda` on a real GPU against the CPU path, where torch sees one.

The CPU path is the reference (tested against written-out formulas elsewhere). A GPU may
contract a·x + b·y into a fused multiply-add, so a compute-dtype result can differ in its
last bit, and its rounding into the output dtype can then land one step away: every value
must be within one step of the output dtype and almost all bytes the same. Random draws
(DARE's masks, stochastic rounding) are made by element index on the CPU and copied over, so
they are the same draws. Without a GPU each case asks for `--device cuda` and checks that it
is refused in one line, with nothing written."""

from __future__ import annotations

import pytest
import torch
from helpers import fp8_copies, load, save

import weightmix
from weightmix import device_chunks, engine
from weightmix.methods import METHODS

HAS_GPU = torch.cuda.is_available()

RECIPES = {
    "weighted_sum": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.3},
    "add_difference": {"method": "add_difference", "inputs": ["A", "B", "C"], "alpha": 0.7},
    "dare_linear": {"method": "dare_linear", "inputs": ["A", "B", "C"], "density": 0.4},
    "slerp": {"method": "slerp", "inputs": ["A", "B"], "t": 0.4},  # whole tensors on the GPU
}
# relative size of one step of each output dtype (its machine epsilon)
STEP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23,
        torch.float8_e4m3fn: 2.0**-3, torch.float8_e5m2: 2.0**-2}  # fmt: skip


def named(merge: dict) -> set[str]:
    """The models a merge tree names."""
    return {n for i in merge["inputs"] for n in (named(i) if isinstance(i, dict) else {i})}


def merge_on(tmp_path, models, device: str, merge: dict, threads: int = 2, **extra):
    """The merged tensors of `merge` over `models` computed on `device`; on "cuda" without
    a GPU, the refusal is checked and None returned."""
    recipe = {
        "models": {n: str(p) for n, p in models.items() if n in named(merge)},
        "merge": merge,
        "seed": 5,
        "device": device,
        **extra,
    }
    out = tmp_path / f"{device}-{threads}-{len(list(tmp_path.iterdir()))}.safetensors"
    if device == "cuda" and not HAS_GPU:
        with pytest.raises(weightmix.WeightmixError, match="no CUDA GPU"):
            weightmix.merge(recipe, out, threads=threads)
        assert not out.exists()
        return None
    weightmix.merge(recipe, out, threads=threads)
    return load(out)


def assert_within_a_step(gpu: dict, cpu: dict, spread: float = 0.0, equal: float = 0.99) -> None:
    """Same keys and dtypes; each float value within one step of the output dtype of the
    CPU's (two steps' worth of absolute slack near zero, plus `spread` times the tensor's
    largest magnitude), and at least the share `equal` of the bytes the same."""
    assert set(gpu) == set(cpu)
    differing = total = 0
    for key, expected in cpu.items():
        got = gpu[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if not expected.is_floating_point():
            assert torch.equal(got, expected), key
            continue
        step = STEP[expected.dtype]
        wide_got, wide_expected = got.double(), expected.double()
        limit = step * wide_expected.abs() + 2 * step * torch.finfo(expected.dtype).tiny
        limit += spread * float(wide_expected.abs().max()) if expected.numel() else 0.0
        assert bool(((wide_got - wide_expected).abs() <= limit).all()), key
        differing += int((got.view(torch.uint8) != expected.view(torch.uint8)).sum())
        total += got.numel() * got.element_size()
    assert differing <= total * (1 - equal), f"{differing} of {total} bytes differ"


def small_chunks(monkeypatch) -> None:
    """Chunks of 1000 elements in tasks of 5000: keys span several tasks, and each task
    reuses both pinned buffer sets and waits on its stream's events."""
    monkeypatch.setattr(device_chunks, "DEVICE_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(engine, "TASK_ELEMENTS", 5000)


@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_gpu_merges_match_the_cpu_path(tmp_path, models, monkeypatch, method, chunks):
    cpu = merge_on(tmp_path, models, "cpu", RECIPES[method])
    if chunks == "small":
        small_chunks(monkeypatch)
    gpu = merge_on(tmp_path, models, "cuda", RECIPES[method])
    if gpu is not None:
        assert_within_a_step(gpu, cpu)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8_e4m3fn"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gpu_output_dtypes_and_rounding_match_the_cpu_path(
    tmp_path, models, monkeypatch, dtype, rounding
):
    """Stochastic rounding's noise is drawn by element index: the same noise on both."""
    merge = RECIPES["add_difference"]
    cpu = merge_on(tmp_path, models, "cpu", merge, dtype=dtype, rounding=rounding)
    small_chunks(monkeypatch)
    gpu = merge_on(tmp_path, models, "cuda", merge, dtype=dtype, rounding=rounding)
    if gpu is not None:
        assert_within_a_step(gpu, cpu)


def test_gpu_takes_fp8_inputs(tmp_path, models, monkeypatch):
    """fp8 files (as Flux ships): widened on the GPU, merged, written back as fp8."""
    fp8 = fp8_copies(tmp_path, models)
    cpu = merge_on(tmp_path, fp8, "cpu", RECIPES["weighted_sum"])
    small_chunks(monkeypatch)
    gpu = merge_on(tmp_path, fp8, "cuda", RECIPES["weighted_sum"])
    if gpu is not None:
        assert all(t.dtype == torch.float8_e4m3fn for t in gpu.values() if t.is_floating_point())
        assert_within_a_step(gpu, cpu)


def test_gpu_bytes_do_not_depend_on_the_thread_count(tmp_path, models, monkeypatch):
    """One worker or four, each with its own stream: the same bytes."""
    small_chunks(monkeypatch)
    one = merge_on(tmp_path, models, "cuda", RECIPES["dare_linear"], threads=1)
    four = merge_on(tmp_path, models, "cuda", RECIPES["dare_linear"], threads=4)
    if one is not None:
        assert one.keys() == four.keys()
        assert all(torch.equal(one[k].view(torch.uint8), four[k].view(torch.uint8)) for k in one)


def test_an_overflow_on_the_gpu_is_refused_and_nothing_is_written(tmp_path, models, monkeypatch):
    """A result beyond fp16 in a late chunk: the key is named, the output path stays empty."""
    a = load(models["A"])
    key = max((k for k in a if a[k].is_floating_point()), key=lambda k: a[k].numel())
    b = {k: v.clone() for k, v in a.items()}
    b[key].view(-1)[-3] = 60000.0  # A + 2·(B − C) with C = A: 2·60000 > 65504
    paths = {"A": models["A"], "B": save(tmp_path / "big.safetensors", b), "C": models["A"]}
    merge = {"method": "add_difference", "inputs": ["A", "B", "C"], "alpha": 2.0}
    recipe = {"models": {n: str(p) for n, p in paths.items()}, "merge": merge, "device": "cuda"}
    out = tmp_path / "out.safetensors"
    small_chunks(monkeypatch)
    match = f"key '{key}'.*1 value" if HAS_GPU else "no CUDA GPU"
    with pytest.raises(weightmix.WeightmixError, match=match):
        weightmix.merge(recipe, out)
    assert not out.exists()


# every method but concept (it needs a CLIP text encoder), with its required parameters
EVERY_METHOD = sorted(name for name in METHODS if name != "concept")


def every_method_recipe(name: str) -> dict:
    """The method over as many of A, B, C as it takes (at most three; slerp and nuslerp blend
    two; add takes a delta), density 0.5 where it needs one."""
    spec = METHODS[name]
    count = 2 if name in ("slerp", "nuslerp") else min(3, spec.max_inputs or 3)
    merge = {"method": name, "inputs": ["A", "B", "C"][: max(count, spec.min_inputs)]}
    if name == "add":
        merge["inputs"] = ["A", {"method": "subtract", "inputs": ["B", "C"]}]
    if "density" in spec.params and spec.params["density"].required:
        merge["density"] = 0.5
    return merge


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_runs_on_the_gpu(tmp_path, models, method):
    """Methods that need whole tensors get them on the GPU: their selections (TIES's and
    breadcrumbs' magnitude cuts, DELLA's ranks) are exact rules with ties broken by index,
    and their Gram matrices are float64, so the results agree with the CPU's to a step. The
    spectral method's FFTs differ from the CPU's by rounding spread over the whole tensor: it
    gets that much slack, and fewer equal bytes."""
    merge = every_method_recipe(method)
    cpu = merge_on(tmp_path, models, "cpu", merge)
    gpu = merge_on(tmp_path, models, "cuda", merge)
    if gpu is not None:
        fft = method == "spectral"
        assert_within_a_step(gpu, cpu, spread=2.0**-18 if fft else 0.0, equal=0.9 if fft else 0.99)
