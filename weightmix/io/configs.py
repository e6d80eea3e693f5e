"""Checks that a model folder's config.json agrees with its weights, from header shapes only:
a folder whose config says 9 input channels but whose weights have 4 would merge fine and then
fail to load (or load wrong), so it is refused up front."""

from __future__ import annotations

import re
from pathlib import Path

from weightmix.errors import WeightmixError
from weightmix.io.header import load_json
from weightmix.io.reader import TensorInfo

# diffusers classes: config field -> (weight key, dimension that must equal it)
DIMENSIONS = {
    "UNet2DConditionModel": {
        "in_channels": ("conv_in.weight", 1),
        "out_channels": ("conv_out.weight", 0),
        "cross_attention_dim": (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            1,
        ),
    },
    "AutoencoderKL": {
        "in_channels": ("encoder.conv_in.weight", 1),
        "out_channels": ("decoder.conv_out.weight", 0),
        "latent_channels": ("decoder.conv_in.weight", 1),
    },
    "FluxTransformer2DModel": {
        "in_channels": ("x_embedder.weight", 1),
        "joint_attention_dim": ("context_embedder.weight", 1),
        "pooled_projection_dim": ("time_text_embed.text_embedder.linear_1.weight", 1),
    },
}
# diffusers classes: config field -> the numbered blocks whose count must equal it
COUNTS = {
    "FluxTransformer2DModel": {
        "num_layers": "transformer_blocks",
        "num_single_layers": "single_transformer_blocks",
    },
}
# transformers models (any architecture): the token embedding and the numbered layers
EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|token_embedding|wte|word_embeddings|shared)\.weight$")
LAYERS = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config(folder: Path, tensors: dict[str, TensorInfo]) -> None:
    """Raise a one-line error when folder/config.json contradicts the weights' shapes."""
    path = folder / "config.json"
    if not path.is_file():
        return
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise WeightmixError(f"{path}: cannot read: {error}") from None
    config = load_json(raw, str(path), ": fix it, or take it from the model's original folder")
    if not isinstance(config, dict):
        raise WeightmixError(f"{path}: is not a JSON object")
    problems = list(_diffusers_problems(config, tensors)) + list(
        _transformers_problems(config, tensors)
    )
    if problems:
        raise WeightmixError(
            f"{path}: {problems[0]}: the config does not match the weights beside it"
            " (a config from another model?)"
        )


def _diffusers_problems(config: dict, tensors: dict[str, TensorInfo]):
    kind = config.get("_class_name")
    if not isinstance(kind, str):  # a list or an object is no class name (nor a dict key)
        return
    for field, (key, dim) in DIMENSIONS.get(kind, {}).items():
        info, value = tensors.get(key), config.get(field)
        known = isinstance(value, int) and info is not None and len(info.shape) > dim
        if known and info.shape[dim] != value:
            yield f"{field} is {value} but {key} has {info.shape[dim]} there"
    for field, prefix in COUNTS.get(kind, {}).items():
        value = config.get(field)
        found = {k.split(".")[1] for k in tensors if k.startswith(prefix + ".")}
        if isinstance(value, int) and len(found) != value:
            yield f"{field} is {value} but the weights hold {len(found)} {prefix}"


def _transformers_problems(config: dict, tensors: dict[str, TensorInfo]):
    if "architectures" not in config and "model_type" not in config:
        return
    embedding = next((info for key, info in tensors.items() if EMBEDDINGS.search(key)), None)
    if embedding is not None and len(embedding.shape) == 2:
        for field, dim in (("vocab_size", 0), ("hidden_size", 1), ("d_model", 1)):
            value = config.get(field)
            if isinstance(value, int) and embedding.shape[dim] != value:
                yield f"{field} is {value} but {embedding.key} has {embedding.shape[dim]} there"
    layers = {m.group(1) for key in tensors if (m := LAYERS.search(key))}
    value = config.get("num_hidden_layers")
    if isinstance(value, int) and layers and len(layers) != value:
        yield f"num_hidden_layers is {value} but the weights hold {len(layers)} layers"
