"""Stable Diffusion 1.x/2.x/XL: LDM/SGM single-file names <-> diffusers names, for the UNet,
the VAE and the CLIP text encoders. The structure (blocks per level, which blocks hold
attention) is read from the single-file key names, so any UNet of this family maps."""

from __future__ import annotations

from collections.abc import Iterable

from weightmix.dialects.links import Link

RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _inner(keys: Iterable[str], prefix: str) -> list[str]:
    return [k[len(prefix) :] for k in keys if k.startswith(prefix)]


def _renamed(name: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


def unet_links(keys: Iterable[str], single: str, diffusers: str) -> list[Link]:
    inner = _inner(keys, single)
    ops = [int(k.split(".")[1]) for k in inner if k.startswith("input_blocks.") and ".op." in k]
    if not ops:
        return []
    per_level = min(ops)  # resnets per down level + 1 (the downsampler's slot)
    links = []
    for name in inner:
        target = _unet_name(name, per_level)
        if target is not None:
            links.append(Link(single + name, diffusers + target))
    return links


def _unet_name(name: str, per_level: int) -> str | None:
    top = _renamed(name, UNET_TOP)
    if top is not None:
        return top
    parts = name.split(".")
    if parts[0] == "middle_block":
        rest = ".".join(parts[2:])
        if parts[1] == "1":
            return f"mid_block.attentions.0.{rest}"
        resnet = _renamed(rest, RESNET) or rest
        return f"mid_block.resnets.{0 if parts[1] == '0' else 1}.{resnet}"
    if parts[0] == "input_blocks":
        index, slot, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        level, block = (index - 1) // per_level, (index - 1) % per_level
        if rest.startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        if slot == "1":
            return f"down_blocks.{level}.attentions.{block}.{rest}"
        return f"down_blocks.{level}.resnets.{block}.{_renamed(rest, RESNET) or rest}"
    if parts[0] == "output_blocks":
        index, slot, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        level, block = index // per_level, index % per_level
        if rest.startswith("conv."):  # the upsampler: slot 1, or 2 after an attention
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        if slot == "1":
            return f"up_blocks.{level}.attentions.{block}.{rest}"
        return f"up_blocks.{level}.resnets.{block}.{_renamed(rest, RESNET) or rest}"
    return None


def vae_links(keys: Iterable[str], single: str, diffusers: str) -> list[Link]:
    inner = _inner(keys, single)
    ups = 1 + max((int(k.split(".")[2]) for k in inner if k.startswith("decoder.up.")), default=-1)
    links = []
    for name in inner:
        target = _vae_name(name, ups)
        if target is None:
            continue
        attention_weight = ".mid.attn_1." in f".{name}" and name.endswith(".weight")
        reshape = attention_weight and name.split(".")[-2] != "norm"  # 1x1 conv <-> linear
        links.append(Link(single + name, diffusers + target, reshape=reshape))
    return links


def _vae_name(name: str, ups: int) -> str | None:
    parts = name.split(".")
    side = parts[0]
    if side in ("quant_conv", "post_quant_conv"):
        return name
    if side not in ("encoder", "decoder"):
        return None
    if parts[1] in ("conv_in", "conv_out"):
        return name
    if parts[1] == "norm_out":
        return f"{side}.conv_norm_out.{'.'.join(parts[2:])}"
    if parts[1] == "mid":
        what, tail = parts[2], ".".join(parts[3:])
        if what in ("block_1", "block_2"):
            resnet = tail.replace("nin_shortcut", "conv_shortcut")
            return f"{side}.mid_block.resnets.{0 if what == 'block_1' else 1}.{resnet}"
        sub = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
        return f"{side}.mid_block.attentions.0.{sub[parts[3]]}.{'.'.join(parts[4:])}"
    if parts[1] in ("down", "up"):
        level = int(parts[2])
        blocks = "down_blocks" if parts[1] == "down" else "up_blocks"
        if parts[1] == "up":
            level = ups - 1 - level  # LDM counts decoder levels from the bottom
        if parts[3] == "block":
            resnet = ".".join(parts[5:]).replace("nin_shortcut", "conv_shortcut")
            return f"{side}.{blocks}.{level}.resnets.{parts[4]}.{resnet}"
        sampler = "downsamplers" if parts[3] == "downsample" else "upsamplers"
        return f"{side}.{blocks}.{level}.{sampler}.0.{'.'.join(parts[4:])}"
    return None


def clip_links(keys: Iterable[str], single: str, diffusers: str, text_model: bool) -> list[Link]:
    """transformers' CLIPTextModel names on both sides ('text_model.' dropped in the folder
    when its files are saved without it); position_ids is a buffer diffusers does not save."""
    links = []
    for name in _inner(keys, single):
        if name.endswith("position_ids"):
            continue
        target = name if text_model else name.removeprefix("text_model.")
        links.append(Link(single + name, diffusers + target))
    return links


OPEN_CLIP = {
    "token_embedding": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final": "text_model.final_layer_norm",
}
OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def open_clip_links(
    keys: Iterable[str], single: str, diffusers: str, text_model: bool
) -> list[Link]:
    """OpenCLIP (SDXL's second encoder) <-> transformers' CLIPTextModelWithProjection: fused
    in_proj cut into q, k and v; the projection matrix stored transposed."""
    prefix = "text_model." if text_model else ""
    links = []
    for name in _inner(keys, single):
        key = single + name
        if name == "text_projection":
            links.append(Link(key, diffusers + "text_projection.weight", transpose=True))
            continue
        top = _renamed(name, OPEN_CLIP)
        if top is not None:
            links.append(Link(key, diffusers + prefix + top.removeprefix("text_model.")))
            continue
        parts = name.split(".")
        if parts[:2] != ["transformer", "resblocks"]:
            continue  # logit_scale: used in training only
        layer, rest = parts[2], ".".join(parts[3:])
        base = f"{diffusers}{prefix}encoder.layers.{layer}."
        if rest.startswith("attn.in_proj_"):
            kind = "weight" if rest.endswith("weight") else "bias"
            for part, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                target = f"{base}self_attn.{projection}.{kind}"
                links.append(Link(key, target, part=part, parts=(1, 1, 1)))
            continue
        renamed = _renamed(rest, OPEN_CLIP_LAYER)
        if renamed is not None:
            links.append(Link(key, base + renamed))
    return links
