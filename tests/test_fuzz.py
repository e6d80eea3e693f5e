"""Fuzzing every parser a stranger's file reaches (issue 11, item 1): property tests over
mutated real-shaped inputs (few examples here; `make fuzz` runs 100,000 per parser), and one
regression test per defect the fuzzing found."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from fuzzing import (
    DEEP,
    Workspace,
    join_safetensors,
    run_one,
    safetensors_bytes,
    sd1_state,
    split_safetensors,
)
from hypothesis import HealthCheck, Phase, given, settings

from weightmix.errors import WeightmixError
from weightmix.io import open_checkpoint
from weightmix.recipe import load_recipe

EXAMPLES = {
    "safetensors": 120,
    "index": 100,
    "config": 100,
    "model_index": 100,
    "pickle": 100,
    "recipe": 60,
    "cli": 15,
    "search": 40,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    space = Workspace(tmp_path_factory.mktemp("fuzz"))
    yield space
    space.close()


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_mutated_inputs_end_in_success_or_one_line_error(workspace, name):
    """Every input: success or a one-line WeightmixError (exit 2 from the CLI), nothing else."""
    target = workspace.targets()[name]
    for seed in target.seeds:  # the seeds themselves are read without error
        assert run_one(target, bytes([0]) + seed if name == "config" else seed) in ("ok", "error")

    @settings(
        max_examples=EXAMPLES[name],
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def check(data: bytes) -> None:
        run_one(target, data)

    check()


# ---------------------------------------------------------------- regressions


def _header_file(path: Path, header: bytes, body: bytes = b"\0" * 64) -> Path:
    path.write_bytes(join_safetensors(header, body))
    return path


def _refused(path: Path, says: str) -> str:
    with pytest.raises(WeightmixError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert says in message and "\n" not in message, message
    return message


def _one_line_exit_2(result, says: str) -> None:
    assert result.code == 2, result.err
    assert len(result.err.splitlines()) == 1 and "Traceback" not in result.err, result.err
    assert says in result.err, result.err


def test_deeply_nested_header_is_one_line_not_recursion_error(run, tmp_path):
    path = _header_file(tmp_path / "deep.safetensors", b"[" * DEEP)
    _refused(path, f"{path}: header is not valid JSON (nested too deeply)")
    _one_line_exit_2(run("inspect", path), "header is not valid JSON (nested too deeply)")


def test_header_integer_of_5000_digits_is_one_line_not_value_error(tmp_path):
    header = b'{"a": {"dtype": "F16", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 2]}}'
    path = _header_file(tmp_path / "digits.safetensors", header)
    _refused(path, "header is not valid JSON (a number has more digits than Python reads)")


def test_header_dtype_that_is_a_list_is_an_unknown_dtype(tmp_path):
    header = json.dumps({"w": {"dtype": [1], "shape": [1], "data_offsets": [0, 2]}}).encode()
    path = _header_file(tmp_path / "dtype.safetensors", header)
    _refused(path, f"{path}: tensor 'w': unknown dtype [1] (known: F64")


def test_header_shape_past_the_data_section_is_refused_before_multiplying(tmp_path):
    """A hundred thousand dimensions of 2**62: refused once the product passes the data
    section, not after multiplying numbers of two million digits; the message quotes the
    shape cut short, not 2 MB of digits (a 4,000-digit dimension made it fail to format)."""
    shape = ",".join([str(2**62)] * 100_000)
    header = f'{{"w": {{"dtype": "F16", "shape": [{shape}], "data_offsets": [0, 2]}}}}'.encode()
    path = _header_file(tmp_path / "shape.safetensors", header)
    start = time.perf_counter()
    message = _refused(path, "needs more bytes than the whole data section (64): the header")
    assert time.perf_counter() - start < 5
    assert f"tensor 'w': shape [{2**62}, {2**62}, " in message and "...4] of F16" in message
    assert len(message) < 400


def test_tensor_names_with_line_breaks_stay_one_line(run, tmp_path):
    header = json.dumps({"a\nb\rc": {"dtype": "X", "shape": [1], "data_offsets": [0, 2]}})
    path = _header_file(tmp_path / "names.safetensors", header.encode())
    _refused(path, "tensor 'a\\nb\\rc': unknown dtype 'X'")
    _one_line_exit_2(run("inspect", path), "tensor 'a\\nb\\rc': unknown dtype 'X'")


def test_lone_surrogate_names_are_refused(run, tmp_path):
    """JSON's \\ud800 decodes to a lone surrogate: no terminal or safetensors writer takes it
    (`inspect --keys` crashed printing it)."""
    state = {"w": torch.zeros(2)}
    header, body = split_safetensors(safetensors_bytes(state))
    path = _header_file(
        tmp_path / "surrogate.safetensors", header.replace(b'"w"', b'"\\ud800"'), body
    )
    says = "header holds the name or value '\\ud800', whose \\u escape is a lone surrogate"
    _refused(path, says)
    _one_line_exit_2(run("inspect", path, "--keys"), says)


def test_weightmix_errors_are_one_printable_line():
    assert str(WeightmixError("a\nb\r\ud800 é")) == "a\\nb\\r\\ud800 é"


def test_deeply_nested_shard_index_is_one_line(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(b"[" * DEEP)
    _refused(index, f"{index}: the shard index is not valid JSON (nested too deeply)")


def test_shard_index_naming_a_key_with_a_line_break_stays_one_line(run, tmp_path):
    shard = tmp_path / "model-00001-of-00001.safetensors"
    shard.write_bytes(safetensors_bytes({"w": torch.zeros(2)}))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a\nb": shard.name, "w": shard.name}}))
    _one_line_exit_2(run("inspect", index), "says 'a\\nb' is in model-00001-of-00001.safetensors")


def _component(folder: Path, config: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        safetensors_bytes({"conv_in.weight": torch.zeros(8, 4, 3, 3)})
    )
    (folder / "config.json").write_bytes(config)
    return folder


def test_config_class_name_that_is_not_a_string_is_no_class(tmp_path):
    """A list as _class_name raised TypeError (unhashable) when looked up."""
    folder = _component(tmp_path / "unet", b'{"_class_name": ["x"], "in_channels": 9}')
    with open_checkpoint(folder) as checkpoint:
        assert list(checkpoint.tensors) == ["conv_in.weight"]


def test_deeply_nested_config_is_one_line(run, tmp_path):
    folder = _component(tmp_path / "unet", b"[" * DEEP)
    _refused(folder, f"{folder / 'config.json'} is not valid JSON (nested too deeply)")
    _one_line_exit_2(run("inspect", folder), "config.json is not valid JSON (nested too deeply)")


@pytest.mark.parametrize("name", ["..", "../unet", "/", "."])
def test_model_index_components_outside_the_pipeline_are_refused(run, tmp_path, name):
    pipeline = tmp_path / "pipeline"
    _component(pipeline / "unet", b'{"_class_name": "UNet2DConditionModel"}')
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "X"], name: ["a"]}
    (pipeline / "model_index.json").write_text(json.dumps(index))
    says = f"model_index.json: names the component '{name}', which is not a folder name"
    _refused(pipeline, says)
    _one_line_exit_2(run("inspect", pipeline), says)


def test_deeply_nested_model_index_is_one_line(tmp_path):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_bytes(b'{"a": ' + b"[" * DEEP)
    _refused(pipeline, f"{pipeline}/model_index.json is not valid JSON (nested too deeply)")


def _legacy_pickle(state: dict) -> bytes:
    path_bytes = __import__("io").BytesIO()
    torch.save(state, path_bytes, _use_new_zipfile_serialization=False)
    return path_bytes.getvalue()


def test_corrupt_pickle_opcodes_are_one_line(run, tmp_path):
    """Truncating the main pickle of the old format left torch's unpickler popping an empty
    stack (IndexError), which escaped as a traceback."""
    data = _legacy_pickle({"w": torch.zeros(3)})
    start = data.index(b"\x80\x02}")  # the state dict's pickle, after magic, version, sys info
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(data[:start] + b"\x80\x02" + b"." + data[start:])  # STOP on an empty stack
    says = "cannot read the pickled checkpoint (IndexError: "
    message = _refused(path, says)
    assert message.endswith("it is corrupt, truncated or not a torch checkpoint")
    _one_line_exit_2(run("inspect", path), says)


def test_old_format_storages_larger_than_the_file_are_refused_unallocated(tmp_path):
    """The old format allocates each storage at the element count the pickle gives, before
    reading it: 2**31 elements claimed in a 400-byte file were 8 GB allocated."""
    data = _legacy_pickle({"w": torch.ones(3, 4)})
    count = re.search(rb"cpuq.K\x0c", data)
    path = tmp_path / "huge.ckpt"
    path.write_bytes(
        data[: count.end() - 2] + b"J" + struct.pack("<i", 2**31 - 1) + data[count.end() :]
    )
    _refused(
        path, f"the pickle's tensors claim 8589934588 bytes but the file holds only {len(data) + 3}"
    )


def test_old_format_pickles_read_as_before(tmp_path):
    """Views into one storage count it once; the tensors read back exactly."""
    base = torch.arange(12, dtype=torch.float32)
    path = tmp_path / "views.ckpt"
    path.write_bytes(_legacy_pickle({"a": base[:6], "b": base[6:].view(2, 3), "c": base}))
    with open_checkpoint(path) as checkpoint:
        assert torch.equal(checkpoint.read(checkpoint.tensors["b"]), base[6:].view(2, 3))
        assert torch.equal(checkpoint.read(checkpoint.tensors["c"]), base)


def test_pickle_lengths_never_become_allocations(tmp_path):
    """A string length of 4 GB in a 10-byte old-format pickle: read under an address-space cap
    of 1 GB over what torch holds, it is a one-line error, not a MemoryError."""
    path = tmp_path / "length.ckpt"
    path.write_bytes(b"\x80\x02X" + struct.pack("<I", 0xF0000000) + b"abc")
    storages = tmp_path / "storages.ckpt"
    data = _legacy_pickle({"w": torch.ones(3, 4)})
    count = re.search(rb"cpuq.K\x0c", data)
    storages.write_bytes(
        data[: count.end() - 2] + b"J" + struct.pack("<i", 2**31 - 1) + data[count.end() :]
    )
    script = (
        "import resource, sys\n"
        "from weightmix.errors import WeightmixError\n"
        "from weightmix.io import open_checkpoint\n"
        "size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open_checkpoint(path)\n"
        "    except WeightmixError as error:\n"
        "        print('refused:', error)\n"
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc for the address-space cap")
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(storages)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"refused: {path}: cannot read the pickled checkpoint: EOFError", lines
    assert "the pickle's tensors claim 8589934588 bytes" in lines[1], lines


def test_recipe_number_of_5000_digits_is_one_line(run, tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text("models: {a: a.safetensors}\nmerge: a\nseed: " + "9" * 5000 + "\n")
    says = f"{path}: holds a value YAML cannot read (Exceeds the limit (4300 digits)"
    with pytest.raises(WeightmixError, match=re.escape(says)):
        load_recipe(path)
    _one_line_exit_2(run("merge", path, "--dry-run"), says)


def test_recipe_date_that_is_no_date_is_one_line(tmp_path):
    path = tmp_path / "date.yaml"
    path.write_text("models: {a: a.safetensors}\nmerge: a\ntitle: 2001-13-45\n")
    with pytest.raises(WeightmixError, match=r"holds a value YAML cannot read \(month must be"):
        load_recipe(path)


def _alias_bomb(levels: int) -> str:
    lines = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ", ".join(lines) + "]"


def test_recipe_alias_bomb_is_refused_at_once(run, tmp_path):
    """Nine levels of ten aliases stand for a billion values: walking them (the NaN check)
    took minutes; refused in linear time."""
    path = tmp_path / "bomb.yaml"
    path.write_text(
        "models: {a: a.safetensors, b: b.safetensors}\n"
        f"merge: {{method: weighted_sum, inputs: [a, b], alpha: 0.5, w: {_alias_bomb(9)}}}\n"
    )
    says = "parameters hold more than 100,000 values once their YAML aliases are written out"
    start = time.perf_counter()
    with pytest.raises(WeightmixError, match=re.escape(f"{path}: {says}")):
        load_recipe(path)
    assert time.perf_counter() - start < 5
    _one_line_exit_2(run("merge", "a", "b", "-p", f"w={_alias_bomb(9)}", "--dry-run"), says)


def test_cli_value_of_5000_digits_is_text_not_a_traceback(run, tmp_path):
    models = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in models:
        path.write_bytes(safetensors_bytes(sd1_state(4)))
    result = run("merge", *models, "-p", "alpha=" + "9" * 5000, "--dry-run")
    _one_line_exit_2(result, "weighted_sum parameter alpha='99999")


def test_corrupt_old_format_pickle_prints_nothing_but_the_error(tmp_path, capfd):
    """The size check's fake-tensor pass logged each failing op with a traceback to stderr."""
    data = _legacy_pickle({"w": torch.ones(3, 4)})
    assert data.count(b"K\x03K\x04\x86") == 1  # the size (3, 4) in _rebuild_tensor_v2's args
    path = tmp_path / "sizes.ckpt"
    path.write_bytes(data.replace(b"K\x03K\x04\x86", b"K\x03K\x04K\x01\x87"))  # size (3, 4, 1)
    capfd.readouterr()
    _refused(path, f"{path}: cannot read the pickled checkpoint")
    assert capfd.readouterr().err == ""


