"""Hyper-Merge end to end: the average through the engine, the shared LoRAs through
shared.py, the multipliers as the seed wrote them. Every file is built in a temporary folder
beside the outputs and moved into place only when all are complete."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightmix import __version__, api
from weightmix.errors import WeightmixError
from weightmix.hyper.config import HyperConfig, file_names, model_paths, output_folder
from weightmix.hyper.shared import Residuals, Unit, fit_component
from weightmix.io import open_checkpoint
from weightmix.io.dtypes import OUTPUT_DTYPES, dtype_from_name
from weightmix.io.folders import FolderCheckpoint
from weightmix.io.interrupts import placed, uninterrupted
from weightmix.io.locks import MARK, DestinationLock, replace_set, temporary_folder
from weightmix.io.writer import OutputTensor, open_output, out_of_space, write_file
from weightmix.lora.extract import units as lora_units
from weightmix.lora.formats import KOHYA
from weightmix.lora.targets import ModelIndex
from weightmix.output_checks import sweep_notes
from weightmix.plan import Plan
from weightmix.progress import make_progress
from weightmix.units import count

FP32 = dtype_from_name("fp32")


@dataclass
class HyperResult:
    files: list[Path]
    multipliers: list[list[float]]  # per LoRA, per model
    notes: list[str] = field(default_factory=list)


def model_names(count_: int) -> list[str]:
    return [f"m{index}" for index in range(count_)]


def models_plan(config: HyperConfig, folder: Path, average: Path | None = None) -> Plan:
    """A plan over the models (and the average, when given): their keys checked against
    each other from headers, every model read with the first one's key names."""
    paths = model_paths(config, folder)
    names = model_names(len(paths))
    models = dict(zip(names, map(str, paths)))
    if average is not None:
        models["average"] = str(average)
    data = {
        "models": models,
        "merge": {"method": "weighted_sum", "inputs": list(models)},  # read, never run
        "device": config.device,
        "compute_dtype": config.compute_dtype,
    }
    try:
        return api.make_plan(data)
    except WeightmixError as error:
        if "keys differ" not in str(error) and "shape" not in str(error):
            raise
        problem = str(error).split(". Pass --on-missing")[0]
        named = ", ".join(f"{n} = {p}" for n, p in zip(names, paths))
        raise WeightmixError(
            f"Hyper-Merge needs models of one architecture: {problem} ({named})"
        ) from None


def select_units(plan: Plan, config: HyperConfig) -> list[Unit]:
    index = ModelIndex(plan.checkpoints["m0"])
    found = [Unit(u.key, u.start, u.stop, u.name) for u in lora_units(plan, index, KOHYA)]
    if config.keys is not None:
        found = [u for u in found if any(fnmatch.fnmatchcase(u.key, g) for g in config.keys)]
    if not found:
        raise WeightmixError(
            "no layer of the models can carry a LoRA"
            + (f" among the keys {config.keys}" if config.keys is not None else "")
        )
    return found


def hyper_merge(
    config: HyperConfig, folder: Path, overwrite: bool = False, progress: bool = False
) -> HyperResult:
    out = output_folder(config, folder)
    if out.exists() and not out.is_dir():
        raise WeightmixError(f"output {out} is a file: give a folder for the outputs")
    dtype = dtype_from_name(config.output_dtype, OUTPUT_DTYPES)
    if not dtype.is_float or dtype.itemsize < 2:
        raise WeightmixError(f"dtype {config.dtype}: give float16, bfloat16, float32 or float64")
    checked = models_plan(config, folder)  # every model against the first, before any read
    try:
        units = select_units(checked, config)
        folders = isinstance(checked.checkpoints["m0"], FolderCheckpoint)
    finally:
        checked.close()
    names = file_names(config, folders)
    finals = [out / names["average"], *(out / n for n in names["loras"]),
              out / names["multipliers"], out / names["json"]]  # fmt: skip
    inputs = {p.resolve() for p in model_paths(config, folder)}
    swept = sweep_notes(out)  # what a killed run left here, before anything is said to exist
    for path in finals:
        if path.resolve() in inputs:
            raise WeightmixError(f"{path} is one of the models: give another name or output")
        if path.exists() and not overwrite:
            raise WeightmixError(f"{path} exists: pass --overwrite to replace it")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = DestinationLock(out / names["average"])  # one run writes this set at a time
    try:
        with out_of_space(out / names["average"], 0):  # no inode left for the folder
            staging, held = temporary_folder(out, ".weightmix-hyper-")
    except BaseException:
        lock.release()
        raise
    try:
        result = _build(config, folder, staging, names, units, dtype, progress)
        result.notes = swept + result.notes
        with out_of_space(out / names["average"], 0), uninterrupted():  # see interrupts.py
            _move_into_place(out, result.files, finals, names)
            placed(out)
            made = False  # in place: a Ctrl-C held until now does not remove it
        result.files = [out / path.name for path in result.files]
        return result
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        held.release()
        lock.release()


