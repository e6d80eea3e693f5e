"""Which rows of which model tensor a LoRA module changes. A model is indexed under its own
module names and, through the key dialects (dialects/), under the other layout's names, so a
kohya or PEFT LoRA finds its layers in a single file or a diffusers folder alike, fused q/k/v
included (a LoRA on `to_q` changes the first third of BFL's `qkv`, and the other way round)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from weightmix.arch import architecture_keys
from weightmix.dialects import LAYOUTS, layout_links
from weightmix.dialects.flux import flux_links
from weightmix.dialects.links import Link
from weightmix.dialects.stable_diffusion import clip_links, open_clip_links, unet_links
from weightmix.io.folders import FolderCheckpoint
from weightmix.io.reader import Checkpoint
from weightmix.lora.formats import DENOISER, TEXT_1, TEXT_2

# where each part of a model lives: single-file prefixes, then diffusers component folders
PART_PREFIXES = (
    ("model.diffusion_model.", DENOISER),
    ("cond_stage_model.transformer.", TEXT_1),
    ("cond_stage_model.model.", TEXT_1),
    ("conditioner.embedders.0.transformer.", TEXT_1),
    ("conditioner.embedders.0.model.", TEXT_1),
    ("conditioner.embedders.1.model.", TEXT_2),
    ("text_encoders.clip_l.transformer.", TEXT_1),
    ("unet/", DENOISER),
    ("transformer/", DENOISER),
    ("text_encoder/", TEXT_1),
    ("text_encoder_2/", TEXT_2),
)
# no LoRA trains these (T5 is left out too: kohya and PEFT LoRAs name no T5 module)
NOT_ADAPTED = ("vae/", "first_stage_model.", "vae.", "model_ema.", "text_encoders.t5xxl.",
               "text_encoder_3/", "conditioner.embedders.2.")  # fmt: skip
# single-file parts and how their names link to diffusers': (prefix, links, component)
SINGLE_FILE_PARTS = (
    ("model.diffusion_model.", "denoiser", "unet/"),
    ("cond_stage_model.transformer.", clip_links, "text_encoder/"),
    ("cond_stage_model.model.", open_clip_links, "text_encoder/"),
    ("conditioner.embedders.0.transformer.", clip_links, "text_encoder/"),
    ("conditioner.embedders.0.model.", open_clip_links, "text_encoder_2/"),
    ("conditioner.embedders.1.model.", open_clip_links, "text_encoder_2/"),
    ("text_encoders.clip_l.transformer.", clip_links, "text_encoder/"),
)
SINGLE, DIFFUSERS = "single", "diffusers"  # the two key dialects


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of model tensor `key` are rows [from_start, from_stop) of the
    module's weight, which has `rows` rows in all."""

    key: str
    start: int
    stop: int
    from_start: int
    from_stop: int
    rows: int
    part: str = ""  # the module's part and path as that dialect names it
    module: str = ""
    dialect: str = ""  # SINGLE or DIFFUSERS


CLIP_MODULES = ("text_model.", "embeddings.", "encoder.layers.", "final_layer_norm",
                "transformer.resblocks.", "token_embedding", "text_projection")  # fmt: skip


def module_name(key: str) -> tuple[str, str] | None:
    """(part, module path) of a weight key; None for keys no LoRA adapts (a text encoder part
    that is not a CLIP, such as Flux's T5 in text_encoder_2/, is left out)."""
    if not key.endswith(".weight") or key.startswith(NOT_ADAPTED):
        return None
    stem = key[: -len(".weight")]
    for prefix, part in PART_PREFIXES:
        if stem.startswith(prefix):
            inner = stem[len(prefix) :]
            if part != DENOISER and not inner.startswith(CLIP_MODULES):
                return None
            return part, inner
    return DENOISER, stem  # a denoiser (or any model) saved on its own


def normalized(module: str) -> str:
    """kohya's spelling of a module path: '.' as '_' (PEFT paths are compared the same way)."""
    return module.replace(".", "_")


