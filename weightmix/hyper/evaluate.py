"""`weightmix hyper reconstruct` and `weightmix hyper evaluate`: model m rebuilt as
mean + Σ_k λ_{k,m}·δ_k, and how far each model is from its rebuild, beside two references."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from weightmix import api
from weightmix.errors import WeightmixError
from weightmix.hyper.config import HyperConfig, file_names, model_paths, output_folder
from weightmix.hyper.run import model_names, models_plan, select_units
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
    known = {str(p) for p in model_paths(config, folder)}
    for model in outputs.models:
        if model not in known:
            raise WeightmixError(
                f"{path}: names model {model}, which is not among the config's models: give the"
                " multipliers file of this config"
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
    model: str
    hyper: float  # ‖W_m − rebuild‖ / ‖W_m − mean‖
    private: float  # the same for each layer's own truncated SVD at the LoRAs' total rank
    bound: float  # the best approximation by as many whole-model directions as LoRAs


def evaluate(config: HyperConfig, folder: Path, outputs: Outputs) -> list[Report]:
    plan = models_plan(config, folder, outputs.average)
    loras = [open_checkpoint(path) for path in outputs.loras]
    try:
        units = select_units(plan, config)
        by_key: dict[str, list] = {}
        for unit in units:
            by_key.setdefault(unit.key, []).append(unit)
        names = model_names(len(outputs.models))
        count = len(names)
        lam = torch.tensor(outputs.multipliers, dtype=torch.float64)  # LoRAs × models
        total_rank = sum(outputs.ranks)
        total = torch.zeros(count, dtype=torch.float64)
        hyper = torch.zeros(count, dtype=torch.float64)
        private = torch.zeros(count, dtype=torch.float64)
        gram = torch.zeros(count, count, dtype=torch.float64)
        dtype = torch.float64
        for key in plan.keys:
            if not key.out_dtype.is_float:
                continue
            mean = plan.checkpoints["average"].read(key.sources["average"]).to(dtype)
            deltas = torch.stack(
                [plan.checkpoints[n].read(key.sources[n]).to(dtype) - mean for n in names]
            ).reshape(count, key.shape[0] if key.shape else 1, -1)
            flat = deltas.reshape(count, -1)
            gram += flat @ flat.T
            total += flat.square().sum(1)
            residual = deltas.clone()
            alone = deltas.clone()
            for unit in by_key.get(key.key, []):
                rows = slice(unit.start, unit.stop)
                for k, lora in enumerate(loras):
                    up = lora.read(lora.tensors[f"{unit.name}.lora_up.weight"]).to(dtype)
                    down = lora.read(lora.tensors[f"{unit.name}.lora_down.weight"]).to(dtype)
                    update = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
                    residual[:, rows] -= lam[k][:, None, None] * update
                for m in range(count):
                    values = torch.linalg.svdvals(deltas[m, rows])
                    alone[m, rows] = 0
                    private[m] += values[total_rank:].square().sum()
            hyper += residual.reshape(count, -1).square().sum(1)
            private += alone.reshape(count, -1).square().sum(1)
        eigenvalues, vectors = torch.linalg.eigh(gram)
        top = torch.arange(count - 1, max(count - 1 - len(loras), -1), -1)
        bound = (gram.diagonal() - (vectors[:, top].square() * eigenvalues[top]).sum(1)).clamp(
            min=0
        )
        scale = total.clamp(min=1e-300)
        return [
            Report(
                outputs.models[m],
                *(float((x[m] / scale[m]).sqrt()) for x in (hyper, private, bound)),
            )
            for m in range(count)
        ]
    finally:
        for lora in loras:
            lora.close()
        plan.close()
