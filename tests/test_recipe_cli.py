"""Recipes through the command line: a recipe file reaches the plan exactly as written,
non-finite parameters are refused everywhere, --save-recipe is checked like an output and
saved recipes (and the one recorded in an output) re-run from their own folder."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import POSITION_IDS, digest, folder_listing, load, random_state, save

import weightmix
from weightmix import engine
from weightmix.io import open_checkpoint
from weightmix.provenance import KEY_RECIPE


def one_line_error(result, *fragments: str) -> str:
    """The run failed as a user error: exit 2, one stderr line holding every fragment."""
    assert result.code == 2, result.err
    line = result.err.strip()
    assert "\n" not in line and "Traceback" not in line, result.err
    for fragment in fragments:
        assert fragment in line, line
    return line


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def two_models(models: dict[str, Path], **merge: object) -> dict:
    node = {"method": "weighted_sum", "inputs": ["A", "B"], **merge}
    return {"models": {"A": str(models["A"]), "B": str(models["B"])}, "merge": node}


# --- 1. NaN and infinity are refused with the parameter's name and value, everywhere ---


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_non_finite_alpha_in_a_recipe_file_is_refused(run, tmp_path, models, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"models: {{A: {models['A']}, B: {models['B']}}}\n"
        f"merge: {{method: weighted_sum, alpha: {text}, inputs: [A, B]}}\n"
    )
    before = folder_listing(tmp_path)
    result = run("merge", recipe, "-o", tmp_path / "out.safetensors")
    value = repr(yaml.safe_load(text))  # nan, inf, -inf
    one_line_error(result, "merge.alpha", f"= {value}", "NaN and infinity are not allowed")
    assert folder_listing(tmp_path) == before


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"rules": [{"keys": "*bias", "params": {"alpha": float("nan")}}]}, "rule 1 params.alpha"),
        ({"rules": [{"keys": "*", "params": {"alpha": float("inf")}}]}, "rule 1 params.alpha"),
        ({"merge": "weights"}, "merge.weights"),
    ],
    ids=["rule-nan", "rule-inf", "weights-list"],
)
def test_non_finite_values_in_rules_and_lists_are_refused(run, tmp_path, models, extra, names):
    data = two_models(models, alpha=0.3)
    if extra.get("merge") == "weights":
        data["merge"] = {"method": "weighted_sum", "inputs": ["A", "B"], "weights": [1.0, math.nan]}
    else:
        data.update(extra)
    recipe = write_yaml(tmp_path / "r.yaml", data)
    result = run("merge", recipe, "-o", tmp_path / "out.safetensors")
    one_line_error(result, names, "NaN and infinity are not allowed")
    with pytest.raises(weightmix.WeightmixError, match="NaN and infinity are not allowed"):
        weightmix.merge(data, tmp_path / "api.safetensors")  # the API says the same
    assert not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "api.safetensors").exists()


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (("--alpha", "nan"), ("alpha", "nan")),
        (("--alpha", "inf"), ("alpha", "inf")),
        (("-p", "alpha=.inf"), ("alpha", "inf")),
        (("--weights", "1,.nan"), ("weights", "nan")),
        (("--rule", "*bias:alpha=.nan"), ("alpha", "nan")),
    ],
)
def test_non_finite_values_in_flags_are_refused(run, tmp_path, models, flags, names):
    result = run("merge", models["A"], models["B"], *flags, "-o", tmp_path / "out.safetensors")
    one_line_error(result, *names)
    assert "finite" in result.err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_key_given_twice_in_a_recipe_file_is_refused(run, tmp_path, models):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"models: {{A: {models['A']}, B: {models['B']}}}\n"
        "merge: {method: weighted_sum, inputs: [A, B], alpha: 0.3, alpha: 0.5}\n"
    )
    one_line_error(run("merge", recipe, "-o", tmp_path / "o.safetensors"), "'alpha' is given twice")


# --- every recipe feature, through the CLI path and through the API: the same bytes ---

FEATURES = {
    "nested-rules-rounding": {
        "merge": {
            "method": "weighted_sum",
            "alpha": 0.25,
            "inputs": [
                {
                    "method": "add_difference",
                    "name": "style",
                    "alpha": 0.7,
                    "inputs": ["A", "B", "C"],
                },
                "B",
            ],
        },
        "rules": [
            {"keys": "*.bias", "take": "C"},
            {"regex": r"input_blocks\.1\.", "params": {"style.alpha": 0.2}},
            {"keys": "*norm*", "params": {"alpha": 0.9}},
            {"keys": "cond_stage_model.*layers.1.*", "drop": True},
        ],
        "dtype": "bf16",
        "rounding": "stochastic",
        "seed": 7,
        "compute_dtype": "fp64",
        "title": "every feature",
        "max_shard_size": "40KB",
    },
    "components-weights-missing": {
        "merge": {
            "method": "weighted_sum",
            "weights": [1, 2, 0.5],
            "normalize": False,
            "inputs": ["A", "B", "C"],
        },
        "rules": [{"component": "text_encoder", "take": "A"}],
        "components": ["unet", "text_encoder"],
        "layout": "B",
        "on_missing": "keep",
        "device": "cpu",
        "dtype": "fp16",
    },
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_recipe_feature_gives_the_same_bytes_through_the_cli(run, tmp_path, models, feature):
    data = {"models": {n: str(models[n]) for n in "ABC"}, **FEATURES[feature]}
    recipe = write_yaml(tmp_path / "recipe.yaml", data)
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    by_cli, by_api = tmp_path / "cli" / "out.safetensors", tmp_path / "api" / "out.safetensors"
    result = run("merge", recipe, "-o", by_cli, "-q")
    assert result.code == 0, result.err
    weightmix.merge(weightmix.load_recipe(recipe), by_api)
    cli_files = folder_listing(by_cli.parent)
    assert cli_files == folder_listing(by_api.parent)
    for name in cli_files:  # shards too
        assert digest(by_cli.parent / name) == digest(by_api.parent / name), name
    index = by_cli.with_name("out.safetensors.index.json")
    with open_checkpoint(index if index.exists() else by_cli) as ckpt:
        recorded = yaml.safe_load(ckpt.metadata[KEY_RECIPE])
    for field, value in data.items():  # every field as written (paths rebased, see below)
        if field != "models":
            assert recorded[field] == value, field


def test_rules_from_a_file_and_flags_both_apply(run, tmp_path, models):
    data = two_models(models, alpha=0.5)
    data["rules"] = [{"keys": "*.bias", "params": {"alpha": 0.0}}]
    recipe = write_yaml(tmp_path / "r.yaml", data)
    out = tmp_path / "out.safetensors"
    assert run("merge", recipe, "--take", "*norm*=B", "--dtype", "fp32", "-o", out, "-q").code == 0
    a, b, merged = load(models["A"]), load(models["B"]), load(out)
    for key, tensor in merged.items():
        if not tensor.is_floating_point():
            continue
        if "norm" in key:
            expected = b[key].float()
        elif key.endswith(".bias"):
            expected = a[key].float()
        else:
            expected = 0.5 * a[key].float() + 0.5 * b[key].float()
        torch.testing.assert_close(tensor, expected, msg=key)


def test_building_flags_with_a_recipe_file_are_refused_even_when_zero(run, tmp_path, models):
    recipe = write_yaml(tmp_path / "r.yaml", two_models(models, alpha=0.5))
    result = run("merge", recipe, "--alpha", "0", "-o", tmp_path / "o.safetensors")
    one_line_error(result, "--alpha builds a recipe from model files")


# --- 2. --save-recipe is checked like an output and written only when the run succeeds ---


def test_save_recipe_never_overwrites_an_input(run, tmp_path, models):
    before = digest(models["A"])
    out = tmp_path / "out.safetensors"
    result = run("merge", models["A"], models["B"], "-o", out, "--save-recipe", models["A"])
    one_line_error(result, "name it *.yaml")
    assert digest(models["A"]) == before and not out.exists()
    recipe = write_yaml(tmp_path / "r.yaml", two_models(models, alpha=0.3))
    text = recipe.read_text()
    result = run("merge", recipe, "-o", out, "--save-recipe", recipe, "--overwrite")
    one_line_error(result, "is an input", "the recipe being run")
    assert recipe.read_text() == text and not out.exists()


def test_save_recipe_into_a_missing_folder_or_over_a_file_is_refused(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    args = ("merge", models["A"], models["B"], "-o", out)
    result = run(*args, "--save-recipe", tmp_path / "missing" / "r.yaml")
    one_line_error(result, "folder", "does not exist")
    existing = tmp_path / "kept.yaml"
    existing.write_text("mine\n")
    one_line_error(run(*args, "--save-recipe", existing), "exists: pass --overwrite")
    assert existing.read_text() == "mine\n" and not out.exists()
    assert run(*args, "--save-recipe", existing, "--overwrite", "-q").code == 0
    assert "weighted_sum" in existing.read_text()


def test_a_failing_run_writes_no_recipe(run, tmp_path, models, monkeypatch):
    saved = tmp_path / "r.yaml"
    out = tmp_path / "out.safetensors"
    args = ("merge", models["A"], models["B"], "-o", out, "--save-recipe", saved)
    one_line_error(run(*args, "--dtype", "fp7"), "unknown or unsupported dtype")
    assert not saved.exists()

    def failing(plan, writer, task, buffers, *_):
        raise RuntimeError("injected compute failure")

    monkeypatch.setattr(engine, "run_task", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(*args)
    assert not saved.exists() and not out.exists()


def test_dry_run_saves_the_recipe_after_validating(run, tmp_path, models):
    saved = tmp_path / "r.yaml"
    result = run("merge", models["A"], models["B"], "--dry-run", "--save-recipe", saved)
    assert result.code == 0, result.err
    assert weightmix.load_recipe(saved).merge.inputs == ["A", "B"]


# --- 3. saved and recorded recipes re-run from their own folder ---


def test_saved_recipe_runs_from_its_own_folder_and_from_anywhere(
    run, tmp_path, models, monkeypatch
):
    work = tmp_path / "work"
    (work / "m").mkdir(parents=True)
    (work / "recipes").mkdir()
    for name in "AB":
        os.link(models[name], work / "m" / f"{name}.safetensors")
    monkeypatch.chdir(work)
    args = ("merge", "m/A.safetensors", "m/B.safetensors", "--alpha", "0.3", "--title", "t")
    assert run(*args, "-o", "first.safetensors", "--save-recipe", "recipes/ab.yaml", "-q").code == 0
    saved = yaml.safe_load((work / "recipes" / "ab.yaml").read_text())
    assert saved["models"] == {"A": "../m/A.safetensors", "B": "../m/B.safetensors"}
    assert run("merge", "recipes/ab.yaml", "-o", "second.safetensors", "-q").code == 0
    monkeypatch.chdir(work / "recipes")
    assert run("merge", "ab.yaml", "-o", "../third.safetensors", "-q").code == 0
    first = load(work / "first.safetensors")
    for other in ("second", "third"):
        again = load(work / f"{other}.safetensors")
        assert set(again) == set(first)
        assert all(torch.equal(again[k], first[k]) for k in first), other


def test_absolute_model_paths_stay_absolute_in_a_saved_recipe(run, tmp_path, models):
    saved = tmp_path / "sub" / "r.yaml"
    saved.parent.mkdir()
    args = ("merge", models["A"], models["B"], "--dry-run", "--save-recipe", saved)
    assert run(*args).code == 0
    assert yaml.safe_load(saved.read_text())["models"]["A"] == str(models["A"])


def test_recorded_recipe_re_runs_from_the_outputs_folder(run, tmp_path, models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    a, b = (os.path.relpath(models[n], tmp_path) for n in "AB")
    assert run("merge", a, b, "--alpha", "0.6", "-o", "outputs/m.safetensors", "-q").code == 0
    printed = run("inspect", "outputs/m.safetensors", "--recipe")
    assert printed.code == 0
    recorded = yaml.safe_load(printed.out)
    assert recorded["models"]["A"] == "../A.safetensors"  # relative to the output's folder
    (outputs / "m.yaml").write_text(printed.out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = tmp_path / "again.safetensors"
    assert run("merge", outputs / "m.yaml", "-o", again, "-q").code == 0
    first, second = load(outputs / "m.safetensors"), load(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    result = run("inspect", models["A"], "--recipe")
    one_line_error(result, "has no weightmix recipe")


# --- 5. integer keys that some models lack follow --on-missing and take rules ---


def test_integer_keys_follow_on_missing_skip(run, tmp_path, models):
    state = random_state(2)
    del state[POSITION_IDS]
    partial = save(tmp_path / "partial.safetensors", state)
    out = tmp_path / "out.safetensors"
    result = run("merge", models["A"], partial, "--on-missing", "skip", "-o", out)
    assert result.code == 0, result.err
    assert POSITION_IDS not in load(out)
    assert "Pass --on-missing" not in result.err  # the user already chose


def test_take_from_a_model_that_lacks_the_key_is_said(run, tmp_path, models):
    state = random_state(2)
    del state[POSITION_IDS]
    partial = save(tmp_path / "partial.safetensors", state)
    out = tmp_path / "out.safetensors"
    args = ("merge", models["A"], partial, "--take", "*position_ids=B", "-o", out)
    says = f"rule 1 (*position_ids) takes 1 key ('{POSITION_IDS}') from B, which has none of them"
    one_line_error(run(*args), says, "take them from A (--take '*position_ids=A')")
    assert not out.exists()
    result = run(*args, "--on-missing", "keep")
    assert result.code == 0, result.err
    assert says in result.err
    assert f"takes '{POSITION_IDS}' from B, which lacks it (A has it)" in result.err
    one_line_error(run(*args, "--on-missing", "keep", "--strict-rules"), says, "--strict-rules")
    assert load(out)[POSITION_IDS].equal(load(models["A"])[POSITION_IDS])
    result = run(*args, "--on-missing", "skip", "--overwrite")
    assert result.code == 0 and POSITION_IDS not in load(out)


def test_float_key_taken_from_a_model_that_lacks_it_is_an_error(run, tmp_path, models):
    state = random_state(2)
    key = next(k for k in state if k.endswith(".bias"))
    del state[key]
    partial = save(tmp_path / "partial.safetensors", state)
    out = tmp_path / "o.safetensors"
    result = run("merge", models["A"], partial, "--take", "*.bias=B", "-o", out)  # B has others
    one_line_error(result, f"takes '{key}' from B, which lacks it", "take them from a model")
    result = run("merge", models["A"], partial, "--take", f"{key}=B", "-o", out)  # B has none
    one_line_error(result, f"takes 1 key ('{key}') from B, which has none of them")


# --- 8. model names: one rule on the command line and in recipe files ---


def test_model_names_with_dashes_and_dots_work_on_the_command_line(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    args = ("merge", f"flux-dev={models['A']}", f"krea.v1={models['B']}")
    result = run(*args, "--take", "*bias=krea.v1", "--alpha", "0.5", "-o", out, "-q")
    assert result.code == 0, result.err
    with open_checkpoint(out) as ckpt:
        assert list(yaml.safe_load(ckpt.metadata[KEY_RECIPE])["models"]) == ["flux-dev", "krea.v1"]
    b, merged = load(models["B"]), load(out)
    bias = next(k for k in merged if k.endswith("bias"))
    assert torch.equal(merged[bias], b[bias])


def test_invalid_model_name_message_states_the_rule(run, tmp_path, models):
    data = {"models": {"9lives": str(models["A"])}, "merge": "9lives"}
    result = run("merge", write_yaml(tmp_path / "r.yaml", data), "-o", tmp_path / "o.safetensors")
    one_line_error(result, "'9lives'", "a letter or _ first, then letters, digits, _, - or .")


# --- 9 and 10. messages ---


def test_rule_values_may_be_lists(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    args = ("merge", models["A"], models["B"], models["C"], "--rule", "*bias:weights=[1,2,1]")
    assert run(*args, "--dtype", "fp32", "-o", out, "-q").code == 0
    a, b, c, merged = (load(p) for p in (models["A"], models["B"], models["C"], out))
    for key, tensor in merged.items():
        if tensor.is_floating_point():
            w = (1, 2, 1) if key.endswith("bias") else (1, 1, 1)
            expected = sum(x * m[key].float() for x, m in zip(w, (a, b, c))) / sum(w)
            torch.testing.assert_close(tensor, expected, msg=key)


@pytest.mark.parametrize(
    ("flag", "value", "form"),
    [
        ("--take", "layer.*", "PATTERN=MODEL"),
        ("--rule", "layer.*", "PATTERN:NAME=VALUE"),
        ("--rule", "alpha=0.3", "PATTERN:NAME=VALUE"),
        ("--param", "alpha", "NAME=VALUE"),
    ],
)
def test_malformed_flags_name_their_form(run, tmp_path, models, flag, value, form):
    result = run("merge", models["A"], models["B"], flag, value, "-o", tmp_path / "o.safetensors")
    one_line_error(result, f"{flag} '{value}': write it as {form}")


def test_empty_weights_or_components_are_refused(run, tmp_path, models):
    args = ("merge", models["A"], models["B"], "-o", tmp_path / "o.safetensors")
    one_line_error(run(*args, "--weights", ""), "--weights is empty")
    one_line_error(run(*args, "--components", " , "), "--components is empty")


def test_usage_errors_name_the_program(run):
    one_line_error(run("bogus"), "(see weightmix --help)")
    one_line_error(run("merge", "--bogus"), "(see weightmix merge --help)")


def test_methods_listing_reads_well(run):
    result = run("methods")
    assert result.code == 0
    assert "take: 1 input\n" in result.out and "1 inputs" not in result.out
    assert "=None" not in result.out and "alpha (optional)" in result.out


def test_seed_help_says_what_draws_random_numbers(run):
    text = " ".join(run("merge", "--help").out.split())
    assert "Seed of every random choice: today stochastic rounding" in text


def test_one_model_is_rewritten_as_convert_does(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    assert run("merge", models["A"], "--dtype", "fp32", "-o", out, "-q").code == 0
    a, merged = load(models["A"]), load(out)
    assert all(
        torch.equal(merged[k], a[k].float() if a[k].is_floating_point() else a[k]) for k in a
    )


def test_single_file_flag_on_a_single_file_says_so(run, tmp_path, models):
    result = run("convert", models["A"], tmp_path / "o.safetensors", "--single-file")
    assert result.code == 0, result.err
    assert "already has single-file key names" in result.err


# --- what a review found: values that must not change between what is written and what runs ---


def test_yaml_merge_keys_work_and_explicit_keys_override_them(run, tmp_path, models):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"models: {{A: {models['A']}, B: {models['B']}}}\n"
        "defaults: &d {method: weighted_sum, inputs: [A, B], alpha: 0.5}\n"
        "merge:\n  <<: *d\n  alpha: 0.25\n".replace("defaults: &d", "x-defaults: &d")
    )
    # an unknown top-level field is refused; a recipe uses anchors inside its own fields
    assert "unknown recipe field 'x-defaults'" in run("merge", recipe, "--dry-run").err
    recipe.write_text(
        f"models: {{A: {models['A']}, B: {models['B']}}}\n"
        "merge:\n  <<: {method: weighted_sum, inputs: [A, B], alpha: 0.5}\n  alpha: 0.25\n"
        "dtype: fp32\n"
    )
    out = tmp_path / "out.safetensors"
    assert run("merge", recipe, "-o", out, "-q").code == 0
    a, b, merged = load(models["A"]), load(models["B"]), load(out)
    key = next(k for k in merged if k.endswith("weight"))
    torch.testing.assert_close(merged[key], 0.75 * a[key].float() + 0.25 * b[key].float())


def test_a_value_that_holds_itself_is_one_line(run, tmp_path, models):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"models: {{A: {models['A']}, B: {models['B']}}}\n"
        "merge: {method: weighted_sum, inputs: [A, B], weights: &w [1, *w]}\n"
    )
    one_line_error(run("merge", recipe, "--dry-run"), "refers to the value that holds it")
    deep = tmp_path / "deep.yaml"
    deep.write_text("models: {A: a}\nmerge: " + "[" * 3000 + "]" * 3000 + "\n")
    one_line_error(run("merge", deep, "--dry-run"), "nested too deeply")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("-p", "alpha=yes"), "True is a boolean, not a number"),
        (("--weights", "true,1"), "True is a boolean, not a number"),
        (("-p", "alpha=~"), "null is not a value"),
        (("-p", "alpha=0.3", "-p", "alpha=0.4"), "'alpha' is given twice"),
        (("-p", "alpha=0.3", "--alpha", "0.4"), "alpha is given twice"),
        (("--rule", "*:alpha=0.2,alpha=0.3"), "'alpha' is given twice"),
        (("--rule", "*:alpha=0.2,"), "'' is not NAME=VALUE"),
        (("-p", "method=add_difference"), "'method' is not a parameter"),
        (("-m", ""), "merge.method: is empty"),
        (("--dtype", ""), "dtype: is empty"),
        (("--max-shard-size", ""), "max_shard_size: is empty"),
        (("--title", ""), "title: is empty"),
    ],
)
def test_flags_that_would_silently_change_the_merge_are_refused(run, tmp_path, models, flags, says):
    args = ("merge", models["A"], models["B"], *flags, "-o", tmp_path / "out.safetensors")
    one_line_error(run(*args), says)
    assert not (tmp_path / "out.safetensors").exists()


def test_parameters_that_overflow_the_compute_dtype_are_refused_before_reading(
    run, tmp_path, models
):
    args = ("merge", models["A"], models["B"], models["C"], "-m", "add_difference")
    one_line_error(run(*args, "--alpha", "1e300", "--dry-run"), "alpha=1e+300", "fp32")
    result = run(*args, "--alpha", "1e300", "--compute-dtype", "fp64", "--dry-run")
    assert result.code == 0, result.err
    one_line_error(
        run("merge", models["A"], models["B"], "--weights", "1e308,1e308", "--dry-run"),
        "their sum overflows",
    )


def test_automatic_names_skip_the_names_given(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    assert run("merge", models["A"], f"A={models['B']}", "-o", out, "-q").code == 0
    with open_checkpoint(out) as ckpt:
        recorded = yaml.safe_load(ckpt.metadata[KEY_RECIPE])["models"]
    assert recorded == {"B": str(models["A"]), "A": str(models["B"])}
    one_line_error(run("merge", f"X={models['A']}", f"X={models['B']}", "--dry-run"), "named 'X'")


def test_saved_paths_follow_symlinked_folders_as_the_system_does(run, tmp_path, models):
    """lnk -> real/deep: 'lnk/../m/x' opens real/m/x, and the saved recipe must say so."""
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "real" / "m").mkdir()
    os.link(models["A"], tmp_path / "real" / "m" / "x.safetensors")
    (tmp_path / "m").mkdir()  # a decoy with the same name where lexical '..' would land
    os.link(models["B"], tmp_path / "m" / "x.safetensors")
    (tmp_path / "lnk").symlink_to(tmp_path / "real" / "deep")
    recipe = write_yaml(
        tmp_path / "lnk" / "r.yaml", {"models": {"A": "../m/x.safetensors"}, "merge": "A"}
    )
    saved = tmp_path / "saved.yaml"
    assert run("merge", recipe, "--dry-run", "--save-recipe", saved).code == 0
    path = yaml.safe_load(saved.read_text())["models"]["A"]
    assert (tmp_path / path).resolve() == (tmp_path / "real" / "m" / "x.safetensors").resolve()


def test_recipe_that_cannot_be_saved_after_the_merge_says_the_output_was_written(
    run, tmp_path, models, monkeypatch
):
    from weightmix import api

    def full(recipe, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "save_recipe", full)
    out, saved = tmp_path / "out.safetensors", tmp_path / "r.yaml"
    result = run("merge", models["A"], models["B"], "-o", out, "--save-recipe", saved, "-q")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert f"the merge was written to {out}, but the recipe could not be saved" in result.err
    assert out.exists() and not saved.exists()


def test_numpy_numbers_in_an_api_recipe_are_recorded(tmp_path, models):
    np = pytest.importorskip("numpy")
    recipe = weightmix.Recipe(
        models={"a": str(models["A"]), "b": str(models["B"])},
        merge=weightmix.node("weighted_sum", "a", "b", weights=[np.float32(1), np.int64(3)]),
    )
    out = tmp_path / "out.safetensors"
    weightmix.merge(recipe, out)
    with open_checkpoint(out) as ckpt:
        assert yaml.safe_load(ckpt.metadata[KEY_RECIPE])["merge"]["weights"] == [1.0, 3]


def test_rule_parameters_beyond_the_compute_dtype_are_refused(run, tmp_path, models):
    """PyYAML reads 1e39 as a string; the rule's value is checked once it is a number."""
    args = ("merge", models["A"], models["B"], models["C"], "-m", "add_difference")
    result = run(*args, "--rule", "model.*:alpha=1e39", "-o", tmp_path / "o.safetensors")
    one_line_error(result, "recipe rule 1", "alpha=1e+39", "beyond what the compute dtype fp32")
    data = two_models(models, normalize=False, weights=[1, 1])
    data["rules"] = [{"keys": "*", "params": {"weights": ["1e39", 1]}}]
    result = run("merge", write_yaml(tmp_path / "r.yaml", data), "-o", tmp_path / "o.safetensors")
    one_line_error(result, "weights=[1e+39, 1.0]", "beyond what the compute dtype")
    assert not (tmp_path / "o.safetensors").exists()


