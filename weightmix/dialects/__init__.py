"""Key dialects: the single-file names of LDM/SGM/BFL checkpoints against diffusers' names, for
SD1.x/2.x, SDXL and Flux (UNet or transformer, VAE, text encoders). See links.py for how one
side is rebuilt from the other as byte ranges, so conversions stream."""

from __future__ import annotations

from collections.abc import Iterable

from weightmix.arch import architecture_keys, detect_architecture
from weightmix.dialects.flux import flux_links, prefix_links
from weightmix.dialects.links import ConvertedCheckpoint, Link, converted, to_diffusers, to_single
from weightmix.dialects.stable_diffusion import clip_links, open_clip_links, unet_links, vae_links
from weightmix.io.reader import Checkpoint

# per architecture: (link builder, single-file prefix, pipeline component)
LAYOUTS = {
    "sd1-ldm": [
        (unet_links, "model.diffusion_model.", "unet"),
        (vae_links, "first_stage_model.", "vae"),
        (clip_links, "cond_stage_model.transformer.", "text_encoder"),
    ],
    "sdxl-sgm": [
        (unet_links, "model.diffusion_model.", "unet"),
        (vae_links, "first_stage_model.", "vae"),
        (clip_links, "conditioner.embedders.0.transformer.", "text_encoder"),
        (open_clip_links, "conditioner.embedders.1.model.", "text_encoder_2"),
    ],
    "flux-flux": [
        (flux_links, "model.diffusion_model.", "transformer"),
        (vae_links, "vae.", "vae"),
        (clip_links, "text_encoders.clip_l.transformer.", "text_encoder"),
        (prefix_links, "text_encoders.t5xxl.transformer.", "text_encoder_2"),
    ],
}
TEXT_ENCODERS = (clip_links, open_clip_links)  # their names depend on the saved 'text_model.'


def layout_links(single_keys: Iterable[str], pipeline_keys: Iterable[str]) -> list[Link] | None:
    """Links between a single file with these keys and a diffusers pipeline with those keys,
    or None when the single file's layout is not one weightmix can convert."""
    single, pipeline = set(single_keys), set(pipeline_keys)
    parts = LAYOUTS.get(detect_architecture(single) or "")
    if parts is None:
        return None
    links = []
    for build, prefix, component in parts:
        if build in TEXT_ENCODERS:
            text_model = any(k.startswith(f"{component}/text_model.") for k in pipeline)
            links += build(single, prefix, f"{component}/", text_model)
        else:
            links += build(single, prefix, f"{component}/")
    return links


def as_pipeline(
    single_file: Checkpoint, pipeline_keys: Iterable[str]
) -> ConvertedCheckpoint | None:
    """A single-file checkpoint seen with diffusers pipeline keys ('unet/conv_in.weight' ...)."""
    links = layout_links(single_file.tensors, pipeline_keys)
    if links is None:
        return None
    return converted(single_file, to_diffusers(links, single_file.tensors))


def as_single_file(pipeline: Checkpoint, single_keys: Iterable[str]) -> ConvertedCheckpoint | None:
    """A pipeline folder seen with single-file keys, for a single file holding `single_keys`."""
    links = layout_links(single_keys, pipeline.tensors)
    if links is None:
        return None
    return converted(pipeline, to_single(links, pipeline.tensors))


def single_file_view(pipeline: Checkpoint) -> ConvertedCheckpoint | None:
    """A pipeline seen with the single-file names of the architecture it matches best (the
    canonical key names of sd1-ldm, sdxl-sgm or flux-flux), or None when none fits."""
    best: tuple[int, list[str]] | None = None
    for architecture in LAYOUTS:
        names = [s.key for s in architecture_keys(architecture, optional=True)]
        links = layout_links(names, pipeline.tensors) or []
        covered = len({link.diffusers for link in links} & pipeline.tensors.keys())
        if best is None or covered > best[0]:
            best = (covered, names)
    if best is None or best[0] < 0.95 * len(pipeline.tensors):
        return None
    return as_single_file(pipeline, best[1])


__all__ = ["Link", "as_pipeline", "as_single_file", "layout_links", "single_file_view"]
