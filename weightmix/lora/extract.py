"""`weightmix lora extract`: a LoRA from a fine-tune and its base. Per adapted layer, the
difference Δ = tuned − base (flattened past dim 0: convolutions become out × in·kh·kw) is cut to
its best rank-r approximation by a truncated SVD, Δ ≈ U_r·S_r·V_rᵀ (Eckart–Young), written as
up = U_r·√S_r and down = √S_r·V_rᵀ with alpha = r. One layer is in memory at a time; factors
go to a spill file until every rank is known, then into the output."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from weightmix import __version__
from weightmix.errors import WeightmixError
from weightmix.io.dtypes import OUTPUT_DTYPES, dtype_from_name
from weightmix.io.writer import OutputTensor, open_output, out_of_space, tensor_bytes
from weightmix.lora.formats import DENOISER, KOHYA, PEFT, TEXT_1, TEXT_2
from weightmix.lora.svd import gram_spectrum, truncated_factors
from weightmix.lora.targets import DIFFUSERS, SINGLE, ModelIndex, Segment, module_name, normalized
from weightmix.plan import Plan
from weightmix.progress import Progress
from weightmix.units import count

EMBEDDINGS = ("token_embedding", "position_embedding", "positional_embedding")
COPY_BYTES = 1 << 24
FP32 = dtype_from_name("fp32")


@dataclass(frozen=True)
class Unit:
    """One LoRA layer to extract: rows [start, stop) of model key `key`, written as `name`."""

    key: str
    start: int
    stop: int
    name: str


@dataclass
class Extracted:
    files: list[Path]
    layers: int
    skipped: int  # layers the fine-tune left unchanged
    notes: list[str]


def preferred_dialect(family: str, part: str, fmt: str, pipeline: bool) -> str:
    """The names each format's users load: PEFT takes diffusers names; kohya takes diffusers
    names for SD1.x/2.x UNets, SGM names for SDXL's, BFL names for Flux's (diffusers names from a
    Flux folder, whose fused BFL tensors it does not hold), transformers' CLIP names for every
    text encoder."""
    if fmt == PEFT or part != DENOISER:
        return DIFFUSERS
    if family == "flux" and pipeline:
        return DIFFUSERS
    return DIFFUSERS if family == "sd" else SINGLE


def lora_name(index: ModelIndex, segment: Segment, fmt: str) -> str:
    """The module's name in the file, without the factor suffix."""
    if fmt == KOHYA:
        text = "lora_te1_" if index.has_text_2 or index.family == "flux" else "lora_te_"
        prefix = {DENOISER: "lora_unet_", TEXT_1: text, TEXT_2: "lora_te2_"}[segment.part]
        return prefix + normalized(segment.module)
    denoiser = "transformer." if index.family == "flux" else "unet."
    if segment.dialect == SINGLE:  # no diffusers name: BFL/LDM names, as ai-toolkit writes them
        denoiser = "diffusion_model."
    prefix = {DENOISER: denoiser, TEXT_1: "text_encoder.", TEXT_2: "text_encoder_2."}
    return prefix[segment.part] + segment.module


def units(plan: Plan, index: ModelIndex, fmt: str) -> list[Unit]:
    """Every weight of two or more dimensions of the denoiser and text encoders (embedding
    tables left out), in the names `fmt` loads; a fused tensor may become several layers."""
    found = []
    for key in plan.keys:
        segments = index.by_key.get(key.key, [])
        named = module_name(key.key)
        part = named[0] if named is not None else (segments[0].part if segments else None)
        if part is None or len(key.shape) < 2 or any(e in key.key for e in EMBEDDINGS):
            continue  # (OpenCLIP's fused attn.in_proj_weight has no '.weight' name, but aliases)
        wanted = preferred_dialect(index.family, part, fmt, index.pipeline)
        chosen = _covering([s for s in segments if s.dialect == wanted], key.shape[0])
        if chosen is None:
            own = [s for s in segments if s.start == 0 and s.stop == key.shape[0]]
            chosen = own[:1]
        for segment in chosen:
            found.append(Unit(key.key, segment.start, segment.stop, lora_name(index, segment, fmt)))
    return found


def _covering(segments: list[Segment], rows: int) -> list[Segment] | None:
    """Segments that are whole modules and cover the rows once, in order; else None."""
    pieces = {(s.start, s.stop): s for s in segments if s.from_start == 0 and s.from_stop == s.rows}
    whole = sorted(pieces.values(), key=lambda s: s.start)
    position = 0
    for segment in whole:
        if segment.start != position:
            return None
        position = segment.stop
    return whole if whole and position == rows else None