def test_shared_aliases_are_checked_quickly(run, tmp_path, models):
    """Ten levels of ten aliases each expand to 10^10 items; each value is walked once."""
    lines = ["x0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("\n".join(lines) + f"\nmodels: {{A: {models['A']}}}\nmerge: A\n")
    one_line_error(run("merge", recipe, "--dry-run"), "unknown recipe field 'x0'")


def test_rule_patterns_may_hold_equals_signs(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    args = ("merge", models["A"], models["B"], "--rule", "*[=]*:alpha=0.5", "-o", out)
    result = run(*args)
    assert result.code == 0 and "rule 1 (*[=]*) matches no key" in result.err


def test_repeated_building_flags_are_refused(run, tmp_path, models):
    args = ("merge", models["A"], models["B"], "--dry-run")
    one_line_error(run(*args, "--alpha", "0.3", "--alpha", "0.4"), "--alpha is given 2 times")
    one_line_error(run(*args, "-m", "add", "-m", "weighted_sum"), "--method is given 2 times")


def test_sizes_too_large_are_one_line(run, tmp_path, models):
    args = ("merge", models["A"], models["B"], "--max-shard-size", "1e400GB", "--dry-run")
    one_line_error(run(*args), "max_shard_size '1e400GB' is too large")


def test_convert_like_given_empty_is_refused(run, tmp_path, models):
    result = run("convert", models["A"], tmp_path / "o.safetensors", "--like", "")
    one_line_error(result, "models.like: is empty")
