"""Outputs replace earlier outputs whole, never leave stale shards, and refuse what they
cannot write; folder outputs keep to the layout model's components."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import folder_listing, load, save

from weightmix.dialects.links import Link, converted, to_single
from weightmix.errors import WeightmixError
from weightmix.io.pickled import PickleCheckpoint


def test_new_shard_layout_replaces_every_earlier_output_file(run, tmp_path, models):
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    args = ("merge", models["A"], models["B"], "-o", out, "-q")
    assert run(*args).code == 0
    assert run(*args, "--max-shard-size", "20KB").code == 2  # the single file exists
    assert run(*args, "--max-shard-size", "20KB", "--overwrite").code == 0
    sharded = folder_listing(out.parent)
    assert "model.safetensors" not in sharded and "model.safetensors.index.json" in sharded
    assert run(*args, "--max-shard-size", "200KB", "--overwrite").code == 0  # fewer shards
    fewer = folder_listing(out.parent)
    assert len(fewer) < len(sharded) and all(f"-of-{len(fewer) - 1:05d}" in n for n in fewer[:-1])
    assert run(*args, "--overwrite").code == 0
    assert folder_listing(out.parent) == ["model.safetensors"]


def test_too_many_shards_is_refused(run, tmp_path):
    from weightmix.arch.synthetic import write_synthetic

    for name in "AB":  # 1132 tensors: one shard each at a 10-byte limit
        write_synthetic(tmp_path / f"{name}.safetensors", "sd1-ldm", seed=1, divisor=64)
    out = tmp_path / "o.safetensors"
    args = ("merge", tmp_path / "A.safetensors", tmp_path / "B.safetensors", "-o", out)
    result = run(*args, "--max-shard-size", "10")
    assert result.code == 2 and "shards (at most 1000)" in result.err


def test_stochastic_rounding_only_applies_to_8_and_16_bit_outputs(tmp_path):
    import weightmix

    state = {"w": torch.randn(64, dtype=torch.float64)}
    paths = {n: str(save(tmp_path / f"{n}.safetensors", state)) for n in "AB"}
    recipe = {
        "models": paths,
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"]},
        "compute_dtype": "fp64",
        "dtype": "fp32",
        "rounding": "stochastic",
    }
    result = weightmix.merge(recipe, tmp_path / "out.safetensors")
    assert any("stochastic changes nothing" in note for note in result.notes)
    assert torch.equal(load(tmp_path / "out.safetensors")["w"], state["w"].float())


def test_joined_tensors_must_fit_together():
    state = {
        "q": torch.zeros(2, 2, dtype=torch.float16),
        "k": torch.zeros(2, 2),
        "v": torch.zeros(2, 2),
    }
    links = [Link("qkv", name, part=i, parts=(1, 1, 1)) for i, name in enumerate("qkv")]
    checkpoint = PickleCheckpoint(Path("memory"), state, [])
    with pytest.raises(WeightmixError, match="do not fit together"):
        converted(checkpoint, to_single(links, checkpoint.tensors))


def pipeline(folder: Path, components: dict[str, dict[str, torch.Tensor]]) -> Path:
    index = {"_class_name": "StableDiffusionPipeline"}
    for name, state in components.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text("{}")
        save(folder / name / "diffusion_pytorch_model.safetensors", state)
        index[name] = ["diffusers", "Whatever"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_keys_of_a_component_the_layout_lacks_are_refused(run, tmp_path):
    a = pipeline(tmp_path / "A", {"unet": {"w": torch.ones(2)}})
    b = pipeline(tmp_path / "B", {"unet": {"w": torch.ones(2)}, "vae": {"v": torch.ones(2)}})
    result = run("merge", a, b, "--on-missing", "keep", "-o", tmp_path / "out")
    assert result.code == 2 and "'vae/v' belongs to a component" in result.err
    assert not (tmp_path / "out").exists()


def test_variant_weights_are_read_and_unreadable_ones_refused(run, tmp_path):
    a = pipeline(tmp_path / "A", {"unet": {"w": torch.ones(2)}})
    b = pipeline(tmp_path / "B", {"unet": {"w": torch.zeros(2)}})
    for folder in (a, b):  # as a hub download of the fp16 variant names them
        plain = folder / "unet" / "diffusion_pytorch_model.safetensors"
        plain.rename(plain.with_name("diffusion_pytorch_model.fp16.safetensors"))
    out = tmp_path / "out"
    assert run("merge", a, b, "-o", out, "-q").code == 0
    merged = load(out / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert torch.equal(merged["w"], torch.full((2,), 0.5))
    (b / "unet" / "diffusion_pytorch_model.bf16.safetensors").write_bytes(b"")
    result = run("merge", a, b, "-o", tmp_path / "other")
    assert result.code == 2 and "weights weightmix does not read" in result.err


def test_components_left_without_weights_are_left_out_of_the_folder(run, tmp_path):
    state = {"unet": {"w": torch.ones(2)}, "safety_checker": {"v": torch.ones(2)}}
    a, b = pipeline(tmp_path / "A", state), pipeline(tmp_path / "B", state)
    index = json.loads((a / "model_index.json").read_text())  # keys in an unsorted order
    index.update(requires_safety_checker=True, tokenizer=["transformers", "CLIPTokenizer"])
    (a / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert run("merge", a, b, "--drop", "safety_checker/*", "-o", out, "-q").code == 0
    assert folder_listing(out) == ["README.md", "model_index.json", "unet"]  # README: the card
    written = json.loads((out / "model_index.json").read_text())
    # marked absent as diffusers marks a component saved as None; the rest as it was
    assert list(written.items()) == list({**index, "safety_checker": [None, None]}.items())


def test_components_a_pipeline_needs_are_never_left_out(run, tmp_path):
    state = {"unet": {"w": torch.ones(2)}, "vae": {"v": torch.ones(2)}}
    a, b = pipeline(tmp_path / "A", state), pipeline(tmp_path / "B", state)
    index = json.loads((a / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (a / "model_index.json").write_text(json.dumps(index))
    out = ("-o", tmp_path / "out")
    for extra in (out, (*out, "--dry-run"), ("--dry-run",)):  # refused while planning
        result = run("merge", a, b, "--drop", "vae/*", *extra)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        assert "leaves vae of" in result.err and "without weights" in result.err
        assert "StableDiffusionPipeline" in result.err and "does not load without it" in result.err
        assert "remove the drop rule (--drop) that matches vae keys" in result.err
    result = run("merge", a, b, "--components", "unet", "--dry-run")
    assert result.code == 2 and "keep them: components unet,vae" in result.err
    assert folder_listing(tmp_path) == ["A", "B"]


@pytest.mark.parametrize(
    ("class_name", "diffusers_installed", "says"),
    [
        ("MyPipeline", True, "has no pipeline class MyPipeline"),
        ("StableDiffusionPipeline", False, "could not be checked (diffusers is not installed)"),
    ],
)
def test_components_left_out_of_an_unknown_pipeline_are_noted(
    run, tmp_path, monkeypatch, class_name, diffusers_installed, says
):
    state = {"unet": {"w": torch.ones(2)}, "vae": {"v": torch.ones(2)}}
    a, b = pipeline(tmp_path / "A", state), pipeline(tmp_path / "B", state)
    index = json.loads((a / "model_index.json").read_text())
    (a / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    if not diffusers_installed:
        monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers fails
    out = tmp_path / "out"
    result = run("merge", a, b, "--drop", "vae/*", "-o", out)
    assert result.code == 0, result.err
    assert "model_index.json marks vae absent ([null, null])" in result.err and says in result.err
    assert folder_listing(out) == ["README.md", "model_index.json", "unet"]  # README: the card
    assert json.loads((out / "model_index.json").read_text())["vae"] == [None, None]


def test_write_failure_is_one_line(run, tmp_path, models, monkeypatch):
    from weightmix.io import writer

    def full(self, data, offset):
        raise OSError(28, "No space left on device", str(self.temp))

    monkeypatch.setattr(writer._TempFile, "write_at", full)
    before = folder_listing(tmp_path)
    result = run("merge", models["A"], models["B"], "-o", tmp_path / "out.safetensors")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "No space left on device" in result.err and "nothing was written" in result.err
    assert f"the disk is full in {tmp_path}" in result.err and "bytes)" in result.err
    assert folder_listing(tmp_path) == before


def refused(result, *fragments: str) -> None:
    """Exit 2 with one error line holding every fragment."""
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightmix: error: "), result.err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_a_dangling_link_at_the_output_path_is_an_existing_output(run, tmp_path, models):
    """A symlink whose target is missing still names something at the output path."""
    out = tmp_path / "out.safetensors"
    out.symlink_to(tmp_path / "missing.safetensors")
    refused(run("merge", models["A"], models["B"], "-o", out), "exists", "--overwrite")
    assert out.is_symlink() and not (tmp_path / "missing.safetensors").exists()
    result = run("merge", models["A"], models["B"], "-o", out, "--overwrite", "-q")
    assert result.code == 0, result.err
    assert out.is_file() and not out.is_symlink()  # the link replaced, its target not made
    assert not (tmp_path / "missing.safetensors").exists()


def test_another_users_output_in_a_sticky_folder_is_refused_before_merging(
    run, tmp_path, models, monkeypatch
):
    """In a sticky folder (like /tmp) only an entry's owner, the folder's owner or root may
    replace it; seen from a user who is none of them (the process's uid made another)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)
    out = folder / "out.safetensors"
    out.write_bytes(b"someone else's")
    owner = os.stat(out).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)
    refused(run("merge", models["A"], models["B"], "-o", out, "--overwrite"),
                 "belongs to another user", "sticky bit")  # fmt: skip
    assert out.read_bytes() == b"someone else's"
    monkeypatch.undo()
    result = run("merge", models["A"], models["B"], "-o", out, "--overwrite", "-q")
    assert result.code == 0, result.err


def test_an_output_name_that_is_not_utf8_gets_a_readable_title(run, tmp_path, models):
    """Bytes that are not UTF-8 in the output's name (Python keeps them as lone surrogates)
    cannot go into the JSON header as they are: the default title shows U+FFFD there."""
    out = tmp_path / os.fsdecode(b"merged-\xff.safetensors")
    result = run("merge", models["A"], models["B"], "-o", out, "-q")
    assert result.code == 0, result.err
    with open(out, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    assert header["__metadata__"]["modelspec.title"] == "merged-\ufffd"
