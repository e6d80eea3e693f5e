"""LoRAs (issue 9): kohya and PEFT files applied to single files and diffusers folders through
the key dialects, extracted from fine-tunes, merged. References are dense torch formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from archs import shapes_of, tiny_state
from helpers import load, save
from test_diffusers import write_pipeline

UNET = "model.diffusion_model."
SD1_Q = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
SD1_CONV = UNET + "input_blocks.1.0.in_layers.2.weight"
SD1_TE = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
KOHYA_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def model_file(tmp_path: Path, family: str, seed: int = 0, divisor: int = 16) -> Path:
    shapes = {k: v for k, v in shapes_of(family).items() if not k.startswith("model_ema.")}
    return save(tmp_path / f"{family}-{seed}.safetensors", tiny_state(shapes, seed, divisor))


def factor_pair(generator, out: int, inner: tuple[int, ...], rank: int = 3):
    """(up, down) of a LoRA layer: out × rank (× 1 × 1) and rank × inner."""
    up = torch.randn(out, rank, *([1] * (len(inner) - 1)), generator=generator)
    return up, torch.randn(rank, *inner, generator=generator)


def kohya(path: Path, layers: dict[str, tuple], alpha: float = 2.0) -> Path:
    state = {}
    for name, (up, down) in layers.items():
        state |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                  f"{name}.alpha": torch.tensor(alpha)}  # fmt: skip
    return save(path, state)


def update(up: torch.Tensor, down: torch.Tensor, scale: float, shape) -> torch.Tensor:
    return (scale * up.flatten(1) @ down.flatten(1)).reshape(shape)


def test_kohya_lora_applied_to_a_single_file_matches_the_dense_formula(run, tmp_path):
    """Diffusers-named kohya modules (UNet attention, a convolution, the text encoder) change
    exactly their LDM-named tensors: W + s·(α/r)·up·down; every other key is unchanged."""
    model = model_file(tmp_path, "sd1")
    weights = load(model)
    generator = torch.Generator().manual_seed(1)
    layers = {
        KOHYA_Q: factor_pair(generator, weights[SD1_Q].shape[0], weights[SD1_Q].shape[1:]),
        KOHYA_CONV: factor_pair(generator, weights[SD1_CONV].shape[0], weights[SD1_CONV].shape[1:]),
        KOHYA_TE: factor_pair(generator, weights[SD1_TE].shape[0], weights[SD1_TE].shape[1:]),
    }
    lora = kohya(tmp_path / "style.safetensors", layers)
    out = tmp_path / "out.safetensors"
    result = run("lora", "apply", model, f"{lora}:0.8", "-o", out)
    assert result.code == 0, result.err
    assert "kohya LoRA: 3 layers change 3 tensors" in result.err
    merged = load(out)
    for key, name in ((SD1_Q, KOHYA_Q), (SD1_CONV, KOHYA_CONV), (SD1_TE, KOHYA_TE)):
        expected = weights[key] + update(*layers[name], 0.8 * 2.0 / 3, weights[key].shape)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-6)
    changed = [k for k in weights if not torch.equal(merged[k], weights[k])]
    assert sorted(changed) == sorted([SD1_Q, SD1_CONV, SD1_TE])


def test_peft_names_and_block_strengths(run, tmp_path):
    """The same factors under PEFT names (lora_A/lora_B, no alpha: scale 1) give the same
    update; a strength per block scales each key by its block's value."""
    model = model_file(tmp_path, "sd1")
    weights = load(model)
    generator = torch.Generator().manual_seed(2)
    up, down = factor_pair(generator, weights[SD1_Q].shape[0], weights[SD1_Q].shape[1:])
    peft = save(tmp_path / "peft.safetensors", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up,
    })  # fmt: skip
    out = tmp_path / "peft-out.safetensors"
    assert run("lora", "apply", model, f"{peft}:0.5", "-o", out, "-q").code == 0
    expected = weights[SD1_Q] + update(up, down, 0.5, weights[SD1_Q].shape)
    torch.testing.assert_close(load(out)[SD1_Q], expected, atol=1e-6, rtol=1e-6)
    blocks = [0.0] * 26
    blocks[2] = 0.25  # IN01 holds input_blocks.1 (BASE, IN00 .. IN11, M00, OUT00 .. OUT11)
    per_block = tmp_path / "blocks.safetensors"
    values = "[" + ",".join(str(v) for v in blocks) + "]"
    assert run("lora", "apply", model, f"{peft}:{values}", "-o", per_block, "-q").code == 0
    expected = weights[SD1_Q] + update(up, down, 0.25, weights[SD1_Q].shape)
    torch.testing.assert_close(load(per_block)[SD1_Q], expected, atol=1e-6, rtol=1e-6)