def test_dimension_past_int64_beside_a_zero_is_refused(run, tmp_path):
    """[2, 0, 10**30] needs no bytes, so it passed the size check, and torch could not reshape
    to it (TypeError: overflow when unpacking long long)."""
    header = json.dumps({"b": {"dtype": "BF16", "shape": [2, 0, 10**30], "data_offsets": [0, 0]}})
    path = _header_file(tmp_path / "dimension.safetensors", header.encode())
    says = f"tensor 'b': shape [2, 0, {10**30}] has a dimension past {2**63 - 1}, more than any"
    _refused(path, says)
    _one_line_exit_2(run("inspect", path), says)


def test_names_too_long_for_the_file_system_are_one_line(run, tmp_path):
    """A shard, a pipeline component or a model named with 300 characters: os.stat raised
    OSError (File name too long) through Path.is_file."""
    long = "x" * 300
    shard = tmp_path / "model-00001-of-00001.safetensors"
    shard.write_bytes(safetensors_bytes({"w": torch.zeros(2)}))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": f"{long}.safetensors"}}))
    _one_line_exit_2(
        run("inspect", index), f"{long}.safetensors: cannot be opened: File name too long"
    )
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({long: ["diffusers", "X"]}))
    _one_line_exit_2(run("inspect", pipeline), f"{long}: cannot be opened: File name too long")
    _one_line_exit_2(
        run("inspect", tmp_path / long), f"{long}: cannot be opened: File name too long"
    )


