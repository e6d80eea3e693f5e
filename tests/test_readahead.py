"""The page-cache hint for a merge's inputs (weightmix/readahead.py): which files of a command
line it names, how it spreads its budget over them, that it calls posix_fadvise with exactly
those ranges, and that it runs before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from weightmix import readahead


def files(tmp_path, *names: str) -> list[str]:
    paths = []
    for name in names:
        path = tmp_path / name
        path.write_bytes(b"\0" * 1000)
        paths.append(str(path))
    return paths


def test_the_inputs_of_a_merge_command_line_are_named(tmp_path):
    a, b, c, out, recipe = files(tmp_path, "a.safetensors", "b.ckpt", "c.safetensors",
                                 "out.safetensors", "r.yaml")  # fmt: skip
    argv = ["weightmix", "merge", a, f"second={b}", "-m", "ties", "-o", out, c, "--save-recipe",
            recipe, str(tmp_path / "missing.safetensors")]  # fmt: skip
    assert readahead.input_files(argv) == [a, b, c]
    assert readahead.input_files(["weightmix", "merge", "--output", out, a]) == [a]
    assert readahead.input_files(["weightmix", "inspect", a]) == []
    assert readahead.input_files(["weightmix", "merge", recipe]) == []
    assert readahead.input_files(["weightmix"]) == []


def test_hints_take_each_file_a_slice_at_a_time_within_the_budget():
    mb = 2**20
    sizes = [150 * mb, 70 * mb]
    everything = readahead.plan_hints(sizes, 10**12)
    assert everything == [(0, 0, 64 * mb), (1, 0, 64 * mb), (0, 64 * mb, 64 * mb),
                          (1, 64 * mb, 6 * mb), (0, 128 * mb, 22 * mb)]  # fmt: skip
    assert sum(length for _, _, length in everything) == sum(sizes)
    limited = readahead.plan_hints(sizes, 100 * mb)
    assert limited == [(0, 0, 64 * mb), (1, 0, 36 * mb)]
    assert readahead.plan_hints(sizes, 0) == [] and readahead.plan_hints([], mb) == []


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_start_hints_the_named_files_on_a_thread(tmp_path, monkeypatch):
    a, b = files(tmp_path, "a.safetensors", "b.safetensors")
    calls = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    thread = readahead.start(["weightmix", "merge", a, b, "-o", str(tmp_path / "o.safetensors")])
    assert thread is not None and thread.daemon
    thread.join(10)
    assert calls == [(a, 0, 1000, os.POSIX_FADV_WILLNEED), (b, 0, 1000, os.POSIX_FADV_WILLNEED)]
    assert readahead.start(["weightmix", "methods"]) is None
    monkeypatch.setenv("WEIGHTMIX_READAHEAD", "0")
    assert readahead.start(["weightmix", "merge", a, b]) is None


def test_the_hint_comes_before_torch_is_imported():
    code = "import sys, weightmix.launch, weightmix.readahead;print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_every_public_name_of_the_package_resolves_on_first_use():
    code = (
        "import weightmix;"
        "missing = [n for n in weightmix.__all__ if getattr(weightmix, n, None) is None];"
        "print(missing, sorted(weightmix.__all__) == sorted([*weightmix._EXPORTS, '__version__']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[] True"