def test_fused_tensors_through_the_dialects(run, tmp_path):
    """A PEFT LoRA on Flux's diffusers `to_k` changes the middle third of BFL's fused qkv; a
    kohya LoRA on SDXL's te2 q_proj changes the first third of OpenCLIP's in_proj."""
    flux = model_file(tmp_path, "flux-dev", divisor=64)
    weights = load(flux)
    qkv = UNET + "double_blocks.0.img_attn.qkv.weight"
    third = weights[qkv].shape[0] // 3
    generator = torch.Generator().manual_seed(3)
    up, down = factor_pair(generator, third, weights[qkv].shape[1:])
    lora = save(tmp_path / "flux-lora.safetensors", {
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": down,
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": up,
    })  # fmt: skip
    out = tmp_path / "flux-out.safetensors"
    assert run("lora", "apply", flux, lora, "-o", out, "-q").code == 0
    expected = weights[qkv].clone()
    expected[third : 2 * third] += up @ down
    torch.testing.assert_close(load(out)[qkv], expected, atol=1e-6, rtol=1e-6)

    sdxl = model_file(tmp_path, "sdxl", divisor=64)
    weights = load(sdxl)
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    third = weights[in_proj].shape[0] // 3
    up, down = factor_pair(generator, third, weights[in_proj].shape[1:])
    lora = kohya(
        tmp_path / "te2.safetensors",
        {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (up, down)},
        alpha=3,
    )
    out = tmp_path / "sdxl-out.safetensors"
    assert run("lora", "apply", sdxl, lora, "-o", out, "-q").code == 0
    expected = weights[in_proj].clone()
    expected[:third] += up @ down
    torch.testing.assert_close(load(out)[in_proj], expected, atol=1e-6, rtol=1e-6)


def test_lora_on_a_diffusers_pipeline_folder(run, tmp_path):
    """kohya's diffusers-style names on a pipeline folder: the output is a folder again."""
    folder = tmp_path / "pipe"
    write_pipeline(folder, seed=1)
    from weightmix.io import open_checkpoint

    with open_checkpoint(folder) as checkpoint:
        key = "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
        before = checkpoint.read(checkpoint.tensors[key]).float()
    generator = torch.Generator().manual_seed(4)
    up, down = factor_pair(generator, before.shape[0], before.shape[1:])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    lora = kohya(tmp_path / "pipe-lora.safetensors", {name: (up, down)}, alpha=3)
    out = tmp_path / "out-pipe"
    assert run("lora", "apply", folder, lora, "-o", out, "-q").code == 0
    with open_checkpoint(out) as checkpoint:
        after = checkpoint.read(checkpoint.tensors[key]).float()
    torch.testing.assert_close(after, before + up @ down, atol=1e-6, rtol=1e-6)


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    flat = delta.double().flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_extract_then_apply_reproduces_the_rank_r_truncation(run, tmp_path, fmt):
    base_path = model_file(tmp_path, "sd1", seed=0)
    base = load(base_path)
    tuned = dict(base)
    generator = torch.Generator().manual_seed(5)
    for key in (SD1_Q, SD1_CONV, SD1_TE):  # three layers fine-tuned by a full-rank change
        tuned[key] = base[key] + 0.1 * torch.randn(base[key].shape, generator=generator)
    tuned_path = save(tmp_path / "tuned.safetensors", tuned)
    lora = tmp_path / f"extracted-{fmt}.safetensors"
    result = run("lora", "extract", base_path, tuned_path, "-o", lora, "--rank", "4",
                 "--format", fmt, "--dtype", "fp32")  # fmt: skip
    assert result.code == 0, result.err
    assert "wrote" in result.out and "3 LoRA layers" in result.out
    names = list(load(lora))
    assert (any(".lora_up." in n for n in names) if fmt == "kohya" else
            any(".lora_B." in n for n in names))  # fmt: skip
    applied = tmp_path / f"applied-{fmt}.safetensors"
    assert run("lora", "apply", base_path, lora, "-o", applied, "-q").code == 0
    merged = load(applied)
    for key in (SD1_Q, SD1_CONV, SD1_TE):
        expected = base[key].double() + truncated(tuned[key] - base[key], 4)
        torch.testing.assert_close(merged[key].double(), expected, atol=2e-5, rtol=1e-5)
    full = tmp_path / "full.safetensors"  # full rank: the fine-tune itself
    result = run("lora", "extract", base_path, tuned_path, "-o", full, "--rank", "4096",
                 "--dtype", "fp32")  # fmt: skip
    assert result.code == 0
    assert "rank 4096 is more than 3 layers allow" in result.err
    rebuilt = tmp_path / "rebuilt.safetensors"
    assert run("lora", "apply", base_path, full, "-o", rebuilt, "-q").code == 0
    for key in (SD1_Q, SD1_CONV, SD1_TE):
        torch.testing.assert_close(load(rebuilt)[key], tuned[key], atol=2e-5, rtol=1e-5)