def test_broken_zip_end_records_are_one_line(tmp_path):
    """zipfile.is_zipfile raised BadZipFile ('span multiple disks') before torch was called."""
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2)  # zip64 locator: two disks
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0)
    path = tmp_path / "disks.ckpt"
    path.write_bytes(b"\x80\x02}." + locator + end)
    _refused(path, f"{path}: cannot read the pickled checkpoint: zipfiles that span multiple disks")


@pytest.mark.parametrize("form", ["old", "zip"])
def test_long_global_names_are_refused_quickly(tmp_path, form):
    """torch quotes an unknown global in its error and searches it with regular expressions in
    time quadratic in its length: a 100 kB name hung the load for minutes."""
    pickled = b"\x80\x02ctorch." + b"[" * 100_000 + b"\nx\n."
    path = tmp_path / f"{form}.ckpt"
    if form == "old":
        path.write_bytes(pickled)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickled)
            archive.writestr("archive/version", "3\n")
            archive.writestr("archive/byteorder", "little")
    start = time.perf_counter()
    _refused(path, "cannot read the pickled checkpoint: a global name longer than 4096 bytes")
    assert time.perf_counter() - start < 5


def test_glob_of_100000_brackets_is_refused_at_once(run, tmp_path):
    """fnmatch.translate scans from each '[' to the end for its ']': quadratic, minutes for
    `--drop` (or --take, --rule, a rule's keys) of 100,000 '['."""
    models = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in models:
        path.write_bytes(safetensors_bytes(sd1_state(4)))
    start = time.perf_counter()
    result = run("merge", *models, "--drop", "[" * DEEP, "--dry-run")
    assert time.perf_counter() - start < 5
    _one_line_exit_2(result, "rules.0: keys glob of 100,000 characters: key names are far shorter")


