"""Architecture families from key names: detection, the key -> block tables (against rules
written here by hand, and across key dialects), layer kinds, and `weightmix inspect`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from archs import UNET, hand_flux_block, hand_sd_block, shapes_of, tiny_state
from helpers import load, save

import weightmix
from weightmix.arch import architecture_keys
from weightmix.arch.families import Unknown, detect
from weightmix.dialects.flux import flux_links
from weightmix.dialects.stable_diffusion import unet_links

FAMILIES = [
    "sd1",
    "sd2",
    "sdxl",
    "sdxl-refiner",
    "sd3-medium",
    "sd3.5-medium",
    "sd3.5-large",
    "flux-dev",
    "flux-schnell",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_detected_from_its_single_file_keys(family):
    found = detect(shapes_of(family))
    assert found.name == family
    assert found.unfit == []


def test_block_counts_follow_the_keys():
    assert len(detect(shapes_of("sd1")).blocks) == 26
    assert len(detect(shapes_of("sdxl")).blocks) == 20
    assert len(detect(shapes_of("flux-dev")).blocks) == 61  # CLIP, T5, IN, D00-D18, S00-S37, OUT
    assert detect(shapes_of("sd3-medium")).blocks[-2:] == ("J23", "OUT")
    large = detect(shapes_of("sd3.5-large")).blocks
    assert len(large) == 2 + 38 + 1 and large[2] == "J00" and large[-2] == "J37"


@pytest.mark.parametrize(
    ("data", "family", "rule"),
    [
        ("sd1-ldm", "sd1", lambda k: hand_sd_block(k, "OUT11")),
        ("sdxl-sgm", "sdxl", lambda k: hand_sd_block(k, "OUT08")),
        ("flux-flux", "flux-dev", hand_flux_block),
    ],
)
def test_every_key_of_the_layouts_gets_the_block_the_rule_says(data, family, rule):
    keys = [s.key for s in architecture_keys(data, optional=True)]
    found = detect({s.key: s.shape for s in architecture_keys(data, optional=True)})
    assert found.name == family
    wrong = [(k, found.block_of(k), rule(k)) for k in keys if found.block_of(k) != rule(k)]
    assert wrong == []
    assert set(found.blocks) == {rule(k) for k in keys}  # every block holds keys


@pytest.mark.parametrize(
    ("data", "links", "component"),
    [
        ("sd1-ldm", unet_links, "unet"),
        ("sdxl-sgm", unet_links, "unet"),
        ("flux-flux", flux_links, "transformer"),
    ],
)
def test_diffusers_names_get_the_blocks_of_the_same_tensors(data, links, component):
    """Through the key dialects: a diffusers key is in the block of the single-file tensor it
    is made of, whether in a pipeline ('unet/...') or a component folder."""
    single = {s.key: s.shape for s in architecture_keys(data)}
    pairs = links(set(single), UNET, f"{component}/")
    assert len(pairs) > 100
    pipeline = {link.diffusers: (1,) for link in pairs}
    folder = {link.diffusers.split("/", 1)[1]: (1,) for link in pairs}
    by_single, by_pipeline, by_folder = detect(single), detect(pipeline), detect(folder)
    assert (
        by_single.name.split("-")[0]
        == by_pipeline.name.split("-")[0]
        == by_folder.name.split("-")[0]
    )
    for link in pairs:
        expected = by_single.block_of(link.single)
        assert by_pipeline.block_of(link.diffusers) == expected, link
        assert by_folder.block_of(link.diffusers.split("/", 1)[1]) == expected, link


KINDS = {  # key -> the layer kinds it is, by hand
    UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": {"self_attention"},
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": {"cross_attention"},
    UNET + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": {"feed_forward"},
    UNET + "input_blocks.1.1.transformer_blocks.0.norm2.weight": {"norm"},
    UNET + "input_blocks.1.1.norm.weight": {"norm"},
    UNET + "input_blocks.1.1.proj_in.weight": set(),
    UNET + "input_blocks.1.0.in_layers.0.weight": {"norm"},
    UNET + "input_blocks.1.0.in_layers.2.weight": {"conv"},
    UNET + "input_blocks.1.0.emb_layers.1.weight": {"time_embedding"},
    UNET + "input_blocks.3.0.op.weight": {"conv"},
    UNET + "input_blocks.0.0.weight": {"conv"},
    UNET + "time_embed.0.weight": {"time_embedding"},
    UNET + "out.0.weight": {"norm"},
    UNET + "out.2.weight": {"conv"},
    UNET + "output_blocks.2.1.conv.weight": {"conv"},
    UNET + "output_blocks.0.0.skip_connection.weight": {"conv"},
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": {
        "self_attention"
    },
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": {"feed_forward"},
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": {"norm"},
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": {"embedding"},
    "first_stage_model.encoder.mid.attn_1.q.weight": {"self_attention"},
    "first_stage_model.encoder.mid.attn_1.norm.weight": {"norm"},
    "first_stage_model.encoder.down.0.block.0.conv1.weight": {"conv"},
    "first_stage_model.quant_conv.weight": {"conv"},
}
FLUX_KINDS = {
    UNET + "double_blocks.0.img_attn.qkv.weight": {"self_attention"},
    UNET + "double_blocks.0.txt_attn.proj.weight": {"self_attention"},
    UNET + "double_blocks.0.img_attn.norm.query_norm.scale": {"norm"},
    UNET + "double_blocks.0.img_mlp.0.weight": {"feed_forward"},
    UNET + "double_blocks.0.img_mod.lin.weight": {"norm"},
    UNET + "single_blocks.0.linear1.weight": {"self_attention", "feed_forward"},
    UNET + "single_blocks.0.modulation.lin.weight": {"norm"},
    UNET + "img_in.weight": {"embedding"},
    UNET + "guidance_in.in_layer.weight": {"time_embedding"},
    UNET + "final_layer.linear.weight": set(),
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": {
        "self_attention"
    },
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight": {
        "feed_forward"
    },
    "text_encoders.t5xxl.transformer.shared.weight": {"embedding"},
}


@pytest.mark.parametrize(("family", "kinds"), [("sd1", KINDS), ("flux-dev", FLUX_KINDS)])
def test_layer_kinds_of_keys_written_out_by_hand(family, kinds):
    found = detect(shapes_of(family))
    for key, expected in kinds.items():
        assert set(found.layers_of(key)) == expected, key


def test_each_layer_kind_picks_exactly_the_keys_named(run, tmp_path):
    """A take rule per kind, on one SD1 block: the keys that come from B are the hand list."""
    shapes = {k: v for k, v in shapes_of("sd1").items() if k.startswith(UNET + "input_blocks.1.")}
    a, b = tiny_state(shapes, 1), tiny_state(shapes, 2)
    paths = [save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)]
    hand = {
        "cross_attention": {k for k in shapes if ".attn2." in k},
        "self_attention": {k for k in shapes if ".attn1." in k},
        "attention": {k for k in shapes if re.search(r"\.attn[12]\.", k)},
        "feed_forward": {k for k in shapes if ".ff.net." in k},
        "time_embedding": {k for k in shapes if ".emb_layers." in k},
        "conv": {k for k in shapes if re.search(r"in_layers\.2|out_layers\.3", k)},
        "norm": {k for k in shapes if re.search(r"norm[123]?\.|layers\.0\.", k)},
    }
    for kind, expected in hand.items():
        out = tmp_path / f"{kind}.safetensors"
        recipe = {
            "models": {"A": str(paths[0]), "B": str(paths[1])},
            "merge": "A",
            "rules": [{"layer": kind, "take": "B"}],
        }
        weightmix.merge(recipe, out)
        merged = load(out)
        from_b = {k for k in merged if torch.equal(merged[k], b[k])}
        assert from_b == expected, kind
        assert all(torch.equal(merged[k], a[k]) for k in merged if k not in expected)


def test_kohya_files_pipelines_and_component_folders_are_detected():
    kohya = {f"unet.{k}": (1,) for k in ("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight")}
    kohya |= {f"unet.down_blocks.{i}.resnets.0.conv1.weight": (1,) for i in range(3)}
    kohya |= {
        "unet.add_embedding.linear_1.weight": (1,),
        "te1.text_model.final_layer_norm.weight": (1,),
    }
    assert detect(kohya).name == "sdxl"
    llm = {
        "model.embed_tokens.weight": (8, 4),
        "model.layers.0.self_attn.q_proj.weight": (4, 4),
        "model.layers.1.mlp.up_proj.weight": (8, 4),
        "model.norm.weight": (4,),
        "lm_head.weight": (8, 4),
    }
    found = detect(llm)
    assert found.name == "llama" and found.blocks == ("EMBED", "L00", "L01", "OUT")
    assert [found.block_of(k) for k in llm] == ["EMBED", "L00", "L01", "OUT", "OUT"]


def test_unknown_names_the_nearest_candidates_and_the_keys_that_did_not_fit():
    shapes = {k: v for k, v in shapes_of("sd1").items() if not k.startswith(UNET)}
    shapes |= {"adapter.down.0.weight": (4,), "adapter.up.0.weight": (4,)}
    found = detect(shapes)
    assert isinstance(found, Unknown)
    assert found.candidates[0][0] in ("sd1", "sd2")
    shapes = {"my.weird.key": (2,), "another.one": (3,)}
    found = detect(shapes)
    assert isinstance(found, Unknown) and set(found.unfit) == set(shapes)


def test_inspect_names_architecture_components_and_blocks(run, tmp_path):
    path = save(tmp_path / "x.safetensors", tiny_state(shapes_of("sdxl"), 1))
    result = run("inspect", path)
    assert result.code == 0, result.err
    assert "architecture: sdxl (Stable Diffusion XL base), 20 blocks" in result.out
    assert "components: " in result.out and "clip_g" in result.out
    counts = detect(shapes_of("sdxl"))
    expected = sum(1 for k in shapes_of("sdxl") if counts.block_of(k) == "IN04")
    assert f"IN04 {expected}," in result.out
    odd = save(tmp_path / "odd.safetensors", {"my.weird.key": torch.ones(2)})
    result = run("inspect", odd)
    assert result.code == 0 and "architecture: unknown" in result.out
    assert "my.weird.key" in result.out


def test_unknown_architecture_still_merges_key_by_key(run, tmp_path):
    a = save(tmp_path / "a.safetensors", {"my.weird.key": torch.zeros(2)})
    b = save(tmp_path / "b.safetensors", {"my.weird.key": torch.ones(2)})
    out = tmp_path / "out.safetensors"
    assert run("merge", a, b, "--alpha", "0.25", "-o", out, "-q").code == 0
    assert torch.equal(load(out)["my.weird.key"], torch.full((2,), 0.25))


DATA = Path(__file__).parent / "data"  # manifests of real files in kohya's and diffusers' names


@pytest.mark.parametrize(
    ("manifest", "data", "family"),
    [
        ("sd1-kohya", "sd1-ldm", "sd1"),
        ("sdxl-kohya", "sdxl-sgm", "sdxl"),
        ("sdxl-diffusers_unet_only", "sdxl-sgm", "sdxl"),
    ],
)
def test_real_files_in_other_names_have_the_same_blocks(manifest, data, family):
    """Each block holds as many UNet tensors in kohya's or diffusers' names as in LDM/SGM's."""
    spec = json.loads((DATA / f"{manifest}.json").read_text())
    shapes = {k: tuple(v["shape"]) for part in spec["components"].values() for k, v in part.items()}
    found = detect(shapes)
    assert found.name == family and found.unfit == []
    reference = detect({s.key: s.shape for s in architecture_keys(data)})

    def unet_counts(architecture, keys):
        return Counter(
            architecture.block_of(k) for k in keys if architecture.component_of(k) == "diffuser"
        )

    assert unet_counts(found, shapes) == unet_counts(reference, reference.classes)


