"""The C loops (weightmix/_kernels.c) compute exactly what the torch code computes: the widening
of every float16 and bfloat16 bit pattern, the radix histogram of delta magnitudes, and TIES's
output chunk, on values chosen to hit every branch (zeros of both signs, subnormals, infinities,
NaN, magnitudes equal to the cut); and a merge gives the same bytes with and without them."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import load, save

import weightmix
from weightmix import kernels
from weightmix.engine import CHUNK_ELEMENTS
from weightmix.methods.sparsify import task_arithmetic_

# a C compiler and Python's headers: what setup.py needs to build weightmix/_kernels.c
BUILDABLE = (
    shutil.which("cc") is not None
    and (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
)
pytestmark = pytest.mark.skipif(
    kernels._kernels is None and not BUILDABLE,
    reason="the C extension was not built (no C compiler or no Python headers)",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (payloads may differ)."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return torch.equal(torch.where(both_nan, 0, a).view(torch.int32),
                       torch.where(both_nan, 0, b).view(torch.int32))  # fmt: skip


def awkward(count: int, seed: int, dtype: torch.dtype, cut: float = 0.05) -> torch.Tensor:
    """Normal values scaled by 0.1 with specials spread in: ±0, ±inf, NaN, subnormals and
    values whose delta from the others may land exactly on `cut`."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(count, generator=generator) * 0.1
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, cut, -cut])
    where = torch.randint(0, count, (count // 8,), generator=generator)
    values[where] = specials[torch.randint(0, len(specials), (len(where),), generator=generator)]
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_widens_as_torch_widens_it(dtype):
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    out = torch.empty(patterns.numel(), dtype=torch.float32)
    kernels._kernels.widen(out.data_ptr(), patterns.data_ptr(), kernels.CODES[dtype],
                           patterns.numel())  # fmt: skip
    assert same_bits(out, patterns.float())
    finite = ~torch.isnan(out)
    assert torch.equal(out[finite].view(torch.int32), patterns.float()[finite].view(torch.int32))


FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_every_float8_pattern_widens_as_torch_widens_it(dtype):
    patterns = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    out = torch.empty(256)
    assert kernels.widen(patterns, out)
    assert same_bits(out, patterns.float())
    assert torch.equal(torch.isnan(out), torch.isnan(patterns.float()))


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_the_cast_to_float8_rounds_as_torch_and_counts_what_is_not_finite(dtype):
    """Arbitrary float32 bit patterns, values over many magnitudes, every float8 value and
    every midpoint between neighbours (ties to even), and the edges: e4m3fn saturates at
    ±448 (464 and up, inf included: torch's CPU cast), e5m2 overflows to inf from 61440."""
    generator = torch.Generator().manual_seed(4)
    patterns = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=generator)
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    values = values[~torch.isnan(values)].sort().values
    edges = torch.tensor([448.0, 463.99, 464.0, 464.01, 480.0, 57344.0, 61439.0, 61440.0,
                          65536.0, 2**-9, 2**-10, 2**-17, 2**-16 * 1.5, math.inf, -math.inf,
                          math.nan, -math.nan, 0.0, -0.0])  # fmt: skip
    wide = torch.randn(100_003, generator=generator) * torch.logspace(-12, 6, 100_003)
    middles = (values[:-1] + values[1:]) / 2
    inputs = torch.cat([patterns.to(torch.int32).view(torch.float32), wide, values, middles,
                        edges])  # fmt: skip
    out = torch.empty(inputs.numel(), dtype=dtype)
    found = kernels.cast(inputs, out)
    expected = inputs.to(dtype)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))  # NaN bytes too
    assert found == int((~torch.isfinite(expected.float())).sum()) > 0


def torch_histogram(base, model, stage, prefix):
    """The radix counts written out in torch: top 16 bits, or low 16 bits under `prefix`,
    every NaN magnitude counted as the quiet NaN 0x7FC00000."""
    bits = (model.float() - base.float()).abs().view(torch.int32)
    bits = torch.where(bits > 0x7F800000, 0x7FC00000, bits)
    if stage == 0:
        return torch.bincount(bits >> 16, minlength=1 << 16)
    return torch.bincount(bits[(bits >> 16) == prefix] & 0xFFFF, minlength=1 << 16)


