"""diffusers and transformers folders: tiny models built from configs here (no download), two
variants each, merged by weightmix, loaded back with from_pretrained and compared with a
reference merged in torch, through a forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from helpers import folder_listing, save
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
)

import weightmix

ALPHA = 0.3


def make_unet():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip


def make_vae():
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )  # fmt: skip


def make_flux():
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def make_clip():
    config = CLIPTextConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModel(config)


def make_image_encoder():
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4, projection_dim=8,
    )  # fmt: skip
    return CLIPVisionModelWithProjection(config)


def make_llama():
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def forward_llama(model):
    return model(input_ids=torch.tensor([[1, 5, 7, 9, 3]])).logits


def forward_unet(model):
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    return model(sample, 10, encoder_hidden_states=context).sample


def forward_vae(model):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model(x, sample_posterior=False).sample


def forward_flux(model):
    g = torch.Generator().manual_seed(0)
    return model(
        hidden_states=torch.randn(1, 6, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
        pooled_projections=torch.randn(1, 8, generator=g),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(6, 3), txt_ids=torch.zeros(3, 3),
        guidance=torch.tensor([3.5]),
    ).sample  # fmt: skip


def forward_clip(model):
    return model(input_ids=torch.tensor([[0, 5, 7, 9, 1]])).last_hidden_state


MODELS = {
    "unet": (make_unet, UNet2DConditionModel, forward_unet),
    "vae": (make_vae, AutoencoderKL, forward_vae),
    "flux": (make_flux, FluxTransformer2DModel, forward_flux),
    "clip": (make_clip, CLIPTextModel, forward_clip),
    "llama": (make_llama, LlamaForCausalLM, forward_llama),  # an LLM folder
}


def variants(make, seeds=(1, 2)):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(make().eval())
    return models


def reference(make, a, b):
    """The merge done directly in torch: (1 − α)·A + α·B for every float tensor."""
    model = make().eval()
    sa, sb = a.state_dict(), b.state_dict()
    merged = {
        k: (1 - ALPHA) * sa[k] + ALPHA * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa
    }
    model.load_state_dict(merged)
    return model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("storage", ["safetensors", "sharded", "bin"])
def test_component_folders_merge_and_load(run, tmp_path, name, storage):
    make, cls, forward = MODELS[name]
    a, b = variants(make)
    options = {
        "safetensors": {},
        "sharded": {"max_shard_size": "20KB"},
        "bin": {"safe_serialization": False},
    }[storage]
    for model, folder in ((a, "A"), (b, "B")):
        model.save_pretrained(tmp_path / folder, **options)
    out = tmp_path / "merged"
    result = run("merge", tmp_path / "A", tmp_path / "B", "--alpha", ALPHA, "-o", out, "-q")
    assert result.code == 0, result.err
    loaded = cls.from_pretrained(out).eval()
    expected = reference(make, a, b)
    for key, tensor in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(forward(loaded), forward(expected))
    names = folder_listing(out)
    assert "config.json" in names
    assert not any(n.endswith(".bin") for n in names)
    if storage == "sharded":
        assert any(n.endswith(".safetensors.index.json") for n in names)


def write_pipeline(folder, seed):
    """A tiny Stable Diffusion pipeline folder, laid out as save_pretrained lays it out."""
    torch.manual_seed(seed)
    make_unet().save_pretrained(folder / "unet")
    make_vae().save_pretrained(folder / "vae")
    make_clip().save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "PNDMScheduler"}')
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index))


def make_tokenizer(folder):
    """A real CLIP tokenizer over a small vocabulary (letters, ids below make_clip's 100)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.update({letter: len(vocab), f"{letter}</w>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )


@pytest.fixture(scope="module")
def loadable_pipelines(tmp_path_factory):
    """Two tiny Stable Diffusion pipelines that DiffusionPipeline.from_pretrained loads whole:
    a real tokenizer and scheduler, and an image encoder, a component diffusers lets be absent."""
    root = tmp_path_factory.mktemp("pipelines")
    folders = []
    for name, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(seed)
        pipeline = StableDiffusionPipeline(
            unet=make_unet(), vae=make_vae(), text_encoder=make_clip(),
            tokenizer=make_tokenizer(root / "vocabulary"), scheduler=PNDMScheduler(steps_offset=1),
            safety_checker=None, feature_extractor=None, image_encoder=make_image_encoder(),
            requires_safety_checker=False,
        )  # fmt: skip
        pipeline.save_pretrained(root / name)
        folders.append(root / name)
    return folders


@pytest.mark.parametrize(
    "leave_out", [("--drop", "image_encoder/*"), ("--components", "unet,vae,text_encoder")]
)
def test_pipeline_without_a_component_loads_with_it_absent(
    run, tmp_path, loadable_pipelines, leave_out
):
    a, b = loadable_pipelines
    out = tmp_path / "merged"
    result = run("merge", a, b, "--alpha", ALPHA, *leave_out, "-o", out, "-q")
    assert result.code == 0, result.err
    assert "image_encoder" not in folder_listing(out)
    base = json.loads((a / "model_index.json").read_text())
    index = json.loads((out / "model_index.json").read_text())
    assert base["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    expected = {**base, "image_encoder": [None, None]}  # as save_pretrained writes None
    assert list(index.items()) == list(expected.items())  # same fields, in the same order
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipeline, StableDiffusionPipeline) and pipeline.image_encoder is None
    assert pipeline.tokenizer("a b").input_ids == [0, 3, 5, 1]  # a</w> b</w>
    inputs = [DiffusionPipeline.from_pretrained(folder) for folder in (a, b)]
    for name, make in (("unet", make_unet), ("vae", make_vae), ("text_encoder", make_clip)):
        expected = reference(make, *(getattr(p, name) for p in inputs)).state_dict()
        loaded = getattr(pipeline, name).state_dict()
        for key, tensor in expected.items():
            torch.testing.assert_close(loaded[key], tensor, msg=f"{name}/{key}")
    unet = reference(make_unet, inputs[0].unet, inputs[1].unet)
    with torch.no_grad():
        torch.testing.assert_close(forward_unet(pipeline.unet.eval()), forward_unet(unet))


@pytest.mark.parametrize("leave_out", [("--components", "unet"), ("--drop", "vae/*")])
def test_pipeline_that_does_not_load_without_a_component_is_refused(
    run, tmp_path, loadable_pipelines, leave_out
):
    a, b = loadable_pipelines
    # what diffusers itself does with a folder whose vae is marked absent, [null, null]
    absent = tmp_path / "absent"
    shutil.copytree(a, absent)
    shutil.rmtree(absent / "vae")
    index = json.loads((absent / "model_index.json").read_text())
    (absent / "model_index.json").write_text(json.dumps({**index, "vae": [None, None]}))
    with pytest.raises(ValueError, match="expected"):
        DiffusionPipeline.from_pretrained(absent)
    before = folder_listing(tmp_path)
    result = run("merge", a, b, *leave_out, "-o", tmp_path / "merged", "-q")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "leaves vae of" in result.err or "leaves text_encoder, vae of" in result.err
    assert "StableDiffusionPipeline does not load without" in result.err
    assert folder_listing(tmp_path) == before  # nothing written, no partial folder


def test_pipeline_folders_merge_component_by_component(run, tmp_path):
    for folder, seed in (("A", 1), ("B", 2)):
        write_pipeline(tmp_path / folder, seed)
    out = tmp_path / "merged"
    args = ("merge", tmp_path / "A", tmp_path / "B", "--alpha", ALPHA, "--take", "vae/*=A")
    result = run(*args, "-o", out, "--dry-run")
    assert result.code == 0 and "copied from A: taken by rule 1 (vae/*)" in result.out
    recipe = {
        "models": {"A": str(tmp_path / "A"), "B": str(tmp_path / "B")},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"]},
        "rules": [{"component": "vae", "take": "A"}],
        "components": ["unet", "vae", "text_encoder"],
    }
    text = weightmix.dry_run(recipe, tmp_path / "other")
    assert "taken by rule 1 (component vae)" in text
    with pytest.raises(
        weightmix.WeightmixError, match=r"leaves text_encoder of .* without weights"
    ):
        weightmix.dry_run({**recipe, "components": ["unet", "vae"]}, tmp_path / "other")
    assert run(*args, "-o", out, "-q").code == 0
    assert (out / "model_index.json").read_text() == (
        tmp_path / "A" / "model_index.json"
    ).read_text()
    assert (out / "tokenizer" / "vocab.json").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    for subfolder, (make, cls, forward) in (
        ("unet", MODELS["unet"]),
        ("text_encoder", MODELS["clip"]),
        ("vae", MODELS["vae"]),
    ):
        loaded = cls.from_pretrained(out, subfolder=subfolder).eval()
        a = cls.from_pretrained(tmp_path / "A", subfolder=subfolder).eval()
        b = cls.from_pretrained(tmp_path / "B", subfolder=subfolder).eval()
        expected = a if subfolder == "vae" else reference(make, a, b)
        with torch.no_grad():
            torch.testing.assert_close(forward(loaded), forward(expected), msg=subfolder)


def test_folder_errors_and_overwrite(run, tmp_path):
    make_unet().save_pretrained(tmp_path / "A")
    make_unet().save_pretrained(tmp_path / "B")
    single = save(tmp_path / "single.safetensors", {"w": torch.ones(2)})
    write_pipeline(tmp_path / "P", 3)
    out = tmp_path / "merged"

    def error(*args):
        result = run("merge", *args)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        return result.err

    assert "mirrors it: give a folder path" in error(
        tmp_path / "A", tmp_path / "B", "-o", tmp_path / "x.safetensors"
    )
    assert "overlaps input" in error(tmp_path / "A", tmp_path / "B", "-o", tmp_path / "A" / "sub")
    assert "overlaps input" in error(tmp_path / "A", tmp_path / "B", "-o", tmp_path, "--overwrite")
    assert "diffusers pipeline folder" in error(tmp_path / "P", single, "-o", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert "no weights" in error(tmp_path / "A", empty, "-o", out)
    assert not out.exists()
    # an existing output folder is replaced only with --overwrite, and only a model folder
    out.mkdir()
    (out / "thesis.tex").write_text("not a model")
    assert "exists" in error(tmp_path / "A", tmp_path / "B", "-o", out)
    assert "not a model folder" in error(tmp_path / "A", tmp_path / "B", "-o", out, "--overwrite")
    assert (out / "thesis.tex").is_file()
    (out / "config.json").write_text("{}")  # an earlier output
    (out / "old.txt").write_text("old")
    assert run("merge", tmp_path / "A", tmp_path / "B", "-o", out, "--overwrite", "-q").code == 0
    assert (
        not (out / "old.txt").exists() and (out / "diffusion_pytorch_model.safetensors").is_file()
    )


@pytest.mark.parametrize(
    ("name", "field", "value", "says"),
    [
        ("unet", "in_channels", 9, "in_channels is 9 but conv_in.weight has 4"),
        ("vae", "latent_channels", 16, "latent_channels is 16"),
        ("flux", "num_layers", 2, "num_layers is 2 but the weights hold 1 transformer_blocks"),
        ("clip", "hidden_size", 32, "hidden_size is 32"),
        ("clip", "num_hidden_layers", 3, "num_hidden_layers is 3 but the weights hold 2 layers"),
    ],
)
def test_config_that_disagrees_with_the_weights(run, tmp_path, name, field, value, says):
    make = MODELS[name][0]
    for folder, model in zip(("A", "B"), variants(make)):
        model.save_pretrained(tmp_path / folder)
    config_path = tmp_path / "B" / "config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    out = tmp_path / "merged"
    result = run("merge", tmp_path / "A", tmp_path / "B", "-o", out)
    assert result.code == 2, result.err
    assert says in result.err and "does not match the weights" in result.err
    assert str(config_path) in result.err and not out.exists()


def test_diffusers_flux_folders_detected_and_merged_with_the_guidance_example(run, tmp_path):
    """FLUX.1-dev and -schnell as diffusers transformer folders: detected apart, and merged by
    examples/flux-guidance.yaml with the guidance embedder from the dev folder."""
    from weightmix.arch.families import detect
    from weightmix.recipe import load_recipe

    torch.manual_seed(1)
    dev = make_flux().eval()
    torch.manual_seed(2)
    schnell = FluxTransformer2DModel(**{**dict(dev.config), "guidance_embeds": False}).eval()
    dev.save_pretrained(tmp_path / "dev")
    schnell.save_pretrained(tmp_path / "schnell")
    for name, expected in (("dev", "flux-dev"), ("schnell", "flux-schnell")):
        with weightmix.open_checkpoint(tmp_path / name) as ckpt:
            shapes = {k: i.shape for k, i in ckpt.tensors.items()}
        found = detect(shapes)
        assert found.name == expected and found.unfit == []
        assert found.block_of("transformer_blocks.0.attn.to_q.weight") == "D00"
        assert found.block_of("single_transformer_blocks.0.proj_out.weight") == "S00"
    recipe = load_recipe(Path(__file__).parent.parent / "examples" / "flux-guidance.yaml")
    recipe.models = {"krea": str(tmp_path / "dev"), "schnell": str(tmp_path / "schnell")}
    recipe.dtype = None
    saved = tmp_path / "flux.yaml"
    saved.write_text(recipe.to_yaml())
    out = tmp_path / "merged"
    result = run("merge", saved, "-o", out)
    assert result.code == 0, result.err
    merged = FluxTransformer2DModel.from_pretrained(out).state_dict()
    a, b = dev.state_dict(), schnell.state_dict()
    for key, tensor in merged.items():
        expected = a[key] if "guidance_embedder" in key else (a[key] + b[key]) / 2
        torch.testing.assert_close(tensor, expected, msg=key)
