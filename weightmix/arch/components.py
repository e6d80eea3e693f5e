"""Components of single-file checkpoints (UNet/transformer, VAE, text encoders), from the
architecture data: which component a key belongs to, and the names users call them by."""

from __future__ import annotations

from functools import cache

from weightmix.arch import load_architecture
from weightmix.arch.families import Architecture
from weightmix.errors import WeightmixError, closest

# diffusers' names for the text encoders, per architecture (the data says clip_l, clip_g, t5xxl)
_TEXT_ENCODERS = {
    "sd1-ldm": ("clip_l",),
    "sdxl-sgm": ("clip_l", "clip_g"),
    "sd3-comfyui": ("clip_l", "clip_g", "t5xxl"),
    "flux-flux": ("clip_l", "t5xxl"),
}
_DIFFUSER = ("unet", "transformer", "diffuser", "model")
PREFIX_DEPTH = 3  # dotted segments that tell components apart (conditioner.embedders.1 ...)


class ComponentMap:
    """Which component each key of an architecture belongs to, and user-facing names."""

    def __init__(self, architecture: str):
        self.architecture = architecture
        specs = load_architecture(architecture)
        self.by_key = {s.key: s.component for s in specs}
        prefixes: dict[str, set[str]] = {}
        for spec in specs:
            for depth in range(1, PREFIX_DEPTH + 1):
                prefix = ".".join(spec.key.split(".")[:depth])
                prefixes.setdefault(prefix, set()).add(spec.component)
        self.by_prefix = {p: c.pop() for p, c in prefixes.items() if len(c) == 1}
        components = sorted({s.component for s in specs})
        self.names = {c: c for c in components}
        self.names.update(dict.fromkeys(_DIFFUSER, "diffuser"))
        for number, encoder in enumerate(_TEXT_ENCODERS.get(architecture, ()), 1):
            self.names["text_encoder" if number == 1 else f"text_encoder_{number}"] = encoder

    def component_of(self, key: str) -> str | None:
        """The key's component: from the data, else from its longest known prefix."""
        if key in self.by_key:
            return self.by_key[key]
        parts = key.split(".")
        for depth in range(min(PREFIX_DEPTH, len(parts) - 1), 0, -1):
            component = self.by_prefix.get(".".join(parts[:depth]))
            if component is not None:
                return component
        return None

    def resolve(self, name: str, where: str) -> str:
        """The data's component for a user-typed name (unet, vae, text_encoder_2 ...)."""
        return named_component(self.names, self.architecture, name, where)


def named_component(names: dict[str, str], architecture: str, name: str, where: str) -> str:
    """The component a user-typed name stands for in `names`, or a one-line error."""
    component = names.get(name.strip().lower())
    if component is None:
        raise WeightmixError(
            f"{where}: '{name}' is not a component of {architecture}"
            f"{closest(name, names)}; components: {', '.join(sorted(names))}"
        )
    return component


class PipelineComponents:
    """The components of a diffusers pipeline folder: its subfolders (unet, vae, text_encoder
    ...), keys prefixed 'component/'; also by the names `weightmix inspect` shows for them
    (diffuser, clip_l, t5xxl ...) when the family is known (`aliases`: name -> folder)."""

    def __init__(self, names: list[str], aliases: dict[str, str] | None = None):
        self.architecture = "this pipeline"
        self.names = {name: name for name in names}
        self.aliases = {k: v for k, v in (aliases or {}).items() if v in self.names}

    def component_of(self, key: str) -> str | None:
        return key.split("/", 1)[0] if "/" in key else None

    def resolve(self, name: str, where: str) -> str:
        name = self.aliases.get(name, name) if name not in self.names else name
        if name in self.names:
            return name
        raise WeightmixError(
            f"{where}: '{name}' is not a component of this pipeline{closest(name, self.names)};"
            f" components: {', '.join(self.names)}"
        )


@cache
def component_map(architecture: str) -> ComponentMap:
    return ComponentMap(architecture)


class FamilyComponents:
    """The components of a single file of a detected family (arch/families.yaml): the data's
    names (diffuser, clip_l, clip_g, t5xxl, vae ...) and diffusers' (unet, text_encoder_2 ...).
    Naming one the checkpoint does not hold is an error."""

    def __init__(self, architecture: Architecture):
        self.architecture = architecture.name
        self._of = architecture.component_of
        present = {c.component for c in architecture.classes.values() if c.component}
        self.present = sorted(present)
        known = {component for _, component, _ in architecture.family.components}
        self.names = {c: c for c in known}
        if "diffuser" in known:
            self.names.update(dict.fromkeys(("unet", "transformer", "diffuser"), "diffuser"))
        for folder, (component, _) in architecture.family.pipeline.items():
            if component in known:
                self.names.setdefault(folder, component)

    def component_of(self, key: str) -> str | None:
        return self._of(key)

    def resolve(self, name: str, where: str) -> str:
        component = named_component(self.names, self.architecture, name, where)
        if component not in self.present:
            raise WeightmixError(
                f"{where}: component '{name}' ({component}) is not in this {self.architecture}"
                f" checkpoint; it holds: {', '.join(self.present)}"
            )
        return component
