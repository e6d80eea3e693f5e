"""Non-finite weights (NaN, ±inf): found in the inputs on request (--check-finite), and never
introduced by a merge unless allowed (allow_nonfinite / --allow-nonfinite).

A merge "gains" a non-finite value at an element whose output is NaN or ±inf while every input
of that element is finite: an unstable method, or a cast that overflows the output dtype (fp16
holds at most 65504). Values an input already had are carried, not gained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from weightmix.errors import WeightmixError
from weightmix.io.reader import Checkpoint, TensorInfo

READ_ELEMENTS = 1 << 22


def check_gained(
    key: str,
    output: torch.Tensor,
    result: torch.Tensor | Callable[[], torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
) -> None:
    """Raise when `output` (the result cast to the output dtype) is non-finite where every
    input is finite. `result` is the value before the cast (same element order), or a call
    that computes it, made only when there is something to report."""
    if not output.is_floating_point():
        return
    if count_nonfinite(output) == 0:
        return
    finite = torch.isfinite(_widened(output))
    gained = ~finite.reshape(-1)
    for tensor in inputs.values():
        if tensor.is_floating_point() and tensor.numel() == gained.numel():
            gained &= torch.isfinite(_widened(tensor).reshape(-1))
    count = int(gained.sum())
    if not count:
        return
    if callable(result):
        result = result()
    before = result.reshape(-1)[gained]
    finite_before = before[torch.isfinite(before)]
    if finite_before.numel():
        largest = float(finite_before.abs().max())
        limit = torch.finfo(output.dtype).max
        cause = (
            f"the cast to {str(output.dtype).removeprefix('torch.')} overflowed to ±inf (largest"
            f" |value| {largest:.6g} > {limit:.6g}): {_wider(output.dtype)}"
        )
    else:
        cause = "the method made NaN or ±inf from finite inputs: check its parameters"
    raise WeightmixError(
        f"key '{key}': the merge made {count} value(s) non-finite that no input had; {cause},"
        " or pass --allow-nonfinite to write them"
    )


def _wider(dtype: torch.dtype) -> str:
    """What to write instead of an output dtype that overflowed."""
    wider = [name for name, kind in (("bf16", torch.bfloat16), ("fp32", torch.float32))
             if torch.finfo(kind).max > torch.finfo(dtype).max]  # fmt: skip
    if not wider:
        return "scale the inputs or the method's parameters down"
    return f"use a wider --dtype ({', '.join(wider)})"


def _widened(values: torch.Tensor) -> torch.Tensor:
    return values if values.element_size() > 1 else values.float()  # no isfinite for fp8


def count_nonfinite(values: torch.Tensor) -> int:
    """How many elements of a float tensor are NaN or ±inf. Screened first by a float32 sum,
    finite exactly when every term is (a vectorised pass, ~0.2 ns per element, where
    isfinite() takes ~2.7 on fp16); a huge but finite sum only costs the exact count."""
    wide = _widened(values)
    if bool(torch.isfinite(wide.sum(dtype=torch.float32 if wide.element_size() < 8 else None))):
        return 0
    return int((~torch.isfinite(wide)).sum())


def tensor_chunks(checkpoint: Checkpoint, info: TensorInfo) -> Iterator[torch.Tensor]:
    """A stored tensor's values, flat, READ_ELEMENTS at a time in one reused buffer (each
    chunk is valid until the next is read)."""
    buffer = torch.empty(min(info.numel, READ_ELEMENTS), dtype=info.dtype.torch)
    for start in range(0, info.numel, READ_ELEMENTS):
        chunk = buffer[: min(READ_ELEMENTS, info.numel - start)]
        checkpoint.read_range(info, start * info.dtype.itemsize, chunk.view(torch.uint8).numpy())
        yield chunk


def nonfinite_counts(checkpoints: Mapping[str, Checkpoint]) -> list[tuple[str, str, int]]:
    """(model, key, count) for every float tensor of the inputs holding NaN or ±inf, read in
    chunks (memory does not grow with tensor size)."""
    found = []
    for name, checkpoint in checkpoints.items():
        for info in checkpoint.tensors.values():
            if info.dtype.torch.is_floating_point:
                bad = sum(count_nonfinite(chunk) for chunk in tensor_chunks(checkpoint, info))
                if bad:
                    found.append((name, info.key, bad))
    return found


def report_inputs(checkpoints: Mapping[str, Checkpoint], allow: bool) -> list[str]:
    """--check-finite: notes naming every input tensor with NaN/inf (per key, count); an error
    when there are any, unless allowed."""
    found = nonfinite_counts(checkpoints)
    notes = [f"model '{m}': tensor '{k}' holds {n} NaN or infinite value(s)" for m, k, n in found]
    if found and not allow:
        model, key, number = found[0]
        raise WeightmixError(
            f"model '{model}': tensor '{key}' holds {number} NaN or infinite value(s)"
            f" ({len(found)} tensor(s) in all have some): repair or drop them, or pass"
            " --allow-nonfinite to merge anyway"
        )
    return notes
