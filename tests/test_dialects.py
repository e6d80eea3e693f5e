"""Key dialects against diffusers' own single-file converters (an independent reference): our
diffusers -> single-file conversion, read back by diffusers' converter, must give the original
diffusers tensors; and single-file -> diffusers -> single-file must be the identity."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as reference
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from weightmix.arch import architecture_keys
from weightmix.dialects import layout_links
from weightmix.dialects.links import converted, to_diffusers, to_single
from weightmix.io.pickled import PickleCheckpoint

warnings.filterwarnings("ignore", category=FutureWarning)


def in_memory(state: dict[str, torch.Tensor]) -> PickleCheckpoint:
    return PickleCheckpoint(Path("memory"), state, [])


def materialize(checkpoint) -> dict[str, torch.Tensor]:
    return {key: checkpoint.read(info) for key, info in checkpoint.tensors.items()}


def pipeline_state(**components) -> dict[str, torch.Tensor]:
    return {
        f"{name}/{k}": v
        for name, model in components.items()
        for k, v in model.state_dict().items()
    }


def single_keys(architecture: str, *components: str) -> list[str]:
    return [s.key for s in architecture_keys(architecture, components, optional=True)]


def convert_both_ways(pipeline: dict, keys: list[str]) -> tuple[dict, dict]:
    links = layout_links(keys, pipeline)
    single = materialize(
        converted(in_memory(pipeline), to_single(links, in_memory(pipeline).tensors))
    )
    back = materialize(converted(in_memory(single), to_diffusers(links, in_memory(single).tensors)))
    return single, back


def assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key].reshape(tensor.shape), tensor), key


def test_sd1_unet_vae_and_clip_match_diffusers_converters():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD1.5's structure, tiny widths
        block_out_channels=(8, 16, 32, 32), layers_per_block=2, cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4, sample_size=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4,
    )  # fmt: skip
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
        num_attention_heads=2, max_position_embeddings=77,
    ))  # fmt: skip
    pipeline = pipeline_state(unet=unet, vae=vae, text_encoder=clip)
    keys = single_keys("sd1-ldm", "diffuser", "vae", "clip_l")
    single, back = convert_both_ways(pipeline, keys)
    assert set(single) == {k for k in keys if not k.endswith("position_ids")}
    assert_same(reference.convert_ldm_unet_checkpoint(single, unet.config), unet.state_dict())
    assert_same(reference.convert_ldm_vae_checkpoint(single, vae.config), vae.state_dict())
    clip_reference = reference.convert_ldm_clip_checkpoint(single)
    assert_same(
        {k.removeprefix("text_model."): v for k, v in clip_reference.items()}, clip.state_dict()
    )
    assert_same(back, pipeline)


def test_sdxl_unet_and_open_clip_match_diffusers_converters():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SDXL's structure, tiny widths
        block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=16,
        attention_head_dim=(1, 2, 4), norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=40, sample_size=8,
    )  # fmt: skip
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
    ))  # fmt: skip
    pipeline = pipeline_state(unet=unet, text_encoder_2=clip_g)
    single, back = convert_both_ways(pipeline, single_keys("sdxl-sgm", "diffuser", "clip_g"))
    assert_same(reference.convert_ldm_unet_checkpoint(single, unet.config), unet.state_dict())
    converted_g = reference.convert_open_clip_checkpoint(
        CLIPTextModelWithProjection(clip_g.config), single, prefix="conditioner.embedders.1.model."
    )
    assert_same(converted_g, clip_g.state_dict())
    assert_same(back, pipeline)


def test_flux_names_and_shapes_match_diffusers_converter_at_full_size():
    specs = architecture_keys("flux-flux", ("diffuser",), optional=True)
    meta = {s.key: torch.empty(s.shape, dtype=torch.bfloat16, device="meta") for s in specs}
    ours = to_diffusers(layout_links(meta, []), in_memory(meta).tensors)
    theirs = reference.convert_flux_transformer_checkpoint_to_diffusers(dict(meta))
    assert {t.key.removeprefix("transformer/"): t.shape for t in ours} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }


def test_flux_fused_tensors_split_and_swap_as_hand_computed():
    h = 4  # hidden size
    prefix = "model.diffusion_model."
    qkv = torch.arange(3 * h * 2, dtype=torch.float32).reshape(3 * h, 2)
    linear1 = torch.arange(7 * h, dtype=torch.float32)  # bias: q, k, v, then the 4h MLP input
    modulation = torch.arange(2 * h, dtype=torch.float32)  # BFL: shift then scale
    single = {
        prefix + "double_blocks.0.img_attn.qkv.weight": qkv,
        prefix + "single_blocks.0.linear1.bias": linear1,
        prefix + "final_layer.adaLN_modulation.1.bias": modulation,
        **{s.key: torch.zeros(1) for s in architecture_keys("flux-flux", ("vae",))},
    }
    links = layout_links(single, [])
    out = materialize(converted(in_memory(single), to_diffusers(links, in_memory(single).tensors)))
    block = "transformer/transformer_blocks.0.attn."
    assert torch.equal(out[block + "to_q.weight"], qkv[:h])
    assert torch.equal(out[block + "to_k.weight"], qkv[h : 2 * h])
    assert torch.equal(out[block + "to_v.weight"], qkv[2 * h :])
    fused = "transformer/single_transformer_blocks.0."
    assert torch.equal(out[fused + "attn.to_v.bias"], linear1[2 * h : 3 * h])
    assert torch.equal(out[fused + "proj_mlp.bias"], linear1[3 * h :])
    assert torch.equal(
        out["transformer/norm_out.linear.bias"], torch.cat([modulation[h:], modulation[:h]])
    )
    again = materialize(converted(in_memory(out), to_single(links, in_memory(out).tensors)))
    for key in (k for k in single if k.startswith(prefix)):
        assert torch.equal(again[key], single[key]), key


def test_streamed_reads_of_converted_tensors_match_whole_reads():
    h = 6
    key = "model.diffusion_model.final_layer.adaLN_modulation.1.weight"
    state = {
        key: torch.randn(2 * h, 3),
        **{s.key: torch.zeros(1) for s in architecture_keys("flux-flux", ("vae",))},
    }
    links = layout_links(state, [])
    view = converted(in_memory(state), to_diffusers(links, in_memory(state).tensors))
    info = view.tensors["transformer/norm_out.linear.weight"]
    whole = view.read(info)
    for start, length in ((0, 5), (7, 30), (30, 42), (71, 1)):  # bytes, across the halves
        out = bytearray(length)
        view.read_range(info, start, out)
        assert (
            bytes(out)
            == whole.view(torch.uint8).reshape(-1)[start : start + length].numpy().tobytes()
        )


def sd1_pipeline(folder: Path, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A tiny pipeline folder with SD1.5's structure; returns each component's state dict."""
    import json

    torch.manual_seed(seed)
    models = {
        "unet": UNet2DConditionModel(
            block_out_channels=(8, 16, 32, 32), layers_per_block=2, cross_attention_dim=16,
            attention_head_dim=2, norm_num_groups=4, sample_size=8,
        ),
        "vae": AutoencoderKL(
            block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4,
        ),
        "text_encoder": CLIPTextModel(CLIPTextConfig(
            vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
            num_attention_heads=2, max_position_embeddings=77,
        )),
    }  # fmt: skip
    for name, model in models.items():
        model.save_pretrained(folder / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "PNDMScheduler"}')
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"]}
    index.update({name: ["diffusers", type(model).__name__] for name, model in models.items()})
    (folder / "model_index.json").write_text(json.dumps(index))
    return {name: model.state_dict() for name, model in models.items()}


