"""The research methods (TIES, DARE, DELLA, breadcrumbs, the SLERP family, model stock,
geometric median, train difference) end to end, against dense torch formulas written here
(sorts and loops: slow and plain), and their laws."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_refused, load, random_state, save

import weightmix

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {"w": (24, 16), "b": (24,), "conv": (8, 4, 3, 3)}


def models(tmp_path, count: int, dtype=torch.float32, seed: int = 0, scale: float = 0.1):
    """A base and count-1 fine-tunes (base + small random deltas), saved."""
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()}
    states = [base] + [
        {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        for _ in range(count - 1)
    ]
    states = [{k: v.to(dtype) for k, v in s.items()} for s in states]
    paths = [save(tmp_path / f"m{i}.safetensors", s) for i, s in enumerate(states)]
    return states, paths


def run_merge(tmp_path, paths, method, **params):
    names = [f"M{i}" for i in range(len(paths))]
    recipe = {
        "models": dict(zip(names, map(str, paths))),
        "merge": {"method": method, "inputs": names, **params},
        "compute_dtype": "fp64" if params.pop("_fp64", False) else "fp32",
    }
    out = tmp_path / f"{method}.safetensors"
    weightmix.merge(recipe, out, overwrite=True)
    return load(out)


def dense_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ (≥1) largest |δ|: a stable sort by descending magnitude, so equal
    magnitudes keep the lower index first."""
    flat = delta.reshape(-1)
    k = max(1, math.floor(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return (flat * mask).reshape(delta.shape)


def dense_ties(base, others, density, lam=1.0, weights=None):
    weights = weights or [1.0] * len(others)
    trimmed = [w * dense_trim(m - base, density) for m, w in zip(others, weights)]
    total = sum(trimmed)
    sign = torch.sign(total)
    agree = [(torch.sign(t) == sign) & (sign != 0) for t in trimmed]
    numerator = sum(torch.where(a, t, 0) for a, t in zip(agree, trimmed))
    divisor = sum(a.double() * w for a, w in zip(agree, weights))
    divisor = torch.where(divisor == 0, 1.0, divisor)
    return base + lam * numerator / divisor


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0]])
def test_ties_matches_the_dense_formula(tmp_path, dtype, weights):
    states, paths = models(tmp_path, 4, dtype)
    params = {"density": 0.3, "lambda": 0.8} | ({"weights": weights} if weights else {})
    merged = run_merge(tmp_path, paths, "ties", **params)
    for key in SHAPES:
        base, *others = (s[key].double() for s in states)
        expected = dense_ties(base, others, 0.3, 0.8, weights).to(dtype)
        torch.testing.assert_close(merged[key], expected, msg=key)


def test_ties_elects_no_sign_where_the_trimmed_deltas_cancel(tmp_path):
    base = {"w": torch.zeros(4)}
    one = {"w": torch.tensor([1.0, 2.0, -3.0, 0.5])}
    two = {"w": torch.tensor([-1.0, 1.0, 3.0, 0.5])}  # element 0 and 2 sum to exactly 0
    paths = [
        save(tmp_path / f"{n}.safetensors", s) for n, s in (("b", base), ("x", one), ("y", two))
    ]
    merged = run_merge(tmp_path, paths, "ties", density=1.0)
    assert merged["w"].tolist() == [0.0, 1.5, 0.0, 0.5]  # sgn(0) = 0: the base stays


def test_ties_breaks_magnitude_ties_at_the_cut_by_lower_index(tmp_path):
    base = {"w": torch.zeros(6)}
    one = {"w": torch.tensor([1.0, 2.0, 2.0, 2.0, -2.0, 0.5])}
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in (("b", base), ("x", one))]
    merged = run_merge(tmp_path, paths, "ties", density=0.5)  # keeps 3 of the four 2s
    assert merged["w"].tolist() == [0.0, 2.0, 2.0, 2.0, 0.0, 0.0]


