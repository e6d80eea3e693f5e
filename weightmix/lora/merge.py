"""`weightmix lora merge`: several LoRAs into one. Per module, the update is
Δ = Σᵢ sᵢ·(αᵢ/rᵢ)·upᵢ·downᵢ. `concat` writes it exactly with rank Σrᵢ (up = [s₁α₁/r₁·up₁, ...],
down = [down₁; ...]); a target rank R writes its best rank-R approximation, found without
forming Δ: QR of the stacked factors, then the SVD of the small core (Δ = Qa·Ra·Rbᵀ·Qbᵀ)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from weightmix import __version__
from weightmix.errors import WeightmixError
from weightmix.io.dtypes import DType, dtype_from_name
from weightmix.io.reader import Checkpoint
from weightmix.io.writer import OutputTensor, open_output
from weightmix.lora.formats import DENOISER, KOHYA, PEFT, TEXT_1, TEXT_2, LoraLayer, read_layers
from weightmix.lora.targets import normalized


@dataclass(frozen=True)
class Source:
    checkpoint: Checkpoint
    strength: float
    where: str


@dataclass(frozen=True)
class Member:
    source: Source
    layer: LoraLayer


def plan_merge(sources: list[Source]) -> tuple[str, dict[tuple[str, str], list[Member]]]:
    """The output format (the first LoRA's) and each module's members, from headers."""
    modules: dict[tuple[str, str], list[Member]] = {}
    fmt = None
    for source in sources:
        found, layers = read_layers(source.checkpoint, source.where)
        fmt = fmt or found
        for layer in layers:
            members = modules.setdefault((layer.part, normalized(layer.module)), [])
            if members:
                first = members[0]
                ours = source.checkpoint.tensors[layer.down].shape[1:]
                theirs = first.source.checkpoint.tensors[first.layer.down].shape[1:]
                if layer.out_features != first.layer.out_features or ours != theirs:
                    raise WeightmixError(
                        f"{source.where}: {layer.down} {[layer.out_features, *ours]} does not fit"
                        f" {first.layer.down} of {first.source.where}"
                        f" {[first.layer.out_features, *theirs]}: the LoRAs are for different"
                        " models"
                    )
            members.append(Member(source, layer))
    assert fmt is not None
    return fmt, modules


def output_name(members: list[Member], fmt: str, text_prefix: str) -> str:
    """The module's name in the output format."""
    same = next((m.layer for m in members if m.layer.dotted == (fmt == PEFT)), None)
    if same is not None:
        return same.up.rsplit(".lora_B" if fmt == PEFT else ".lora_up", 1)[0]
    layer = members[0].layer
    if fmt == PEFT:
        raise WeightmixError(
            f"{members[0].source.where}: {layer.down}: a kohya name cannot be written as PEFT (its"
            " dots are lost): give --format kohya, or put a kohya LoRA first"
        )
    prefix = {DENOISER: "lora_unet_", TEXT_1: text_prefix, TEXT_2: "lora_te2_"}[layer.part]
    return prefix + normalized(layer.module)


def factors(member: Member) -> tuple[torch.Tensor, torch.Tensor]:
    """s·(α/r)·up (out × r) and down (r × in), float64."""
    checkpoint, layer = member.source.checkpoint, member.layer
    up = checkpoint.read(checkpoint.tensors[layer.up]).double().reshape(layer.out_features, -1)
    down = checkpoint.read(checkpoint.tensors[layer.down]).double().reshape(layer.rank, -1)
    alpha = layer.alpha_value if layer.alpha_value is not None else float(layer.rank)
    if layer.alpha is not None:
        alpha = float(checkpoint.read(checkpoint.tensors[layer.alpha]).double().item())
    return up * (member.source.strength * alpha / layer.rank), down


def merged_factors(members: list[Member], rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    ups, downs = zip(*(factors(m) for m in members))
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    if rank is None:
        return up, down
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    left, values, right = torch.linalg.svd(r_up @ r_down.T)
    keep = min(rank, values.numel())
    root = values[:keep].sqrt()
    return (q_up @ left[:, :keep]) * root, root[:, None] * (q_down @ right[:keep].T).T


def target_rank(members: list[Member], rank: int | None) -> int:
    total = sum(m.layer.rank for m in members)
    if rank is None:
        return total
    first = members[0].layer
    return min(rank, total, first.out_features, first.in_features)


def merge_loras(
    sources: list[Source], output: Path, rank: int | None, fmt: str | None, dtype: DType
) -> list[Path]:
    found, modules = plan_merge(sources)
    fmt = fmt or found
    kohya_te = [m.layer.up for ms in modules.values() for m in ms if not m.layer.dotted]
    text_prefix = "lora_te1_" if any(k.startswith("lora_te1_") for k in kohya_te) else "lora_te_"
    layout, jobs = [], []
    for members in modules.values():
        name = output_name(members, fmt, text_prefix)
        first = members[0]
        down_tail = first.source.checkpoint.tensors[first.layer.down].shape[1:]
        up_tail = (1,) * (len(down_tail) - 1)
        r = target_rank(members, rank)
        up_name, down_name = (
            (f"{name}.lora_up.weight", f"{name}.lora_down.weight")
            if fmt == KOHYA
            else (f"{name}.lora_B.weight", f"{name}.lora_A.weight")
        )
        layout.append(OutputTensor(up_name, dtype, (first.layer.out_features, r, *up_tail)))
        layout.append(OutputTensor(down_name, dtype, (r, *down_tail)))
        if fmt == KOHYA:  # alpha = rank, in fp32: exact for any rank
            layout.append(OutputTensor(f"{name}.alpha", dtype_from_name("fp32"), ()))
        jobs.append((members, name, up_name, down_name))
    about = {"merged": [str(s.checkpoint.path) for s in sources], "rank": rank}
    metadata = {
        "format": "pt",
        "weightmix.version": __version__,
        "weightmix.lora": json.dumps(about),
    }
    writer = open_output(output, layout, metadata)
    try:
        for members, name, up_name, down_name in jobs:
            up, down = merged_factors(members, rank)
            shapes = {t.key: t.shape for t in layout}
            r = shapes[up_name][1]
            if up.shape[1] < r:  # fewer singular values than planned: pad with zeros
                up = torch.nn.functional.pad(up, (0, r - up.shape[1]))
                down = torch.nn.functional.pad(down, (0, 0, 0, r - down.shape[0]))
            writer.write(up_name, up.to(dtype.torch).reshape(shapes[up_name]))
            writer.write(down_name, down.to(dtype.torch).reshape(shapes[down_name]))
            if fmt == KOHYA:
                writer.write(f"{name}.alpha", torch.tensor(float(r), dtype=torch.float32))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
