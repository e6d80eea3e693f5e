"""Pickled checkpoints: read only through torch's weights_only loader, converted safely."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import POSITION_IDS, folder_listing, load, random_state

import weightmix


class CreatesAFile:
    """A pickle payload: unpickling it would run os.system and create a file."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_before_anything_runs(run, tmp_path, models):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": CreatesAFile(target)}, evil)
    before = folder_listing(tmp_path)
    out = tmp_path / "out.safetensors"
    for args in (
        ("merge", models["A"], evil, "-o", out),
        ("convert", evil, out),
        ("inspect", evil),
    ):
        result = run(*args)
        assert result.code == 2, result.err
        line = result.err.strip()
        assert "\n" not in line and "refused" in line and "system" in line
    assert not target.exists()
    assert folder_listing(tmp_path) == before


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_state_dict_merges_like_safetensors(run, tmp_path, models, zip_format):
    state = random_state(2)
    ckpt = tmp_path / "b.ckpt"
    torch.save(
        {"state_dict": state, "global_step": 1000, "epoch": 3},
        ckpt,
        _use_new_zipfile_serialization=zip_format,
    )
    from_pickle, from_safetensors = tmp_path / "p.safetensors", tmp_path / "s.safetensors"
    result = run("merge", models["A"], ckpt, "--alpha", "0.4", "-o", from_pickle, "--title", "t")
    assert result.code == 0, result.err
    assert "2 entries of the pickle are not weights: global_step, epoch" in result.err
    assert run("merge", models["A"], models["B"], "--alpha", "0.4", "-o", from_safetensors,
               "--title", "t", "-q").code == 0  # fmt: skip
    merged, expected = load(from_pickle), load(from_safetensors)
    assert set(merged) == set(expected)
    for key in expected:
        assert merged[key].equal(expected[key]), key


def test_convert_pickle_to_safetensors(run, tmp_path):
    state = random_state(5, torch.float32)
    state["non_contiguous"] = torch.randn(6, 4).t()
    source = tmp_path / "model.pt"
    torch.save(state, source)
    out = tmp_path / "model.safetensors"
    assert run("convert", source, out, "-q").code == 0
    converted = load(out)
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert converted[key].equal(tensor), key
    half = tmp_path / "half.safetensors"
    assert run("convert", source, half, "--dtype", "fp16", "-q").code == 0
    halved = load(half)
    assert halved[POSITION_IDS].dtype == torch.int64
    key = next(k for k in state if k != POSITION_IDS)
    assert halved[key].equal(state[key].half())
    with weightmix.open_checkpoint(out) as ckpt:
        assert "source: " in ckpt.metadata["weightmix.recipe"]


def test_pickle_with_a_dtype_safetensors_cannot_hold(run, tmp_path):
    source = tmp_path / "complex.pt"
    torch.save({"w": torch.ones(2, dtype=torch.complex64)}, source)
    result = run("convert", source, tmp_path / "x.safetensors")
    assert result.code == 2 and "complex64" in result.err and "'w'" in result.err


def test_pickle_that_is_not_a_state_dict(run, tmp_path):
    source = tmp_path / "list.pt"
    torch.save([torch.ones(2)], source)
    result = run("inspect", source)
    assert result.code == 2 and "not a state dict" in result.err


def test_convert_refuses_output_over_its_input(run, tmp_path, models):
    result = run("convert", models["A"], models["A"], "--overwrite")
    assert result.code == 2 and "is an input" in result.err


WRAPPED = {
    "model": (lambda state: {"model": state, "epoch": 2}, "'model'"),
    "module": (  # DeepSpeed's model states
        lambda state: {"module": state, "buffer_names": [], "optimizer": None, "global_steps": 9},
        "'module'",
    ),
    "model_state_dict": (
        lambda state: {"model_state_dict": state, "optimizer_state_dict": {"state": {}}},
        "'model_state_dict'",
    ),
    "model-state_dict": (
        lambda state: {"model": {"state_dict": state, "config": {"width": 8}}, "epoch": 2},
        "'model' -> 'state_dict'",
    ),
    "beside-a-tensor": (  # a step counter saved as a tensor is not the model
        lambda state: {"state_dict": state, "global_step": torch.tensor(1000)},
        "'state_dict'",
    ),
}