def test_yaml_with_thousands_of_open_brackets_is_refused_before_yaml_reads_it(
    run, tmp_path, monkeypatch
):
    """PyYAML's scanner is quadratic in flow nesting (10,000 `[` take it ~2 s to refuse, and
    a fuzzed recipe hit the 10 s limit on a busy machine): a recipe, a hyper config and a CLI
    value with more than 1,000 brackets open at once are refused before YAML reads them."""
    import yaml

    deep = "[" * 5000 + "{" * 5000
    for name in ("load", "safe_load"):
        real = getattr(yaml, name)

        def guarded(text, *args, real=real, **kwargs):
            assert "[" * 5000 not in str(text), "YAML was given the deep text"
            return real(text, *args, **kwargs)

        monkeypatch.setattr(yaml, name, guarded)
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("models: {a: a.safetensors}\nmerge: " + deep + "\n")
    config = tmp_path / "config.yaml"
    config.write_text("name: x\nmodels: " + deep + "\n")
    with pytest.raises(WeightmixError, match=re.escape(f"{recipe}: nested too deeply")):
        load_recipe(recipe)
    _one_line_exit_2(run("hyper", config), f"{config}: nested too deeply to be a config")
    _one_line_exit_2(run("merge", "a", "b", "-p", f"w={deep}", "--dry-run"), "nested too deeply")
    # brackets that close again are not nesting: 2,000 of them in a row, depth 1, still read
    wide = tmp_path / "wide.yaml"
    wide.write_text("models: {a: a.safetensors}\nmerge: a\ntitle: '" + "[]" * 2000 + "'\n")
    assert load_recipe(wide).title == "[]" * 2000