def test_layer_kinds_agree_across_names_for_sd3_embedders_and_t5():
    sd3 = detect(shapes_of("sd3-medium"))
    assert sd3.layers_of(UNET + "t_embedder.mlp.0.weight") == ("time_embedding",)
    assert sd3.layers_of(UNET + "y_embedder.mlp.2.weight") == ("time_embedding",)
    assert sd3.layers_of(UNET + "joint_blocks.0.x_block.mlp.fc1.weight") == ("feed_forward",)
    pipeline = {
        "transformer/transformer_blocks.0.attn.to_q.weight": (4, 4),
        "transformer/single_transformer_blocks.0.attn.to_q.weight": (4, 4),
        "transformer/time_text_embed.guidance_embedder.linear_1.weight": (4, 4),
        "text_encoder_2/shared.weight": (8, 4),
        "text_encoder_2/encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4),
    }
    found = detect(pipeline)
    assert found.name == "flux-dev"
    assert found.layers_of("text_encoder_2/shared.weight") == ("embedding",)
    assert found.block_of("text_encoder_2/shared.weight") == "T5"


def test_llama_base_models_without_a_head_are_llama(run, tmp_path):
    bare = {
        "embed_tokens.weight": (8, 4),
        "layers.0.self_attn.q_proj.weight": (4, 4),
        "layers.0.mlp.up_proj.weight": (8, 4),
        "layers.0.input_layernorm.weight": (4,),
        "norm.weight": (4,),
    }
    found = detect(bare)
    assert found.name == "llama" and found.unfit == []
    assert [found.block_of(k) for k in bare] == ["EMBED", "L00", "L00", "L00", "OUT"]
    state = {k: torch.ones(s) for k, s in bare.items()}
    paths = [save(tmp_path / f"{n}.safetensors", state) for n in "ab"]
    result = run("merge", *paths, "--components", "model", "--dry-run")
    assert result.code == 0, result.err
    result = run("merge", *paths, "--components", "unet", "--dry-run")
    assert result.code == 2 and "'unet' is not a component of llama" in result.err