def test_energy_picks_each_layers_rank(run, tmp_path):
    """Δ = 3·e₁f₁ᵀ + 1·e₂f₂ᵀ: 90% of the energy (9 of 10) needs rank 1, 95% rank 2."""
    base_path = model_file(tmp_path, "sd1")
    base = load(base_path)
    rows, cols = base[SD1_Q].shape
    delta = torch.zeros(rows, cols)
    delta[0, 0], delta[1, 1] = 3.0, 1.0
    tuned_path = save(tmp_path / "tuned.safetensors", {**base, SD1_Q: base[SD1_Q] + delta})
    for energy, rank in (("0.9", 1), ("0.95", 2)):
        lora = tmp_path / f"energy{energy}.safetensors"
        assert run("lora", "extract", base_path, tuned_path, "-o", lora, "--energy", energy,
                   "--dtype", "fp32", "-q").code == 0  # fmt: skip
        down = load(lora)[f"{KOHYA_Q}.lora_down.weight"]
        assert down.shape[0] == rank


def test_lora_merge_concatenates_exactly_and_re_svds_to_a_rank(run, tmp_path):
    model = model_file(tmp_path, "sd1")
    weights = load(model)
    generator = torch.Generator().manual_seed(6)
    shape = weights[SD1_Q].shape
    first = factor_pair(generator, shape[0], shape[1:], rank=3)
    second = factor_pair(generator, shape[0], shape[1:], rank=2)
    one = kohya(tmp_path / "one.safetensors", {KOHYA_Q: first}, alpha=3)
    two = kohya(tmp_path / "two.safetensors", {KOHYA_Q: second}, alpha=1)
    total = 0.7 * update(*first, 1.0, shape) + 0.3 * update(*second, 0.5, shape)
    concat = tmp_path / "concat.safetensors"
    assert (
        run("lora", "merge", f"{one}:0.7", f"{two}:0.3", "-o", concat, "--dtype", "fp32").code == 0
    )
    merged = load(concat)
    assert merged[f"{KOHYA_Q}.lora_down.weight"].shape[0] == 5
    torch.testing.assert_close(
        update(merged[f"{KOHYA_Q}.lora_up.weight"], merged[f"{KOHYA_Q}.lora_down.weight"], 1.0,
               shape), total, atol=1e-5, rtol=1e-5)  # fmt: skip
    reduced = tmp_path / "reduced.safetensors"
    assert run("lora", "merge", f"{one}:0.7", f"{two}:0.3", "-o", reduced, "--rank", "2",
               "--dtype", "fp32").code == 0  # fmt: skip
    merged = load(reduced)
    got = update(merged[f"{KOHYA_Q}.lora_up.weight"], merged[f"{KOHYA_Q}.lora_down.weight"],
                 1.0, shape)  # fmt: skip
    torch.testing.assert_close(got.double(), truncated(total, 2), atol=1e-5, rtol=1e-5)


def refused(run, args: list, says: str, out: Path) -> None:
    result = run(*args, "-o", out)
    assert result.code == 2, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], result.err
    assert not out.exists()


