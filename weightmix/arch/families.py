"""Architecture families (SD1.x, SD2.x, SDXL, SD3, Flux, Llama ...) as data: their blocks in
the order block values are given, their components, and the block and layer kinds of each key,
read from data/families.yaml. `detect()` tells the family from key names (and the rank of a
few tensors), for single files, diffusers pipelines and component folders alike."""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from weightmix.arch import read_data_yaml

LAYER_KINDS = (
    "self_attention",
    "cross_attention",
    "attention",
    "feed_forward",
    "norm",
    "conv",
    "embedding",
    "time_embedding",
)
ATTENTION = ("self_attention", "cross_attention")  # what the kind 'attention' stands for


@dataclass(frozen=True)
class Table:
    """How the inner names of one kind of component map to blocks and layer kinds."""

    blocks: tuple[tuple[re.Pattern, str], ...]
    layers: tuple[tuple[re.Pattern, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    modelspec: str | None
    block_spec: tuple[str, ...]  # e.g. BASE, IN00-IN11 ... or J* (counted from the keys)
    outside: str  # the block of keys outside the denoiser
    components: tuple[tuple[re.Pattern, str, str | None], ...]
    pipeline: Mapping[str, tuple[str, str | None]]
    component_blocks: Mapping[str, str]


@cache
def _data() -> dict:
    return read_data_yaml("families.yaml")


@cache
def tables() -> dict[str, Table]:
    return {
        name: Table(
            tuple((re.compile(rx), block) for rx, block in spec.get("blocks", [])),
            tuple((re.compile(rx), tuple(kinds)) for rx, kinds in spec.get("layers", [])),
        )
        for name, spec in _data()["tables"].items()
    }


@cache
def families() -> dict[str, Family]:
    return {
        name: Family(
            name=name,
            title=spec["title"],
            modelspec=spec.get("modelspec"),
            block_spec=tuple(spec["blocks"]),
            outside=spec["outside"],
            components=tuple(
                (re.compile(rx), comp, table) for rx, comp, table in spec["components"]
            ),
            pipeline={k: (v[0], v[1]) for k, v in spec.get("pipeline", {}).items()},
            component_blocks=spec.get("component_blocks", {}),
        )
        for name, spec in _data()["families"].items()
    }


def layer_kind_help() -> dict[str, str]:
    return dict(_data()["layer_kinds"])


@dataclass(frozen=True)
class KeyClass:
    """What one key is: its component, block and layer kinds (None/() where unknown)."""

    component: str | None
    block: str | None
    layers: tuple[str, ...]


class Architecture:
    """A detected family bound to one checkpoint's keys: the block list (J*, D* ... counted
    from the keys) and the class of every key."""

    def __init__(self, family: Family, keys: list[str]):
        self.family = family
        self.name = family.name
        self.classes = {key: self._classify(key) for key in keys}
        self.blocks = _expand_blocks(family.block_spec, self._counts())
        self._last = {_prefix(b): b for b in self.blocks}
        for key, cls in self.classes.items():  # a '{last}' block is known now
            if cls.block is None and cls.component is not None:
                self.classes[key] = self._classify(key)
        self.unfit = [k for k, c in self.classes.items() if c.component is None or c.block is None]

    def _counts(self) -> dict[str, int]:
        """How many J*, D*, S*, L* blocks the keys hold (their largest index + 1)."""
        counts: dict[str, int] = {}
        for cls in self.classes.values():
            if cls.block and re.fullmatch(r"[A-Z]+\d+", cls.block):
                prefix = _prefix(cls.block)
                counts[prefix] = max(counts.get(prefix, 0), int(cls.block[len(prefix) :]) + 1)
        return counts

    def _classify(self, key: str) -> KeyClass:
        component, table, inner = self._component(key)
        if component is None:
            return KeyClass(None, None, ())
        found = tables().get(table) if table else None
        layers = _layers(found, inner) if found else ()
        if found is None or not found.blocks:
            block = self.family.component_blocks.get(component, self.family.outside)
            return KeyClass(component, block, layers)
        return KeyClass(component, self._block(found, inner), layers)

    def _component(self, key: str) -> tuple[str | None, str | None, str]:
        if "/" in key:  # a pipeline: 'unet/down_blocks.0 ...'
            folder, inner = key.split("/", 1)
            component, table = self.family.pipeline.get(folder, (None, None))
            return component, table, inner
        for pattern, component, table in self.family.components:
            match = pattern.match(key)
            if match:
                return component, table, key[match.end() :]
        return None, None, key

    def _block(self, table: Table, inner: str) -> str | None:
        for pattern, template in table.blocks:
            match = pattern.search(inner)
            if match:
                return self._fill(template, [int(g) for g in match.groups() if g and g.isdigit()])
        return None

    def _fill(self, template: str, numbers: list[int]) -> str | None:
        head, brace, expression = template.partition("{")
        if not brace:
            return template
        expression = expression.rstrip("}")
        if expression == "last":
            return getattr(self, "_last", {}).get(head)
        names = dict(zip("abcdef", numbers))
        return f"{head}{_arithmetic(expression, names):02d}"

    def block_of(self, key: str) -> str | None:
        cls = self.classes.get(key) or self._classify(key)
        return cls.block

    def layers_of(self, key: str) -> tuple[str, ...]:
        cls = self.classes.get(key) or self._classify(key)
        return cls.layers

    def component_of(self, key: str) -> str | None:
        cls = self.classes.get(key) or self._classify(key)
        return cls.component

    @property
    def title(self) -> str:
        return self.family.title


@dataclass(frozen=True)
class Unknown:
    """No family fits: the nearest candidates (share of keys they place) and keys that did not
    fit the nearest one."""

    candidates: tuple[tuple[str, float], ...]
    unfit: tuple[str, ...]

    name = "unknown"


def detect(shapes: Mapping[str, tuple[int, ...]]) -> Architecture | Unknown:
    """The family of a checkpoint with these keys (and shapes), bound to its keys; or Unknown.
    A pipeline's keys read 'folder/inner'; a component folder's keys are its inner names."""
    keys = list(shapes)
    name = _family_name(shapes)
    if name is not None:
        architecture = Architecture(families()[name], keys)
        if len(architecture.unfit) <= 0.05 * len(keys):
            return architecture
    return _unknown(keys)


def _family_name(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The family whose signature keys the denoiser (UNet or transformer) holds."""
    pipeline = any("/" in k for k in shapes)
    inner: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if pipeline:
            folder, _, key = key.partition("/")
            if folder not in ("unet", "transformer"):
                continue
        for prefix in ("model.diffusion_model.", "unet."):  # LDM/SGM, kohya
            key = key.removeprefix(prefix)
        inner[key] = shape
    names = set(inner)
    if any(re.match(r"(double_blocks|single_transformer_blocks)\.\d+\.", k) for k in names):
        guidance = ("guidance_in.", "time_text_embed.guidance_embedder.")
        return "flux-dev" if any(k.startswith(guidance) for k in names) else "flux-schnell"
    joint = _indices(names, r"joint_blocks\.(\d+)\.")
    if not joint and any(k.startswith("context_embedder.") for k in names):
        joint = _indices(names, r"transformer_blocks\.(\d+)\.")
    if joint:
        if any(".attn2." in k for k in names):
            return "sd3.5-medium"
        return "sd3.5-large" if len(joint) >= 38 else "sd3-medium"
    if any(re.match(r"(model\.)?layers\.\d+\.(self_attn|mlp)\.", k) for k in names):
        return "llama"
    ldm = _indices(names, r"input_blocks\.(\d+)\.")
    diffusers = _indices(names, r"down_blocks\.(\d+)\.") if "conv_in.weight" in names else set()
    if not ldm and not diffusers:
        return None
    levels = len(diffusers) if diffusers else (max(ldm) + 3) // 3
    if any(k.startswith(("label_emb.", "add_embedding.")) for k in names):
        return "sdxl" if levels == 3 else "sdxl-refiner"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"  # OpenCLIP ViT-H, where SD1 has CLIP-L ('cond_stage_model.transformer.')
    # SD2's transformers project in with a linear layer, SD1's with a 1x1 convolution
    projection = next((s for k, s in inner.items() if k.endswith("proj_in.weight")), None)
    return "sd2" if projection is not None and len(projection) == 2 else "sd1"


def _has_prefix(shapes: Mapping[str, object], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _indices(names: set[str], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in names if (m := regex.match(k))}


def _unknown(keys: list[str]) -> Unknown:
    """The families that place the largest share of these keys, best first."""
    scores = []
    for family in families().values():
        architecture = Architecture(family, keys)
        placed = 1 - len(architecture.unfit) / max(len(keys), 1)
        scores.append((placed, family.name, architecture.unfit))
    scores.sort(key=lambda s: -s[0])
    best = scores[0]
    candidates = tuple((name, share) for share, name, _ in scores[:3] if share > 0)
    return Unknown(candidates, tuple(best[2][:5]) if candidates else tuple(keys[:5]))


def _layers(table: Table, inner: str) -> tuple[str, ...]:
    kinds: dict[str, None] = {}
    for pattern, found in table.layers:
        if pattern.search(inner):
            kinds.update(dict.fromkeys(found))
    return tuple(kinds)


def _prefix(block: str) -> str:
    return block.rstrip("0123456789")


def _expand_blocks(spec: tuple[str, ...], counts: dict[str, int]) -> tuple[str, ...]:
    """BASE, IN00-IN11, J* ... -> every block name in order."""
    blocks: list[str] = []
    for item in spec:
        if item.endswith("*"):
            prefix = item[:-1]
            blocks += [f"{prefix}{i:02d}" for i in range(counts.get(prefix, 0))]
        elif "-" in item:
            first, last = item.split("-")
            prefix = _prefix(first)
            blocks += [
                f"{prefix}{i:02d}"
                for i in range(int(first[len(prefix) :]), int(last[len(prefix) :]) + 1)
            ]
        else:
            blocks.append(item)
    return tuple(blocks)


_OPERATORS = {ast.Add: operator.add, ast.Mult: operator.mul, ast.Sub: operator.sub}


def _arithmetic(expression: str, names: dict[str, int]) -> int:
    """Evaluate a block template's arithmetic (numbers, a b c ..., + - *) without eval()."""

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"block template arithmetic not understood: {expression!r}")

    return value(ast.parse(expression, mode="eval").body)
