"""LoRA files, read from their headers: kohya's (`lora_up`/`lora_down`/`alpha`, module paths
with '_' under `lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`) and diffusers/PEFT's
(`lora_A`/`lora_B`, dotted module paths under `unet.`, `transformer.`, `text_encoder.` ...,
BFL names under `diffusion_model.` as ai-toolkit writes them for Flux)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from weightmix.errors import WeightmixError
from weightmix.io.reader import Checkpoint
from weightmix.units import count

KOHYA, PEFT = "kohya", "peft"
# the model part a LoRA module belongs to: the denoiser, the first or second text encoder
DENOISER, TEXT_1, TEXT_2 = "denoiser", "text_encoder", "text_encoder_2"
KOHYA_PREFIXES = (("lora_unet_", DENOISER), ("lora_te1_", TEXT_1), ("lora_te2_", TEXT_2),
                  ("lora_te_", TEXT_1))  # fmt: skip
PEFT_PREFIXES = (
    ("unet.", DENOISER),
    ("transformer.", DENOISER),
    ("model.diffusion_model.", DENOISER),
    ("diffusion_model.", DENOISER),
    ("text_encoder_2.", TEXT_2),
    ("text_encoder.", TEXT_1),
    ("te2.", TEXT_2),
    ("te1.", TEXT_1),
    ("te.", TEXT_1),
)
KOHYA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_up|lora_down)\.weight$")
PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(\.[\w-]+)?\.weight$")
UNSUPPORTED = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "dora_scale": "DoRA", "lora_mid": "LoCon"
               " with a Tucker middle factor", "lora.down.weight": "the old diffusers attention"
               " processor format"}  # fmt: skip


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: delta = (alpha / rank) · up · down, flattened past dim 0."""

    module: str  # the module path as the file names it, without prefix and suffix
    part: str  # DENOISER, TEXT_1 or TEXT_2
    dotted: bool  # PEFT's dotted path, else kohya's with '_' for '.'
    up: str
    down: str
    alpha: str | None  # a scalar tensor; None: `alpha_value`, else alpha = rank (scale 1)
    rank: int
    out_features: int
    in_features: int  # the input size flattened (in × kh × kw for a convolution)
    alpha_value: float | None = None  # PEFT's lora_alpha from the file's metadata

    @property
    def label(self) -> str:
        return self.up.rsplit(".", 2)[0] if not self.dotted else self.up.split(".lora_B")[0]


def is_lora(checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint is a LoRA (some key is a LoRA factor), from key names."""
    return any(
        KOHYA_KEY.match(k) or PEFT_KEY.match(k) or any(u in k for u in UNSUPPORTED)
        for k in checkpoint.tensors
    )


def read_layers(checkpoint: Checkpoint, where: str) -> tuple[str, list[LoraLayer]]:
    """The LoRA's format and layers; one line for anything it holds that is not understood."""
    keys = checkpoint.tensors
    for marker, name in UNSUPPORTED.items():
        found = next((k for k in keys if marker in k), None)
        if found is not None:
            raise WeightmixError(
                f"{where}: {found}: {name} adapters are not supported (weightmix reads kohya and"
                " PEFT LoRAs: lora_up/lora_down or lora_A/lora_B)"
            )
    kohya = [k for k in keys if KOHYA_KEY.match(k)]
    peft = [k for k in keys if PEFT_KEY.match(k)]
    if kohya and peft:
        raise WeightmixError(f"{where}: mixes kohya ({kohya[0]}) and PEFT ({peft[0]}) names")
    layers = _kohya_layers(checkpoint, where) if kohya else _peft_layers(checkpoint, where)
    used = {k for layer in layers for k in (layer.up, layer.down, layer.alpha) if k}
    stray = sorted(k for k in keys if k not in used)
    if stray:
        raise WeightmixError(
            f"{where}: {count(len(stray), 'key')} that are not LoRA factors of a known module,"
            f" e.g. {', '.join(stray[:3])}"
        )
    if not layers:
        raise WeightmixError(f"{where}: holds no LoRA layer")
    return (KOHYA if kohya else PEFT), layers


def _factor_keys(checkpoint: Checkpoint, pattern: re.Pattern) -> list[tuple[str, dict]]:
    """(module, {factor kind: key}) for every key the pattern matches, by module name."""
    factors: dict[str, dict[str, str]] = {}
    for key in checkpoint.tensors:
        match = pattern.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["kind"]] = key
    return sorted(factors.items())


