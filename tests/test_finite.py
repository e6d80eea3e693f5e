"""Non-finite weights: --check-finite names them in the inputs; a merge that makes NaN/inf from
finite inputs (fp16 overflow, an unstable method) stops unless --allow-nonfinite."""

from __future__ import annotations

import torch
from helpers import load, save


def states(tmp_path, scale: float = 1.0):
    torch.manual_seed(0)
    a = {"w": torch.randn(64, 8) * scale, "b": torch.randn(8) * scale}
    b = {k: v + 1 for k, v in a.items()}
    c = {k: v.clone() for k, v in a.items()}
    return {n: save(tmp_path / f"{n}.safetensors", {k: v.half() for k, v in s.items()})
            for n, s in (("A", a), ("B", b), ("C", c))}  # fmt: skip


def test_fp16_overflow_is_named_with_the_key_and_largest_value(run, tmp_path):
    paths = states(tmp_path)
    out = tmp_path / "out.safetensors"
    args = ["merge", paths["A"], paths["B"], paths["C"], "-m", "add_difference",
            "--alpha", "100000", "-o", out]  # fmt: skip
    result = run(*args)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "non-finite that no input had" in result.err
    assert "the cast to float16 overflowed" in result.err and "65504" in result.err
    # the largest |value| said is the largest of the overflowing results, computed here
    a, b, c = (load(paths[n]) for n in "ABC")
    key = "b" if "key 'b'" in result.err else "w"
    exact = a[key].float() + 100000 * (b[key].float() - c[key].float())
    overflowing = exact[exact.abs() > 65504]
    assert f"{float(overflowing.abs().max()):.6g}" in result.err
    assert not out.exists()
    result = run(*args, "--allow-nonfinite", "-q")
    assert result.code == 0, result.err
    assert torch.isinf(load(out)[key]).sum() == overflowing.numel()


def test_nonfinite_inputs_are_reported_with_check_finite(run, tmp_path):
    paths = states(tmp_path)
    tensors = load(paths["B"])
    tensors["w"][3, :5] = float("nan")
    tensors["w"][4, 0] = float("inf")
    save(paths["B"], tensors)
    out = tmp_path / "out.safetensors"
    result = run("merge", paths["A"], paths["B"], "-o", out, "--check-finite")
    assert result.code == 2
    assert "model 'B': tensor 'w' holds 6 NaN or infinite value(s)" in result.err
    assert not out.exists()
    result = run("merge", paths["A"], paths["B"], "-o", out, "--check-finite", "--allow-nonfinite")
    assert result.code == 0, result.err
    assert "note: model 'B': tensor 'w' holds 6 NaN or infinite value(s)" in result.err
    # carried from an input, not gained: no flag needed without --check-finite
    result = run("merge", paths["A"], paths["B"], "-o", out, "--overwrite", "-q")
    assert result.code == 0, result.err
    assert (~torch.isfinite(load(out)["w"])).sum() == 6


def test_a_bfloat16_overflow_asks_for_fp32_only(run, tmp_path):
    """bf16 holds nearly float32's range: its overflow points to fp32, not to bf16 itself."""
    a = {"w": torch.full((4, 4), 3.3895e38)}  # bfloat16's largest value
    b = {"w": torch.full((4, 4), 1e36)}  # the sum, 3.3995e38, is a float32 past bf16's range
    paths = [save(tmp_path / f"{n}.safetensors", {k: v.bfloat16() for k, v in s.items()})
             for n, s in (("A", a), ("B", b))]  # fmt: skip
    out = tmp_path / "out.safetensors"
    result = run("merge", *paths, "--weights", "1,1", "-p", "normalize=false", "-o", out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "the cast to bfloat16 overflowed" in result.err
    assert "use a wider --dtype (fp32)" in result.err and not out.exists()
