"""Every method against a direct torch formula, for fp32, fp16 and bf16 inputs, end to end."""

from __future__ import annotations

import pytest
import torch
from helpers import POSITION_IDS, load, random_state, save
from hypothesis import given, settings
from hypothesis import strategies as st

import weightmix
from weightmix.methods import METHODS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# method, inputs, params, reference formula over fp32 tensors
CASES = [
    ("weighted_sum", "AB", {"alpha": 0.3}, lambda a, b: (1 - 0.3) * a + 0.3 * b),
    ("weighted_sum", "AB", {}, lambda a, b: 0.5 * a + 0.5 * b),
    (
        "weighted_sum",
        "ABC",
        {"weights": [1.0, 2.0, 5.0]},
        lambda a, b, c: (1 * a + 2 * b + 5 * c) / 8,
    ),
    (
        "weighted_sum",
        "ABC",
        {"weights": [0.2, 0.3, 0.1], "normalize": False},
        lambda a, b, c: 0.2 * a + 0.3 * b + 0.1 * c,
    ),
    ("add_difference", "ABC", {"alpha": 0.7}, lambda a, b, c: a + 0.7 * (b - c)),
    ("add_difference", "ABC", {}, lambda a, b, c: a + (b - c)),
    ("subtract", "AB", {}, lambda a, b: a - b),
    ("take", "B", {}, lambda b: b),
]


def _states(tmp_path, dtype, names):
    states = {n: random_state(seed, dtype) for seed, n in enumerate("ABC", 1)}
    paths = {n: save(tmp_path / f"{n}.safetensors", states[n]) for n in names}
    return states, paths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("method", "names", "params", "formula"), CASES)
def test_method_matches_torch_formula(tmp_path, dtype, method, names, params, formula):
    states, paths = _states(tmp_path, dtype, names)
    recipe = {
        "models": {n: str(paths[n]) for n in names},
        "merge": {"method": method, "inputs": list(names), **params},
    }
    out = tmp_path / "out.safetensors"
    weightmix.merge(recipe, out)
    merged = load(out)
    assert set(merged) == set(states["A"])
    for key, tensor in merged.items():
        if key == POSITION_IDS:
            continue
        expected = formula(*(states[n][key].float() for n in names)).to(dtype)
        assert tensor.dtype == dtype
        torch.testing.assert_close(tensor, expected, msg=f"{method} {key}")


def test_add_applies_task_vectors_like_the_formula(tmp_path):
    states, paths = _states(tmp_path, torch.float32, "ABC")
    recipe = {
        "models": {n: str(p) for n, p in paths.items()},
        "merge": {
            "method": "add",
            "inputs": ["A", {"method": "subtract", "inputs": ["B", "C"]}],
            "alpha": 0.5,
        },
    }
    weightmix.merge(recipe, tmp_path / "out.safetensors")
    merged = load(tmp_path / "out.safetensors")
    a, b, c = (states[n] for n in "ABC")
    for key in merged:
        if key != POSITION_IDS:
            torch.testing.assert_close(merged[key], a[key] + 0.5 * (b[key] - c[key]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_integer_tensors_are_copied_from_the_first_model(tmp_path, dtype):
    states, paths = _states(tmp_path, dtype, "AB")
    recipe = {
        "models": {"A": str(paths["A"]), "B": str(paths["B"])},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.5},
        "dtype": "fp32",
    }
    weightmix.merge(recipe, tmp_path / "out.safetensors")
    merged = load(tmp_path / "out.safetensors")
    assert merged[POSITION_IDS].dtype == torch.int64
    assert torch.equal(merged[POSITION_IDS], states["A"][POSITION_IDS])
    assert not torch.equal(states["A"][POSITION_IDS], states["B"][POSITION_IDS])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alpha_zero_returns_first_model_bit_for_bit(tmp_path, dtype):
    states, paths = _states(tmp_path, dtype, "AB")
    state = states["A"]
    state["special"] = torch.tensor([-0.0, float("inf"), float("-inf"), 1e-8]).to(dtype)
    states["B"]["special"] = torch.tensor([1.0, float("nan"), 2.0, 3.0]).to(dtype)
    save(paths["A"], state)
    save(paths["B"], states["B"])
    for alpha, source in ((0.0, "A"), (1.0, "B")):
        out = tmp_path / f"out{alpha}.safetensors"
        weightmix.merge(
            {
                "models": {n: str(p) for n, p in paths.items()},
                "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": alpha},
            },
            out,
        )
        merged = load(out)
        for key, tensor in merged.items():
            expected = states[source][key] if key != POSITION_IDS else states["A"][key]
            assert tensor.view(torch.uint8).equal(expected.view(torch.uint8)), (alpha, key)


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(finite, min_size=1, max_size=32),
    others=st.lists(finite, min_size=32, max_size=32),
    alpha=st.floats(0, 1),
)
def test_weighted_sum_laws(values, others, alpha):
    a = torch.tensor(values)
    b = torch.tensor(others[: len(values)])
    weighted_sum = METHODS["weighted_sum"]
    # blending a model with itself gives the model (up to one rounding)
    torch.testing.assert_close(weighted_sum(a, a, alpha=alpha), a, atol=1e-4, rtol=1e-5)
    assert weighted_sum(a, b, alpha=0.0).equal(a)
    assert weighted_sum(a, b, alpha=1.0).equal(b)
    # add_difference with B == C leaves A exactly
    assert METHODS["add_difference"](a, b, b, alpha=alpha).equal(a)
    # the result lies between the inputs
    low, high = torch.minimum(a, b), torch.maximum(a, b)
    result = weighted_sum(a, b, alpha=alpha)
    assert bool(((result >= low - 1e-3) & (result <= high + 1e-3)).all())


def test_methods_do_not_modify_their_inputs():
    a, b, c = (torch.randn(64) for _ in range(3))
    copies = [t.clone() for t in (a, b, c)]
    METHODS["weighted_sum"](a, b, c, weights=[1.0, 2.0, 3.0])
    METHODS["add_difference"](a, b, c, alpha=0.5)
    METHODS["add"](a, b, c, alpha=2.0)
    METHODS["subtract"](a, b)
    for before, after in zip(copies, (a, b, c)):
        assert before.equal(after)