def extract(
    plan: Plan,
    output: Path,
    fmt: str,
    rank: int,
    energy: float | None,
    dtype: str,
    progress: Progress,
) -> Extracted:
    """Write the LoRA to `output` (a .safetensors file) from a subtract(tuned, base) plan."""
    out_dtype = dtype_from_name(dtype, OUTPUT_DTYPES)
    if not out_dtype.is_float:
        raise WeightmixError(f"--dtype {dtype}: LoRA factors are floats; give fp16, bf16 or fp32")
    index = ModelIndex(plan.checkpoints[next(iter(plan.checkpoints))])
    todo = units(plan, index, fmt)
    if not todo:
        raise WeightmixError("no layer of the models can carry a LoRA (no 2-d or 4-d weights)")
    keys = {key.key: key for key in plan.keys}
    layout: list[OutputTensor] = []
    placed: list[tuple[str, int, int]] = []  # (output key, spill offset, bytes)
    clamped, skipped = 0, 0
    progress.start(len(todo), sum(keys[u.key].numel * 4 for u in todo))
    with out_of_space(output, 0):  # no inode left for the spill file
        # unbuffered: a full disk is said at the write, never again when the file closes
        spill = tempfile.TemporaryFile(  # noqa: SIM115 (closed by the `with` below)
            dir=output.parent, prefix=".weightmix-lora-", buffering=0
        )
    with spill:
        by_key: dict[str, list[Unit]] = {}
        for unit in todo:
            by_key.setdefault(unit.key, []).append(unit)
        for key_name, group in by_key.items():
            key = keys[key_name]
            delta = _difference(plan, key)
            for unit in group:
                rows = delta[unit.start : unit.stop].reshape(unit.stop - unit.start, -1)
                progress.advance(rows.numel() * 4)
                if not bool(rows.any()):
                    skipped += 1
                    continue
                up, down, was_clamped = _factors(rows, rank, energy)
                clamped += was_clamped
                tail = key.shape[2:]
                up = up.reshape(up.shape[0], up.shape[1], *([1] * len(tail)))
                down = down.reshape(down.shape[0], *key.shape[1:])
                suffix = (".lora_up.weight", ".lora_down.weight") if fmt == KOHYA else (
                    ".lora_B.weight", ".lora_A.weight")  # fmt: skip
                for tensor, end in zip((up, down), suffix):
                    data = tensor.to(out_dtype.torch).contiguous()
                    offset = spill.tell()
                    with out_of_space(output, offset + data.numel() * out_dtype.itemsize):
                        _append(spill, tensor_bytes(data))
                    layout.append(OutputTensor(unit.name + end, out_dtype, tuple(data.shape)))
                    placed.append((unit.name + end, offset, data.numel() * out_dtype.itemsize))
                if fmt == KOHYA:  # alpha = rank (scale 1), in fp32: exact for any rank
                    alpha = torch.tensor(float(down.shape[0]), dtype=torch.float32)
                    offset = spill.tell()
                    with out_of_space(output, offset + 4):
                        _append(spill, tensor_bytes(alpha))
                    layout.append(OutputTensor(unit.name + ".alpha", FP32, ()))
                    placed.append((unit.name + ".alpha", offset, 4))
        progress.close()
        if not layout:
            raise WeightmixError(
                "the two models are identical in every layer a LoRA can carry: nothing to extract"
            )
        files = _write(plan, output, layout, placed, spill, fmt, rank, energy)
    notes = []
    if clamped:
        notes.append(
            f"rank {rank} is more than {count(clamped, 'layer')} allow (a layer's rank is at most"
            " min(rows, columns)): those layers have that smaller rank"
        )
    if skipped:
        notes.append(f"{count(skipped, 'layer')} the fine-tune left unchanged: not in the LoRA")
    return Extracted(files, len(layout) // (3 if fmt == KOHYA else 2), skipped, notes)


def _difference(plan: Plan, key) -> torch.Tensor:
    """tuned − base for one key, in the compute dtype."""
    tensors = {m: plan.checkpoints[m].read(info) for m, info in key.sources.items()}
    dtype = plan.compute_dtype.torch
    base, tuned = (tensors[m].to(plan.device, dtype) for m in plan.checkpoints)
    return tuned - base


def _factors(rows: torch.Tensor, rank: int, energy: float | None):
    """up (m × r) and down (r × n) of the truncated SVD; whether the rank was clamped."""
    limit = min(rows.shape)
    keep = min(rank, limit)
    if energy is not None:
        values = gram_spectrum(rows)[0]
        total = values.cumsum(0)
        needed = int(torch.searchsorted(total, energy * total[-1]).item()) + 1
        keep = min(keep, max(needed, 1))
    up, down = truncated_factors(rows, keep)
    return up.cpu(), down.cpu(), rank > limit


def _append(spill, data) -> None:
    """Write all of `data` at the end of the unbuffered spill file (writes may be short)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[spill.write(view) :]


def _write(plan: Plan, output: Path, layout, placed, spill, fmt: str, rank: int, energy):
    models = [str(plan.recipe.model_path(name)) for name in plan.recipe.models]
    about = {"format": fmt, "rank": rank, "energy": energy, "models": models}
    metadata = {
        "format": "pt",
        "weightmix.version": __version__,
        "weightmix.lora": json.dumps(about),
    }
    if fmt == KOHYA:
        metadata["ss_network_module"] = "networks.lora"
    writer = open_output(output, layout, metadata)
    try:
        for name, offset, size in placed:
            done = 0
            while done < size:
                length = min(COPY_BYTES, size - done)
                data = os.pread(spill.fileno(), length, offset + done)
                if len(data) != length:
                    raise OSError(f"spill file: short read at {offset + done}")
                writer.write_range(name, done, data)
                done += length
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def check_rank(rank: int, energy: float | None) -> None:
    if rank < 1:
        raise WeightmixError(f"--rank {rank}: give a rank of at least 1")
    if energy is not None and not (0 < energy <= 1):  # NaN fails both comparisons
        raise WeightmixError(f"--energy {energy}: give the share of Δ's energy to keep, in (0, 1]")


def check_file_output(output: Path, overwrite: bool, inputs: list[Path]) -> None:
    """A LoRA goes to one .safetensors file: not a folder, not an input, in a folder that
    exists, and not over an existing file without --overwrite."""
    if output.is_dir():
        raise WeightmixError(f"output {output} is a folder: give a .safetensors file path")
    if not output.parent.is_dir():
        raise WeightmixError(f"output {output}: folder {output.parent} does not exist")
    if output.exists() and output.resolve() in {p.resolve() for p in inputs if p.exists()}:
        raise WeightmixError(f"output {output} is one of the inputs: give another path")
    if output.exists() and not overwrite:
        raise WeightmixError(f"output {output} exists: pass --overwrite to replace it")