def test_ties_with_density_one_and_one_model_is_add_difference(tmp_path):
    states, paths = models(tmp_path, 2)
    merged = run_merge(tmp_path, paths, "ties", density=1.0, **{"lambda": 0.7})
    for key in SHAPES:
        base, tuned = states[0][key], states[1][key]
        torch.testing.assert_close(merged[key], base + 0.7 * (tuned - base), msg=key)


def dense_dare(base, others, density, uniforms, ties: bool, lam: float = 1.0):
    kept = [torch.where(u < density, (m - base) / density, 0) for m, u in zip(others, uniforms)]
    if not ties:
        return base + lam * sum(kept)
    total = sum(kept)
    sign = torch.sign(total)
    agree = [(torch.sign(t) == sign) & (sign != 0) for t in kept]
    return base + lam * sum(torch.where(a, t, 0) for a, t in zip(agree, kept))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_and_rescales_with_the_seeds_numbers(tmp_path, method):
    from weightmix.rounding import Draw, key_stream

    states, paths = models(tmp_path, 3)
    merged = run_merge(tmp_path, paths, method, density=0.4)
    for key in SHAPES:
        base, *others = (s[key] for s in states)
        draw = Draw(key_stream(0, key)).salted("merge")
        uniforms = [draw.uniform(base.shape, i) for i in range(len(others))]
        expected = dense_dare(base, others, 0.4, uniforms, method == "dare_ties")
        torch.testing.assert_close(merged[key], expected, msg=key)


def test_dare_keeps_about_density_and_is_reproducible(tmp_path, monkeypatch):
    from weightmix import engine

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(200_000)}
    tuned = {"w": torch.randn(200_000, generator=generator)}
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in (("b", base), ("x", tuned))]
    recipe = {
        "models": {"B": str(paths[0]), "X": str(paths[1])},
        "merge": {"method": "dare_linear", "inputs": ["B", "X"], "density": 0.3},
        "title": "t",
    }

    def merged(name, **extra):
        out = tmp_path / name / "out.safetensors"
        out.parent.mkdir()
        weightmix.merge(recipe | extra, out, threads=extra.pop("threads", None))
        return out

    first = merged("a")
    values = load(first)["w"]
    kept = values != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.01
    torch.testing.assert_close(values[kept], tuned["w"][kept] / 0.3)  # the exact rescale
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(engine, "TASK_ELEMENTS", 7000)
    other = merged("b")
    assert first.read_bytes() == other.read_bytes()  # chunks and tasks change nothing
    assert not torch.equal(load(merged("c", seed=5))["w"], values)  # the seed does


def dense_slerp(a, b, t):
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a.double() + t * b.double()
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a.double() + math.sin(t * omega) * b.double()) / math.sin(
        omega
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slerp_matches_the_formula_and_keeps_its_endpoints(tmp_path, dtype):
    states, paths = models(tmp_path, 2, dtype, scale=1.0)
    merged = run_merge(tmp_path, paths, "slerp", t=0.3)
    for key in SHAPES:
        expected = dense_slerp(states[0][key], states[1][key], 0.3).to(dtype)
        torch.testing.assert_close(merged[key], expected, msg=key)
    for t, index in ((0.0, 0), (1.0, 1)):
        ends = run_merge(tmp_path, paths, "slerp", t=t)
        for key in SHAPES:
            assert torch.equal(ends[key], states[index][key]), (t, key)


def test_slerp_of_colinear_tensors_is_lerp(tmp_path):
    a = {"w": torch.linspace(-1, 1, 50)}
    b = {"w": torch.linspace(-1, 1, 50) * 3}
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in (("a", a), ("b", b))]
    merged = run_merge(tmp_path, paths, "slerp", t=0.25)
    torch.testing.assert_close(merged["w"], 0.75 * a["w"] + 0.25 * b["w"])


