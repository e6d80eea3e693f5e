"""Key names and shapes of every architecture family, for tiny test checkpoints: the four
layouts weightmix ships as data, and the variants derived from them the way the real models
differ (SD2's OpenCLIP-H text encoder and linear projections, the SDXL refiner's twelve input
blocks and OpenCLIP-G alone, SD3.5's second attention and q/k norms, 38 joint blocks, schnell
without a guidance embedder)."""

from __future__ import annotations

import re

import torch

from weightmix.arch import architecture_keys, scaled_shape

UNET = "model.diffusion_model."


def data_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {s.key: s.shape for s in architecture_keys(name)}


def _open_clip(prefix: str, layers: int) -> dict[str, tuple[int, ...]]:
    """OpenCLIP text encoder keys (as SDXL's second encoder has them) under `prefix`."""
    found = {}
    for key, shape in data_shapes("sdxl-sgm").items():
        if key.startswith("conditioner.embedders.1.model."):
            inner = key.removeprefix("conditioner.embedders.1.model.")
            match = re.match(r"transformer\.resblocks\.(\d+)\.", inner)
            if match and int(match.group(1)) >= layers:
                continue
            found[prefix + inner] = shape
    return found


def shapes_of(family: str) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a single file of `family` (see families.yaml)."""
    if family == "sd1":
        return data_shapes("sd1-ldm")
    if family == "sd2":
        shapes = {k: v for k, v in data_shapes("sd1-ldm").items() if not k.startswith("cond_")}
        for key in [k for k in shapes if re.search(r"\.proj_(in|out)\.weight$", k)]:
            shapes[key] = shapes[key][:2]  # linear projections, not 1x1 convolutions
        shapes.update(_open_clip("cond_stage_model.model.", 24))
        return shapes
    if family == "sdxl":
        return data_shapes("sdxl-sgm")
    if family == "sdxl-refiner":
        shapes = {
            k: v for k, v in data_shapes("sd1-ldm").items() if not k.startswith("cond_stage_model")
        }
        shapes.update({k: v for k, v in data_shapes("sdxl-sgm").items() if ".label_emb." in k})
        shapes.update(_open_clip("conditioner.embedders.0.model.", 32))
        return shapes
    if family == "sd3-medium":
        return data_shapes("sd3-comfyui")
    if family == "sd3.5-medium":
        shapes = data_shapes("sd3-comfyui")
        for block in range(13):
            base = f"{UNET}joint_blocks.{block}.x_block."
            shapes[base + "attn2.qkv.weight"] = shapes[base + "attn.qkv.weight"]
            shapes[base + "attn2.proj.weight"] = shapes[base + "attn.proj.weight"]
            shapes[base + "attn2.ln_q.weight"] = (64,)
        return shapes
    if family == "sd3.5-large":  # 38 joint blocks: the last one reduced, as in every SD3
        shapes = data_shapes("sd3-comfyui")
        large = {}
        for key, shape in shapes.items():
            match = re.match(rf"{re.escape(UNET)}joint_blocks\.(\d+)\.(.*)", key)
            if match is None:
                large[key] = shape
            elif match.group(1) == "23":  # the final, reduced block becomes block 37
                large[f"{UNET}joint_blocks.37.{match.group(2)}"] = shape
            elif match.group(1) == "0":
                for block in range(37):
                    large[f"{UNET}joint_blocks.{block}.{match.group(2)}"] = shape
        return large
    if family == "flux-dev":
        return data_shapes("flux-flux")
    if family == "flux-schnell":
        return {k: v for k, v in data_shapes("flux-flux").items() if ".guidance_in." not in k}
    raise ValueError(family)


def hand_sd_block(key: str, last_out: str) -> str:
    """supermerger's rule, written out: everything outside the UNet is BASE."""
    if not key.startswith(UNET):
        return "BASE"
    head, *rest = key[len(UNET) :].split(".")
    if head in ("time_embed", "label_emb"):
        return "IN00"
    if head == "input_blocks":
        return "IN" + rest[0].zfill(2)
    if head == "middle_block":
        return "M00"
    if head == "output_blocks":
        return "OUT" + rest[0].zfill(2)
    assert head == "out", key
    return last_out


def hand_flux_block(key: str) -> str:
    if key.startswith("text_encoders.t5xxl."):
        return "T5"
    if not key.startswith(UNET):
        return "CLIP"  # CLIP-L and the VAE of an all-in-one file
    head, *rest = key[len(UNET) :].split(".")
    if head == "double_blocks":
        return "D" + rest[0].zfill(2)
    if head == "single_blocks":
        return "S" + rest[0].zfill(2)
    if head == "final_layer":
        return "OUT"
    assert head in ("img_in", "txt_in", "time_in", "vector_in", "guidance_in"), key
    return "IN"


def tiny_state(
    shapes: dict[str, tuple[int, ...]], seed: int, divisor: int = 64
) -> dict[str, torch.Tensor]:
    """Random fp32 tensors for these keys, every dimension divided by `divisor`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(scaled_shape(s, divisor), generator=generator) for k, s in shapes.items()
    }


def run_example(run, tmp_path, path, seeds_by_name=None, divisor=64):
    """Run an example recipe on tiny SD1.5-layout models (one per recipe model, seeded in
    order); return the models' states and the merged output."""
    from helpers import load, save

    from weightmix.recipe import load_recipe

    shapes = {k: v for k, v in shapes_of("sd1").items() if not k.startswith("model_ema.")}
    recipe = load_recipe(path)
    states = {name: tiny_state(shapes, seed, divisor) for seed, name in enumerate(recipe.models)}
    recipe.models = {n: str(save(tmp_path / f"{n}.safetensors", s)) for n, s in states.items()}
    if recipe.tokenizer is not None:  # the demo's tokenizer, built as `make demo` builds it
        from weightmix.examples import write_example_tokenizer

        recipe.tokenizer = str(write_example_tokenizer(tmp_path / "tokenizer"))
    saved = tmp_path / "example.yaml"
    saved.write_text(recipe.to_yaml())
    out = tmp_path / "out.safetensors"
    assert run("merge", saved, "-o", out, "-q").code == 0
    return states, load(out)