@pytest.mark.parametrize("shape", list(WRAPPED))
def test_wrapped_state_dict_is_unwrapped(run, tmp_path, shape):
    wrap, where = WRAPPED[shape]
    state = random_state(4, torch.bfloat16)
    source = tmp_path / "wrapped.ckpt"
    torch.save(wrap(state), source)
    inspected = run("inspect", source)
    assert inspected.code == 0, inspected.err
    assert f"tensors: {len(state)} (" in inspected.out
    out = tmp_path / "out.safetensors"
    result = run("convert", source, out)
    assert result.code == 0, result.err
    assert f"note: model source: weights read from the pickle's {where} entry" in result.err
    converted = load(out)
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert converted[key].dtype == tensor.dtype and converted[key].equal(tensor), key


def test_pickle_without_tensors_names_its_entries(run, tmp_path):
    source = tmp_path / "config.ckpt"
    torch.save({"model": {"config": 3}, "epoch": 1}, source)
    before = folder_listing(tmp_path)
    for args in (("convert", source, tmp_path / "out.safetensors"), ("inspect", source)):
        result = run(*args)
        assert result.code == 2, result.err
        line = result.err.strip()
        assert "\n" not in line and line.startswith("weightmix: error: ")
        assert "holds no tensors; its entries: model (dict, 0 tensors), epoch (int);" in line
    assert folder_listing(tmp_path) == before
    many = tmp_path / "many.ckpt"
    torch.save({f"entry{i}": i for i in range(8)}, many)
    line = run("inspect", many).err.strip()
    assert "entry4 (int) ..." in line and "entry5" not in line


# torch < 2.2 warned "TypedStorage is deprecated" (two lines on stderr) when its weights_only
# loader read the old pre-zip format (fixed upstream by pytorch/pytorch#113614). This makes the
# installed torch do the same, so the test holds on every torch weightmix supports.
AS_TORCH_2_1 = """
import torch.serialization, torch.storage
read_dtype = torch.serialization.StorageType.dtype.fget
def dtype(self):
    torch.storage._warn_typed_storage_removal()
    return read_dtype(self)
torch.serialization.StorageType.dtype = property(dtype)
"""
CLI = "import sys; from weightmix.cli import main; sys.exit(main(sys.argv[1:]))"


def test_old_format_pickle_converts_without_torch_warnings(tmp_path):
    state = random_state(5)
    source = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, source, _use_new_zipfile_serialization=False)
    out = tmp_path / "out.safetensors"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [sys.executable, "-c", AS_TORCH_2_1 + CLI, "convert", str(source), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "TypedStorage" not in result.stderr
    assert all(line.startswith("weightmix: ") for line in result.stderr.splitlines())
    converted = load(out)
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert converted[key].dtype == tensor.dtype and converted[key].equal(tensor), key


def test_other_torch_warnings_become_one_note_line(run, tmp_path, monkeypatch):
    source = tmp_path / "model.pt"
    torch.save(random_state(6), source)
    real_load = torch.load

    def warning_load(*args, **kwargs):
        warnings.warn("checkpoint saved by a newer torch\nsecond line", UserWarning, stacklevel=2)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", warning_load)
    result = run("convert", source, tmp_path / "out.safetensors")
    assert result.code == 0, result.err
    assert "weightmix: note: model source: torch: checkpoint saved by a newer torch\n" in result.err
    assert "second line" not in result.err


def test_old_format_pickle_torch_cannot_read_is_one_line(run, tmp_path):
    """torch's legacy (pre-zip) loader fails inside torch on fp8 storages: a user error."""
    old = tmp_path / "f8.ckpt"
    torch.save(
        {"w": torch.ones(3).to(torch.float8_e4m3fn)}, old, _use_new_zipfile_serialization=False
    )
    out = tmp_path / "out.safetensors"
    result = run("convert", old, out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "old (pre-zip) format" in result.err and "re-save it" in result.err
    assert not out.exists()


def test_keys_that_read_the_same_as_text_are_refused(run, tmp_path):
    path = tmp_path / "clash.ckpt"
    torch.save({1: torch.ones(2), "1": torch.zeros(2)}, path)
    result = run("convert", path, tmp_path / "out.safetensors")
    assert result.code == 2 and "two tensors are named '1'" in result.err
    assert not (tmp_path / "out.safetensors").exists()
