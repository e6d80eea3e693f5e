"""The `modelspec.*` metadata keys (Stability AI Model Metadata Standard 1.0) that ComfyUI and
kohya write and read: which architecture a file holds, its title, date and what it was merged
from."""

from __future__ import annotations

import os
import time

from weightmix.arch import detect_architecture

SPEC_VERSION = "1.0.0"
_SGM = "https://github.com/Stability-AI/generative-models"
_BFL = "https://github.com/black-forest-labs/flux"
# our architecture data -> (modelspec.architecture, modelspec.implementation)
ARCHITECTURE_IDS = {
    "sd1-ldm": ("stable-diffusion-v1", _SGM),
    "sdxl-sgm": ("stable-diffusion-xl-v1-base", _SGM),
    "sd3-comfyui": ("stable-diffusion-v3-medium", _SGM),
    "flux-flux": ("flux-1-dev", _BFL),
}
# keys of an input that stay true of a merge of models of the same architecture
CARRIED = ("resolution", "prediction_type", "timestep_range", "encoder_layer")


def merge_date() -> str:
    """Today (UTC) as YYYY-MM-DD, or the date of SOURCE_DATE_EPOCH for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    seconds = int(epoch) if epoch and epoch.isdigit() else time.time()
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


def modelspec_metadata(
    output_keys: list[str], title: str, sources: list[tuple[str, dict[str, str]]]
) -> dict[str, str]:
    """modelspec.* keys for a merge whose output holds `output_keys`; `sources` are the inputs'
    (name, metadata) with the base model first. Empty when the layout is not one we know."""
    architecture = detect_architecture(output_keys)
    if architecture is None:
        return {}
    arch_id, implementation = ARCHITECTURE_IDS[architecture]
    if architecture == "flux-flux" and not any(".guidance_in." in k for k in output_keys):
        arch_id = "flux-1-schnell"  # schnell has no guidance embedder
    merged_from = [meta.get("modelspec.title", name) for name, meta in sources]
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": arch_id,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": merge_date(),
        "modelspec.merged_from": ", ".join(merged_from),
    }
    base = sources[0][1] if sources else {}
    if base.get("modelspec.architecture") == arch_id:
        for name in CARRIED:
            if f"modelspec.{name}" in base:
                spec[f"modelspec.{name}"] = base[f"modelspec.{name}"]
    return spec
