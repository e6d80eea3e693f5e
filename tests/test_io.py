"""Reading (header validation, lazy reads, sharded sets) and streaming writing."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import load, random_state, save
from safetensors import safe_open

from weightmix.errors import WeightmixError
from weightmix.io import OutputTensor, dtype_from_name, open_checkpoint, open_output
from weightmix.io.dtypes import SAFETENSORS_DTYPES


def _raw_file(path, header: dict, data: bytes = b"", length: int | None = None) -> None:
    text = json.dumps(header).encode()
    size = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + text + data)


def test_reads_what_the_reference_library_wrote(tmp_path):
    state = random_state(1, torch.bfloat16)
    path = save(tmp_path / "m.safetensors", state, metadata={"note": "hi"})
    with open_checkpoint(path) as ckpt:
        assert set(ckpt.tensors) == set(state)
        assert ckpt.metadata == {"note": "hi"}
        for key, tensor in state.items():
            assert ckpt.read(ckpt.tensors[key]).equal(tensor)


@pytest.mark.parametrize("name", sorted(SAFETENSORS_DTYPES))
def test_every_dtype_round_trips_through_writer_and_reference_reader(tmp_path, name):
    dtype = SAFETENSORS_DTYPES[name]
    source = (torch.arange(24, dtype=torch.float32) - 12).reshape(2, 3, 4)
    tensor = source.to(dtype.torch)
    path = tmp_path / "t.safetensors"
    out = open_output(path, [OutputTensor("t", dtype, (2, 3, 4))], {"k": "v"})
    out.write("t", tensor)
    out.commit()
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"k": "v"}
        read = handle.get_tensor("t")
    assert read.dtype == dtype.torch and read.view(torch.uint8).equal(tensor.view(torch.uint8))
    with open_checkpoint(path) as ckpt:
        assert ckpt.read(ckpt.tensors["t"]).view(torch.uint8).equal(tensor.view(torch.uint8))


def test_output_gets_the_usual_file_mode(tmp_path):
    f32 = dtype_from_name("fp32")
    out = open_output(tmp_path / "x.safetensors", [OutputTensor("a", f32, (1,))], {})
    out.write("a", torch.ones(1))
    out.commit()
    (tmp_path / "plain").write_bytes(b"")
    mode = (tmp_path / "x.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777


def test_writer_handles_scalars_and_empty_tensors(tmp_path):
    f32 = dtype_from_name("fp32")
    tensors = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "v": torch.ones(3)}
    layout = [OutputTensor(k, f32, tuple(v.shape)) for k, v in tensors.items()]
    out = open_output(tmp_path / "x.safetensors", layout, {})
    for key, value in tensors.items():
        out.write(key, value)
    out.commit()
    read = load(tmp_path / "x.safetensors")
    for key, value in tensors.items():
        assert read[key].shape == value.shape and read[key].equal(value)


def test_writer_refuses_tensors_out_of_layout(tmp_path):
    f32 = dtype_from_name("fp32")
    out = open_output(tmp_path / "x.safetensors", [OutputTensor("a", f32, (2,))], {})
    with pytest.raises(RuntimeError, match="not in the output layout"):
        out.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="expected a"):
        out.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="0 of 8 bytes"):
        out.commit()
    out.abort()
    assert list(tmp_path.iterdir()) == []


def test_sharded_set_opens_from_index_or_folder(tmp_path):
    state = random_state(4, torch.float32)
    f32 = dtype_from_name("fp32")
    layout = [
        OutputTensor(k, f32 if v.is_floating_point() else dtype_from_name("i64"), tuple(v.shape))
        for k, v in state.items()
    ]
    out = open_output(tmp_path / "model.safetensors", layout, {}, max_shard_bytes=2000)
    for t in layout:
        out.write(t.key, state[t.key])
    files = out.commit()
    index = tmp_path / "model.safetensors.index.json"
    assert files[-1] == index and len(files) > 3
    assert json.loads(index.read_text())["metadata"]["total_size"] == sum(t.nbytes for t in layout)
    for source in (index, tmp_path):
        with open_checkpoint(source) as ckpt:
            assert len(ckpt.files) == len(files) - 1
            for key, tensor in state.items():
                assert ckpt.read(ckpt.tensors[key]).equal(tensor)


def _bad(tmp_path, name, header, data=b"", length=None):
    path = tmp_path / name
    _raw_file(path, header, data, length)
    with pytest.raises(WeightmixError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_truncated_file(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(WeightmixError, match="too short"):
        open_checkpoint(tmp_path / "t.safetensors")


def test_header_longer_than_file(tmp_path):
    assert "truncated" in _bad(tmp_path, "h.safetensors", {}, length=10_000)


def test_invalid_json_header(tmp_path):
    path = tmp_path / "j.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(WeightmixError, match="not valid JSON"):
        open_checkpoint(path)


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}
    assert "unknown dtype 'F12'" in _bad(tmp_path, "d.safetensors", header, b"\0\0")


def test_offsets_disagree_with_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    assert "needs 8 bytes" in _bad(tmp_path, "s.safetensors", header, b"\0" * 8)


def test_out_of_range_offsets(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    assert "truncated" in _bad(tmp_path, "r.safetensors", header, b"\0" * 8)


def test_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    assert "overlap" in _bad(tmp_path, "o.safetensors", header, b"\0" * 12)


def test_folder_without_index(tmp_path):
    save(tmp_path / "only.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(WeightmixError, match="neither a diffusers pipeline"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_shard_or_wrong_shard(tmp_path):
    save(tmp_path / "s1.safetensors", {"a": torch.zeros(2)})
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(WeightmixError, match="missing"):
        open_checkpoint(index)
    index.write_text(json.dumps({"weight_map": {"b": "s1.safetensors"}}))
    with pytest.raises(WeightmixError, match="no such tensor"):
        open_checkpoint(index)


@pytest.mark.parametrize(
    "name", ["../s1.safetensors", "sub/../../s1.safetensors", "/tmp/s1.safetensors", "..", "."]
)
def test_an_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, name):
    """Shards lie in their index's folder (transformers also allows a subfolder): a name that
    climbs out of it, or is absolute, is refused before anything is opened."""
    inner = tmp_path / "model"
    (inner / "sub").mkdir(parents=True)
    for where in (tmp_path, inner / "sub"):
        save(where / "s1.safetensors", {"a": torch.zeros(2)})
    index = inner / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(WeightmixError, match="not a file name inside the index's folder"):
        open_checkpoint(index)
    index.write_text(json.dumps({"weight_map": {"a": "sub/s1.safetensors"}}))
    with open_checkpoint(index) as checkpoint:
        assert checkpoint.read(checkpoint.tensors["a"]).tolist() == [0.0, 0.0]


def test_file_shrunk_after_opening_is_an_error_not_garbage(tmp_path):
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(1000)})
    with open_checkpoint(path) as ckpt:
        with open(path, "r+b") as handle:
            handle.truncate(200)
        with pytest.raises(WeightmixError, match=r"changed size .* while it was being read"):
            ckpt.read(ckpt.tensors["w"])
