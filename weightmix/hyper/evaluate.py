"""`weightmix hyper reconstruct` and `weightmix hyper evaluate`: model m rebuilt as
mean + Σ_k λ_{k,m}·δ_k, and how far each model is from its rebuild, beside two references."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from weightmix import api
from weightmix.engine import key_chunks
from weightmix.errors import WeightmixError
from weightmix.hyper.config import HyperConfig, file_names, output_folder
from weightmix.hyper.run import model_names, models_plan, select_units
from weightmix.hyper.shared import read_rows
from weightmix.io import open_checkpoint


@dataclass(frozen=True)
class Outputs:
    """A Hyper-Merge's files and multipliers, from its JSON twin."""

    average: Path
    loras: list[Path]
    ranks: list[int]
    multipliers: list[list[float]]  # per LoRA, per model
    models: list[str]


def read_outputs(config: HyperConfig, folder: Path, multipliers: Path | None) -> Outputs:
    out = output_folder(config, folder)
    path = multipliers or out / str(file_names(config)["json"])
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        loras = document["loras"]
        outputs = Outputs(
            path.parent / document["average"],
            [path.parent / entry["file"] for entry in loras],
            [int(entry["rank"]) for entry in loras],
            [[float(x) for x in entry["multipliers"]] for entry in loras],
            [str(m) for m in document["models"]],
        )
    except OSError as error:
        raise WeightmixError(f"{path}: cannot read ({error.strerror or error}): run"
                             " weightmix hyper CONFIG first") from None  # fmt: skip
    except (ValueError, KeyError, TypeError) as error:
        raise WeightmixError(f"{path}: not a Hyper-Merge multipliers file ({error})") from None
    known = list(config.models)
    for model in outputs.models:
        if model not in known:
            raise WeightmixError(
                f"{path}: names model {model}, which is not among the config's models: give the"
                " multipliers file of this config"
            )
    if outputs.models != known:
        raise WeightmixError(
            f"{path}: lists the models as {outputs.models}, the config as {known}: the"
            " multipliers follow the file's order; give the config they were made with"
        )
    if any(len(values) != len(outputs.models) for values in outputs.multipliers):
        raise WeightmixError(f"{path}: a LoRA has not one multiplier per model")
    return outputs


def pick_model(outputs: Outputs, which: str) -> int:
    """A model by its number (0 ..), its path, or its file name."""
    if which.isdigit() and int(which) < len(outputs.models):
        return int(which)
    for index, model in enumerate(outputs.models):
        if which in (model, Path(model).name):
            return index
    raise WeightmixError(
        f"--model {which}: not a model of this Hyper-Merge; its models: "
        + ", ".join(f"{i} = {m}" for i, m in enumerate(outputs.models))
    )


def reconstruct(outputs: Outputs, index: int, output: Path, overwrite: bool, dtype: str | None):
    """mean + Σ_k λ_{k,m}·δ_k, streamed (lora apply with the multipliers as strengths)."""
    names = [f"lora{k}" for k in range(len(outputs.loras))]
    deltas = [
        {"method": "scale", "inputs": [name], "factor": values[index]}
        for name, values in zip(names, outputs.multipliers)
    ]
    recipe = {
        "models": {"average": str(outputs.average), **dict(zip(names, map(str, outputs.loras)))},
        "merge": {"method": "add", "inputs": ["average", *deltas]},
    }
    if dtype is not None:
        recipe["dtype"] = dtype
    with open_checkpoint(outputs.average) as average:  # an fp64 average is rebuilt in fp64
        if any(info.dtype.short == "fp64" for info in average.tensors.values()):
            recipe["compute_dtype"] = "fp64"
    return api.merge(recipe, output, overwrite=overwrite)


@dataclass(frozen=True)
class Report:
    model: str  # 'all' for the models together
    hyper: float  # ‖W_m − rebuild‖ / ‖W_m − mean‖
    private: float  # the same for each layer's own truncated SVD at the LoRAs' total rank
    bound: float | None  # all models only: no K shared directions do better (Gram tail)


@dataclass
class Sums:
    """What evaluate adds up over keys, per model (the Gram matrix: per pair of models)."""

    total: torch.Tensor  # ‖Δ_m‖²
    hyper: torch.Tensor  # ‖Δ_m − Σ_k λ_{k,m}δ_k‖²
    private: torch.Tensor  # what each layer's own rank-K SVD leaves of Δ_m
    gram: torch.Tensor  # ⟨Δ_m, Δ_n⟩

    @classmethod
    def zeros(cls, count: int) -> Sums:
        zero = torch.zeros(count, dtype=torch.float64)
        return cls(zero, zero.clone(), zero.clone(), torch.zeros(count, count, dtype=torch.float64))


CHUNK_BYTES = 64 << 20  # float64 rows of all models at a time