@pytest.mark.parametrize("base_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
def test_the_magnitude_histogram_counts_as_torch_does(base_dtype, model_dtype):
    count = 5000  # several blocks of the C loop and a remainder
    base, model = awkward(count, 1, base_dtype), awkward(count, 2, model_dtype)
    top = torch.zeros(1 << 16, dtype=torch.int64)
    assert kernels.magnitude_histogram(base, model, 0, 0, top)
    assert torch.equal(top, torch_histogram(base, model, 0, 0))
    busiest = int(top[:0x7F80].argmax())  # a bucket of finite magnitudes with most elements
    low = torch.zeros(1 << 16, dtype=torch.int64)
    assert kernels.magnitude_histogram(base, model, 1, busiest, low)
    expected = torch_histogram(base, model, 1, busiest)
    assert int(expected.sum()) > 1 and torch.equal(low, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_histogram_of_every_16_bit_pattern_against_others(dtype):
    """Every pattern as base, against the patterns rolled by a few offsets as model (the
    vectorised float16 loops see infinities, NaNs of every payload, subnormals, both zeros);
    stage 1 under the busiest, the infinity and the NaN prefixes."""
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    for shift in (1, 977, 32768):
        base, model = patterns[1:], patterns.roll(shift)[1:]  # 65,535: a remainder of 7
        top = torch.zeros(1 << 16, dtype=torch.int64)
        assert kernels.magnitude_histogram(base, model, 0, 0, top)
        assert torch.equal(top, torch_histogram(base, model, 0, 0))
        for prefix in (int(top[:0x7F80].argmax()), 0x7F80, 0x7FC0):
            low = torch.zeros(1 << 16, dtype=torch.int64)
            assert kernels.magnitude_histogram(base, model, 1, prefix, low)
            expected = torch_histogram(base, model, 1, prefix)
            assert int(expected.sum()) > 0 and torch.equal(low, expected)


def torch_ties(base, models, cuts, weights, consensus, normalize, lambda_):
    """The torch code's TIES for given cuts: MagnitudeCutStreamer.apply's masks."""

    def trim(delta, index):
        mode, cut, left = cuts[index]
        magnitude = delta.abs()
        if mode == kernels.KEEP_ALL:
            return delta
        if mode == kernels.AT_LEAST:
            return delta * (1 - torch.sign(torch.relu(cut - magnitude)))
        keep = torch.sign(torch.relu(magnitude - cut))
        if mode == kernels.FIRST_AT_CUT:  # the first `left` elements at the cut, by index
            at_cut = (magnitude == cut).nonzero().reshape(-1)[:left]
            keep[at_cut] = 1.0
        return delta * keep

    widened = [m.float() for m in models]
    return task_arithmetic_(base.float(), widened, trim, consensus, lambda_, weights, normalize)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("weights", "consensus", "normalize", "lambda_"),
    [
        ([1.0, 1.0, 1.0], "sum", True, 1.0),
        ([1.0, 0.5, 2.0], "sum", True, 0.8),
        ([0.3, 1.0, -1.5], "sum", False, 1.7),
        ([1.0, 1.0, 1.0], "count", True, 1.0),
        ([2.0, 1.0, 0.5], "count", False, 0.5),
    ],
)
def test_the_ties_chunk_equals_the_torch_code(dtype, weights, consensus, normalize, lambda_):
    count = 4099
    base = torch.zeros(count, dtype=dtype)  # deltas are the models: some land on the cut
    base[::97], base[1::97], base[2::97] = math.nan, -math.inf, -0.0
    models = [awkward(count, 11 + m, dtype) for m in range(4)]
    cut = float(torch.tensor(0.05, dtype=dtype))
    at_cut = int((models[3].float().abs() == cut).sum())
    assert at_cut > 20
    cuts = [(kernels.ABOVE, cut, 0), (kernels.AT_LEAST, cut, 0), (kernels.KEEP_ALL, 0.0, 0),
            (kernels.FIRST_AT_CUT, cut, at_cut // 2)]  # fmt: skip
    weights = [*weights, 1.25]
    fused = kernels.ties_chunk(base, models, cuts, weights, consensus, normalize, lambda_)
    assert fused is not None and fused[0].dtype == torch.float32
    assert fused[1] == [0, 0, 0, at_cut // 2]
    expected = torch_ties(base, models, cuts, weights, consensus, normalize, lambda_)
    assert same_bits(fused[0], expected)
    assert torch.isnan(expected).any() and torch.isinf(expected).any()  # specials reached


def test_mixed_input_dtypes_and_one_model():
    base = awkward(3000, 20, torch.float16)
    models = [awkward(3000, 21, torch.bfloat16)]
    cuts = [(kernels.ABOVE, 0.1, 0)]
    fused = kernels.ties_chunk(base, models, cuts, [1.0], "sum", True, 1.0)
    assert fused is not None
    assert same_bits(fused[0], torch_ties(base, models, cuts, [1.0], "sum", True, 1.0))


def test_what_the_loops_cannot_take_is_left_to_torch(monkeypatch):
    base, keep = torch.zeros(10), [(kernels.KEEP_ALL, 0.0, 0)]
    assert kernels.ties_chunk(base, [base], keep, [1.0], "sum", True, 1.0) is not None
    wide = base.double()
    assert kernels.ties_chunk(wide, [wide], keep, [1.0], "sum", True, 1.0) is None
    assert kernels.ties_chunk(base, [base], keep, [1.0], "none", True, 1.0) is None
    strided = torch.zeros(20)[::2]
    assert kernels.ties_chunk(base, [strided], keep, [1.0], "sum", True, 1.0) is None
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    assert not kernels.magnitude_histogram(wide, wide, 0, 0, counts)
    assert not kernels.magnitude_histogram(base, base, 2, 0, counts)
    into = torch.empty(8, dtype=torch.int32)
    assert kernels.magnitude_collect(base, base, None, (0, 1), into) == (10, 0)  # |0 − 0| = 0
    assert kernels.magnitude_collect(base, base, None, (5, 4), into) is None  # an empty window
    spaced = torch.zeros(1 << 17, dtype=torch.int64)[::2]
    assert kernels.magnitude_collect(base, base, spaced, (0, 1), into) is None
    drops = [(kernels.DROP, 0.5, 0)]
    assert kernels.ties_chunk(base, [base], drops, [1.0], "sum", True, 1.0) is None  # no numbers
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "0")
    assert not kernels.enabled()
    assert kernels.ties_chunk(base, [base], keep, [1.0], "sum", True, 1.0) is None
    assert not kernels.magnitude_histogram(base, base, 0, 0, counts)
    assert kernels.magnitude_collect(base, base, None, (0, 1), into) is None


class Counting:
    """The extension module with its calls counted, and the dtype codes histograms get."""

    def __init__(self, module):
        self.module, self.codes, self.calls = module, set(), Counter()

    def __getattr__(self, name):
        function = getattr(self.module, name)

        def counted(*args):
            self.calls[name] += 1
            if name in ("histogram", "collect"):
                self.codes.update((args[1], args[3]))
            return function(*args)

        return counted


def fine_tunes(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    """A base and count − 1 fine-tunes of it: a big key, one just over a chunk, a small one."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"big": (700, 1000), "odd": (3, 262_145), "small": (5, 7)}
    base = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    return [base] + [
        {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        for _ in range(count - 1)
    ]


def saved(tmp_path, states: list[dict], dtypes: list[torch.dtype]) -> list:
    return [
        save(tmp_path / f"m{i}.safetensors", {k: v.to(d) for k, v in s.items()})
        for i, (s, d) in enumerate(zip(states, dtypes))
    ]


def merged_both_ways(tmp_path, monkeypatch, recipe: dict, threads: int = 2):
    """The recipe merged with the C loops (their calls counted) into out-1.safetensors and
    without them (WEIGHTMIX_KERNELS=0) into out-0.safetensors: both outputs' bytes, the calls
    with the loops on, and the counter. No call may follow with the loops off."""
    counting = Counting(kernels._kernels)
    monkeypatch.setattr(kernels, "_kernels", counting)
    outputs, used = [], {}
    for setting in ("1", "0"):
        monkeypatch.setenv("WEIGHTMIX_KERNELS", setting)
        out = tmp_path / f"out-{setting}.safetensors"
        weightmix.merge(recipe, out, threads=threads)
        outputs.append(out.read_bytes())
        if setting == "1":
            used = dict(counting.calls)
    assert counting.calls == used  # nothing more with WEIGHTMIX_KERNELS=0
    return outputs, used, counting


def refusals_both_ways(tmp_path, monkeypatch, recipe: dict) -> list[str]:
    """The error of the recipe's merge with the C loops and without them (out-1, out-0)."""
    messages = []
    for setting in ("1", "0"):
        monkeypatch.setenv("WEIGHTMIX_KERNELS", setting)
        with pytest.raises(weightmix.WeightmixError) as caught:
            weightmix.merge(recipe, tmp_path / f"out-{setting}.safetensors", threads=1)
        messages.append(str(caught.value))
    return messages


@pytest.mark.parametrize(
    ("dtypes", "compute", "out_dtype"),
    [((torch.float16,) * 3, "fp32", "fp16"),
     ((torch.bfloat16, torch.float16, torch.float32), "fp32", "fp32"),
     ((torch.bfloat16,) * 3, "fp32", "bf16"), ((torch.float16,) * 3, "fp64", "fp32")],
    ids=["fp16", "mixed", "bf16", "fp16-in-fp64"],
)  # fmt: skip
@pytest.mark.parametrize("params", [{"density": 0.3}, {"density": 0.5, "lambda": 0.7,
                                    "weights": [1.0, 0.5], "consensus": "count"}])  # fmt: skip
def test_a_ties_merge_gives_the_same_bytes_with_and_without_the_loops(
    tmp_path, monkeypatch, dtypes, compute, out_dtype, params
):
    states = fine_tunes(5, 3)
    states[2]["small"][0, :3] = states[0]["small"][0, :3]  # deltas of 0: ties at the cut
    paths = saved(tmp_path, states, dtypes)
    recipe = {
        "models": {f"M{i}": str(p) for i, p in enumerate(paths)},
        "merge": {"method": "ties", "inputs": ["M0", "M1", "M2"], **params},
        "compute_dtype": compute,
        "dtype": out_dtype,
    }
    outputs, used, counting = merged_both_ways(tmp_path, monkeypatch, recipe)
    assert outputs[0] == outputs[1]
    if compute == "fp32":  # the big keys' chunks went through C, but for a split run of ties
        assert used["ties"] >= 4 and used["histogram"] >= 4
        assert "cast" not in used  # rounded into the output by the ties loop itself
        # the statistics passes read the chunks as stored, not widened copies
        assert counting.codes == {kernels.CODES[d] for d in set(dtypes)}
    else:
        assert used.get("ties", 0) == used.get("histogram", 0) == 0
    merged = load(tmp_path / "out-1.safetensors")
    assert not torch.equal(merged["big"], states[0]["big"].to(dtypes[0]).float())


@pytest.mark.parametrize("density", [0.3, 0.5])
def test_ties_cuts_from_sampled_windows_give_the_same_bytes(tmp_path, monkeypatch, density):
    """With the engine's sample of each big key (pieces spread over it, here from keys of
    100,000 elements on), the first passes make no histogram, and the merge is the bytes of
    the torch code's radix select."""
    from weightmix.methods import selection, sparsify

    monkeypatch.setattr(sparsify.MagnitudeCutStreamer, "SAMPLE_FROM", 100_000)
    settled = Counter()
    real = selection.StreamedTopK.end_pass

    def end_pass(self):
        settled["without a histogram"] += self.counting
        real(self)

    monkeypatch.setattr(selection.StreamedTopK, "end_pass", end_pass)
    paths = saved(tmp_path, fine_tunes(7, 3), [torch.float16] * 3)
    recipe = {
        "models": {f"M{i}": str(p) for i, p in enumerate(paths)},
        "merge": {"method": "ties", "inputs": ["M0", "M1", "M2"], "density": density},
    }
    outputs, _, _ = merged_both_ways(tmp_path, monkeypatch, recipe)
    assert outputs[0] == outputs[1]
    assert settled["without a histogram"] == 4  # the big and odd keys, two models each


@pytest.mark.parametrize("dtypes", [(torch.float16,) * 3, (torch.bfloat16, torch.float16,
                                    torch.float32)], ids=["fp16", "mixed"])  # fmt: skip
@pytest.mark.parametrize("params", [{"density": 0.3}, {"density": 1.0},
                                    {"density": 0.6, "lambda": 0.7, "weights": [1.0, 0.5],
                                     "consensus": "count", "normalize": True}])  # fmt: skip
@pytest.mark.parametrize("compute", ["fp32", "fp16", "bf16"])
def test_a_dare_ties_merge_gives_the_same_bytes_with_and_without_the_loops(
    tmp_path, monkeypatch, dtypes, params, compute
):
    """DARE's drop, rescale and TIES's election in the C TIES loop (mode DROP), whose
    arithmetic is float32: a float16 or bfloat16 compute dtype stays in torch (a review found
    the loop taking half-precision chunks and computing in float32)."""
    states = fine_tunes(6, 3)
    states[2]["small"][0, :3] = states[0]["small"][0, :3]  # deltas of 0
    paths = saved(tmp_path, states, list(dtypes))
    recipe = {
        "models": {f"M{i}": str(p) for i, p in enumerate(paths)},
        "merge": {"method": "dare_ties", "inputs": ["M0", "M1", "M2"], **params},
        "dtype": "fp16",
        "compute_dtype": compute,
        "seed": 11,
    }
    outputs, used, _ = merged_both_ways(tmp_path, monkeypatch, recipe)
    assert outputs[0] == outputs[1]
    if compute == "fp32":
        assert used["ties"] >= 4  # every chunk of the big keys
    else:
        assert "ties" not in used and "stream_uniform" in used
    merged = load(tmp_path / "out-1.safetensors")
    assert not torch.equal(merged["big"], states[0]["big"].half())


def torch_dare_ties(base, models, density, uniforms, weights, consensus, normalize, lambda_):
    """sparsify.task_arithmetic_ with random_drop: the torch code the C loop must equal."""
    from weightmix.methods.sparsify import random_drop, task_arithmetic_

    def drop(delta, index):
        return random_drop(delta, density, uniforms[index])

    return task_arithmetic_(base, models, drop, consensus, lambda_, weights, normalize)


def test_dares_drop_in_c_matches_torch_at_the_edges():
    """Uniform numbers equal to the float32 density (dropped: u < density fails), just below
    it, signed zeros, deltas of 0 and an elected sign of 0: the same bits as torch."""
    density = 0.3
    edge = float(torch.tensor(density, dtype=torch.float32))  # a multiple of 2^-24: a draw
    n = 4099
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(n, generator=generator)
    base[:8] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.0, 2.0, 0.0])
    models = [base + 0.1 * torch.randn(n, generator=generator) for _ in range(2)]
    models[0][:8] = base[:8]  # deltas of 0 (−0 − −0 = 0, 0 − 0 = 0)
    models[1][8:16] = base[8:16] + 0.25
    models[0][8:16] = base[8:16] - 0.25  # opposite deltas: the elected sign is 0 where kept
    uniforms = [torch.rand(n, generator=generator) for _ in models]
    uniforms = [(u * (1 << 24)).floor() / (1 << 24) for u in uniforms]
    uniforms[0][16:24] = edge
    uniforms[1][16:24] = edge - 2**-24
    uniforms[0][8:16] = uniforms[1][8:16] = 0.0  # both kept
    for weights, consensus, normalize, lambda_ in [
        ([1.0, 1.0], "sum", False, 1.0), ([0.5, 2.0], "count", True, 0.7),
    ]:  # fmt: skip
        cuts = [(kernels.DROP, density, 0)] * 2
        fused = kernels.ties_chunk(base, models, cuts, weights, consensus, normalize, lambda_,
                                   uniforms=uniforms)  # fmt: skip
        assert fused is not None
        expected = torch_dare_ties(base, models, density, uniforms, weights, consensus,
                                   normalize, lambda_)  # fmt: skip
        assert torch.equal(fused[0].view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("value", [math.inf, math.nan, 1e36])
def test_dares_drop_in_c_leaves_non_finite_or_huge_deltas_to_torch(value):
    """torch looks for a non-finite dropped delta with a sum (and picks them by torch.where);
    the loop declines such a chunk, and one whose sum could overflow."""
    n = 1000
    base, models = torch.zeros(n), [torch.full((n,), 0.5), torch.full((n,), -0.25)]
    models[0][3] = value
    uniforms = [torch.zeros(n), torch.zeros(n)]  # everything kept
    cuts = [(kernels.DROP, 0.5, 0)] * 2
    assert kernels.ties_chunk(base, models, cuts, [1.0, 1.0], "sum", False, 1.0,
                              uniforms=uniforms) is None  # fmt: skip
    models[0][3] = 1e30  # 1e30 · 2 / 0.5 · 1000 elements: no overflow in any order
    assert kernels.ties_chunk(base, models, cuts, [1.0, 1.0], "sum", False, 1.0,
                              uniforms=uniforms) is not None  # fmt: skip


def streamed_cut(base, model, k, chunk, monkeypatch, setting):
    """A StreamedTopK's cut over |model − base| seen in chunks, kernels on ('1') or off."""
    from weightmix.methods.selection import StreamedTopK

    monkeypatch.setenv("WEIGHTMIX_KERNELS", setting)
    cut = StreamedTopK(k, base.numel(), torch.float32)
    while cut.wants_pass():
        for start in range(0, base.numel(), chunk):
            cut.observe_delta(base[start : start + chunk], model[start : start + chunk])
        cut.end_pass()
    return cut.threshold.view(torch.int32).item(), cut.above, cut.need, cut.ties


def cut_and_passes(base, model, k, chunk, samples=None):
    """streamed_cut's result with the loops as they are set, and how many passes it took;
    with `samples` ((base, model) pieces), shown those first (sample_delta, end_sample)."""
    from weightmix.methods.selection import StreamedTopK

    cut, passes = StreamedTopK(k, base.numel(), torch.float32), 0
    if samples is not None:
        for piece in samples:
            cut.sample_delta(*piece)
        cut.end_sample()
    while cut.wants_pass():
        passes += 1
        for start in range(0, base.numel(), chunk):
            cut.observe_delta(base[start : start + chunk], model[start : start + chunk])
        cut.end_pass()
    return (cut.threshold.view(torch.int32).item(), cut.above, cut.need, cut.ties), passes


def sorted_cut(base, model, k):
    """The same four numbers from a full sort of the float32 magnitudes (no NaN here)."""
    magnitudes = (model.float() - base.float()).abs()
    cut = magnitudes.sort(descending=True).values[k - 1]
    above, ties = int((magnitudes > cut).sum()), int((magnitudes == cut).sum())
    return cut.view(torch.int32).item(), above, k - above, ties


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.5, 0.1, 0.9])
def test_the_second_stage_comes_from_the_patterns_kept_aside(monkeypatch, dtype, density):
    """The first pass keeps aside the patterns near where its first chunk puts the cut; the
    cut's bits fall there, so one pass finds what two passes and a full sort find. (bfloat16
    differences sit on few values: here the cut's top bits alone hold 13 % of the tensor, more
    than the room of an eighth, so bfloat16 may take the second pass.)"""
    from weightmix.methods import selection

    generator = torch.Generator().manual_seed(3)
    n, chunk = 50_000, 4096
    base = torch.randn(n, generator=generator).to(dtype)
    model = (base.float() + 0.02 * torch.randn(n, generator=generator)).to(dtype)
    model[7_000:7_300] = base[7_000:7_300]  # deltas of 0: equal magnitudes
    k = max(1, math.floor(density * n))
    expected = sorted_cut(base, model, k)
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "1")
    found, passes = cut_and_passes(base, model, k, chunk)
    assert found == expected and (passes == 1 or dtype == torch.bfloat16)
    monkeypatch.setattr(selection, "KEPT_AT_MOST", 0)  # nothing kept aside: two passes
    assert cut_and_passes(base, model, k, chunk) == (expected, 2)
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "0")
    assert cut_and_passes(base, model, k, chunk)[0] == expected


