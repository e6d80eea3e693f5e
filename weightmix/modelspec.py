"""The `modelspec.*` metadata keys (Stability AI Model Metadata Standard 1.0) that ComfyUI and
kohya write and read: which architecture a file holds, its title, date and what it was merged
from."""

from __future__ import annotations

import os
import time

from weightmix.arch.families import Unknown, detect

SPEC_VERSION = "1.0.0"
_SGM = "https://github.com/Stability-AI/generative-models"
_BFL = "https://github.com/black-forest-labs/flux"
IMPLEMENTATIONS = {"flux": _BFL}  # by family name prefix; Stability's otherwise
# keys of an input that stay true of a merge of models of the same architecture
CARRIED = ("resolution", "prediction_type", "timestep_range", "encoder_layer")


def merge_date() -> str:
    """Today (UTC) as YYYY-MM-DD, or the date of SOURCE_DATE_EPOCH for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    seconds = int(epoch) if epoch and epoch.isdigit() else time.time()
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


def modelspec_metadata(
    output_shapes: dict[str, tuple[int, ...]], title: str, sources: list[tuple[str, dict[str, str]]]
) -> dict[str, str]:
    """modelspec.* keys for a merge whose output holds these keys (and shapes); `sources` are
    the inputs' (name, metadata) with the base model first. Empty for layouts the standard has
    no name for (LLMs, unknown ones). SD2's 512 and 768-v variants share their weights' layout,
    so the name is carried over from the base model, else left out."""
    architecture = detect(output_shapes)
    if isinstance(architecture, Unknown):
        return {}
    base = sources[0][1] if sources else {}
    arch_id = architecture.family.modelspec
    if architecture.name == "sd2":
        carried = base.get("modelspec.architecture", "")
        arch_id = carried if carried.startswith("stable-diffusion-v2") else None
    if arch_id is None:
        return {}
    implementation = IMPLEMENTATIONS.get(architecture.name.split("-")[0], _SGM)
    merged_from = [meta.get("modelspec.title", name) for name, meta in sources]
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": arch_id,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": merge_date(),
        "modelspec.merged_from": ", ".join(merged_from),
    }
    if base.get("modelspec.architecture") == arch_id:
        for name in CARRIED:
            if f"modelspec.{name}" in base:
                spec[f"modelspec.{name}"] = base[f"modelspec.{name}"]
    return spec
