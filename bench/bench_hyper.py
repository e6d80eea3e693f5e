"""Hyper-Merge benchmark: four SD1.5-layout models, ranks [64, 32].

    python bench/bench_hyper.py                  # SD1.5 size (about 2.1 GB per fp16 file)
    python bench/bench_hyper.py --divisor 4      # every dimension / 4, for a quick look
    python bench/bench_hyper.py --keys 'model.diffusion_model.output_blocks.0.0.in_layers.2.weight'
                                                 # memory of the largest layer, in minutes

The models are generated once into a scratch folder: a random base with the real key names and
shapes, plus, in every layer a LoRA can carry, two shared low-rank directions (rank 64 and 32)
at per-model strengths, plus Gaussian noise (a tenth of the directions' size). Measured, each
command as its own process after a `sync`: the I/O floor (cat the four inputs once, write one
output of the same size), `weightmix hyper CONFIG`, then `weightmix hyper evaluate CONFIG`.
Reported: wall time, CPU time, peak RSS (against `python -c "import torch"`), and per model the
share of its delta energy recovered (1 − relative error²) beside the two bounds evaluate gives.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import BIN, measure, size_text

MODELS = 4
GENERATE = """
import math, sys, torch
from pathlib import Path
from weightmix.arch import architecture_keys, scaled_shape
from weightmix.io.dtypes import dtype_from_name
from weightmix.io.writer import OutputTensor, open_output
folder, divisor, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
fp16 = dtype_from_name("fp16")
specs = [(s.key, scaled_shape(s.shape, divisor)) for s in architecture_keys("sd1-ldm")]
layout = [OutputTensor(k, fp16, tuple(shape)) for k, shape in specs]
strengths = torch.Generator().manual_seed(99)
c = torch.randn(count, 2, generator=strengths) * torch.tensor([1.0, 0.6])
writers = [open_output(folder / f"m{m}.safetensors", layout, {}) for m in range(count)]
for index, (key, shape) in enumerate(specs):
    g = torch.Generator().manual_seed(index)
    base = torch.randn(shape, generator=g) * 0.05
    adapted = len(shape) >= 2 and "embedding" not in key and key.startswith(
        ("model.diffusion_model.", "cond_stage_model."))
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (0, 0)
    directions = []
    if adapted:
        for rank in (64, 32):
            r = min(rank, rows, cols)
            a = torch.randn(rows, r, generator=g) / math.sqrt(r)
            b = torch.randn(r, cols, generator=g) / math.sqrt(cols)
            directions.append((a @ b).reshape(shape) * 0.01)
    for m, writer in enumerate(writers):
        tensor = base.clone()
        for k, direction in enumerate(directions):
            tensor += c[m, k] * direction
        if adapted:
            scale = 0.001 / math.sqrt(math.prod(shape[1:]))
            tensor += torch.randn(shape, generator=g) * scale
        writer.write(key, tensor.to(torch.float16))
for writer in writers:
    writer.commit()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/weightmix-bench-hyper"))
    parser.add_argument("--divisor", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--keys", nargs="*", help="only these keys (globs) carry LoRAs")
    args = parser.parse_args()
    folder = args.scratch / f"d{args.divisor}"
    folder.mkdir(parents=True, exist_ok=True)
    models = [folder / f"m{m}.safetensors" for m in range(MODELS)]
    if not all(p.exists() for p in models):
        print(f"generating {MODELS} models in {folder} ...", flush=True)
        subprocess.run([str(BIN / "python"), "-c", GENERATE, str(folder), str(args.divisor),
                        str(MODELS)], check=True)  # fmt: skip
    config = folder / "config.yaml"
    config.write_text(
        "name: bench\nmodels: [" + ", ".join(p.name for p in models) + "]\ndevice: cpu\n"
        f"dtype: float16\niterations: {args.iterations}\nranks: [64, 32]\n"
        + (f"keys: {json.dumps(args.keys)}\n" if args.keys else "")
    )
    size = sum(p.stat().st_size for p in models)
    out = folder / "floor.out"
    floor_read = measure(["sh", "-c", "cat " + " ".join(map(str, models)) + " > /dev/null"])
    floor_write = measure(["sh", "-c", f"head -c {models[0].stat().st_size} /dev/zero > {out}"])
    out.unlink()
    torch_only = measure([str(BIN / "python"), "-c", "import torch"])
    hyper = measure([str(BIN / "weightmix"), "hyper", str(config), "-q", "--overwrite"])
    print(f"weightmix hyper: {hyper[0]:.1f} s wall, {size_text(hyper[1])} peak RSS", flush=True)
    report = folder / "evaluate.txt"
    evaluate = [str(BIN / "weightmix"), "hyper", "evaluate", str(config)]
    evaluation = measure(["sh", "-c", " ".join(evaluate) + f" > {report}"])
    evaluated = report.read_text()
    floor = floor_read[0] + floor_write[0]
    print(
        f"inputs: {MODELS} × {size_text(size / MODELS)} (SD1.5 layout, dimensions / {args.divisor})"
    )
    print(f"I/O floor (read all once, write one): {floor:.1f} s")
    print(f"weightmix hyper (ranks [64, 32], {args.iterations} iterations): {hyper[0]:.1f} s wall,"
          f" {hyper[2]:.1f} s CPU, {hyper[0] / floor:.1f}× floor")  # fmt: skip
    print(f"peak RSS {size_text(hyper[1])}, import torch alone {size_text(torch_only[1])}:"
          f" {size_text(hyper[1] - torch_only[1])} above")  # fmt: skip
    print(f"weightmix hyper evaluate: {evaluation[0]:.1f} s wall, {size_text(evaluation[1])}"
          " peak RSS")  # fmt: skip
    print("recovered share of each model's delta energy (1 − relative error²):")
    print(f"{'hyper':>8} {'own SVD':>8} {'bound':>8}  model")
    for line in evaluated.splitlines()[2:]:
        hyper_e, own, bound, name = line.split(maxsplit=3)
        shares = [f"{1 - float(x) ** 2:8.4f}" if x != "-" else f"{'-':>8}"
                  for x in (hyper_e, own, bound)]  # fmt: skip
        print(f"{' '.join(shares)}  {os.path.basename(name)}")


if __name__ == "__main__":
    main()