def test_multislerp_karcher_and_nuslerp_of_two_agree_with_slerp_directions(tmp_path):
    states, paths = models(tmp_path, 2, scale=1.0)
    slerped = run_merge(tmp_path, paths, "slerp", t=0.5)
    nus = run_merge(tmp_path, paths, "nuslerp", weights=[1, 1])
    for key in SHAPES:
        torch.testing.assert_close(nus[key], slerped[key])
    for method in ("multislerp", "karcher"):
        merged = run_merge(tmp_path, paths, method)
        for key in SHAPES:
            a, b = (s[key].double().reshape(-1) for s in states)
            mid = a / a.norm() + b / b.norm()  # the spherical midpoint's direction
            got = merged[key].double().reshape(-1)
            cos = float(got @ mid / (got.norm() * mid.norm()))
            assert cos == pytest.approx(1.0, abs=1e-6), (method, key)
            assert float(got.norm()) == pytest.approx(float((a.norm() + b.norm()) / 2), rel=1e-5)


def dense_model_stock(base, others):
    deltas = [(m - base).double().reshape(-1) for m in others]
    n = len(deltas)
    cosines = [
        float(deltas[i] @ deltas[j] / (deltas[i].norm() * deltas[j].norm()))
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(m.double() for m in others) / n
    return t * mean + (1 - t) * base.double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_stock_matches_the_formula(tmp_path, dtype):
    states, paths = models(tmp_path, 4, dtype)
    merged = run_merge(tmp_path, paths, "model_stock")
    for key in SHAPES:
        base, *others = (s[key] for s in states)
        torch.testing.assert_close(merged[key], dense_model_stock(base, others).to(dtype), msg=key)


def test_model_stock_of_identical_fine_tunes_is_that_fine_tune(tmp_path):
    states, _ = models(tmp_path, 2)
    paths = [save(tmp_path / f"s{i}.safetensors", states[min(i, 1)]) for i in range(3)]
    merged = run_merge(tmp_path, paths, "model_stock")
    for key in SHAPES:
        torch.testing.assert_close(merged[key], states[1][key], rtol=1e-6, atol=1e-6)


def dense_geometric_median(points, iterations=100, eps=1e-6):
    median = sum(p.double() for p in points) / len(points)
    for _ in range(iterations):
        betas = [1 / max(float((p.double() - median).norm()), eps) for p in points]
        median = sum(b * p.double() for b, p in zip(betas, points)) / sum(betas)
    return median


def test_geometric_median_matches_weiszfeld_and_keeps_identical_models(tmp_path):
    states, paths = models(tmp_path, 4, scale=1.0)
    merged = run_merge(tmp_path, paths, "geometric_median", iterations=200)
    for key in SHAPES:
        expected = dense_geometric_median([s[key] for s in states], 200).float()
        torch.testing.assert_close(merged[key], expected, rtol=1e-4, atol=1e-5)
    same = [save(tmp_path / f"same{i}.safetensors", states[0]) for i in range(3)]
    merged = run_merge(tmp_path, same, "geometric_median")
    for key in SHAPES:
        assert torch.equal(merged[key], states[0][key]), key


def test_train_difference_is_supermergers_formula(tmp_path):
    states, paths = models(tmp_path, 3, scale=1.0)
    merged = run_merge(tmp_path, paths, "train_difference", alpha=0.6)
    for key in SHAPES:
        a, b, c = (s[key].double() for s in states)
        share = torch.where(
            (b - c).abs() + (b - a).abs() != 0, (b - a).abs() / ((b - c).abs() + (b - a).abs()), 0
        )
        expected = a + (b - c) * share * 1.8 * 0.6
        torch.testing.assert_close(merged[key], expected.float(), msg=key)


def test_breadcrumbs_keeps_the_middle_band_and_della_its_probabilities(tmp_path):
    base = {"w": torch.zeros(100)}
    one = {"w": torch.arange(1, 101, dtype=torch.float32)}  # magnitudes 1..100
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in (("b", base), ("x", one))]
    merged = run_merge(tmp_path, paths, "breadcrumbs", density=0.5, gamma=0.1)
    kept = (merged["w"] != 0).nonzero().reshape(-1).tolist()
    assert kept == list(range(40, 90))  # the 10 largest dropped, then the 40 smallest
    merged = run_merge(tmp_path, paths, "della", density=0.5, epsilon=0.2)
    values = merged["w"]
    kept = values != 0
    # kept element i (rank i among 100) was rescaled by 1/p, p = 0.3 + 0.4·i/99
    probability = 0.3 + 0.4 * torch.arange(100) / 99
    torch.testing.assert_close(values[kept], one["w"][kept] / probability[kept])


