"""Pickled checkpoints: read only through torch's weights_only loader, converted safely."""

from __future__ import annotations

import os
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
