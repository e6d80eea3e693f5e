"""Run a CLIP text encoder over one prompt with transformers' CLIPTextModel, one layer in memory
at a time: the model is built on the meta device, each layer's weights are read just before it
runs and dropped after; only the embedding rows of the prompt's tokens are read."""

from __future__ import annotations

import torch

from weightmix.errors import WeightmixError
from weightmix.prompts.encoders import (
    LAST,
    LAST_PRESENT,
    PENULTIMATE,
    POSITION_EMBEDDING,
    TOKEN_EMBEDDING,
    TextEncoder,
)


def run_encoder(encoder: TextEncoder, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, final): the state the denoiser reads for each token (encoder.context) and the
    last layer's state after the final norm (None when the file lacks either), tokens × width,
    float32."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocabulary = encoder.config["vocab_size"]
    outside = [i for i in ids if not 0 <= i < vocabulary]
    if outside:
        raise WeightmixError(
            f"{encoder.where}: the tokenizer gives token {outside[0]}, outside the text encoder's"
            f" vocabulary of {vocabulary}: give the tokenizer of this text encoder (--tokenizer)"
        )
    rows = sorted(set(ids))  # the model gets a vocabulary of the prompt's tokens only
    local = torch.tensor([[rows.index(i) for i in ids]])
    layers = encoder.config["num_hidden_layers"]
    config = CLIPTextConfig(
        **{**encoder.config, "vocab_size": len(rows)}, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.eval()
    core = getattr(model, "text_model", model)  # transformers 4 nests the modules in text_model
    embeddings = {
        "token_embedding.weight": _rows(encoder, TOKEN_EMBEDDING, rows),
        "position_embedding.weight": _read(encoder, POSITION_EMBEDDING),
    }
    core.embeddings.load_state_dict(embeddings, assign=True)
    if encoder.final_norm:
        core.final_layer_norm.load_state_dict(_module(encoder, "final_layer_norm."), assign=True)
    else:  # left out of the file (SDXL's context never uses it): an identity stands in
        width = encoder.config["hidden_size"]
        core.final_layer_norm.load_state_dict(
            {"weight": torch.ones(width), "bias": torch.zeros(width)}, assign=True
        )
    hooks = []
    for index, layer in enumerate(core.encoder.layers):
        hooks.append(layer.register_forward_pre_hook(_loader(encoder, index)))
        hooks.append(layer.register_forward_hook(_drop))
    try:
        with torch.no_grad():
            out = model(
                input_ids=local,
                position_ids=torch.arange(len(ids)).unsqueeze(0),
                output_hidden_states=True,
            )
            states = out.hidden_states  # the embeddings, then each layer's output
            complete = encoder.final_norm and encoder.context != LAST_PRESENT
            final = core.final_layer_norm(states[layers])[0] if complete else None
            penultimate = states[layers - 1][0]
            if encoder.context == LAST:
                return final, final
            if encoder.context == LAST_PRESENT:
                return states[layers][0], None
            if encoder.context == PENULTIMATE:
                return penultimate, final
            return core.final_layer_norm(penultimate), final
    finally:
        for hook in hooks:
            hook.remove()


def _read(encoder: TextEncoder, name: str) -> torch.Tensor:
    return encoder.checkpoint.read(encoder.info(name)).float()


def _rows(encoder: TextEncoder, name: str, rows: list[int]) -> torch.Tensor:
    """Rows of a 2-d tensor, each read on its own."""
    info = encoder.info(name)
    width = info.shape[1]
    out = torch.empty((len(rows), width), dtype=info.dtype.torch)
    row_bytes = width * info.dtype.itemsize
    for position, row in enumerate(rows):
        buffer = out[position].view(torch.uint8).numpy()
        encoder.checkpoint.read_range(info, row * row_bytes, buffer)
    return out.float()


def _module(encoder: TextEncoder, prefix: str) -> dict[str, torch.Tensor]:
    found = {n[len(prefix) :]: _read(encoder, n) for n in encoder.keys if n.startswith(prefix)}
    if not found:
        raise WeightmixError(f"{encoder.where}: the text encoder has no {prefix.rstrip('.')}")
    return found


def _drop(module: torch.nn.Module, args: object, output: object) -> None:
    """After a layer ran: its weights leave memory (the output is left as it is)."""
    module.to("meta")


def _loader(encoder: TextEncoder, index: int):
    def load(module: torch.nn.Module, args: object) -> None:
        module.load_state_dict(_module(encoder, f"encoder.layers.{index}."), assign=True)

    return load