@pytest.mark.parametrize("character", ["\x1d", "\x1c", "\x0b", "\x0c", "\x85", "\u2028", "\x1b"])
def test_control_characters_in_a_value_stay_one_line(run, character):
    """str.splitlines() also breaks at \\x1c-\\x1e, \\v, \\f, \\x85 and U+2028 (the CLI fuzzer
    found `--take '*\\x1dB'` printed as two lines), and \\x1b starts terminal escapes: all are
    written as escapes."""
    code = ord(character)
    escaped = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    result = run("merge", "a", "b", "--take", f"*{character}B", "--dry-run")
    _one_line_exit_2(result, f"--take '*{escaped}B'")


def test_a_size_of_thousands_of_digits_is_refused_at_once(run, tmp_path):
    """`[0-9]*\\.?[0-9]+` tried every split of a digit run before failing (15,000 digits: ~4 s,
    a 10 s timeout on the busy machine; found by the CLI fuzzer). Sizes are matched one way
    now, and a size written in more than 100 characters is refused unread."""
    from weightmix.units import _SIZE, parse_size

    digits = "9" * 15_000 + "x!"
    _one_line_exit_2(run("merge", "a", "b", "--max-shard-size", digits, "--dry-run"),
                     "(15002 characters) is not a size")  # fmt: skip
    assert _SIZE.match("9" * 97 + "x!") is None
    assert [parse_size(t) for t in ("5GB", "1.5 GiB", ".5GB", "1000", "5e3MB")] == [
        5 * 10**9, 1536 * 2**20, 5 * 10**8, 1000, 5 * 10**9]  # fmt: skip
    with pytest.raises(WeightmixError, match="is not a size"):
        parse_size("5.GB")  # as before: a point needs digits after it
