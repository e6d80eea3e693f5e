"""`weightmix preview` (issue 10 item 3) on tiny random Stable Diffusion pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from test_diffusers import make_clip, make_tokenizer, make_vae

import weightmix
from weightmix.analysis.preview import LABEL, load_merged


@pytest.fixture(scope="module")
def loadable_pipelines(tmp_path_factory):
    """Two tiny Stable Diffusion pipelines that run: the UNet reads the CLIP's 16-wide text."""
    root = tmp_path_factory.mktemp("runnable")
    folders = []
    for name, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            attention_head_dim=2, norm_num_groups=4,
        )  # fmt: skip
        pipeline = StableDiffusionPipeline(
            unet=unet, vae=make_vae(), text_encoder=make_clip(),
            tokenizer=make_tokenizer(root / "vocabulary"), scheduler=PNDMScheduler(steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipeline.save_pretrained(root / name)
        folders.append(root / name)
    return folders


def write_recipe(tmp_path, folders, **merge) -> object:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "models": {"A": str(folders[0]), "B": str(folders[1])},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.5, **merge},
    }))  # fmt: skip
    return recipe


def test_grid_of_a_sweep(run, tmp_path, loadable_pipelines):
    recipe = write_recipe(tmp_path, loadable_pipelines)
    grid = tmp_path / "grid.png"
    result = run("preview", recipe, "--param", "alpha=0,1,0", "--prompt", "a cat", "--steps", "5",
                 "--size", "32", "-o", grid)  # fmt: skip
    assert result.code == 0, result.err
    image = Image.open(grid)
    assert image.size == (3 * 32, LABEL + 32)
    cells = [np.asarray(Image.open(tmp_path / f"grid-0-{j}.png")) for j in range(3)]
    assert np.array_equal(cells[0], cells[2])  # equal values, identical cells
    assert not np.array_equal(cells[0], cells[1])
    labels = np.asarray(image.convert("L"))[:LABEL]
    assert (labels < 128).any()  # the column labels are drawn
    nested = tmp_path / "nested.yaml"
    inner = {"method": "weighted_sum", "name": "inner", "inputs": ["A", "B"], "alpha": 0.5}
    nested.write_text(json.dumps({
        "models": {"A": str(loadable_pipelines[0]), "B": str(loadable_pipelines[1])},
        "merge": {"method": "weighted_sum", "name": "outer", "inputs": [inner, "B"],
                  "alpha": 0.3},
    }))  # fmt: skip
    two = tmp_path / "two.png"
    result = run("preview", nested, "--param", "inner.alpha=0,1", "--param", "outer.alpha=0.5",
                 "--prompt", "a cat", "--steps", "5", "--size", "16", "-o", two)  # fmt: skip
    assert result.code == 0, result.err
    assert Image.open(two).size == (3 * LABEL + 2 * 16, LABEL + 16)
    result = run("preview", nested, "--param", "alpha=0,1", "--param", "outer.alpha=0.5",
                 "--prompt", "a cat", "-o", tmp_path / "same.png")  # fmt: skip
    assert result.code == 2 and "set the same parameter" in result.err


def test_loaded_weights_equal_a_file_merge(tmp_path, loadable_pipelines):
    from diffusers import DiffusionPipeline

    data = json.loads(write_recipe(tmp_path, loadable_pipelines).read_text())
    pipeline = DiffusionPipeline.from_pretrained(str(loadable_pipelines[0]), local_files_only=True)
    load_merged(pipeline, weightmix.merge_to_state_dict(data))
    weightmix.merge(data, tmp_path / "merged")
    reference = DiffusionPipeline.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_bad_previews(run, tmp_path, loadable_pipelines, models):
    recipe = write_recipe(tmp_path, loadable_pipelines)
    grid = tmp_path / "g.png"
    base = ["preview", recipe, "--prompt", "x", "-o", grid]
    result = run(*base, "--param", "alpah=0,1")
    assert result.code == 2 and "no method of this recipe has it" in result.err
    assert "alpha" in result.err
    result = run(*base, "--param", "alpha=0", "--param", "alpha=1", "--param", "alpha=2")
    assert result.code == 2 and "sweep one or two" in result.err
    files = tmp_path / "files.yaml"
    merge = {"method": "weighted_sum", "inputs": ["A", "B"]}
    files.write_text(json.dumps({"models": {"A": str(models["A"]), "B": str(models["B"])},
                                 "merge": merge}))  # fmt: skip
    result = run("preview", files, "--prompt", "x", "--param", "alpha=0", "-o", grid)
    assert result.code == 2 and "is not a pipeline folder" in result.err
    assert not grid.exists()