def _plain_key(plan, key, names, sums: Sums) -> None:
    """A key no LoRA carries: its delta is all residual, for the rebuild and the private SVD
    alike; read chunk by chunk."""
    for chunk in key_chunks(plan, key):
        flat = torch.stack([chunk[n].double() - chunk["average"] for n in names])
        sums.gram += flat @ flat.T
        energy = flat.square().sum(1)
        sums.total += energy
        sums.hyper += energy
        sums.private += energy


def _lora_key(plan, key, names, units, loras, lam, total_rank: int, sums: Sums) -> None:
    """One key that carries LoRA layers, a few rows of every model at a time (CHUNK_BYTES of
    float64) for the Gram matrix, totals and residuals; then each layer's own SVD tail, one
    model's layer at a time (float64: about two float32 deltas, never M)."""
    count, rows, cols = len(names), key.shape[0], math.prod(key.shape[1:])
    average, sources = plan.checkpoints["average"], key.sources
    factors = {}
    for unit in units:  # (up, down) of each LoRA, rows × r and r × columns: small
        factors[unit] = []
        for lora in loras:
            up = lora.read(lora.tensors[f"{unit.name}.lora_up.weight"]).double()
            down = lora.read(lora.tensors[f"{unit.name}.lora_down.weight"]).double()
            factors[unit].append((up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)))
    step = max(1, CHUNK_BYTES // max(1, count * cols * 8))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        mean = read_rows(average, sources["average"], r0, r1).double()
        deltas = torch.empty(count, r1 - r0, cols, dtype=torch.float64)
        for m, name in enumerate(names):
            deltas[m].copy_(read_rows(plan.checkpoints[name], sources[name], r0, r1))
            deltas[m] -= mean
        del mean
        flat = deltas.reshape(count, -1)
        sums.gram += flat @ flat.T
        sums.total += torch.einsum("mi,mi->m", flat, flat)
        uncovered = torch.ones(r1 - r0, dtype=torch.bool)
        for unit in units:
            a, b = max(r0, unit.start), min(r1, unit.stop)
            if a >= b:
                continue
            uncovered[a - r0 : b - r0] = False
            piece = deltas[:, a - r0 : b - r0]
            for k, (up, down) in enumerate(factors[unit]):
                piece -= lam[k][:, None, None] * (up[a - unit.start : b - unit.start] @ down)
        if bool(uncovered.any()):  # rows no LoRA carries: their delta is what is left
            left = deltas[:, uncovered].reshape(count, -1)
            sums.private += torch.einsum("mi,mi->m", left, left)
        sums.hyper += torch.einsum("mi,mi->m", flat, flat)  # deltas are now the residuals
    for unit in units:  # each layer's own SVD, one model at a time
        rows = (unit.start, unit.stop)
        mean = read_rows(average, sources["average"], *rows)
        for m, name in enumerate(names):
            matrix = read_rows(plan.checkpoints[name], sources[name], *rows).double()
            matrix -= mean
            values = torch.linalg.svdvals(matrix)
            del matrix
            sums.private[m] += values[total_rank:].square().sum()


def evaluate(config: HyperConfig, folder: Path, outputs: Outputs) -> list[Report]:
    plan = models_plan(config, folder, outputs.average)
    loras = [open_checkpoint(path) for path in outputs.loras]
    try:
        units = select_units(plan, config)
        for path, lora in zip(outputs.loras, loras):
            missing = [u.name for u in units if f"{u.name}.lora_up.weight" not in lora.tensors]
            if missing:
                raise WeightmixError(
                    f"{path}: has no layer {missing[0]} ({len(missing)} in all): the config's"
                    " keys are not those it was made with; run weightmix hyper again"
                )
        by_key: dict[str, list] = {}
        for unit in units:
            by_key.setdefault(unit.key, []).append(unit)
        names = model_names(len(outputs.models))
        count = len(names)
        lam = torch.tensor(outputs.multipliers, dtype=torch.float64)  # LoRAs × models
        total_rank = sum(outputs.ranks)
        sums = Sums.zeros(count)
        for key in plan.keys:
            if not key.out_dtype.is_float:
                continue
            if key.key in by_key:
                _lora_key(plan, key, names, by_key[key.key], loras, lam, total_rank, sums)
            else:
                _plain_key(plan, key, names, sums)
        total, hyper, private = sums.total, sums.hyper, sums.private
        eigenvalues = torch.linalg.eigvalsh(sums.gram)  # ascending
        tail = float(eigenvalues[: max(count - len(loras), 0)].clamp(min=0).sum())
        scale = total.clamp(min=1e-300)
        shares = [(x / scale).sqrt().tolist() for x in (hyper, private)]
        reports = [Report(outputs.models[m], shares[0][m], shares[1][m], None)
                   for m in range(count)]  # fmt: skip
        whole = float(total.sum()) or 1e-300
        together = [(float(x.sum()) / whole) ** 0.5 for x in (hyper, private)]
        reports.append(Report("all", *together, (tail / whole) ** 0.5))
        return reports
    finally:
        for lora in loras:
            lora.close()
        plan.close()