def _move_into_place(out: Path, files: list[Path], finals: list[Path], names) -> None:
    """Move the staged files into `out` one by one under a journal (replace_set; the JSON
    twin, last, marks a whole set). An earlier average folder (--overwrite) waits in a hidden
    `.old` folder meanwhile: put back if the move fails, and by the next run's sweep if this
    one is killed before the new average is in place."""
    average = out / names["average"]
    aside, held = None, None
    if average.is_dir():
        aside, held = temporary_folder(out, f".{average.name}{MARK}", ".old")
        os.replace(average, aside / "previous")
    try:
        replace_set(
            [(path, out / path.name) for path in files],
            [p for p in finals if p.is_file()],
            first=out / names["json"],
        )
    except BaseException:
        if aside is not None and not average.exists():
            os.replace(aside / "previous", average)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            held.release()


def _build(config, folder, staging, names, units, dtype, progress) -> HyperResult:
    paths = model_paths(config, folder)
    recipe = {
        "models": dict(zip(model_names(len(paths)), map(str, paths))),
        "merge": {"method": "weighted_sum", "inputs": model_names(len(paths))},
        "dtype": config.output_dtype,
        "compute_dtype": config.compute_dtype,
        "device": config.device,
        "title": f"{config.name} (hyper-model: the mean of {len(paths)} models)",
    }
    average = staging / names["average"]
    api.merge(recipe, average, progress=progress)
    plan = models_plan(config, folder, average)
    files, multipliers, notes = [average], [], []
    residuals = Residuals(
        [plan.checkpoints[n] for n in model_names(len(paths))],
        plan.checkpoints["average"],
        plan.compute_dtype.torch,
        plan.device,
    )
    try:
        shapes = {key.key: key.shape for key in plan.keys}
        for step, rank in enumerate(config.ranks):
            path = staging / names["loras"][step]
            clamped = sum(rank > min(u.stop - u.start, math.prod(shapes[u.key][1:])) for u in units)
            if clamped:
                notes.append(
                    f"LoRA {step} (rank {rank}): {count(clamped, 'layer')} allow less (a layer's"
                    " rank is at most min(rows, columns)): they have that smaller rank"
                )
            lam = _write_lora(path, residuals, units, shapes, rank, config, dtype, progress)
            residuals.components.append((open_checkpoint(path), lam))
            files.append(path)
            multipliers.append([float(x) for x in lam])
    finally:
        for lora, _ in residuals.components:
            lora.close()
        plan.close()
    files += _write_multipliers(config, staging, names, paths, multipliers)
    return HyperResult(files, multipliers, notes)


def _write_lora(path, residuals, units, shapes, rank, config, dtype, progress) -> torch.Tensor:
    layout = []
    for unit in units:
        rows, tail = unit.stop - unit.start, shapes[unit.key][1:]
        keep = min(rank, rows, math.prod(tail))
        up_shape = (rows, keep, *([1] * (len(tail) - 1)))
        layout += [
            OutputTensor(f"{unit.name}.lora_up.weight", dtype, up_shape),
            OutputTensor(f"{unit.name}.lora_down.weight", dtype, (keep, *tail)),
            OutputTensor(f"{unit.name}.alpha", FP32, ()),  # exact for any rank
        ]
    metadata = {
        "format": "pt",
        "weightmix.version": __version__,
        "ss_network_module": "networks.lora",
        "weightmix.hyper": json.dumps({"name": config.name, "rank": rank}),
    }
    writer = open_output(path, layout, metadata)
    shapes_out = {t.key: t.shape for t in layout}
    bar = make_progress(progress)
    bar.start(len(units) * (config.iterations + 2), 0)

    def write(unit: Unit, up: torch.Tensor, down: torch.Tensor) -> None:
        for suffix, tensor in (("lora_up.weight", up), ("lora_down.weight", down)):
            name = f"{unit.name}.{suffix}"
            writer.write(name, tensor.to("cpu", dtype.torch).reshape(shapes_out[name]).contiguous())
        writer.write(f"{unit.name}.alpha", torch.tensor(float(up.shape[1]), dtype=torch.float32))

    try:
        lam = fit_component(residuals, units, rank, config.iterations, write,
                            lambda: bar.advance(0))  # fmt: skip
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return lam


def _write_multipliers(config, staging, names, paths, multipliers) -> list[Path]:
    """One line per model of <lora:NAME:λ> tags (as the seed), and the same as JSON."""
    stems = [n.removesuffix(".safetensors") for n in names["loras"]]
    lines = [
        " ".join(f"<lora:{stem}:{values[m]:.6g}>" for stem, values in zip(stems, multipliers))
        for m in range(len(paths))
    ]
    text = staging / names["multipliers"]
    write_file(text, ("\n".join(lines) + "\n").encode("utf-8"))
    document = {
        "name": config.name,
        "average": names["average"],
        "models": list(config.models),  # as the config writes them
        "loras": [
            {"file": file, "rank": rank, "multipliers": values}
            for file, rank, values in zip(names["loras"], config.ranks, multipliers)
        ],
    }
    twin = staging / names["json"]
    write_file(twin, json.dumps(document, indent=2).encode("utf-8"))
    return [text, twin]