def _kohya_layers(checkpoint: Checkpoint, where: str) -> list[LoraLayer]:
    layers = []
    for name, found in _factor_keys(checkpoint, KOHYA_KEY):
        part = next((p for prefix, p in KOHYA_PREFIXES if name.startswith(prefix)), None)
        if part is None:
            raise WeightmixError(
                f"{where}: {name}: a kohya module name must start with lora_unet_, lora_te_,"
                " lora_te1_ or lora_te2_"
            )
        prefix = next(prefix for prefix, p in KOHYA_PREFIXES if name.startswith(prefix))
        alpha = f"{name}.alpha" if f"{name}.alpha" in checkpoint.tensors else None
        layers.append(_layer(checkpoint, where, name[len(prefix) :], part, False,
                             found, ("lora_up", "lora_down"), alpha))  # fmt: skip
    return layers


def _peft_layers(checkpoint: Checkpoint, where: str) -> list[LoraLayer]:
    peft_alpha = _metadata_alpha(checkpoint, where)
    layers = []
    for name, found in _factor_keys(checkpoint, PEFT_KEY):
        inner = name.removeprefix("base_model.model.")
        hit = next(((prefix, p) for prefix, p in PEFT_PREFIXES if inner.startswith(prefix)), None)
        prefix, part = hit if hit is not None else ("", DENOISER)  # PEFT on a bare model
        alpha = f"{name}.alpha" if f"{name}.alpha" in checkpoint.tensors else None
        layer = _layer(checkpoint, where, inner[len(prefix) :], part, True, found,
                       ("lora_B", "lora_A"), alpha)  # fmt: skip
        if alpha is None and peft_alpha is not None:
            layer = replace(layer, alpha_value=peft_alpha)
        layers.append(layer)
    return layers


def _metadata_alpha(checkpoint: Checkpoint, where: str) -> float | None:
    """lora_alpha from the metadata diffusers writes (lora_adapter_metadata: PEFT's config)."""
    text = checkpoint.metadata.get("lora_adapter_metadata")
    if not text:
        return None
    try:
        config = json.loads(text)
    except ValueError:
        raise WeightmixError(f"{where}: metadata lora_adapter_metadata is not JSON") from None
    if not isinstance(config, dict) or config.get("lora_alpha") is None:
        return None
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise WeightmixError(
            f"{where}: per-module alpha_pattern/rank_pattern in the metadata is not supported"
        )
    try:
        return float(config["lora_alpha"])
    except (TypeError, ValueError):
        raise WeightmixError(f"{where}: metadata lora_alpha is not a number") from None


def _layer(
    checkpoint: Checkpoint,
    where: str,
    module: str,
    part: str,
    dotted: bool,
    found: dict[str, str],
    kinds: tuple[str, str],
    alpha: str | None,
) -> LoraLayer:
    up_kind, down_kind = kinds
    missing = [kind for kind in kinds if kind not in found]
    if missing:
        present = next(iter(found.values()))
        raise WeightmixError(f"{where}: {present} has no {missing[0]} beside it")
    up, down = checkpoint.tensors[found[up_kind]], checkpoint.tensors[found[down_kind]]
    if len(up.shape) < 2 or len(down.shape) < 2 or up.shape[1] != down.shape[0]:
        raise WeightmixError(
            f"{where}: {up.key} {list(up.shape)} and {down.key} {list(down.shape)} do not"
            " multiply (up: out × rank, down: rank × in)"
        )
    if any(d != 1 for d in up.shape[2:]):
        raise WeightmixError(f"{where}: {up.key} {list(up.shape)}: the up factor must be 1×1")
    if alpha is not None and checkpoint.tensors[alpha].numel != 1:
        raise WeightmixError(f"{where}: {alpha} is not a single number")
    in_features = 1
    for size in down.shape[1:]:
        in_features *= size
    return LoraLayer(module, part, dotted, up.key, down.key, alpha, down.shape[0], up.shape[0],
                     in_features)  # fmt: skip
