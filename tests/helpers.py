"""Tiny checkpoints with real SD1.5 key names and shapes, written by the reference library."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from weightmix.arch import architecture_keys, scaled_shape

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def sd1_specs(count: int = 24) -> dict[str, tuple[int, ...]]:
    """`count` float keys of the SD1.5 UNet and text encoder, every dimension divided by 16."""
    specs = [s for s in architecture_keys("sd1-ldm") if s.dtype == "F32"]
    unet = [s for s in specs if s.component == "diffuser"]
    clip = [s for s in specs if s.component == "clip_l"]
    picked = unet[: count // 2] + clip[: count - count // 2]
    return {s.key: scaled_shape(s.shape, 16) for s in picked}


def random_state(
    seed: int, dtype: torch.dtype = torch.float16, specs: dict | None = None
) -> dict[str, torch.Tensor]:
    """Random float tensors for the keys of `specs`, plus int64 position_ids like real files."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        key: torch.randn(shape, generator=generator).to(dtype)
        for key, shape in (specs or sd1_specs()).items()
    }
    state[POSITION_IDS] = torch.arange(77, dtype=torch.int64).reshape(1, 77) + seed
    return state


def save(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def fp8_copies(folder: Path, models: dict[str, Path], names=("A", "B")) -> dict[str, Path]:
    """fp8 (e4m3fn) copies of the named models' float tensors, as Flux checkpoints ship."""
    copies = {}
    for name in names:
        state = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v
                 for k, v in load(models[name]).items()}  # fmt: skip
        copies[name] = save(folder / f"{name}8.safetensors", state)
    return copies


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_refused(run, paths: list[Path], method: str, params: dict, says: str, out: Path) -> None:
    """`weightmix merge PATHS -m METHOD -p name=value ...` fails with one line holding `says`,
    exit code 2, and nothing at `out`."""
    args: list[object] = ["merge", *paths, "-m", method]
    for name, value in params.items():
        args += ["-p", f"{name}={value}"]
    result = run(*args, "-o", out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert says in result.err
    assert not out.exists()