@pytest.mark.parametrize(
    ("method", "params", "count", "says"),
    [
        ("ties", {"density": 0}, 3, "density=0"),
        ("ties", {"density": 1.5}, 3, "density=1.5"),
        ("ties", {}, 3, "ties needs parameter 'density'"),
        (
            "ties",
            {"density": 0.5, "weights": [1]},
            3,
            "1 weights given for 2 models after the base",
        ),
        ("model_stock", {}, 2, "model_stock takes 3 or more inputs, 2 given"),
        ("slerp", {}, 3, "use multislerp for N models"),
        ("karcher", {"max_iter": 0}, 2, "max_iter=0"),
        ("multislerp", {"weights": [1, 2, 3]}, 2, "3 weights given for 2 models"),
        ("della", {"density": 0.1, "epsilon": 0.2}, 3, "must stay within (0, 1]"),
        ("ties", {"density": 0.5, "weights": "1,2"}, 3, "write a list in brackets: weights=[1,2]"),
        ("nuslerp", {"weights": [-1, 3]}, 2, "t = w_B/(w_A + w_B) = 1.5, outside 0..1"),
    ],
)
def test_bad_method_parameters_are_one_line(run, tmp_path, method, params, count, says):
    _, paths = models(tmp_path, count)
    assert_refused(run, paths, method, params, says, tmp_path / "out.safetensors")


def test_smooth_add_difference_filters_as_scipy_does(tmp_path, monkeypatch):
    from scipy import ndimage

    states, paths = models(tmp_path, 3, scale=1.0)
    merged = run_merge(tmp_path, paths, "smooth_add_difference", alpha=0.5)
    for key in SHAPES:
        a, b, c = (s[key] for s in states)
        smoothed = ndimage.gaussian_filter(ndimage.median_filter((b - c).numpy(), size=3), sigma=1)
        torch.testing.assert_close(merged[key], a + 0.5 * torch.from_numpy(smoothed), msg=key)
    from weightmix.methods import difference

    monkeypatch.setattr(difference, "_ndimage", lambda: None)
    with pytest.raises(weightmix.WeightmixError, match=r"pip install 'weightmix\[methods\]'"):
        run_merge(tmp_path, paths, "smooth_add_difference")


def test_density_and_t_vary_by_block(tmp_path):
    from archs import UNET, hand_sd_block, shapes_of, tiny_state

    shapes = {k: v for k, v in shapes_of("sd1").items() if k.startswith(UNET + "input_blocks.1")}
    shapes |= {k: v for k, v in shapes_of("sd1").items() if k.startswith(UNET + "out.")}
    base, tuned = tiny_state(shapes, 1), tiny_state(shapes, 2)
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in (("b", base), ("t", tuned))]
    merged = run_merge(tmp_path, paths, "ties", density="IN01=0.25,default=1")
    for key, tensor in merged.items():
        changed = int((tensor != base[key]).sum())
        if hand_sd_block(key, "OUT11") == "IN01":
            assert changed == max(1, math.floor(0.25 * tensor.numel())), key
        else:
            torch.testing.assert_close(tensor, tuned[key], msg=key)
    merged = run_merge(tmp_path, paths, "slerp", t="IN01=0,default=1")
    for key, tensor in merged.items():
        source = base if hand_sd_block(key, "OUT11") == "IN01" else tuned
        assert torch.equal(tensor, source[key]), key


