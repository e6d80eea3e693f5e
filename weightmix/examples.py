"""Build the small example checkpoints that `make demo` merges: python -m weightmix.examples DIR

Three SD1.5-layout checkpoints (real key names, every dimension divided by 16, fp16) named
base, anime and photo, as in a typical add-difference workflow.
"""

from __future__ import annotations

import sys
from pathlib import Path

from weightmix.arch.synthetic import write_synthetic

EXAMPLE_MODELS = {"base": 1, "anime": 2, "photo": 3}  # name -> seed


def build_examples(folder: Path, divisor: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed in EXAMPLE_MODELS.items():
        path = folder / f"{name}.safetensors"
        keys = write_synthetic(path, "sd1-ldm", seed=seed, divisor=divisor)
        print(f"built {path}: SD1.5 layout, {len(keys)} tensors, dimensions / {divisor}, fp16")
        paths.append(path)
    return paths


if __name__ == "__main__":
    build_examples(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
