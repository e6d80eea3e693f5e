"""Components of single-file checkpoints: selecting them and giving them their own rules."""

from __future__ import annotations

import torch
from helpers import load, save

import weightmix
from weightmix.arch import architecture_keys, scaled_shape
from weightmix.arch.components import component_map


def tiny(architecture: str, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        s.key: torch.randn(scaled_shape(s.shape, 64), generator=generator)
        for s in architecture_keys(architecture)
        if s.dtype == "F32"
    }


def pair(tmp_path, architecture):
    states = {"A": tiny(architecture, 1), "B": tiny(architecture, 2)}
    paths = {n: str(save(tmp_path / f"{n}.safetensors", s)) for n, s in states.items()}
    return states, paths


def test_component_names_follow_diffusers_per_architecture():
    sdxl = component_map("sdxl-sgm")
    assert sdxl.resolve("unet", "t") == "diffuser"
    assert sdxl.resolve("text_encoder", "t") == "clip_l"
    assert sdxl.resolve("text_encoder_2", "t") == "clip_g"
    assert sdxl.component_of("conditioner.embedders.1.model.ln_final.weight") == "clip_g"
    assert sdxl.component_of("conditioner.embedders.0.transformer.new.weight") == "clip_l"
    flux = component_map("flux-flux")
    assert flux.resolve("transformer", "t") == "diffuser"
    assert flux.resolve("text_encoder_2", "t") == "t5xxl"
    assert flux.component_of("vae.decoder.anything.new") == "vae"


def test_select_components(run, tmp_path):
    states, paths = pair(tmp_path, "sd1-ldm")
    out = tmp_path / "unet_te.safetensors"
    result = run("merge", paths["A"], paths["B"], "--components", "unet,text_encoder", "-o", out)
    assert result.code == 0, result.err
    merged = load(out)
    expected = {
        k for k in states["A"] if k.startswith(("model.diffusion_model.", "cond_stage_model."))
    }
    assert set(merged) == expected
    assert f"{len(states['A']) - len(expected)} keys of other components left out" in result.err


def test_components_get_their_own_rules(tmp_path):
    states, paths = pair(tmp_path, "sdxl-sgm")
    recipe = {
        "models": paths,
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.5},
        "rules": [
            {"component": "vae", "take": "A"},
            {"component": "text_encoder_2", "params": {"alpha": 0.2}},
        ],
    }
    out = tmp_path / "out.safetensors"
    weightmix.merge(recipe, out)
    merged, a, b = load(out), states["A"], states["B"]
    assert set(merged) == set(a)
    for key, tensor in merged.items():
        if key.startswith("first_stage_model."):
            expected = a[key]
        elif key.startswith("conditioner.embedders.1."):
            expected = 0.8 * a[key] + 0.2 * b[key]
        else:
            expected = 0.5 * a[key] + 0.5 * b[key]
        torch.testing.assert_close(tensor, expected, msg=key)


def test_component_errors(run, tmp_path):
    _, paths = pair(tmp_path, "sd1-ldm")
    out = tmp_path / "out.safetensors"
    result = run("merge", paths["A"], paths["B"], "--components", "unett", "-o", out)
    assert result.code == 2 and "'unett' is not a component of sd1" in result.err
    assert "did you mean 'unet'" in result.err
    llm = {"encoder.blocks.0.mlp.weight": torch.ones(2, 2)}
    a = save(tmp_path / "llm_a.safetensors", llm)
    b = save(tmp_path / "llm_b.safetensors", llm)
    result = run("merge", a, b, "--components", "unet", "-o", out)
    assert result.code == 2 and "architecture of model A is unknown" in result.err
    assert not out.exists()
