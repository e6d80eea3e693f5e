"""`weightmix verify`: an output checked end to end, exit 1 with the first problem."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import save


@pytest.fixture
def merged(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    result = run("merge", models["A"], models["B"], "--alpha", "0.3", "-o", out, "-q")
    assert result.code == 0, result.err
    return out


def test_a_good_output_passes_with_its_inputs_checked_and_recomputed(run, merged):
    result = run("verify", merged, "--inputs")
    assert result.code == 0, result.err
    assert "ok:" in result.out and "2 input(s) match their fingerprints" in result.out
    assert "recomputed from the inputs: identical" in result.out


def test_a_changed_input_is_found(run, merged, models):
    torch.manual_seed(9)
    save(models["B"], {k: torch.randn_like(v.float()).half()
                       for k, v in _state(models["B"]).items()})  # fmt: skip
    result = run("verify", merged)
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert "input 'B'" in result.err and "is not the file this output was made from" in result.err


def test_absent_inputs_are_said_not_checked(run, merged, models):
    models["A"].unlink()
    result = run("verify", merged)
    assert result.code == 0 and "not present, not checked: A" in result.out
    result = run("verify", merged, "--inputs")
    assert result.code == 1 and "--inputs needs every input; not found: A" in result.err


def test_a_non_finite_value_is_found(run, merged):
    data = bytearray(merged.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F16")
    at = 8 + length + header[key]["data_offsets"][0]
    data[at : at + 2] = struct.pack("<e", float("nan"))
    merged.write_bytes(bytes(data))
    result = run("verify", merged)
    assert result.code == 1
    assert f"tensor '{key}' holds 1 NaN or infinite value(s)" in result.err


def test_a_flipped_byte_is_found_by_recomputing(run, merged):
    data = bytearray(merged.read_bytes())
    data[-3] ^= 0x01  # a finite value changed: only recomputing can tell
    merged.write_bytes(bytes(data))
    assert run("verify", merged).code == 0
    result = run("verify", merged, "--inputs")
    assert result.code == 1 and "differs from what its recorded recipe makes" in result.err


@pytest.mark.parametrize("damage", ["truncated", "trailing", "header"])
def test_damaged_files_fail(run, merged, damage):
    data = merged.read_bytes()
    damaged = {"truncated": data[:-100], "trailing": data + b"\0" * 8,
               "header": data[:20] + b"\xff" + data[21:]}[damage]  # fmt: skip
    merged.write_bytes(damaged)
    result = run("verify", merged)
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    words = {"truncated": "truncated", "trailing": "bytes after its last tensor",
             "header": "not valid JSON"}  # fmt: skip
    assert words[damage] in result.err


def _state(path):
    from safetensors.torch import load_file

    return load_file(path)
