"""modelspec.* metadata: architecture detection, title, date, merged-from, carried keys."""

from __future__ import annotations

import time

import pytest
import torch
from archs import shapes_of, tiny_state
from helpers import save

import weightmix
from weightmix.arch import architecture_keys, detect_architecture, scaled_shape
from weightmix.io import open_checkpoint
from weightmix.modelspec import merge_date


def tiny(architecture: str, seed: int, drop: str | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        s.key: torch.randn(scaled_shape(s.shape, 64), generator=generator).half()
        for s in architecture_keys(architecture)
        if s.dtype != "I64" and (drop is None or drop not in s.key)
    }


def merged_metadata(tmp_path, states, metas=None, **extra):
    paths = {}
    for i, (name, state) in enumerate(states.items()):
        meta = (metas or [None] * len(states))[i]
        paths[name] = str(save(tmp_path / f"{name}.safetensors", state, metadata=meta))
    recipe = {"models": paths, "merge": {"method": "weighted_sum", "inputs": list(paths)}}
    out = tmp_path / "my-merge.safetensors"
    weightmix.merge(recipe | extra, out, overwrite=True)
    with open_checkpoint(out) as ckpt:
        return ckpt.metadata


def test_detects_the_real_layouts():
    for architecture in ("sd1-ldm", "sdxl-sgm", "sd3-comfyui", "flux-flux"):
        keys = [s.key for s in architecture_keys(architecture)]
        assert detect_architecture(keys) == architecture
    assert detect_architecture(["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]) is None


def test_sd1_merge_gets_modelspec(tmp_path):
    meta = merged_metadata(
        tmp_path,
        {"A": tiny("sd1-ldm", 1), "B": tiny("sd1-ldm", 2)},
        [{"modelspec.title": "Anime v2", "modelspec.architecture": "stable-diffusion-v1",
          "modelspec.resolution": "512x512", "ss_lr": "1e-4"}, None],
    )  # fmt: skip
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "my-merge"
    assert meta["modelspec.merged_from"] == "Anime v2, B"
    assert meta["modelspec.resolution"] == "512x512"  # still true of the merge
    assert "ss_lr" not in meta  # training details of one input are not
    assert meta["modelspec.date"] == time.strftime("%Y-%m-%d", time.gmtime(1790000000))


def test_flux_without_guidance_is_schnell_and_title_from_recipe(tmp_path):
    states = {"dev": tiny("flux-flux", 1), "krea": tiny("flux-flux", 2)}
    assert merged_metadata(tmp_path, states)["modelspec.architecture"] == "flux-1-dev"
    schnell = {n: tiny("flux-flux", i, drop="guidance_in") for i, n in enumerate(states)}
    meta = merged_metadata(tmp_path, schnell, title="Fast mix")
    assert meta["modelspec.architecture"] == "flux-1-schnell"
    assert meta["modelspec.title"] == "Fast mix"


def test_unknown_layout_writes_no_modelspec(tmp_path):
    state = {"model.layers.0.mlp.weight": torch.ones(4, 4), "lm_head.weight": torch.ones(2, 4)}
    meta = merged_metadata(tmp_path, {"A": state, "B": state})
    assert not any(k.startswith("modelspec.") for k in meta)
    assert "weightmix.recipe" in meta


def test_merge_date_is_today_without_source_date_epoch(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    before = time.strftime("%Y-%m-%d", time.gmtime())
    assert merge_date() in (before, time.strftime("%Y-%m-%d", time.gmtime()))


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("sdxl-refiner", "stable-diffusion-xl-v1-refiner"),
        ("sd3.5-medium", "stable-diffusion-v3.5-medium"),
        ("sd3.5-large", "stable-diffusion-v3.5-large"),
        ("flux-schnell", "flux-1-schnell"),
    ],
)
def test_every_family_gets_its_modelspec_name(tmp_path, family, expected):
    state = {k: v.half() for k, v in tiny_state(shapes_of(family), 1).items()}
    meta = merged_metadata(tmp_path, {"A": state, "B": state})
    assert meta["modelspec.architecture"] == expected


def test_sd2_keeps_the_base_models_variant_or_says_nothing(tmp_path):
    state = {k: v.half() for k, v in tiny_state(shapes_of("sd2"), 1).items()}
    plain = merged_metadata(tmp_path, {"A": state, "B": state})
    assert "modelspec.architecture" not in plain  # 512 and 768-v look the same
    told = [{"modelspec.architecture": "stable-diffusion-v2-768-v"}, None]
    meta = merged_metadata(tmp_path, {"A": state, "B": state}, told)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
