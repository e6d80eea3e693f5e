"""Flux: Black Forest Labs' names (in ComfyUI/BFL single files) <-> diffusers'
FluxTransformer2DModel names. BFL fuses q, k and v (and, in single blocks, the MLP input as
well) into one matrix; the final modulation stores (shift, scale) where diffusers stores
(scale, shift)."""

from __future__ import annotations

from collections.abc import Iterable

from weightmix.dialects.links import Link

TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE = {
    "linear2": "proj_out",
    "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
MLP_RATIO = 4  # the MLP input is 4x the hidden size in every Flux model


def flux_links(keys: Iterable[str], single: str, diffusers: str) -> list[Link]:
    links = []
    for key in keys:
        if not key.startswith(single):
            continue
        name = key[len(single) :]
        stem, _, kind = name.rpartition(".")  # kind: weight, bias or scale
        if name.startswith("final_layer.adaLN_modulation.1."):
            target = f"{diffusers}norm_out.linear.{kind}"
            links += [Link(key, target, part=1, parts=(1, 1), position=0),
                      Link(key, target, part=0, parts=(1, 1), position=1)]  # fmt: skip
            continue
        parts = name.split(".")
        if parts[0] in ("double_blocks", "single_blocks"):
            links += _block_links(key, parts, diffusers)
            continue
        for old, new in TOP.items():
            if stem == old:
                links.append(Link(key, f"{diffusers}{new}.{kind}"))
    return links


def _block_links(key: str, parts: list[str], diffusers: str) -> list[Link]:
    number, rest = parts[1], ".".join(parts[2:])
    stem, _, kind = rest.rpartition(".")
    if parts[0] == "double_blocks":
        base = f"{diffusers}transformer_blocks.{number}."
        if rest in DOUBLE:  # the norm scales map whole names
            return [Link(key, base + DOUBLE[rest])]
        if stem in DOUBLE:
            return [Link(key, f"{base}{DOUBLE[stem]}.{kind}")]
        if stem in DOUBLE_QKV:
            return [
                Link(key, f"{base}{target}.{kind}", part=i, parts=(1, 1, 1))
                for i, target in enumerate(DOUBLE_QKV[stem])
            ]
        return []
    base = f"{diffusers}single_transformer_blocks.{number}."
    if rest in SINGLE:
        return [Link(key, base + SINGLE[rest])]
    if stem in SINGLE:
        return [Link(key, f"{base}{SINGLE[stem]}.{kind}")]
    if stem == "linear1":
        weights = (1, 1, 1, MLP_RATIO)
        return [
            Link(key, f"{base}{target}.{kind}", part=i, parts=weights)
            for i, target in enumerate(SINGLE_FUSED)
        ]
    return []


def prefix_links(keys: Iterable[str], single: str, diffusers: str) -> list[Link]:
    """Components whose names are the same on both sides but for the prefix (T5)."""
    return [Link(k, diffusers + k[len(single) :]) for k in keys if k.startswith(single)]
