from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import random_state, save

from weightmix.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    """Outputs carry modelspec.date: pin it so byte comparisons cannot straddle midnight."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1790000000")


@pytest.fixture
def run(capsys) -> Callable[..., CliResult]:
    """Run the weightmix CLI in-process; return exit code, stdout and stderr."""

    def invoke(*args: object) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """Three tiny fp16 SD1.5-layout checkpoints A, B, C (same keys and shapes)."""
    return {
        name: save(tmp_path / f"{name}.safetensors", random_state(seed, torch.float16))
        for name, seed in (("A", 1), ("B", 2), ("C", 3))
    }