def test_bad_loras_are_refused(run, tmp_path):
    model = model_file(tmp_path, "sd1")
    weights = load(model)
    generator = torch.Generator().manual_seed(7)
    out = tmp_path / "o.safetensors"
    shape = weights[SD1_Q].shape
    layers = {KOHYA_Q: factor_pair(generator, shape[0], shape[1:]),
              "lora_unet_no_such_block_attn1_to_q": factor_pair(generator, 4, (4,))}  # fmt: skip
    stray = kohya(tmp_path / "stray.safetensors", layers)
    refused(run, ["lora", "apply", model, stray], "1 LoRA layer of 2 match no layer", out)
    wrong = kohya(tmp_path / "wrong.safetensors", {KOHYA_Q: factor_pair(generator, 7, (5,))})
    refused(run, ["lora", "apply", model, wrong], "the LoRA is for another model", out)
    loha = save(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)})
    refused(run, ["lora", "apply", model, loha], "LoHa adapters are not supported", out)
    args = ["merge", f"M={model}", f"L={stray}", "-m", "add", "--layout", "L"]
    refused(run, args, "model L is a LoRA", out)
    refused(run, ["lora", "merge", f"{wrong}:x"], "strength 'x' is not a number", out)
    refused(run, ["lora", "extract", model, model, "--rank", "0"], "--rank 0", out)
    refused(run, ["lora", "extract", model, model, "-q"], "identical in every layer", out)


def test_extract_covers_fused_openclip_and_folder_bases(run, tmp_path):
    """OpenCLIP's fused attn.in_proj_weight is extracted (as kohya's te2 q/k/v) and rebuilt;
    a diffusers folder as BASE gives a LoRA file too."""
    base_path = model_file(tmp_path, "sdxl", seed=0, divisor=64)
    base = load(base_path)
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    generator = torch.Generator().manual_seed(8)
    tuned = {**base, in_proj: base[in_proj] + 0.1 * torch.randn(base[in_proj].shape,
                                                                  generator=generator)}  # fmt: skip
    tuned_path = save(tmp_path / "sdxl-tuned.safetensors", tuned)
    lora = tmp_path / "te2.safetensors"
    result = run("lora", "extract", base_path, tuned_path, "-o", lora, "--rank", "4096",
                 "--dtype", "fp32", "-q")  # fmt: skip
    assert result.code == 0, result.err
    names = set(load(lora))
    assert {f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj.lora_up.weight"
            for p in "qkv"} <= names  # fmt: skip
    applied = tmp_path / "applied.safetensors"
    assert run("lora", "apply", base_path, lora, "-o", applied, "-q").code == 0
    torch.testing.assert_close(load(applied)[in_proj], tuned[in_proj], atol=1e-5, rtol=1e-5)

    first, second = tmp_path / "p1", tmp_path / "p2"
    write_pipeline(first, seed=1)
    write_pipeline(second, seed=2)
    folder_lora = tmp_path / "from-folders.safetensors"
    result = run("lora", "extract", first, second, "-o", folder_lora, "--rank", "2", "-q")
    assert result.code == 0, result.err
    assert any(k.startswith("lora_unet_down_blocks_0_") for k in load(folder_lora))


def test_peft_alpha_from_metadata_and_output_checks(run, tmp_path):
    """diffusers saves PEFT's lora_alpha in the metadata: scale = lora_alpha / r."""
    import json

    model = model_file(tmp_path, "sd1")
    weights = load(model)
    generator = torch.Generator().manual_seed(9)
    up, down = factor_pair(generator, weights[SD1_Q].shape[0], weights[SD1_Q].shape[1:])
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    metadata = {"lora_adapter_metadata": json.dumps({"r": 3, "lora_alpha": 6})}
    state = {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    peft = save(tmp_path / "meta.safetensors", state, metadata=metadata)
    out = tmp_path / "out.safetensors"
    assert run("lora", "apply", model, peft, "-o", out, "-q").code == 0
    expected = weights[SD1_Q] + update(up, down, 2.0, weights[SD1_Q].shape)
    torch.testing.assert_close(load(out)[SD1_Q], expected, atol=1e-6, rtol=1e-6)
    result = run("lora", "merge", peft, "--overwrite", "-o", tmp_path)
    assert result.code == 2 and "is a folder" in result.err
    refused(
        run, ["lora", "merge", f"{peft}:nan"], "not a finite number", tmp_path / "n.safetensors"
    )
    refused(run, ["lora", "merge", peft], "does not exist", tmp_path / "no" / "m.safetensors")