def test_a_cut_outside_the_window_or_a_full_room_takes_the_second_pass(monkeypatch):
    from weightmix.methods import selection

    generator = torch.Generator().manual_seed(4)
    n, chunk = 40_000, 4096
    base = torch.zeros(n, dtype=torch.float16)
    model = torch.randn(n, generator=generator).half()
    model[:chunk] *= 1e-3  # the first chunk puts the cut three orders of magnitude too low
    k = n // 2
    expected = sorted_cut(base, model, k)
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "1")
    assert cut_and_passes(base, model, k, chunk) == (expected, 2)
    model[:chunk] *= 1e3  # a good guess now, but room for 4 patterns only
    expected = sorted_cut(base, model, k)
    assert cut_and_passes(base, model, k, chunk) == (expected, 1)
    monkeypatch.setattr(selection, "KEPT_AT_MOST", 4)
    assert cut_and_passes(base, model, k, chunk) == (expected, 2)


def sampled_cut_and_passes(base, model, k, chunk, pieces):
    """cut_and_passes after showing the cut the pieces [start, stop) of the tensor first."""
    samples = [(base[start:stop], model[start:stop]) for start, stop in pieces]
    return cut_and_passes(base, model, k, chunk, samples)


SPREAD = [(start, start + 512) for start in range(0, 60_000, 4_000)]  # 15 pieces


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.5, 0.1, 0.9])
def test_a_sampled_window_settles_the_cut_without_a_histogram(monkeypatch, dtype, density):
    """Placed by pieces spread over the tensor, the window holds the cut even where the first
    chunk is unlike the rest (scaled down a thousandfold here: placed by it, the window would
    miss); the first pass counts only the elements above it and finds what a sort finds."""
    generator = torch.Generator().manual_seed(5)
    n, chunk = 60_000, 4096
    base = torch.randn(n, generator=generator).to(dtype)
    delta = 0.02 * torch.randn(n, generator=generator)
    delta[:chunk] *= 1e-3
    model = (base.float() + delta).to(dtype)
    model[9_000:9_300] = base[9_000:9_300]  # deltas of 0: equal magnitudes
    k = max(1, math.floor(density * n))
    expected = sorted_cut(base, model, k)
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "1")
    found, passes = sampled_cut_and_passes(base, model, k, chunk, SPREAD)
    assert cut_and_passes(base, model, k, chunk) == (expected, 2)  # the first chunk's window
    # half-precision differences sit on few values: where the sample foresees the window
    # overflowing, the pass makes its histogram as without a sample (never more passes)
    assert found == expected and (passes == 1 or (dtype != torch.float32 and passes == 2))