def test_pipelines_and_single_files_merge_and_convert_both_ways(run, tmp_path):
    from helpers import load

    a = sd1_pipeline(tmp_path / "A", 1)
    b = sd1_pipeline(tmp_path / "B", 2)
    unet_config = UNet2DConditionModel.load_config(tmp_path / "A" / "unet")
    single_b = tmp_path / "b.safetensors"
    result = run("convert", tmp_path / "B", single_b, "--single-file", "-q")
    assert result.code == 0, result.err
    as_ldm = load(single_b)
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
        for k in as_ldm
    )
    assert_same(reference.convert_ldm_unet_checkpoint(as_ldm, unet_config), b["unet"])

    # a pipeline merged with a single file: the output mirrors the pipeline
    merged = tmp_path / "merged"
    result = run("merge", tmp_path / "A", single_b, "--alpha", 0.3, "-o", merged)
    assert result.code == 0, result.err
    assert "read with the key names of model A" in result.err
    unet = UNet2DConditionModel.from_pretrained(merged, subfolder="unet").state_dict()
    expected = {k: 0.7 * v + 0.3 * b["unet"][k] for k, v in a["unet"].items()}
    for key, tensor in expected.items():
        torch.testing.assert_close(unet[key], tensor, msg=key)

    # the single file first: the output is a single file with single-file names
    merged_file = tmp_path / "merged.safetensors"
    assert run("merge", single_b, tmp_path / "A", "--alpha", 0.7, "-o", merged_file, "-q").code == 0
    unet_again = reference.convert_ldm_unet_checkpoint(load(merged_file), unet_config)
    for key, tensor in expected.items():
        torch.testing.assert_close(unet_again[key], tensor, msg=key)

    # the layout model need not come first; its components are the ones named (the rest would
    # be left out, which a StableDiffusionPipeline does not load without: refused)
    unet_only = tmp_path / "unet_only"
    args = ("merge", single_b, tmp_path / "A", "--layout", "B", "--components", "unet")
    result = run(*args, "-o", unet_only, "-q")
    assert result.code == 2 and "leaves text_encoder, vae of" in result.err
    assert not unet_only.exists()

    # and back to a folder like A, loadable by diffusers
    folder_b = tmp_path / "b_folder"
    assert run("convert", single_b, folder_b, "--like", tmp_path / "A", "-q").code == 0
    assert (folder_b / "scheduler" / "scheduler_config.json").is_file()
    for name, cls in (
        ("unet", UNet2DConditionModel),
        ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel),
    ):
        loaded = cls.from_pretrained(folder_b, subfolder=name).state_dict()
        assert_same({k: loaded[k] for k in b[name]}, b[name])