def test_method_checks_run_on_each_blocks_numbers(run, tmp_path):
    from archs import UNET, shapes_of, tiny_state

    shapes = {k: v for k, v in shapes_of("sd1").items() if k.startswith(UNET + "input_blocks.1")}
    paths = [save(tmp_path / f"{i}.safetensors", tiny_state(shapes, i)) for i in range(3)]
    args = ("merge", *paths, "-m", "della", "-p", "density=IN=0.1,default=0.5", "--dry-run")
    result = run(*args)
    assert result.code == 2 and "block IN01: della: density 0.1 ± epsilon 0.15" in result.err


@pytest.mark.parametrize(
    ("method", "weights"),
    [("karcher", "[1,-1,0]"), ("multislerp", "[0,0,0]"), ("geometric_median", "[1,-1,1]")],
)
def test_weights_that_cannot_weigh_are_refused(run, tmp_path, method, weights):
    _, paths = models(tmp_path, 3)
    out = tmp_path / "out.safetensors"
    result = run("merge", *paths, "-m", method, "-p", f"weights={weights}", "-o", out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert not out.exists()


def _reference_range(values):
    """supermerger's rule, step by step: drop NaN, below the 1st percentile, then above the
    99th percentile of what is left (numpy's 'midpoint' percentiles)."""
    import numpy as np

    sims = np.array(values, dtype=np.float64)
    sims = sims[~np.isnan(sims)]
    low = np.percentile(sims, 1, method="midpoint")
    sims = sims[sims >= low]
    high = np.percentile(sims, 99, method="midpoint")
    sims = sims[sims <= high]
    return sims.min(), sims.max()


def _column_cos(a, b):
    """Cosine of each column (along dim 0), written out: Σ a·b / (‖a‖·‖b‖)."""
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


@pytest.mark.parametrize("method", ["add_cosine_a", "add_cosine_b"])
def test_add_cosine_follows_supermergers_formula(tmp_path, method):
    generator = torch.Generator().manual_seed(5)
    keys = [f"model.diffusion_model.k{i}" for i in range(12)] + ["first_stage_model.decoder.w"]
    a = {k: torch.randn(16, 200 if "first_stage" in k else 6, generator=generator) for k in keys}
    b = {k: v + (0.2 + i / 10) * torch.randn(v.shape, generator=generator)
         for i, (k, v) in enumerate(a.items())}  # fmt: skip
    b["first_stage_model.decoder.w"] = -a["first_stage_model.decoder.w"]  # far outside the range
    paths = [save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)]
    merged = run_merge(tmp_path, paths, method, alpha=0.2)
    unit = (lambda t: t / t.norm(dim=0)) if method == "add_cosine_a" else (lambda t: t)
    listed, combined = [], {}
    for key in keys:
        ua, ub = unit(a[key].double()), unit(b[key].double())
        column = _column_cos(ua, ub)
        whole = (ua * ub).sum() / (ua.norm() * ub.norm())
        combined[key] = (column + whole) / 2
        if not key.startswith("first_stage_model"):
            listed += (column if method == "add_cosine_a" else combined[key]).tolist()
    low, high = _reference_range(listed)
    assert torch.equal(merged[keys[-1]], a[keys[-1]])  # VAE keys stay A, as in supermerger
    for key in keys[:-1]:
        k = ((combined[key] - low) / (high - low) - 0.2).clamp(0, 1)
        expected = k * a[key].double() + (1 - k) * b[key].double()
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged[keys[0]], a[keys[0]])
    assert not torch.equal(merged[keys[0]], b[keys[0]])