@pytest.mark.parametrize("where", ["top", "bottom"])
def test_a_sampled_window_at_either_end_reaches_the_end_of_the_range(monkeypatch, where):
    """k = 1 (or n − 1): the cut lies beyond what a sample is likely to have seen, so the
    window runs to the top (or bottom) of the range and the one pass still holds it (a
    review found a third pass here when the window stopped at the sample's extreme)."""
    generator = torch.Generator().manual_seed(8)
    n, chunk = 200_000, 16_384
    base = torch.randn(n, generator=generator)
    model = base + 0.02 * torch.randn(n, generator=generator)
    k = 1 if where == "top" else n - 1
    pieces = [(start, start + 512) for start in range(0, n, n // 16)]
    expected = sorted_cut(base, model, k)
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "1")
    assert sampled_cut_and_passes(base, model, k, chunk, pieces) == (expected, 1)


def test_a_sampled_window_that_misses_the_cut_or_fills_up_takes_a_histogram_pass(monkeypatch):
    """A sample unlike the tensor puts the window where the cut is not: the pass without a
    histogram finds that out (the cut's rank is not among the window's elements) and the
    next passes make the histogram; a room filled by what the sample did not see does the
    same. The cut stays exact."""

    generator = torch.Generator().manual_seed(6)
    n, chunk = 60_000, 4096
    base = torch.zeros(n, dtype=torch.float16)
    model = torch.randn(n, generator=generator).half()
    k = n // 2
    expected = sorted_cut(base, model, k)
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "1")
    misleading = base.clone(), (model.float() * 1e-3).half()  # a sample of other deltas
    found, passes = cut_and_passes(base, model, k, chunk, [misleading])
    assert found == expected
    assert passes == 2  # the miss, then the histogram (whose window holds the cut)
    # 6,600 elements that no piece of the sample saw, all at the cut's magnitude: more than
    # the room of an eighth (7,500) holds with the rest of the window
    middle = model.float().abs().median()
    model[600:3_900] = middle.half()
    model[4_600:7_900] = -middle.half()
    expected = sorted_cut(base, model, k)
    found, passes = sampled_cut_and_passes(base, model, k, chunk, SPREAD)
    assert found == expected and passes == 2  # a full room, then the histogram settles it


