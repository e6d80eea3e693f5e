"""Where a checkpoint keeps its CLIP text encoders, found from key names and shapes only, and
which of their hidden states the denoiser reads (facts about the public model layouts)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from weightmix.dialects.links import converted, to_diffusers
from weightmix.dialects.stable_diffusion import open_clip_links
from weightmix.errors import WeightmixError
from weightmix.io.reader import Checkpoint, TensorInfo

# The state the denoiser reads as its text context, by how the model was trained:
LAST = "last"  # the last layer, after the final norm (SD1.x, and one-encoder diffusers folders)
PENULTIMATE_NORMED = "penultimate+norm"  # the penultimate layer, then the final norm (SD2.x LDM)
PENULTIMATE = "penultimate"  # the penultimate layer, no final norm (SDXL's both encoders)
LAST_PRESENT = "last present"  # the same, from a file saved without the unused last layer
# layers of the CLIP text encoders Stable Diffusion uses, by width: ViT-L/14, OpenCLIP
# ViT-H/14, OpenCLIP ViT-bigG/14 (SDXL files may leave out the last layer they never use)
FULL_DEPTH = {768: 12, 1024: 24, 1280: 32}

# (prefix, names, context state): single-file prefixes of CLIP text encoders; 'hf' names are
# transformers' CLIPTextModel (OpenAI CLIP, quick_gelu), 'open_clip' names OpenCLIP's (gelu)
SINGLE_FILE = (
    ("cond_stage_model.transformer.", "hf", LAST),  # SD1.x: CLIP ViT-L/14
    ("cond_stage_model.model.", "open_clip", PENULTIMATE_NORMED),  # SD2.x: OpenCLIP ViT-H/14
    ("conditioner.embedders.0.transformer.", "hf", PENULTIMATE),  # SDXL: CLIP ViT-L/14
    ("conditioner.embedders.0.model.", "open_clip", PENULTIMATE),  # SDXL refiner: bigG
    ("conditioner.embedders.1.model.", "open_clip", PENULTIMATE),  # SDXL: OpenCLIP ViT-bigG/14
    ("text_encoders.clip_l.transformer.", "hf", LAST),  # Flux single files: CLIP ViT-L/14
)
PIPELINE = ("text_encoder", "text_encoder_2")  # diffusers folders; SDXL has both
HEAD_WIDTH = 64  # every CLIP text encoder's attention head width
TOKEN_EMBEDDING = "embeddings.token_embedding.weight"
POSITION_EMBEDDING = "embeddings.position_embedding.weight"


@dataclass
class TextEncoder:
    """One CLIP text encoder of a checkpoint, with transformers' names (no 'text_model.')."""

    where: str  # for messages: 'model a (text_encoder)'
    checkpoint: Checkpoint
    keys: dict[str, str]  # transformers name -> key in checkpoint
    context: str  # LAST, PENULTIMATE_NORMED or PENULTIMATE
    hidden_act: str  # from the names: quick_gelu (OpenAI CLIP), gelu (OpenCLIP); '' if unknown
    config: dict = field(default_factory=dict)  # CLIPTextConfig arguments
    notes: list[str] = field(default_factory=list)
    final_norm: bool = True  # whether the file holds the final norm (SDXL's may leave it out)

    def info(self, name: str) -> TensorInfo:
        return self.checkpoint.tensors[self.keys[name]]

    @property
    def width(self) -> int:
        return self.config["hidden_size"]


def find_text_encoders(checkpoint: Checkpoint, where: str) -> list[TextEncoder]:
    """The checkpoint's CLIP text encoders in the order the denoiser concatenates their states
    (SDXL: CLIP-L, then bigG); an empty list when it has none."""
    keys = checkpoint.tensors
    found: list[TextEncoder] = []
    pipeline = [c for c in PIPELINE if any(k.startswith(f"{c}/") for k in keys)]
    for component in pipeline:  # the context is settled below, once the CLIPs are known
        label = f"{where} ({component})"
        encoder = _hf_encoder(checkpoint, f"{component}/", label, LAST, "")
        if encoder is not None:
            found.append(encoder)
    if pipeline and (len(found) == 2 or (found and found[0].where.endswith("_2)"))):
        for encoder in found:  # SDXL (both CLIPs) or its refiner (bigG alone): penultimate
            encoder.context = PENULTIMATE
    for prefix, names, context in SINGLE_FILE if not pipeline else ():
        label = f"{where} ({prefix.rstrip('.')})"
        if names == "hf":
            encoder = _hf_encoder(checkpoint, prefix, label, context, "quick_gelu")
        else:
            encoder = _open_clip_encoder(checkpoint, prefix, label, context)
        if encoder is not None:
            found.append(encoder)
    if not found:
        encoder = _hf_encoder(checkpoint, "", where, LAST, "")  # a CLIP text model alone
        if encoder is not None:
            found.append(encoder)
    for encoder in found:
        _configure(encoder)
    return found


def _hf_encoder(
    checkpoint: Checkpoint, prefix: str, where: str, context: str, hidden_act: str
) -> TextEncoder | None:
    names = {}
    for key in checkpoint.tensors:
        if key.startswith(prefix):
            inner = key[len(prefix) :].removeprefix("text_model.")
            if inner.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
                names[inner] = key
    if TOKEN_EMBEDDING not in names:
        return None
    return TextEncoder(where, checkpoint, names, context, hidden_act)


