"""What the output records about how it was made: the recipe, the version, and each input's
name, size and a content fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from weightmix import __version__
from weightmix.io import Checkpoint
from weightmix.modelspec import modelspec_metadata
from weightmix.plan import Plan

SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
FINGERPRINTS = {
    "sampled": (
        f"sha256 over each file's 8-byte length and JSON header, then {SAMPLES} blocks of"
        f" {SAMPLE_BYTES // 1024} KiB at evenly spaced offsets of its data section (all of it"
        f" when smaller than {SAMPLES * SAMPLE_BYTES // 1024} KiB; for a pickle, of the whole"
        " file); files in index order"
    ),
    "full": "sha256 over every byte of each file, files in index order",
}
KEY_RECIPE = "weightmix.recipe"
KEY_VERSION = "weightmix.version"
KEY_INPUTS = "weightmix.inputs"
KEY_FINGERPRINT = "weightmix.fingerprint"


def fingerprint(checkpoint: Checkpoint, how: str = "sampled") -> str:
    """A content fingerprint of a checkpoint's files (see FINGERPRINTS for the bytes covered)."""
    digest = hashlib.sha256()
    for path, prefix, data_start in checkpoint.fingerprint_parts():
        with open(path, "rb") as handle:
            if how == "full":
                while block := handle.read(16 * 2**20):
                    digest.update(block)
                continue
            digest.update(prefix)
            data_size = os.fstat(handle.fileno()).st_size - data_start
            if data_size <= SAMPLES * SAMPLE_BYTES:
                offsets = [data_start]
                length = data_size
            else:
                span = data_size - SAMPLE_BYTES  # first block at the start, last at the end
                offsets = [data_start + i * span // (SAMPLES - 1) for i in range(SAMPLES)]
                length = SAMPLE_BYTES
            for offset in offsets:
                digest.update(os.pread(handle.fileno(), length, offset))
    return digest.hexdigest()


def printable(name: str) -> str:
    """A file name as text for the header (UTF-8 JSON): bytes that are not UTF-8 (kept by
    Python as lone surrogates) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def build_metadata(plan: Plan, how: str = "sampled") -> dict[str, str]:
    """The output's __metadata__: recipe as YAML, weightmix version, inputs with fingerprints."""
    inputs = [
        {
            "name": name,
            "files": [printable(Path(f).name) for f in ckpt.files],
            "size": ckpt.size,
            "fingerprint": fingerprint(ckpt, how),
        }
        for name, ckpt in plan.checkpoints.items()
    ]
    title = plan.recipe.title or (
        printable(plan.output.name.removesuffix(".safetensors")) if plan.output else ""
    )
    sources = [(name, ckpt.metadata) for name, ckpt in plan.checkpoints.items()]
    return {
        "format": "pt",
        **modelspec_metadata({k.key: k.shape for k in plan.keys}, title, sources),
        KEY_VERSION: __version__,
        # model paths as seen from the folder that holds the output, so the recipe re-runs
        # from there (README: "Re-running a merge")
        KEY_RECIPE: plan.recipe.to_yaml(relative_to=plan.output.parent if plan.output else None),
        KEY_INPUTS: json.dumps(inputs),
        KEY_FINGERPRINT: FINGERPRINTS[how],
    }