def test_ties_at_the_cut_are_counted_from_the_patterns_kept_aside(monkeypatch):
    """Magnitudes from 301 values, a hundred elements each: the cut splits a run of equal
    ones."""
    n, chunk = 30_100, 2048
    base = torch.zeros(n, dtype=torch.float16)
    model = ((torch.arange(n) * 37 % 301 - 150) * 0.01).half()
    for k in (1, n // 3, n // 2 + 11, n - 1):
        monkeypatch.setenv("WEIGHTMIX_KERNELS", "1")
        found, passes = cut_and_passes(base, model, k, chunk)
        assert found == sorted_cut(base, model, k) and passes == 1
        monkeypatch.setenv("WEIGHTMIX_KERNELS", "0")
        assert cut_and_passes(base, model, k, chunk)[0] == found


def test_nan_deltas_count_alike_whatever_their_payloads(monkeypatch):
    """NaN − NaN keeps one operand's payload, and which one differs between the C loop and
    torch: the histograms count every NaN magnitude as the one quiet NaN (a review found the
    tie count at a NaN cut differing, and with it the kept elements)."""
    count = 2048
    base, model = torch.zeros(count), torch.full((count,), 0.5)
    payloads = torch.tensor([0x7FC00002, 0x7FC00001, 0x7FC00002, 0xFFC00005], dtype=torch.int64)
    model.view(torch.int32)[:2] = payloads[:2].to(torch.int32)
    base.view(torch.int32)[:2] = payloads[2:].to(torch.int32)
    model.view(torch.int32)[7] = 0x7F800001  # a signalling NaN against a finite base
    found = {s: streamed_cut(base, model, 1, 1024, monkeypatch, s) for s in ("1", "0")}
    assert found["1"] == found["0"]
    assert found["1"][0] == 0x7FC00000 and found["1"][3] == 3  # the cut: 3 NaNs as one value


def lane_order_dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ x_e·y_e in Python floats (float64) in the documented order: 8 partial sums by e mod 8,
    each in index order, then added in lane order."""
    lanes = [0.0] * 8
    for e, (a, b) in enumerate(zip(x.double().tolist(), y.double().tolist())):
        lanes[e % 8] += a * b
    total = lanes[0]
    for partial in lanes[1:]:
        total += partial
    return total


@pytest.mark.parametrize("vectors", [1, 2, 3, 4])  # up to 3 in one loop (all pairs at once)
@pytest.mark.parametrize("dtypes", [(d, d, d) for d in DTYPES] + [tuple(DTYPES)], ids=str)
def test_the_dot_products_are_summed_in_the_documented_order(dtypes, vectors, monkeypatch):
    """The C loop and the torch code (streaming.lane_dot) both add in the documented order."""
    from weightmix.methods.streaming import Gram

    count = 2053  # two blocks of the C loop and a remainder of 5 (not a multiple of 8)
    kinds = [dtypes[n % len(dtypes)] for n in range(vectors)]
    values = [awkward(count, seed, dtype) for seed, dtype in enumerate(kinds)]
    values = [torch.where(torch.isfinite(v), v, 0) for v in values]
    base = awkward(count, 9, dtypes[0])
    base = torch.where(torch.isfinite(base), base, 0)
    found = kernels.gram(values)
    deltas = [v.float() - base.float() for v in values]
    found_deltas = kernels.gram(values, base)
    pairs = [(i, j) for i in range(vectors) for j in range(i, vectors)]
    assert found == [lane_order_dot(values[i], values[j]) for i, j in pairs]
    assert found_deltas == [lane_order_dot(deltas[i], deltas[j]) for i, j in pairs]
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "0")
    in_torch, deltas_in_torch = Gram(vectors), Gram(vectors)
    in_torch.add(values)
    deltas_in_torch.add_deltas(base, values, torch.float32)
    assert [in_torch.sums[i][j] for i, j in pairs] == found
    assert [deltas_in_torch.sums[i][j] for i, j in pairs] == found_deltas


@pytest.mark.parametrize(
    ("method", "count", "params"),
    [("slerp", 2, {"t": 0.3}), ("model_stock", 3, {}), ("multislerp", 3, {}),
     ("karcher", 3, {})],
)  # fmt: skip
def test_dot_product_merges_give_the_same_bytes_with_and_without_the_loops(
    tmp_path, monkeypatch, method, count, params
):
    dtypes = [torch.float16, torch.bfloat16, torch.float16][:count]
    paths = saved(tmp_path, fine_tunes(8, count), dtypes)
    names = [f"M{i}" for i in range(count)]
    recipe = {
        "models": dict(zip(names, map(str, paths))),
        "merge": {"method": method, "inputs": names, **params},
        "dtype": "fp32",
    }
    outputs, used, _ = merged_both_ways(tmp_path, monkeypatch, recipe)
    assert outputs[0] == outputs[1]
    assert used["gram"] >= 3
    if method in ("slerp", "model_stock"):  # the output through blend's one pass
        assert used["blend"] >= 3 and "cast" not in used


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_cast_rounds_as_torch_and_counts_what_is_not_finite(dtype):
    """Arbitrary float32 bit patterns, values around the float16 limit (65504, 65520: the
    rounding boundary), subnormal edges and halfway cases, cast to each output dtype: the
    values torch gives (NaN payloads aside) and the count of inf and NaN among them."""
    generator = torch.Generator().manual_seed(3)
    patterns = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=generator)
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, -65520.0, 2**-24, 2**-25,
                          2**-25 * 1.0000001, 2**-14, 1e-8, 0.0, -0.0, math.inf, -math.inf,
                          math.nan, 3.3895314e38, 3.4e38, -3.4e38, 1.00390625,
                          1.01171875])  # fmt: skip
    values = torch.cat([patterns.to(torch.int32).view(torch.float32), edges,
                        torch.randn(100_003, generator=generator) * 1000])  # fmt: skip
    out = torch.empty(values.numel(), dtype=dtype)
    found = kernels.cast(values, out)
    expected = values.to(dtype)
    assert same_bits(out.float(), expected.float())
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert found == int((~torch.isfinite(expected)).sum()) > 0
    assert kernels.cast(values.double(), out) is None  # float64 results: torch casts them


@pytest.mark.parametrize("dtypes", [(torch.float16,) * 3, (torch.bfloat16,) * 2,
                                    (torch.float32, torch.float16, torch.bfloat16),
                                    (torch.float32,)], ids=str)  # fmt: skip
@pytest.mark.parametrize("count", [5000, 13])
def test_a_linear_combination_equals_torchs(dtypes, count):
    """torch.mul(x₀, c₀) then .add_(x_k, alpha=c_k), in float32, as methods/arithmetic.py ran
    it before the C loop: the same values (specials included), with and without `out`."""
    values = [awkward(count, seed, dtype) for seed, dtype in enumerate(dtypes)]
    coefficients = [0.3123456789, -1.7345678912, 2.5][: len(values)]
    expected = torch.mul(values[0], torch.full((1,), coefficients[0]))
    for value, coefficient in zip(values[1:], coefficients[1:]):
        expected.add_(value, alpha=coefficient)
    found = kernels.combine(values, coefficients, None)
    assert found is not None and same_bits(found, expected)
    into = torch.empty(count)
    assert kernels.combine(values, coefficients, into) is not None and same_bits(into, expected)
    assert kernels.combine([v.double() for v in values], coefficients, None) is None


MIXED = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtypes", [(torch.float16,) * 3, (torch.bfloat16,) * 3, MIXED], ids=str)
@pytest.mark.parametrize("count", [5000, 13, 2048])
def test_a_blend_is_the_torch_arithmetic_then_the_cast(dtypes, out_dtype, count):
    """kernels.blend against torch on widened inputs: mul then add_(alpha=) (a linear
    combination), or torch.add(a, b − c, alpha=) (add-difference), then .to(out_dtype): the
    same values (NaN payloads aside) and the count of inf and NaN written (values near the
    float16 and bfloat16 limits overflow, and an inf input, so it is above 0)."""
    values = [awkward(count, 10 + seed, dtype) for seed, dtype in enumerate(dtypes)]
    values[0][:3] = torch.tensor([60000.0, -60000.0, 3e38]).to(dtypes[0])
    values[1][:3] = torch.tensor([60000.0, 60000.0, 3e38]).to(dtypes[1])
    values[2][3] = math.inf
    wide = [v.float() for v in values]
    coefficients = [0.7123456789, 1.3345678912, -2.5]
    linear = torch.mul(wide[0], torch.full((1,), coefficients[0]))
    for value, coefficient in zip(wide[1:], coefficients[1:]):
        linear.add_(value, alpha=coefficient)
    difference = torch.add(wide[0], wide[1] - wide[2], alpha=-1.7345678912)
    for expected, found in (
        (linear, lambda out: kernels.blend(values, coefficients, out)),
        (difference, lambda out: kernels.blend(values, [-1.7345678912], out, "difference")),
    ):
        out = torch.empty(count, dtype=out_dtype)
        written = found(out)
        rounded = expected.to(out_dtype)
        assert same_bits(out.float(), rounded.float())
        assert written == int((~torch.isfinite(rounded)).sum()) > 0
    assert kernels.blend([v.double() for v in values], coefficients, out) is None
    assert kernels.blend(values[:2], [1.0], out, "difference") is None


@pytest.mark.parametrize(
    ("method", "params", "count"),
    [("weighted_sum", {"alpha": 0.3}, 2), ("weighted_sum", {"weights": [0.5, -1.5, 2.0]}, 3),
     ("add_difference", {"alpha": 1.7}, 3)],
)  # fmt: skip
@pytest.mark.parametrize("out_dtype", ["fp16", "bf16", "fp32"])
def test_linear_merges_give_the_same_bytes_with_and_without_the_blend_loop(
    tmp_path, monkeypatch, method, params, count, out_dtype
):
    """Arithmetic and rounding in one C pass (kernels.blend, the methods' `rounded` forms)
    against the torch path (WEIGHTMIX_KERNELS=0: widened copies, torch's arithmetic and cast),
    fp16/bf16/fp16 inputs, a key over a chunk long."""
    dtypes = [torch.float16, torch.bfloat16, torch.float16][:count]
    paths = saved(tmp_path, fine_tunes(9, count), dtypes)
    names = [f"M{i}" for i in range(count)]
    recipe = {
        "models": dict(zip(names, map(str, paths))),
        "merge": {"method": method, "inputs": names, **params},
        "dtype": out_dtype,
    }
    outputs, used, _ = merged_both_ways(tmp_path, monkeypatch, recipe)
    assert outputs[0] == outputs[1]
    assert used["blend"] >= 6  # every chunk of the three keys


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize(
    ("method", "params", "count"),
    [("weighted_sum", {"alpha": 0.3}, 2), ("add_difference", {"alpha": 1.7}, 3),
     ("ties", {"density": 0.5}, 3)],
)  # fmt: skip
def test_float8_merges_give_the_same_bytes_with_and_without_the_loops(
    tmp_path, monkeypatch, dtype, method, params, count
):
    """float8 inputs widened and the output rounded into float8 by the C loops (in one pass
    with the arithmetic for the linear methods: kernels.blend) against torch's copies,
    arithmetic and cast (WEIGHTMIX_KERNELS=0)."""
    torch_dtype = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[dtype]
    paths = saved(tmp_path, fine_tunes(11, count), [torch_dtype] * count)
    names = [f"M{i}" for i in range(count)]
    recipe = {
        "models": dict(zip(names, map(str, paths))),
        "merge": {"method": method, "inputs": names, **params},
    }
    outputs, used, _ = merged_both_ways(tmp_path, monkeypatch, recipe)
    assert outputs[0] == outputs[1]
    assert load(tmp_path / "out-1.safetensors")["big"].dtype == torch_dtype
    if method == "ties":
        assert used["widen"] >= 6 * count and used["cast"] >= 6
    else:  # every chunk of the three keys
        assert used["blend"] >= 6 and "widen" not in used and "cast" not in used


def test_float8_chunks_the_blend_loop_leaves_take_the_plain_path(tmp_path, monkeypatch):
    """alpha 0 (A itself, which blend leaves to the plain path) writes A's float8 bytes; an
    add-difference that overflows float8 e5m2 is refused with the message of the torch path,
    which the blend loop's count of inf values sends it to."""
    paths = saved(tmp_path, fine_tunes(12, 3), [torch.float8_e5m2] * 3)
    names = ["M0", "M1", "M2"]
    models = dict(zip(names, map(str, paths)))
    two = {name: models[name] for name in names[:2]}
    copy = {"models": two, "merge": {"method": "weighted_sum", "inputs": names[:2],
                                     "alpha": 0.0}}  # fmt: skip
    weightmix.merge(copy, tmp_path / "copy.safetensors", threads=2)
    merged, first = load(tmp_path / "copy.safetensors"), load(paths[0])
    assert all(torch.equal(merged[k].view(torch.uint8), first[k].view(torch.uint8)) for k in first)
    huge = {"models": models, "merge": {"method": "add_difference", "inputs": names,
                                        "alpha": 1e6}}  # fmt: skip
    messages = refusals_both_ways(tmp_path, monkeypatch, huge)
    assert messages[0] == messages[1] and "overflowed to ±inf" in messages[0]
    assert not list(tmp_path.glob("out-*"))


def test_where_torch_runs_its_scalar_loops_the_fused_loops_step_aside(tmp_path):
    """With ATEN_CPU_CAPABILITY=default torch adds `alpha·x` with two roundings, not one
    fused multiply-add: combine and blend are then not taken, and a weighted sum and an
    add-difference give torch's bytes with the extension as without it."""
    paths = saved(tmp_path, fine_tunes(13, 3), [torch.float16] * 3)
    script = f"""
import os, torch, weightmix
from weightmix import kernels
assert not kernels.torch_fuses()
models = {{f"M{{i}}": p for i, p in enumerate({[str(p) for p in paths]!r})}}
for merge in ({{"method": "add_difference", "inputs": ["M0", "M1", "M2"], "alpha": 1.7}},
              {{"method": "weighted_sum", "inputs": ["M0", "M1", "M2"],
                "weights": [0.3, -1.1, 2.0]}}):
    outputs = []
    for setting in ("1", "0"):
        os.environ["WEIGHTMIX_KERNELS"] = setting
        out = {str(tmp_path)!r} + f"/out-{{setting}}.safetensors"
        weightmix.merge({{"models": models, "merge": merge, "dtype": "fp32"}}, out,
                        overwrite=True)
        outputs.append(open(out, "rb").read())
    assert outputs[0] == outputs[1], merge["method"]
print("same")
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]


def test_a_carried_inf_does_not_move_the_ties_cut_on(tmp_path, monkeypatch):
    """An inf in the base is carried into the output: the one-pass loop counts it, the screen
    finds it carried (not gained) and the merge goes on. The cut of TIES falls inside a run of
    equal magnitudes split over two chunks (1,000 at the cut in the first, more in the
    second): the second chunk must still keep the rest, as the torch path does."""
    count = CHUNK_ELEMENTS + 4096
    delta = torch.full((count,), 0.001)
    delta[torch.arange(1000) * 200] = 1.0  # at the cut, in the first chunk
    delta[CHUNK_ELEMENTS:] = 1.0  # more at the cut in the second
    delta[CHUNK_ELEMENTS + 100 : CHUNK_ELEMENTS + 2100] = 2.0  # above it
    base = torch.zeros(count)
    base[7] = math.inf
    paths = [save(tmp_path / "base.safetensors", {"w": base.half()}),
             save(tmp_path / "tuned.safetensors", {"w": (base + delta).half()})]  # fmt: skip
    recipe = {
        "models": {"base": str(paths[0]), "tuned": str(paths[1])},
        "merge": {"method": "ties", "inputs": ["base", "tuned"],
                  "density": 3501.5 / count},  # 2,001 above the cut (the inf too), 1,500 at it
    }  # fmt: skip
    merged_both_ways(tmp_path, monkeypatch, recipe, threads=1)
    outputs = [load(tmp_path / f"out-{setting}.safetensors")["w"] for setting in ("1", "0")]
    assert torch.equal(outputs[0].view(torch.int16), outputs[1].view(torch.int16))
    kept = (outputs[1].float() - base.half().float()).abs() == 1.0
    assert int(kept[:CHUNK_ELEMENTS].sum()) == 1000 and int(kept.sum()) == 1500


def test_a_ties_overflow_is_reported_from_the_cuts_its_chunk_used(tmp_path, monkeypatch):
    """λ = 100 pushes the kept deltas (1000) past float16's 65504. The chunk that overflows
    kept every element still to keep at the cut, which leaves the cut's remainder at 0: the
    report recomputes the chunk from the cuts it used (not from the remainder of 0, which
    would keep nothing), so it names the same largest value as the torch path."""
    count = CHUNK_ELEMENTS + 5000
    tuned = torch.zeros(count)
    tuned[torch.arange(100) * 7] = 1000.0
    tuned[CHUNK_ELEMENTS : CHUNK_ELEMENTS + 300] = 1000.0
    paths = [save(tmp_path / "base.safetensors", {"w": torch.zeros(count).half()}),
             save(tmp_path / "tuned.safetensors", {"w": tuned.half()})]  # fmt: skip
    recipe = {
        "models": {"base": str(paths[0]), "tuned": str(paths[1])},
        "merge": {"method": "ties", "inputs": ["base", "tuned"], "density": 100.5 / count,
                  "lambda": 100},  # 100 of the 400 at the cut: all of the first chunk's
        "dtype": "fp16",
    }  # fmt: skip
    messages = refusals_both_ways(tmp_path, monkeypatch, recipe)
    assert messages[0] == messages[1] and "largest |value| 100000 > 65504" in messages[0]


def test_the_uniform_numbers_are_numpys_pcg64dxsm_draws(monkeypatch):
    """rounding.uniform() fills each 65,536-number block from numpy's PCG64DXSM: the C loop
    gives the numbers numpy's own generator gives, at any start and count (block edges,
    odd starts that begin on a high half, empty)."""
    from weightmix.rounding import uniform

    cases = [(0, 1), (1, 1), (3, 70_000), (65_535, 3), (65_536 * 3 + 7, 200_001), (5, 0)]
    for start, count in cases:
        monkeypatch.setenv("WEIGHTMIX_KERNELS", "1")
        found = uniform(-123_456_789, start, count)
        monkeypatch.setenv("WEIGHTMIX_KERNELS", "0")
        assert torch.equal(found, uniform(-123_456_789, start, count)), (start, count)
    import numpy as np

    generator = np.random.PCG64DXSM(np.random.SeedSequence([7, 0]))
    halves = generator.random_raw(4).view(np.uint32)  # an independent reading of the rule
    expected = torch.tensor([(int(h) >> 8) / 2**24 for h in halves], dtype=torch.float32)
    monkeypatch.setenv("WEIGHTMIX_KERNELS", "1")
    assert torch.equal(uniform(7, 0, 8), expected)


def test_the_seeding_is_numpys_seedsequence_and_pcg64dxsm():
    """The C seeding (SeedSequence's hash and mix, generate_state, PCG64's set_seed) gives
    the state numpy's own generator holds, for streams of one and two 32-bit words and blocks
    from 0 up."""
    import random

    import numpy as np

    draw = random.Random(4)
    mask = (1 << 64) - 1
    for trial in range(500):
        stream = draw.getrandbits(64) if trial % 3 else draw.getrandbits(20)
        block = 0 if trial % 5 == 0 else draw.getrandbits(20)
        held = np.random.PCG64DXSM(np.random.SeedSequence([stream, block])).state["state"]
        words = [w for n in (stream, block)
                 for w in ([n & mask & 0xFFFFFFFF] + ([n >> 32] if n >> 32 else []))]  # fmt: skip
        expected = (held["state"] >> 64, held["state"] & mask, held["inc"] >> 64,
                    held["inc"] & mask)  # fmt: skip
        assert kernels._kernels.pcg_state(words) == expected, (stream, block)


def test_the_extension_is_built_where_a_compiler_is():
    """setup.py builds weightmix/_kernels.c as optional: a compile error would leave every
    test here skipped and every merge in torch, silently. Where a C compiler and Python's
    headers are, it must have been built (the other tests then run)."""
    assert kernels._kernels is not None, "weightmix/_kernels.c did not build: see pip's log"