def _open_clip_encoder(
    checkpoint: Checkpoint, prefix: str, where: str, context: str
) -> TextEncoder | None:
    if f"{prefix}token_embedding.weight" not in checkpoint.tensors:
        return None
    links = open_clip_links(checkpoint.tensors, prefix, "", False)
    view = converted(checkpoint, to_diffusers(links, checkpoint.tensors))
    return _hf_encoder(view, "", where, context, "gelu")


def _configure(encoder: TextEncoder) -> None:
    """CLIPTextConfig arguments: from the component's config.json when it has one, else from
    the shapes (heads of width 64; OpenAI CLIP's quick_gelu for a 768-wide CLIP, OpenCLIP's
    gelu otherwise, unless the key names say which). Every tensor a layer needs is checked."""
    tokens = _shape(encoder, TOKEN_EMBEDDING, 2)
    width = tokens[1]
    layers = sorted({int(k.split(".")[2]) for k in encoder.keys if k.startswith("encoder.layers.")})
    if layers != list(range(len(layers))) or not layers:
        raise WeightmixError(f"{encoder.where}: text encoder layers {layers} are not 0 .. n-1")
    inner = _shape(encoder, "encoder.layers.0.mlp.fc1.weight", 2)[0]
    positions = _shape(encoder, POSITION_EMBEDDING, 2)
    _expect(encoder, POSITION_EMBEDDING, (positions[0], width))
    for layer in layers:
        for name, shape in _layer_shapes(width, inner).items():
            _expect(encoder, f"encoder.layers.{layer}.{name}", shape)
    encoder.final_norm = "final_layer_norm.weight" in encoder.keys
    if encoder.final_norm:
        for name in ("final_layer_norm.weight", "final_layer_norm.bias"):
            _expect(encoder, name, (width,))
    saved = _saved_config(encoder)
    guessed = encoder.hidden_act or ("quick_gelu" if width == 768 else "gelu")
    config = {
        "vocab_size": tokens[0],
        "hidden_size": width,
        "intermediate_size": inner,
        "num_hidden_layers": len(layers),
        "num_attention_heads": width // HEAD_WIDTH if width % HEAD_WIDTH == 0 else 1,
        "max_position_embeddings": positions[0],
        "hidden_act": guessed,
        "layer_norm_eps": 1e-5,
    }
    if saved:
        taken = ("num_attention_heads", "hidden_act", "layer_norm_eps")
        config.update({name: saved[name] for name in taken if name in saved})
    else:
        if not encoder.hidden_act:
            encoder.notes.append(
                f"{encoder.where}: no config.json says the text encoder's activation: {guessed}"
                f" assumed (OpenAI's CLIP-L is quick_gelu, OpenCLIP's encoders gelu)"
            )
        if width % HEAD_WIDTH:
            encoder.notes.append(
                f"{encoder.where}: text encoder width {width} is not a multiple of CLIP's head"
                f" width {HEAD_WIDTH} and no config.json says its heads: it runs with one head"
            )
    encoder.config = config
    full = FULL_DEPTH.get(width)
    if encoder.context == PENULTIMATE and full is not None and len(layers) == full - 1:
        encoder.context = LAST_PRESENT  # saved without the last layer, which it never used
    if not encoder.final_norm and encoder.context in (LAST, PENULTIMATE_NORMED):
        raise WeightmixError(
            f"{encoder.where}: the text encoder has no final_layer_norm, which its text context"
            " needs: give --text-encoder with a complete one"
        )


def _layer_shapes(width: int, inner: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes[f"self_attn.{projection}.weight"] = (width, width)
        shapes[f"self_attn.{projection}.bias"] = (width,)
    for norm in ("layer_norm1", "layer_norm2"):
        shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (width,)
    shapes |= {"mlp.fc1.weight": (inner, width), "mlp.fc1.bias": (inner,),
               "mlp.fc2.weight": (width, inner), "mlp.fc2.bias": (width,)}  # fmt: skip
    return shapes


def _shape(encoder: TextEncoder, name: str, dims: int) -> tuple[int, ...]:
    if name not in encoder.keys:
        raise WeightmixError(f"{encoder.where}: the text encoder has no {name}")
    shape = encoder.info(name).shape
    if len(shape) != dims:
        raise WeightmixError(
            f"{encoder.where}: text encoder {encoder.keys[name]} is {list(shape)}, not {dims}-d"
        )
    return shape


def _expect(encoder: TextEncoder, name: str, shape: tuple[int, ...]) -> None:
    if name not in encoder.keys:
        raise WeightmixError(f"{encoder.where}: the text encoder has no {name}")
    found = encoder.info(name).shape
    if found != shape:
        raise WeightmixError(
            f"{encoder.where}: text encoder {encoder.keys[name]} is {list(found)}, a CLIP text"
            f" encoder of this width has {list(shape)} there"
        )


def _saved_config(encoder: TextEncoder) -> dict | None:
    """config.json of the component folder the encoder's weights come from, if any."""
    source = getattr(encoder.checkpoint, "source", encoder.checkpoint)
    folder = Path(source.path)
    if not folder.is_dir():
        return None
    first = next(iter(encoder.keys.values()))
    component = first.split("/", 1)[0] if "/" in first else ""
    path = folder / component / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightmixError(f"{path}: cannot read the text encoder's config: {error}") from None
    return data if isinstance(data, dict) else None