def test_diffusers_from_single_file_loads_our_single_file(run, tmp_path, monkeypatch):
    """diffusers' own single-file loader, given the local config, reads what we wrote."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    states = sd1_pipeline(tmp_path / "P", 4)
    single = tmp_path / "single.safetensors"
    assert run("convert", tmp_path / "P", single, "--single-file", "-q").code == 0
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        model = cls.from_single_file(
            str(single), config=str(tmp_path / "P"), subfolder=name, local_files_only=True
        )
        assert_same(model.state_dict(), states[name])


def test_convert_like_overwrites_an_earlier_folder_with_the_new_contents(run, tmp_path):
    states = {name: sd1_pipeline(tmp_path / name, seed) for name, seed in (("A", 5), ("B", 6))}
    singles = {}
    for name in "AB":
        singles[name] = tmp_path / f"{name}.safetensors"
        assert run("convert", tmp_path / name, singles[name], "--single-file", "-q").code == 0
    out = tmp_path / "out"
    (out / "stale").mkdir(parents=True)
    (out / "config.json").write_text("{}")  # an earlier model folder at the destination
    for name in "BA":  # B first, then A over it: the folder holds A's tensors only
        result = run("convert", singles[name], out, "--like", tmp_path / "A", "--overwrite", "-q")
        assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (tmp_path / "A").iterdir()
    )
    for component, cls in (
        ("unet", UNet2DConditionModel),
        ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel),
    ):
        loaded = cls.from_pretrained(out, subfolder=component).state_dict()
        assert_same({k: loaded[k] for k in states["A"][component]}, states["A"][component])