def test_research_methods_run_from_a_recipe_file_and_re_run_from_the_output(run, tmp_path):
    """A tree of research methods (streamed, random, model-wide statistic) written as a YAML
    file, run by the CLI, then re-run from the recipe recorded in the output: same tensors."""
    import yaml

    _, paths = models(tmp_path, 3, torch.float16)
    recipe = {
        "models": {"base": "m0.safetensors", "x": "m1.safetensors", "y": "m2.safetensors"},
        "seed": 7,
        "merge": {
            "method": "weighted_sum",
            "alpha": 0.5,
            "inputs": [
                {"method": "ties", "inputs": ["base", "x", "y"], "density": 0.4},
                {
                    "method": "add_cosine_b",
                    "alpha": 0.1,
                    "inputs": [
                        {"method": "dare_ties", "inputs": ["base", "x", "y"], "density": 0.6},
                        {"method": "slerp", "inputs": ["x", "y"], "t": 0.3},
                    ],
                },
            ],
        },
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out, again = tmp_path / "out.safetensors", tmp_path / "again.safetensors"
    assert run("merge", tmp_path / "r.yaml", "-o", out, "-q").code == 0
    printed = run("inspect", out, "--recipe")
    assert printed.code == 0 and yaml.safe_load(printed.out)["merge"]["inputs"][1]["alpha"] == 0.1
    (tmp_path / "recorded.yaml").write_text(printed.out)
    assert run("merge", tmp_path / "recorded.yaml", "-o", again, "-q").code == 0
    first, second = load(out), load(again)
    assert first.keys() == second.keys() == set(SHAPES)
    assert all(torch.equal(first[k], second[k]) for k in SHAPES)
    states = [load(p) for p in paths]
    assert not any(torch.equal(first["w"], s["w"]) for s in states)


def test_nested_add_cosine_gathers_the_inner_range_first(tmp_path):
    """An add_cosine over another add_cosine equals merging in two steps through a file."""
    _, paths = models(tmp_path, 3)
    inner = {"method": "add_cosine_b", "inputs": ["M0", "M1"], "alpha": 0.1}
    names = {f"M{i}": str(p) for i, p in enumerate(paths)}
    nested = {"models": names, "merge": {"method": "add_cosine_a", "alpha": 0.2,
                                          "inputs": [inner, "M2"]}}  # fmt: skip
    weightmix.merge(nested, tmp_path / "nested.safetensors")
    first = {"M0": names["M0"], "M1": names["M1"]}
    weightmix.merge({"models": first, "merge": inner}, tmp_path / "step.safetensors")
    outer = {"method": "add_cosine_a", "alpha": 0.2, "inputs": ["S", "M2"]}
    step = str(tmp_path / "step.safetensors")
    two_steps = {"models": {"S": step, "M2": names["M2"]}, "merge": outer}
    weightmix.merge(two_steps, tmp_path / "two.safetensors")
    nested_out, two = load(tmp_path / "nested.safetensors"), load(tmp_path / "two.safetensors")
    assert all(torch.equal(nested_out[k], two[k]) for k in SHAPES)


@pytest.mark.parametrize("method", ["add_cosine_a", "add_cosine_b"])
def test_add_cosine_of_zero_tensors_is_zero_not_nan(tmp_path, method):
    zero = {"bias": torch.zeros(6), "w": torch.randn(4, 6)}
    other = {"bias": torch.zeros(6), "w": torch.randn(4, 6)}
    paths = [save(tmp_path / "a.safetensors", zero), save(tmp_path / "b.safetensors", other)]
    merged = run_merge(tmp_path, paths, method)
    assert torch.equal(merged["bias"], torch.zeros(6))
    assert bool(torch.isfinite(merged["w"]).all())


def test_breadcrumbs_drops_the_outliers_when_gamma_and_density_fill_the_tensor(tmp_path):
    base, one = {"w": torch.zeros(10)}, {"w": torch.arange(1.0, 11.0)}
    paths = [save(tmp_path / "b.safetensors", base), save(tmp_path / "x.safetensors", one)]
    merged = run_merge(tmp_path, paths, "breadcrumbs", density=0.5, gamma=0.5)
    assert merged["w"].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 0, 0]


