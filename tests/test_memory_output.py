"""Merging into memory (issue 10 item 2): the same bytes as a file merge, as a dict or as a
stream of finished keys; stopping the stream stops the merge."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import load

import weightmix


def recipe(models, method: dict) -> dict:
    used = {n: str(p) for n, p in models.items() if n in method["inputs"]}
    return {"models": used, "merge": method, "dtype": "fp16"}


@pytest.mark.parametrize(
    "method",
    [{"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.3},
     {"method": "ties", "inputs": ["A", "B", "C"], "density": 0.5},
     {"method": "dare_linear", "inputs": ["A", "B", "C"], "density": 0.5}],
)  # fmt: skip
def test_state_dict_and_stream_equal_the_file(models, tmp_path, method):
    data = recipe(models, method)
    weightmix.merge(data, tmp_path / "out.safetensors")
    written = load(tmp_path / "out.safetensors")
    state = weightmix.merge_to_state_dict(data, threads=2)
    assert list(state) == list(written)  # output order
    assert all(torch.equal(state[k], written[k]) and state[k].dtype == written[k].dtype
               for k in written)  # fmt: skip
    streamed = dict(weightmix.merge_iter(data, threads=2, waiting=1))
    assert streamed.keys() == written.keys()
    assert all(torch.equal(streamed[k], written[k]) for k in written)


def test_stopping_the_stream_stops_the_merge(models):
    data = recipe(models, {"method": "weighted_sum", "inputs": ["A", "B"]})
    before = threading.active_count()
    stream = weightmix.merge_iter(data, threads=2, waiting=1)
    key, tensor = next(stream)
    assert isinstance(key, str) and tensor.numel() > 0
    stream.close()
    assert threading.active_count() <= before  # the merge thread has ended


def test_bad_recipes_fail_before_anything_runs(models):
    data = recipe(models, {"method": "weighted_sum", "inputs": ["A", "Z"]})
    data["merge"]["inputs"] = ["A", "Z"]
    with pytest.raises(weightmix.WeightmixError, match="'Z' is not a model"):
        weightmix.merge_to_state_dict(data)
    with pytest.raises(weightmix.WeightmixError, match="'Z' is not a model"):
        next(weightmix.merge_iter(data))
