"""Parameters per block (supermerger's MBW) and block/layer selectors, end to end: a model of
zeros merged with a model of ones shows the value each key got, checked against the block a
hand-written rule gives the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from archs import UNET, hand_flux_block, hand_sd_block, run_example, shapes_of, tiny_state
from helpers import load, save

import weightmix
from weightmix.blocks import presets
from weightmix.recipe import load_recipe

EXAMPLES = Path(__file__).parent.parent / "examples"
SD1_BLOCKS = [
    "BASE",
    *(f"IN{i:02d}" for i in range(12)),
    "M00",
    *(f"OUT{i:02d}" for i in range(12)),
]
SDXL_BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]


def zeros_and_ones(tmp_path: Path, family: str) -> tuple[Path, Path, dict]:
    shapes = {k: v for k, v in shapes_of(family).items() if not k.startswith("model_ema.")}
    state = tiny_state(shapes, 0)
    zeros = save(tmp_path / "zeros.safetensors", {k: torch.zeros_like(v) for k, v in state.items()})
    ones = save(tmp_path / "ones.safetensors", {k: torch.ones_like(v) for k, v in state.items()})
    return zeros, ones, shapes


def alpha_of_each_key(merged: dict[str, torch.Tensor]) -> dict[str, float]:
    """The merged value of each key (zeros merged with ones: every element is alpha)."""
    values = {}
    for key, tensor in merged.items():
        unique = tensor.float().unique()
        assert len(unique) == 1, key
        values[key] = float(unique[0])
    return values


def merge_zeros_ones(run, tmp_path, family, *flags):
    zeros, ones, _ = zeros_and_ones(tmp_path, family)
    out = tmp_path / "out.safetensors"
    result = run("merge", zeros, ones, *flags, "-o", out, "--overwrite")
    assert result.code == 0, result.err
    return alpha_of_each_key(load(out)), result


def test_each_sd1_block_gets_its_own_value(run, tmp_path):
    alphas = [round(0.01 + i / 40, 6) for i in range(26)]
    got, _ = merge_zeros_ones(run, tmp_path, "sd1", "--alpha", ",".join(map(str, alphas)))
    for key, value in got.items():
        expected = alphas[SD1_BLOCKS.index(hand_sd_block(key, "OUT11"))]
        assert value == pytest.approx(expected, abs=1e-6), key


def test_each_flux_block_gets_its_own_value(run, tmp_path):
    blocks = [
        "CLIP",
        "T5",
        "IN",
        *(f"D{i:02d}" for i in range(19)),
        *(f"S{i:02d}" for i in range(38)),
        "OUT",
    ]
    alphas = [i / 64 for i in range(61)]
    got, _ = merge_zeros_ones(run, tmp_path, "flux-dev", "--alpha", ",".join(map(str, alphas)))
    for key, value in got.items():
        assert value == pytest.approx(alphas[blocks.index(hand_flux_block(key))]), key


def test_all_zero_block_weights_give_a_bit_for_bit(run, tmp_path):
    shapes = {k: v for k, v in shapes_of("sd1").items() if not k.startswith("model_ema.")}
    a = {k: v.half() for k, v in tiny_state(shapes, 1).items()}
    b = {k: v.half() for k, v in tiny_state(shapes, 2).items()}
    paths = [save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)]
    for form in (",".join(["0"] * 26), "ALL_A", "{gradient: [0, 0]}", "default=0"):
        out = tmp_path / "out.safetensors"
        assert run("merge", *paths, "--alpha", form, "-o", out, "--overwrite", "-q").code == 0
        merged = load(out)
        for key, tensor in a.items():
            assert torch.equal(merged[key].view(torch.int16), tensor.view(torch.int16)), (form, key)


def test_an_sd1_list_on_sdxl_is_converted_as_supermerger_does(run, tmp_path):
    alphas = [i / 32 for i in range(26)]
    got, result = merge_zeros_ones(run, tmp_path, "sdxl", "--alpha", ",".join(map(str, alphas)))
    assert "has SD1's 26 values; for sdxl kept BASE, IN00-IN08, M00 and OUT00-OUT08" in result.err
    kept = [*alphas[:10], alphas[13], *alphas[14:23]]  # BASE, IN00-IN08, M00, OUT00-OUT08
    for key, value in got.items():
        assert value == pytest.approx(kept[SDXL_BLOCKS.index(hand_sd_block(key, "OUT08"))]), key


@pytest.mark.parametrize("points", [[0, 1], [1, 0, 1], [0.2, 0.9]])
def test_gradients_interpolate_linearly_over_the_blocks(run, tmp_path, points):
    got, _ = merge_zeros_ones(run, tmp_path, "sd1", "--alpha", yaml.safe_dump({"gradient": points}))
    for key, value in got.items():
        position = SD1_BLOCKS.index(hand_sd_block(key, "OUT11")) / 25 * (len(points) - 1)
        left = min(int(position), len(points) - 2)
        expected = points[left] + (points[left + 1] - points[left]) * (position - left)
        assert value == pytest.approx(expected, abs=1e-6), key


@pytest.mark.parametrize("preset", ["GRAD_V", "WRAP08", "SMOOTHSTEP"])
def test_presets_give_their_values(run, tmp_path, preset):
    got, _ = merge_zeros_ones(run, tmp_path, "sd1", "--alpha", preset)
    values = presets()[preset]
    for key, value in got.items():
        assert value == pytest.approx(values[SD1_BLOCKS.index(hand_sd_block(key, "OUT11"))]), key
    assert presets()["GRAD_V"][1:14] == pytest.approx([1 - i / 12 for i in range(13)])


def test_named_blocks_ranges_groups_and_default(run, tmp_path):
    got, _ = merge_zeros_ones(
        run, tmp_path, "sd1", "--alpha", "IN00-IN05=0.2,M00=1,OUT=0.75,default=0.5"
    )
    for key, value in got.items():
        block = hand_sd_block(key, "OUT11")
        if block.startswith("IN") and int(block[2:]) <= 5:
            expected = 0.2
        elif block == "M00":
            expected = 1.0
        elif block.startswith("OUT"):
            expected = 0.75
        else:
            expected = 0.5
        assert value == pytest.approx(expected), key


def test_recipe_forms_and_rule_params_per_block(run, tmp_path):
    zeros, ones, _ = zeros_and_ones(tmp_path, "sd1")
    recipe = {
        "models": {"A": str(zeros), "B": str(ones)},
        "merge": {
            "method": "weighted_sum",
            "inputs": ["A", "B"],
            "alpha": {"IN": 0.25, "default": 0},
        },
        "rules": [{"keys": "*attn2*", "params": {"alpha": {"gradient": [0, 1]}}}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out.safetensors"
    result = run("merge", path, "-o", out, "--dry-run")
    assert result.code == 0, result.err
    assert "per block: merge.alpha = {'IN': 0.25, 'default': 0}" in result.out
    assert "IN03 0.25" in result.out and "OUT11 1" in result.out
    assert run("merge", path, "-o", out, "-q").code == 0
    for key, value in alpha_of_each_key(load(out)).items():
        index = SD1_BLOCKS.index(hand_sd_block(key, "OUT11"))
        if ".attn2." in key:
            expected = index / 25
        else:
            expected = 0.25 if SD1_BLOCKS[index].startswith("IN") else 0.0
        assert value == pytest.approx(expected), key


@pytest.mark.parametrize(
    ("family", "alpha", "says"),
    [
        (
            "flux-dev",
            "GRAD_V",
            "preset GRAD_V has 26 values, but flux-dev takes 61 (CLIP, T5, IN, D00-D18, S00-S37",
        ),
        ("sd1", "0,1", "a block list has 2 values, but sd1 takes 26"),
        (
            "sdxl",
            "0,1",
            "sdxl takes 20 (BASE, IN00-IN08, M00, OUT00-OUT08) or 26 (an SD1 list, converted)",
        ),
        ("sd1", "IN13=1,default=0", "'IN13' is not a block of sd1 (did you mean 'IN11'?)"),
        ("sd1", "OUT05-OUT03=1,default=0", "block range OUT05-OUT03 runs backwards"),
        ("sd1", "GRAD_W", "is not a number, a block list or a preset (did you mean 'GRAD_V'?)"),
        ("sd1", "{gradient: [1]}", "a gradient needs at least two points"),
        ("sd1", "IN00=1", "have no value: add default=VALUE"),
        ("sd1", "IN00=2,default=0", "Input should be less than or equal to 1"),
    ],
)
def test_bad_block_values_are_one_line(run, tmp_path, family, alpha, says):
    zeros, ones, _ = zeros_and_ones(tmp_path, family)
    out = tmp_path / "out.safetensors"
    result = run("merge", zeros, ones, "--alpha", alpha, "-o", out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert says in result.err
    assert not out.exists()


def test_block_values_and_selectors_on_an_unknown_architecture_are_refused(run, tmp_path):
    a = save(tmp_path / "a.safetensors", {"my.weird.key": torch.zeros(2)})
    b = save(tmp_path / "b.safetensors", {"my.weird.key": torch.ones(2)})
    for flags, says in (
        (
            ("--alpha", "GRAD_V"),
            "given per block (preset GRAD_V), but the architecture of model A is unknown",
        ),
        (
            (
                "--rule",
                "*:alpha=0.5",
            ),
            None,
        ),
    ):
        result = run("merge", a, b, *flags, "--dry-run")
        if says is None:
            assert result.code == 0, result.err
            continue
        assert result.code == 2 and says in result.err, result.err
    recipe = {
        "models": {"A": str(a), "B": str(b)},
        "merge": "A",
        "rules": [{"blocks": "IN00", "take": "B"}],
    }
    with pytest.raises(weightmix.WeightmixError, match="selects blocks, but the architecture"):
        weightmix.dry_run(recipe)


def test_selectors_that_the_architecture_lacks_are_refused(run, tmp_path):
    zeros, ones, _ = zeros_and_ones(tmp_path, "flux-dev")
    for rule, says in (
        (
            {"layer": "cross_attention", "take": "B"},
            "flux-dev (FLUX.1-dev (with a guidance embedder)) has no such layers",
        ),
        ({"layer": "atention", "take": "B"}, "did you mean 'attention'?"),
        ({"blocks": "IN00", "take": "B"}, "'IN00' is not a block of flux-dev"),
        ({"component": "clip_g", "take": "B"}, "'clip_g' is not a component of flux-dev"),
    ):
        recipe = {"models": {"A": str(zeros), "B": str(ones)}, "merge": "A", "rules": [rule]}
        with pytest.raises(weightmix.WeightmixError, match=re.escape(says)):
            weightmix.dry_run(recipe)
    unet_only = {k: v for k, v in tiny_state(shapes_of("sdxl"), 1).items() if k.startswith(UNET)}
    path = save(tmp_path / "unet.safetensors", unet_only)
    recipe = {
        "models": {"A": str(path)},
        "merge": "A",
        "rules": [{"component": "vae", "drop": True}],
    }
    with pytest.raises(
        weightmix.WeightmixError, match=r"component 'vae' .* is not in this sdxl checkpoint"
    ):
        weightmix.dry_run(recipe)


def test_strict_rules_turn_notes_into_errors(run, tmp_path):
    zeros, ones, _ = zeros_and_ones(tmp_path, "sd1")
    args = ("merge", zeros, ones, "--take", "*guidance_in*=B", "--dry-run")
    result = run(*args)
    assert result.code == 0 and "rule 1 (*guidance_in*) matches no key" in result.out
    result = run(*args, "--strict-rules")
    assert (
        result.code == 2 and "rule 1 (*guidance_in*) matches no key (--strict-rules)" in result.err
    )


def test_the_attention_swap_example(run, tmp_path):
    states, merged = run_example(run, tmp_path, EXAMPLES / "attention-swap.yaml")
    assert list(states) == ["base", "style", "detail"]
    for key, tensor in merged.items():
        block = hand_sd_block(key, "OUT11")
        if ".attn2." in key and block in ("OUT03", "OUT04", "OUT05"):
            source = "style"
        elif ".attn1." in key and block == "IN07":
            source = "detail"
        else:
            source = "base"
        assert torch.equal(tensor, states[source][key]), key


def flux_inputs(tmp_path: Path) -> tuple[dict, dict, Path, Path]:
    dev = tiny_state(shapes_of("flux-dev"), 1)
    schnell = tiny_state(shapes_of("flux-schnell"), 2)
    krea_path = save(tmp_path / "krea.safetensors", dev)
    # schnell as a sharded set whose shards hold the keys in another order than krea's file
    keys = sorted(schnell, reverse=True)
    shard_dir = tmp_path / "schnell"
    shard_dir.mkdir()
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    weight_map = {}
    for name, half in zip(names, halves):
        save(shard_dir / name, {k: schnell[k] for k in half})
        weight_map.update(dict.fromkeys(half, name))
    index = shard_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dev, schnell, krea_path, index


def test_the_flux_guidance_example(run, tmp_path):
    dev, schnell, krea_path, index = flux_inputs(tmp_path)
    recipe = load_recipe(EXAMPLES / "flux-guidance.yaml")
    recipe.models = {"krea": str(krea_path), "schnell": str(index)}
    saved = tmp_path / "flux.yaml"
    saved.write_text(recipe.to_yaml())
    out = tmp_path / "out.safetensors"
    result = run("merge", saved, "-o", out)
    assert result.code == 0, result.err
    merged = load(out)
    assert set(merged) == set(dev)
    for key, tensor in merged.items():
        expected = dev[key] if ".guidance_in." in key else (dev[key] + schnell[key]) / 2
        torch.testing.assert_close(tensor, expected.bfloat16(), msg=key)
    with weightmix.open_checkpoint(out) as ckpt:
        assert ckpt.metadata["modelspec.architecture"] == "flux-1-dev"


def test_guidance_taken_from_schnell_says_what_the_output_becomes(run, tmp_path):
    _, schnell, krea_path, index = flux_inputs(tmp_path)
    args = ("merge", f"krea={krea_path}", f"schnell={index}", "--alpha", "0.5")
    result = run(*args, "--take", "*guidance_in.*=schnell", "-o", tmp_path / "x.safetensors")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    for says in (
        "rule 1 (*guidance_in.*) takes 4 keys",
        "from schnell, which has none of them (schnell is FLUX.1-schnell (no guidance embedder))",
        "with them the output is flux-dev, without them flux-schnell",
        "take them from krea (--take '*guidance_in.*=krea')",
        "or leave them out (--drop '*guidance_in.*')",
    ):
        assert says in result.err
    out = tmp_path / "schnell-like.safetensors"
    assert run(*args, "--drop", "*guidance_in.*", "-o", out, "-q").code == 0
    with weightmix.open_checkpoint(out) as ckpt:
        assert ckpt.metadata["modelspec.architecture"] == "flux-1-schnell"
        assert set(ckpt.tensors) == set(schnell)


# --- what a review found ---


def test_models_of_other_depths_with_block_values_say_what_differs(run, tmp_path):
    medium = tiny_state(shapes_of("sd3-medium"), 1)
    large = tiny_state(shapes_of("sd3.5-large"), 2)
    a, b = save(tmp_path / "a.safetensors", medium), save(tmp_path / "b.safetensors", large)
    out = tmp_path / "out.safetensors"
    result = run("merge", a, b, "--alpha", "J=0.3,default=0.5", "-o", out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "keys differ between models" in result.err or "differ in architecture" in result.err
    xl, sd1 = tiny_state(shapes_of("sdxl"), 1), tiny_state(shapes_of("sd1"), 2)
    a, b = save(tmp_path / "xl.safetensors", xl), save(tmp_path / "sd1.safetensors", sd1)
    result = run("merge", a, b, "--alpha", "GRAD_V", "-o", out)
    assert result.code == 2 and "the models differ in architecture" in result.err, result.err
    extra = dict(sd1) | {"extra.weight": torch.ones(2)}
    b = save(tmp_path / "extra.safetensors", extra)
    a = save(tmp_path / "plain.safetensors", sd1)
    result = run("merge", a, b, "--alpha", "GRAD_V", "--on-missing", "skip", "-o", out, "-q")
    assert result.code == 0, result.err
    assert "extra.weight" not in load(out)


@pytest.mark.parametrize(
    ("alpha", "says"),
    [
        ("IN1=1,default=0", "'IN1' is not a block of sd1"),
        ("S1=1,default=0", "'S1' is not a block of sd1"),
    ],
)
def test_block_names_with_digits_are_blocks_not_groups(run, tmp_path, alpha, says):
    zeros, ones, _ = zeros_and_ones(tmp_path, "sd1")
    result = run("merge", zeros, ones, "--alpha", alpha, "--dry-run")
    assert result.code == 2 and says in result.err, result.err


def test_rule_flags_take_quoted_block_values(run, tmp_path):
    alphas = [i / 25 for i in range(26)]
    got, _ = merge_zeros_ones(
        run, tmp_path, "sd1",
        "--alpha", "0", "--rule", '*attn2*:alpha="IN=0.25,default=0.75"',
        "--rule", f"*attn1*:alpha=\"{','.join(map(str, alphas))}\"",
    )  # fmt: skip
    for key, value in got.items():
        block = hand_sd_block(key, "OUT11")
        if ".attn2." in key:
            expected = 0.25 if block.startswith("IN") else 0.75
        elif ".attn1." in key:
            expected = alphas[SD1_BLOCKS.index(block)]
        else:
            expected = 0.0
        assert value == pytest.approx(expected), key


def test_block_values_of_rules_that_match_nothing_are_still_checked(run, tmp_path):
    zeros, ones, _ = zeros_and_ones(tmp_path, "sd1")
    for alpha, says in (("0,1", "recipe rule 1 at merge"), ("IN99=1,default=0", "'IN99'")):
        recipe = {
            "models": {"A": str(zeros), "B": str(ones)},
            "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.5},
            "rules": [{"keys": "nothing*", "params": {"alpha": alpha}}],
        }
        with pytest.raises(weightmix.WeightmixError, match=re.escape(says)):
            weightmix.dry_run(recipe)


def test_empty_alpha_and_empty_selectors_are_refused(run, tmp_path):
    zeros, ones, _ = zeros_and_ones(tmp_path, "sd1")
    for empty in ("", "null", "~"):
        result = run("merge", zeros, ones, "--alpha", empty, "--dry-run")
        assert result.code == 2 and "is empty: give a number" in result.err, result.err
    recipe = {"models": {"A": str(zeros)}, "merge": "A", "rules": [{"blocks": [], "drop": True}]}
    with pytest.raises(weightmix.WeightmixError, match="'blocks' is an empty list"):
        weightmix.dry_run(recipe)


def test_later_defaults_win_and_no_strict_rules_overrides_a_recipe(run, tmp_path):
    got, _ = merge_zeros_ones(run, tmp_path, "sd1", "--alpha", "default=0.1,M00=1,default=0.7")
    others = [v for k, v in got.items() if hand_sd_block(k, "OUT11") != "M00"]
    assert others == pytest.approx([0.7] * len(others))
    zeros, ones, _ = zeros_and_ones(tmp_path, "sd1")
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {"A": str(zeros), "B": str(ones)},
                "merge": "A",
                "rules": [{"keys": "nothing*", "take": "B"}],
                "strict_rules": True,
            }
        )
    )
    assert run("merge", recipe, "--dry-run").code == 2
    assert run("merge", recipe, "--dry-run", "--no-strict-rules").code == 0


def test_a_regex_take_rule_is_told_how_to_change_itself(run, tmp_path):
    _, _, krea_path, index = flux_inputs(tmp_path)
    recipe = load_recipe(EXAMPLES / "flux-guidance.yaml")
    recipe.models = {"krea": str(krea_path), "schnell": str(index)}
    recipe.rules[0].take = "schnell"
    with pytest.raises(weightmix.WeightmixError) as error:
        weightmix.dry_run(recipe)
    assert "take them from krea (take: krea in rule 1)" in str(error.value)
    assert "leave them out (drop: true in rule 1)" in str(error.value)
