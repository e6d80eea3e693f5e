"""`weightmix wizard`, driven through standard input (not a terminal)."""

from __future__ import annotations

import io

import torch
from helpers import load, save

import weightmix


def answer(monkeypatch, *lines: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))


def two_models(tmp_path):
    generator = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(3, 4, generator=generator)} for _ in range(2)]
    return [save(tmp_path / f"{n}.safetensors", s) for n, s in zip("ab", states)]


def test_the_wizard_asks_again_merges_and_saves_a_recipe_that_re_runs(run, tmp_path, monkeypatch):
    a, b = two_models(tmp_path)
    out = tmp_path / "merged.safetensors"
    answer(monkeypatch,
           str(a), str(tmp_path / "missing.safetensors"), str(b), "",  # a wrong path, asked again
           str(tmp_path / "merged.txt"), str(out),  # not .safetensors: asked again
           "add_difference", "weighted_sum",  # needs 3 models: asked again
           "1.5", "0.25", "", "",  # alpha out of range, then 0.25; weights, normalize defaults
           "y")  # fmt: skip
    result = run("wizard")
    assert result.code == 0, result.err
    assert "missing.safetensors: no such file or folder" in result.err
    assert "give a .safetensors output path" in result.err
    assert "add_difference takes 3 inputs, 2 given: pick another" in result.err
    assert "alpha=1.5" in result.err and "weighted_sum(A, B)" in result.err
    direct = tmp_path / "direct.safetensors"
    weightmix.merge({"models": {"A": str(a), "B": str(b)}, "merge": {"method": "weighted_sum",
                     "inputs": ["A", "B"], "alpha": 0.25}}, direct)  # fmt: skip
    assert torch.equal(load(out)["w"], load(direct)["w"])
    saved = tmp_path / "merged.yaml"
    again = tmp_path / "again.safetensors"
    assert run("merge", saved, "-o", again, "-q").code == 0
    assert torch.equal(load(again)["w"], load(out)["w"])


def test_the_wizard_writes_nothing_when_declined_or_cut_short(run, tmp_path, monkeypatch):
    a, b = two_models(tmp_path)
    out = tmp_path / "merged.safetensors"
    answer(monkeypatch, str(a), str(b), "", str(out), "weighted_sum", "0.5", "", "", "n")
    result = run("wizard")
    assert result.code == 0 and "nothing written" in result.err
    assert not out.exists() and not out.with_suffix(".yaml").exists()
    answer(monkeypatch, str(a), str(b))  # standard input ends at the third question
    result = run("wizard")
    assert result.code == 2
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("weightmix: error: wizard: no answer to 'Another model")
    assert not out.exists()


def test_the_wizard_takes_block_values_and_asks_again_across_parameters(run, tmp_path, monkeypatch):
    """A preset answer stays a preset; a malformed answer is asked again; an existing
    OUT.yaml is refused at the output question; weights that cannot be normalised are asked
    again together with normalize."""
    from archs import shapes_of, tiny_state

    shapes = {k: v for k, v in shapes_of("sd1").items() if not k.startswith("model_ema.")}
    paths = [save(tmp_path / f"{n}.safetensors", tiny_state(shapes, i))
             for i, n in enumerate("ab")]  # fmt: skip
    (tmp_path / "taken.yaml").write_text("mine\n")
    out = tmp_path / "blocks.safetensors"
    answer(monkeypatch, *map(str, paths), "", str(tmp_path / "taken.safetensors"), str(out),
           "weighted_sum", "[0.5", "GRAD_V", "", "", "y")  # fmt: skip
    result = run("wizard")
    assert result.code == 0, result.err
    assert "taken.yaml exists" in result.err and (tmp_path / "taken.yaml").read_text() == "mine\n"
    assert "'[0.5' does not read as a value" in result.err
    assert "alpha: GRAD_V" in (tmp_path / "blocks.yaml").read_text()
    direct = tmp_path / "direct.safetensors"
    assert run("merge", tmp_path / "blocks.yaml", "-o", direct, "-q").code == 0
    first, second = load(out), load(direct)
    assert all(torch.equal(first[k], second[k]) for k in first)
    out = tmp_path / "weights.safetensors"
    answer(monkeypatch, *map(str, paths), "", str(out), "weighted_sum",
           "", "[1, -1]", "",  # normalize on: weights that sum to 0 are refused together
           "", "[1, -1]", "false", "y")  # fmt: skip
    result = run("wizard")
    assert result.code == 0, result.err
    assert "weights sum to 0" in result.err and "answer the parameters again" in result.err
    assert "normalize: false" in (tmp_path / "weights.yaml").read_text()
