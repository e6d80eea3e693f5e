"""The seed methods (LosslessMix, MaxDiff, the spectral "quantum" blend) against the worked
examples of issue 8, hand-written formulas, and their example recipes."""

from __future__ import annotations

import math
import re

import pytest
import torch
from archs import run_example, shapes_of, tiny_state
from helpers import assert_refused, load, save
from test_block_weights import EXAMPLES

import weightmix
from weightmix.methods import METHODS
from weightmix.rounding import Draw


def merge3(tmp_path, method, a, b, c, **params):
    paths = [save(tmp_path / f"{n}.safetensors", {"w": t}) for n, t in zip("abc", (a, b, c))]
    recipe = {
        "models": {n: str(p) for n, p in zip("abc", paths)},
        "merge": {"method": method, "inputs": ["a", "b", "c"], **params},
    }
    weightmix.merge(recipe, tmp_path / "out.safetensors", overwrite=True)
    return load(tmp_path / "out.safetensors")["w"]


A, B, C = ([0.2, -0.02], [0.25, -0.06], [0.3, -0.03])


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("lossless", {}, [0.25, -0.03]),
        ("maxdiff", {}, [0.3, -0.06]),
        ("lossless", {"alpha": 1.4}, [0.3, -0.03]),
    ],
)
def test_lossless_and_maxdiff_worked_examples(tmp_path, method, params, expected):
    got = merge3(tmp_path, method, *(torch.tensor(v) for v in (A, B, C)), **params)
    assert got.tolist() == torch.tensor(expected).tolist()  # b's or c's values, unscaled


def test_lossless_ties_go_to_b_and_maxdiff_ties_to_c(tmp_path):
    a, b, c = torch.zeros(3), torch.tensor([1.0, 2.0, -3.0]), torch.tensor([-1.0, -2.0, 3.0])
    assert torch.equal(merge3(tmp_path, "lossless", a, b, c), b)
    assert torch.equal(merge3(tmp_path, "maxdiff", a, b, c), c)


def test_lossless_picks_the_nearer_element_in_every_dtype(tmp_path):
    generator = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(1000, generator=generator) for _ in range(3))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x, y, z = (t.to(dtype) for t in (a, b, c))
        got = merge3(tmp_path, "lossless", x, y, z, alpha=0.9, beta=1.1)
        d_b = (x.double() - 0.9 * y.double()).abs()
        d_c = (x.double() - 1.1 * z.double()).abs()
        picks_c = d_b > d_c
        far = (d_b - d_c).abs() > 1e-2  # away from ties, where fp32 arithmetic may differ
        assert torch.equal(got[far & picks_c], z[far & picks_c])
        assert torch.equal(got[far & ~picks_c], y[far & ~picks_c])


def spectral(a, b, draw=None, statistic=True, **params):
    full = {
        "entanglement": 0.7714,
        "decoherence": 0.0,
        "coefficients": 0.0,
        "variant": "gumgum",
        "chunk_size": 1,
    } | params
    return METHODS["spectral"](a, b, draw=draw or Draw(1), statistic=statistic, **full)


def test_spectral_worked_examples():
    a, zero, b = torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(1, 4), torch.tensor([[4.0, 3, 2, 1]])
    close = {"rtol": 0, "atol": 2e-6}
    torch.testing.assert_close(
        spectral(a, zero)[0], torch.tensor([0.5, 1.178239, 1.5, 1.821761]), **close
    )
    torch.testing.assert_close(
        spectral(a, b)[0], torch.tensor([2.5, 2.856477, 2.5, 2.143523]), **close
    )
    got = spectral(a, b, variant="class", coefficients=0.3)[0]
    torch.testing.assert_close(got, torch.tensor([2.96284, 2.65428, 2.34572, 2.03716]), **close)
    # a draw whose mask (uniform < decoherence) is [F, T, F, F]: that element keeps the average
    wanted = [[False, True, False, False]]
    stream = next(s for s in range(10_000) if (Draw(s).uniform((1, 4), 0) < 0.5).tolist() == wanted)
    got = spectral(a, b, draw=Draw(stream), decoherence=0.5)[0]
    torch.testing.assert_close(got, torch.tensor([2.5, 2.5, 2.5, 2.143523]), **close)


