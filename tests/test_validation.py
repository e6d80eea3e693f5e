"""Every user error: one line on stderr naming what/where/how, exit code 2, nothing written,
and no tensor data read before it is reported."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import folder_listing, random_state, save

from weightmix.io.reader import Checkpoint, SafetensorsCheckpoint


@pytest.fixture(autouse=True)
def no_tensor_reads(monkeypatch):
    """Validation works from headers alone: any tensor read during these tests fails them."""

    def refuse(self, info, *args, **kwargs):
        raise AssertionError(f"tensor data read during validation: {info.key}")

    for owner, name in ((Checkpoint, "read"), (SafetensorsCheckpoint, "read_range")):
        monkeypatch.setattr(owner, name, refuse)


def expect_error(result, *fragments: str) -> str:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("weightmix: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(folder: Path, before: list[str]) -> None:
    assert folder_listing(folder) == before


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out.safetensors"


def test_unknown_method_suggests_closest(run, models, out):
    before = folder_listing(out.parent)
    result = run("merge", models["A"], models["B"], "--method", "weighted_summ", "-o", out)
    expect_error(result, "unknown method 'weighted_summ'", "did you mean 'weighted_sum'")
    assert_nothing_written(out.parent, before)


def test_unknown_parameter_suggests_closest(run, models, out):
    result = run("merge", models["A"], models["B"], "-p", "alpah=0.5", "-o", out)
    expect_error(result, "no parameter 'alpah'", "did you mean 'alpha'")


def test_parameter_out_of_range(run, models, out):
    result = run("merge", models["A"], models["B"], "--alpha", "1.5", "-o", out)
    expect_error(result, "alpha=1.5", "less than or equal to 1")


def test_wrong_number_of_inputs(run, models, out):
    result = run("merge", models["A"], models["B"], "-m", "add_difference", "-o", out)
    expect_error(result, "add_difference takes 3 inputs, 2 given")


def test_weights_count_must_match_models(run, models, out):
    args = ("merge", models["A"], models["B"], models["C"], "--weights", "1,2", "-o", out)
    expect_error(run(*args), "2 weights given for 3 models")


def test_missing_input_file(run, tmp_path, models, out):
    result = run("merge", models["A"], tmp_path / "nope.safetensors", "-o", out)
    expect_error(result, "model B", "nope.safetensors", "no such file")


def test_pickle_input_is_refused_clearly(run, tmp_path, models, out):
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"not read")
    expect_error(
        run("merge", models["A"], pickle, "-o", out), "old.ckpt", "cannot read the pickled"
    )


def test_truncated_input(run, tmp_path, models, out):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(models["B"].read_bytes()[:5000])
    expect_error(run("merge", models["A"], broken, "-o", out), "broken.safetensors", "truncated")


def test_invalid_header_json(run, tmp_path, models, out):
    broken = tmp_path / "json.safetensors"
    broken.write_bytes(struct.pack("<Q", 4) + b"{x:1")
    expect_error(run("merge", models["A"], broken, "-o", out), "not valid JSON")


def test_unknown_dtype_in_input(run, tmp_path, models, out):
    broken = tmp_path / "dt.safetensors"
    header = json.dumps({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}).encode()
    broken.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    expect_error(run("merge", models["A"], broken, "-o", out), "unknown dtype 'Q4'")


def test_directory_without_index(run, tmp_path, models, out):
    folder = tmp_path / "folder"
    folder.mkdir()
    expect_error(run("merge", models["A"], folder, "-o", out), "folder", "index")


def test_keys_differ_lists_first_keys(run, tmp_path, models, out):
    state = random_state(2)
    removed = sorted(k for k in state if k.endswith(("weight", "bias")))[:5]
    for key in removed:
        del state[key]
    partial = save(tmp_path / "partial.safetensors", state)
    before = folder_listing(tmp_path)
    line = expect_error(
        run("merge", models["A"], partial, "-o", out), "keys differ", "--on-missing keep"
    )
    assert f"'{removed[0]}' is in A but not in B" in line
    assert "(5 keys in all)" in line
    assert_nothing_written(tmp_path, before)


def test_shape_mismatch_names_key_and_files(run, tmp_path, models, out):
    state = random_state(2)
    key = sorted(k for k in state if k.endswith("weight"))[0]
    state[key] = torch.zeros(3, 3, dtype=torch.float16)
    other = save(tmp_path / "other.safetensors", state)
    line = expect_error(run("merge", models["A"], other, "-o", out), f"key '{key}'", "shape")
    assert "A.safetensors" in line and "other.safetensors" in line


def test_integer_and_float_cannot_be_merged(run, tmp_path, models, out):
    state = random_state(2)
    key = sorted(state)[0]
    state[key] = torch.zeros(state[key].shape, dtype=torch.int16)
    other = save(tmp_path / "other.safetensors", state)
    expect_error(run("merge", models["A"], other, "-o", out), f"key '{key}'", "integer and float")


def test_output_equal_to_input_is_refused(run, models):
    before = models["A"].read_bytes()
    result = run("merge", models["A"], models["B"], "-o", models["A"], "--overwrite")
    expect_error(result, "is an input", "model 'A'")
    assert models["A"].read_bytes() == before


def test_output_folder_missing_or_unwritable(run, tmp_path, models):
    missing = tmp_path / "no" / "out.safetensors"
    expect_error(run("merge", models["A"], models["B"], "-o", missing), "does not exist")
    unwritable = Path("/proc/weightmix-test.safetensors")
    expect_error(run("merge", models["A"], models["B"], "-o", unwritable), "not writable")


def test_existing_output_needs_overwrite(run, tmp_path, models, out):
    out.write_bytes(b"keep me")
    expect_error(run("merge", models["A"], models["B"], "-o", out), "exists", "--overwrite")
    assert out.read_bytes() == b"keep me"


def test_output_must_be_safetensors(run, models, tmp_path):
    expect_error(run("merge", models["A"], models["B"], "-o", tmp_path / "x.ckpt"), "*.safetensors")


def test_recipe_errors(run, tmp_path, models, out):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{A: {models['A']}}}\nmerge: A\ndtyp: fp16\n")
    expect_error(run("merge", recipe, "-o", out), "unknown recipe field 'dtyp'", "'dtype'")
    recipe.write_text("models: [\n")
    expect_error(run("merge", recipe, "-o", out), "not valid YAML")
    recipe.write_text(f"models: {{A: {models['A']}, B: {models['B']}}}\nmerge: A\n")
    expect_error(run("merge", recipe, "-o", out), "model 'B' is never used")


def test_merge_space_mismatch(run, tmp_path, models, out):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"models: {{A: {models['A']}, B: {models['B']}}}\nmerge: {{method: add, inputs: [A, B]}}\n"
    )
    expect_error(run("merge", recipe, "-o", out), "is a weight", "expects a delta", "subtract")


def test_rule_errors(run, models, out):
    args = ("merge", models["A"], models["B"], "-o", out)
    expect_error(run(*args, "--take", "*=Z"), "'Z', which is not a model")
    expect_error(run(*args, "--rule", "*attn*:beta=0.1"), "no method of this merge has a parameter")


def test_bad_dtype_and_device_and_size(run, models, out):
    args = ("merge", models["A"], models["B"], "-o", out)
    expect_error(run(*args, "--dtype", "fp12"), "dtype 'fp12'", "fp32, fp16, bf16")
    expect_error(run(*args, "--max-shard-size", "5 parsecs"), "not a size")
    if not torch.cuda.is_available():
        expect_error(run(*args, "--device", "cuda"), "no CUDA GPU")
    expect_error(run(*args, "--device", "tpu"), "device 'tpu'")


def test_click_usage_errors_are_one_line_too(run, models):
    expect_error(run("merge", models["A"], "--threads", "0"), "--threads")
    expect_error(run("merge", models["A"], models["B"]), "no output path")


def test_output_is_never_the_text_encoder(run, models):
    """--text-encoder names a file read for prompts: an input, never overwritten (found by a
    review of the web UI, which checks the same through the CLI's planning)."""
    result = run("merge", models["A"], models["B"], "--text-encoder", models["C"], "-o",
                 models["C"], "--overwrite")  # fmt: skip
    expect_error(result, "is an input", "the text encoder")