class ModelIndex:
    """Module names -> the model rows they are, from the model's key names and shapes."""

    def __init__(self, model: Checkpoint):
        self.model = model
        self.pipeline = isinstance(model, FolderCheckpoint) and model.pipeline
        self.segments: dict[tuple[str, str], list[Segment]] = defaultdict(list)
        self.by_key: dict[str, list[Segment]] = defaultdict(list)
        own = DIFFUSERS if self.pipeline else SINGLE
        for key, info in model.tensors.items():
            named = module_name(key)
            if named is not None and len(info.shape) >= 2:
                rows = info.shape[0]
                self._add(named, Segment(key, 0, rows, 0, rows, rows), own)
        self._add_links(self._links())
        keys = model.tensors
        self.has_text_2 = any(module_name(k) and module_name(k)[0] == TEXT_2 for k in keys)
        if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys) or any(
            "single_transformer_blocks." in k for k in keys
        ):
            self.family = "flux"
        elif self.has_text_2 or any(".label_emb." in k or "add_embedding." in k for k in keys):
            self.family = "sdxl"
        else:
            self.family = "sd"

    def lookup(self, part: str, module: str) -> list[Segment]:
        return self.segments.get((part, normalized(module)), [])

    def _add(self, named: tuple[str, str], segment: Segment, dialect: str) -> None:
        part, module = named
        segment = replace(segment, part=part, module=module, dialect=dialect)
        found = self.segments[(part, normalized(module))]
        if all(_place(s) != _place(segment) for s in found):
            found.append(segment)
            self.by_key[segment.key].append(segment)
        if part in (TEXT_1, TEXT_2) and not module.startswith("text_model."):
            self._add((part, f"text_model.{module}"), segment, dialect)  # saved without it

    def _links(self) -> list[Link]:
        """Links between the model's names and the other dialect's."""
        keys = self.model.tensors
        if self.pipeline:  # the single-file names of the layout that covers most keys
            candidates = []
            for architecture in LAYOUTS:
                links = layout_links(_canonical(architecture), keys) or []
                covered = {link.diffusers for link in links} & keys.keys()
                candidates.append((len(covered), links))
            return max(candidates, key=lambda c: c[0], default=(0, []))[1]
        links: list[Link] = []
        for prefix, build, component in SINGLE_FILE_PARTS:
            if not any(k.startswith(prefix) for k in keys):
                continue
            if build == "denoiser":
                flux = any(k.startswith(f"{prefix}double_blocks.") for k in keys)
                build_links = flux_links if flux else unet_links
                component = "transformer/" if flux else component
                links += build_links(keys, prefix, component)
            else:
                links += build(keys, prefix, component, True)
        return links

    def _add_links(self, links: list[Link]) -> None:
        """Segments for the other dialect's names: each link is rows of a single-file tensor
        that are rows of a diffusers tensor."""
        keys = self.model.tensors
        pipeline = self.pipeline
        links = [link for link in links if not link.transpose]
        by_single: dict[str, list[Link]] = defaultdict(list)
        by_diffusers: dict[str, list[Link]] = defaultdict(list)
        for link in links:
            by_single[link.single].append(link)
            by_diffusers[link.diffusers].append(link)
        single_rows: dict[Link, tuple[int, int]] = {}
        diffusers_rows: dict[Link, tuple[int, int]] = {}
        if not pipeline:  # the model's tensors are the single-file ones
            for single, group in by_single.items():
                if single in keys and keys[single].shape:
                    _cut(group, keys[single].shape[0], single_rows, lambda k: k.part)
            for group in by_diffusers.values():
                _stack(group, single_rows, diffusers_rows, lambda k: k.position)
        else:
            for name, group in by_diffusers.items():
                if name in keys and keys[name].shape:
                    _cut(group, keys[name].shape[0], diffusers_rows, lambda k: k.position)
            for group in by_single.values():
                _stack(group, diffusers_rows, single_rows, lambda k: k.part)
        for link in links:
            if link not in single_rows or link not in diffusers_rows:
                continue
            model_key, alias = (
                (link.diffusers, link.single) if pipeline else (link.single, link.diffusers)
            )
            own, other = (
                (diffusers_rows, single_rows) if pipeline else (single_rows, diffusers_rows)
            )
            named = module_name(alias)
            if named is None or model_key not in keys:
                continue
            group = by_single[link.single] if pipeline else by_diffusers[link.diffusers]
            total = sum(other[k][1] - other[k][0] for k in group if k in other)
            (start, stop), (from_start, from_stop) = own[link], other[link]
            segment = Segment(model_key, start, stop, from_start, from_stop, total)
            self._add(named, segment, SINGLE if pipeline else DIFFUSERS)


def _place(segment: Segment) -> tuple[str, int, int, int, int]:
    return segment.key, segment.start, segment.stop, segment.from_start, segment.from_stop


def _canonical(architecture: str) -> list[str]:
    """Every single-file key name of an architecture weightmix ships as data."""
    return [spec.key for spec in architecture_keys(architecture, optional=True)]


def _cut(group, rows: int, out: dict, order) -> None:
    """The known tensor cut among its links: by `parts` weights, in `order`."""
    group = sorted(group, key=order)
    weights = [link.parts[link.part] for link in group]
    total = sum(weights)
    if total == 0 or rows % total:
        return
    start = 0
    for link, weight in zip(group, weights):
        stop = start + rows * weight // total
        out[link] = (start, stop)
        start = stop


def _stack(group, known: dict, out: dict, order) -> None:
    """The other tensor: its links' pieces one after another, in `order`."""
    start = 0
    for link in sorted(group, key=order):
        if link not in known:
            return
        size = known[link][1] - known[link][0]
        out[link] = (start, start + size)
        start += size