def test_spectral_matches_a_dense_dft_and_routes_by_name(tmp_path):
    """Against a DFT written as a matrix product; 'weight' keys of 2+ dims are filtered, the
    rest (biases, a 2-D tensor without 'weight' in its name) averaged; seeded, reproducible."""
    generator = torch.Generator().manual_seed(4)
    shapes = {
        "net.weight": (6, 5, 7),
        "net.bias": (7,),
        "pos_embedding": (5, 7),
        "z.weight": (4, 0),
    }
    states = [{k: torch.randn(s, generator=generator) for k, s in shapes.items()} for _ in range(2)]
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in zip("AB", states)]
    merge = {"method": "spectral", "inputs": ["A", "B"], "entanglement": 0.6}
    merge |= {"decoherence": 0.3, "coefficients": [0.5, -1.0, 2.0], "chunk_size": 4}
    recipe = {"models": {"A": str(paths[0]), "B": str(paths[1])}, "seed": 9, "merge": merge}
    outs = []
    for name in ("one", "two"):
        weightmix.merge(recipe, tmp_path / f"{name}.safetensors")
        outs.append(load(tmp_path / f"{name}.safetensors"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in shapes)
    recipe["seed"] = 10
    weightmix.merge(recipe, tmp_path / "other.safetensors")
    assert not torch.equal(
        load(tmp_path / "other.safetensors")["net.weight"], outs[0]["net.weight"]
    )
    a, b = (s["net.weight"].double() for s in states)
    n = 7
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    resampled = torch.tensor([0.5, -0.5, 0.0, 2.0], dtype=torch.float64)  # 3 → 4 bins, linear
    real_k, imag_k = torch.sigmoid(5 * resampled) - 0.5, torch.sigmoid(3 * resampled - 1) - 0.5
    t = torch.arange(n, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(t, k) / n
    d = a - b
    re, im = d @ torch.cos(angle), -(d @ torch.sin(angle))  # rfft by hand
    re, im = re * real_k, im * imag_k
    weights = torch.where((k == 0) | (k == n / 2), 1.0, 2.0)  # inverse: conjugate pairs twice
    back = ((re * weights) @ torch.cos(angle).T - (im * weights) @ torch.sin(angle).T) / n
    from weightmix.rounding import key_stream

    draw = Draw(key_stream(9, "net.weight")).salted("merge")
    keep = draw.uniform(a.shape, 0) >= 0.3
    expected = (a + b) / 2 + 0.6 * back * keep
    torch.testing.assert_close(outs[0]["net.weight"].double(), expected, rtol=0, atol=1e-5)
    for key in ("net.bias", "pos_embedding", "z.weight"):
        assert torch.equal(outs[0][key], (states[0][key] + states[1][key]) / 2), key


@pytest.mark.parametrize(
    ("method", "params", "count", "says"),
    [
        ("lossless", {}, 2, "lossless takes 3 inputs, 2 given"),
        ("maxdiff", {}, 4, "maxdiff takes 3 inputs, 4 given"),
        ("spectral", {"decoherence": 1.5}, 2, "decoherence=1.5"),
        ("spectral", {"entanglement": -0.1}, 2, "entanglement=-0.1"),
        ("spectral", {"variant": "quantum"}, 2, "variant"),
    ],
)
def test_bad_seed_method_input_is_one_line(run, tmp_path, method, params, count, says):
    paths = [save(tmp_path / f"m{i}.safetensors", {"w": torch.randn(2, 3)}) for i in range(count)]
    assert_refused(run, paths, method, params, says, tmp_path / "out.safetensors")


@pytest.mark.parametrize(
    "example", ["losslessmix.yaml", "quantum-spectral.yaml", "prompt-concept.yaml"]
)
def test_the_seed_examples_run(run, tmp_path, example):
    # dimensions / 16: the text encoder keeps 5 positions, room for the example's prompt
    divisor = 16 if example == "prompt-concept.yaml" else 64
    states, merged = run_example(run, tmp_path, EXAMPLES / example, divisor=divisor)
    recorded = run("inspect", tmp_path / "out.safetensors", "--recipe")
    (tmp_path / "recorded.yaml").write_text(recorded.out)
    assert run("merge", tmp_path / "recorded.yaml", "-o", tmp_path / "again.safetensors").code == 0
    again = load(tmp_path / "again.safetensors")  # the recorded recipe re-runs to the same bytes
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    vae = [k for k in merged if k.startswith("first_stage_model.")]
    unet = [
        k
        for k in merged
        if k.startswith("model.diffusion_model.") and k.endswith("weight") and merged[k].dim() > 1
    ]
    assert vae and unet
    names = list(states)
    if example == "losslessmix.yaml":
        assert all(torch.equal(merged[k], states["a"][k]) for k in vae)
        b, c = states["b"], states["c"]
        assert all(bool(((merged[k] == b[k]) | (merged[k] == c[k])).all()) for k in unet)
    elif example == "prompt-concept.yaml":
        a, b = (states[n] for n in names)
        kv = [k for k in merged if re.search(r"attn2\.to_[kv]\.weight$", k)]
        assert len(kv) == 32  # keys and values of SD1.5's 16 transformer blocks
        for key in merged:
            if key in kv:
                assert not torch.equal(merged[key], a[key]) and not torch.equal(merged[key], b[key])
            else:
                assert torch.equal(merged[key], a[key].to(merged[key].dtype)), key
    else:
        first, second = (states[n] for n in names)
        wide = [k for k in unet if merged[k].shape[-1] > 2]  # 1-wide rows: only a DC term
        mean = {k: ((first[k].float() + second[k].float()) / 2).to(merged[k].dtype) for k in wide}
        assert wide and not any(torch.equal(merged[k], mean[k]) for k in wide)


@pytest.mark.parametrize("method", ["lossless", "maxdiff"])
def test_dry_run_reports_each_models_share_per_component(run, tmp_path, method):
    shapes = {k: v for k, v in shapes_of("sd1").items() if not k.startswith("model_ema.")}
    states = [tiny_state(shapes, seed) for seed in range(3)]
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in zip("abc", states)]
    args = ["merge", *paths, "-m", method, "-p", "alpha=0.8", "--dry-run"]
    result = run(*args, "-o", tmp_path / "out.safetensors")
    assert result.code == 0 and not (tmp_path / "out.safetensors").exists()
    prefixes = {"diffuser": "model.diffusion_model.", "vae": "first_stage_model.",
                "clip_l": "cond_stage_model."}  # fmt: skip
    for part, prefix in prefixes.items():
        from_b = total = 0
        for key in shapes:
            a, b, c = (s[key] for s in states)
            if not key.startswith(prefix) or not a.is_floating_point():
                continue
            d_b, d_c = ((a.float() - 0.8 * b.float()).abs(), (a.float() - c.float()).abs())
            farther_b = int((d_b > d_c).sum())
            from_b += farther_b if method == "maxdiff" else a.numel() - farther_b
            total += a.numel()
        share_b = f"B {100 * from_b / total:.1f}%, C {100 * (total - from_b) / total:.1f}%"
        assert f"{part}: {share_b} of {total} elements" in result.out, result.out