def test_non_finite_deltas_that_are_dropped_leave_the_base(tmp_path):
    """A vote of −inf and +1 elects no sign (count): the base stays, not inf·0 = NaN; a
    DARE-dropped inf is dropped."""
    base, one = {"w": torch.zeros(4)}, {"w": torch.tensor([1.0, 1.0, 2.0, 3.0])}
    two = {"w": torch.tensor([-math.inf, 1.0, 2.0, 3.0])}
    paths = [save(tmp_path / f"{n}.safetensors", s)
             for n, s in (("b", base), ("x", one), ("y", two))]  # fmt: skip
    merged = run_merge(tmp_path, paths, "ties", density=1.0, consensus="count")
    assert merged["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    inf = {"w": torch.full((4096,), math.inf)}
    paths = [paths[0], save(tmp_path / "inf.safetensors", {"w": torch.zeros(4096)} | inf)]
    paths[0] = save(tmp_path / "z.safetensors", {"w": torch.zeros(4096)})
    merged = run_merge(tmp_path, paths, "dare_linear", density=0.5)
    dropped = merged["w"] == 0
    assert 1500 < int(dropped.sum()) < 2600  # about half dropped: 0, the others inf
    assert bool((merged["w"][~dropped] == math.inf).all())


def test_a_tensor_without_elements_merges_with_every_streamed_method(tmp_path):
    """Statistics passes over a tensor of 0 elements end (they looped forever once)."""
    import subprocess
    import sys

    states = [{"w": torch.randn(4, 4) + i, "empty": torch.zeros(0, 3)} for i in range(3)]
    paths = [save(tmp_path / f"e{i}.safetensors", s) for i, s in enumerate(states)]
    for method, flags in (("ties", ["-p", "density=0.5"]), ("breadcrumbs", ["-p", "density=0.5"]),
                          ("model_stock", []), ("geometric_median", [])):  # fmt: skip
        out = tmp_path / f"{method}.safetensors"
        command = [sys.executable, "-m", "weightmix", "merge", *map(str, paths), "-m", method]
        done = subprocess.run([*command, *flags, "-o", str(out), "-q"], timeout=120)
        assert done.returncode == 0, method
        assert load(out)["empty"].shape == (0, 3)


def test_della_ranks_rows_a_block_at_a_time_with_the_same_result(tmp_path, monkeypatch):
    from weightmix.methods import sparsify

    _, paths = models(tmp_path, 3)
    whole = run_merge(tmp_path, paths, "della", density=0.4, epsilon=0.1)
    monkeypatch.setattr(sparsify, "RANKED_ROWS_ELEMENTS", 7)  # a row or two per block
    blocks = run_merge(tmp_path, paths, "della", density=0.4, epsilon=0.1)
    assert all(torch.equal(whole[k], blocks[k]) for k in SHAPES)
    assert not torch.equal(whole["conv"], load(paths[0])["conv"])


def test_add_cosine_gives_the_same_bytes_on_every_run_and_thread_count(tmp_path):
    """The whole-tensor cosine is summed by torch's own reduction: BLAS's dot, called from the
    engine's worker threads, summed in an order that changed from run to run (an output bit
    flipped in 3 to 5 of 9 runs of this recipe over these tiny SD1.5 files)."""
    paths = {name: str(save(tmp_path / f"{name}.safetensors", random_state(seed)))
             for name, seed in (("A", 1), ("B", 2), ("C", 3))}  # fmt: skip
    inner = {"method": "add_cosine_a", "inputs": ["A", "C"]}
    recipe = {"models": paths, "merge": {"method": "add_cosine_b", "inputs": [inner, "B"]}}
    outputs = []
    for run_number in range(10):
        out = tmp_path / f"run{run_number}.safetensors"
        weightmix.merge(recipe, out, threads=1 + run_number % 3)
        outputs.append(load(out))
    assert all(torch.equal(outputs[0][k], o[k]) for o in outputs[1:] for k in o)
