"""The Python API as the README shows it, and the demo recipe on the example models."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from helpers import POSITION_IDS, load

import weightmix
from weightmix.examples import build_examples
from weightmix.recipe import load_recipe

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_readme_python_example(tmp_path, models):
    recipe = weightmix.Recipe(
        models={"a": str(models["A"]), "b": str(models["B"])},
        merge=weightmix.node("weighted_sum", "a", "b", alpha=0.3),
    )
    out = tmp_path / "out.safetensors"
    assert "weighted_sum(a, b)" in weightmix.dry_run(recipe, out)
    result = weightmix.merge(recipe, out, threads=2)
    assert result.files == [out] and result.tensors == len(load(models["A"]))
    with weightmix.open_checkpoint(out) as ckpt:
        assert "alpha: 0.3" in ckpt.metadata["weightmix.recipe"]
    a, b, merged = load(models["A"]), load(models["B"]), load(out)
    key = next(k for k in merged if k != POSITION_IDS)
    torch.testing.assert_close(merged[key], (0.7 * a[key].float() + 0.3 * b[key].float()).half())


def test_recipe_dict_and_yaml_file_give_the_same_bytes(tmp_path, models, run):
    """The same recipe as a dict through the API and as a YAML file through the CLI, the file
    run as written: the same bytes, and both match the formula."""
    data = {
        "models": {"A": str(models["A"]), "B": str(models["B"])},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.35},
        "rules": [{"keys": "*.bias", "params": {"alpha": 0.8}}],
        "dtype": "bf16",
    }
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text(yaml.safe_dump(data))
    weightmix.merge(data, tmp_path / "out.safetensors")
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / "out.safetensors"  # same name: same title
    result = run("merge", yaml_path, "-o", again, "-q")
    assert result.code == 0, result.err
    assert (tmp_path / "out.safetensors").read_bytes() == again.read_bytes()
    a, b, merged = load(models["A"]), load(models["B"]), load(again)
    for key, tensor in merged.items():
        if tensor.is_floating_point():
            alpha = 0.8 if key.endswith(".bias") else 0.35
            expected = ((1 - alpha) * a[key].float() + alpha * b[key].float()).bfloat16()
            torch.testing.assert_close(tensor, expected, msg=key)


def test_demo_recipe_on_the_example_models(tmp_path, run):
    paths = build_examples(tmp_path / "demo", divisor=32)
    recipe = load_recipe(EXAMPLES / "demo.yaml")
    recipe.models = {p.stem: str(p) for p in paths}
    saved = tmp_path / "demo.yaml"
    saved.write_text(recipe.to_yaml())
    out = tmp_path / "merged.safetensors"
    assert run("merge", saved, "-o", out, "-q").code == 0
    base, anime, photo = (load(p) for p in paths)
    merged = load(out)
    assert set(merged) == set(photo)
    for key, tensor in merged.items():
        if key.startswith("cond_stage_model.") or not tensor.is_floating_point():
            assert tensor.equal(photo[key])  # taken by rule 1, or integer: the first model read
            continue
        style = 0.4 if key.startswith("model.diffusion_model.output_blocks.") else 0.8
        p, a, b = (m[key].float() for m in (photo, anime, base))
        expected = 0.5 * (p + style * (a - b)) + 0.5 * p
        torch.testing.assert_close(tensor, expected.half(), msg=key)
