"""Which keys each rule selects: `keys` (a glob over the whole name), `regex`, `component`,
`blocks` and `layer` kinds. Selectors given together combine: a key must match all of them.
Components, blocks and layer kinds come from the layout model's architecture (arch/)."""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Callable

from weightmix.arch.components import FamilyComponents, PipelineComponents
from weightmix.arch.families import ATTENTION, LAYER_KINDS, Architecture, Unknown
from weightmix.blocks import select_blocks
from weightmix.errors import WeightmixError, closest
from weightmix.io import Checkpoint
from weightmix.io.folders import FolderCheckpoint
from weightmix.recipe import Recipe, Rule

Components = FamilyComponents | PipelineComponents


def unknown_text(name: str, architecture: Unknown) -> str:
    """'the architecture of model A is unknown (nearest: sd1, 62% of its keys)'."""
    nearest = ", ".join(f"{n} {share:.0%}" for n, share in architecture.candidates)
    found = f"nearest: {nearest} of its keys" if nearest else "no family places its keys"
    unfit = (
        f"; keys that fit none: {', '.join(architecture.unfit[:3])}" if architecture.unfit else ""
    )
    return f"the architecture of model {name} is unknown ({found}{unfit})"


def component_map(
    recipe: Recipe, layout: tuple[str, Checkpoint], architecture: Architecture | Unknown
) -> Components | None:
    """The components of the layout model, when the recipe names any."""
    if not recipe.components and not any(r.component for r in recipe.rules):
        return None
    name, checkpoint = layout
    if isinstance(checkpoint, FolderCheckpoint) and checkpoint.pipeline:
        aliases = {}
        if isinstance(architecture, Architecture):  # clip_l -> text_encoder, diffuser -> unet ...
            aliases = {c: folder for folder, (c, _) in architecture.family.pipeline.items()}
            aliases |= {
                "unet": aliases.get("diffuser", ""),
                "transformer": aliases.get("diffuser", ""),
            }
        return PipelineComponents([c.name for c in checkpoint.components], aliases)
    if isinstance(architecture, Unknown):
        raise WeightmixError(
            f"recipe: components are named, but {unknown_text(name, architecture)}; select"
            " keys with rules instead"
        )
    return FamilyComponents(architecture)


class RuleMatcher:
    """Matches keys against every rule's selectors; counts hits (a rule matching nothing is
    reported, or refused with strict_rules)."""

    def __init__(
        self,
        rules: list[Rule],
        components: Components | None,
        architecture: Architecture | Unknown,
        layout_name: str,
    ):
        self.rules = rules
        self.architecture = architecture
        self.layout_name = layout_name
        self.tests = [self._tests(number, rule, components) for number, rule in enumerate(rules, 1)]
        self.hits: Counter[int] = Counter()

    def _tests(
        self, number: int, rule: Rule, components: Components | None
    ) -> list[Callable[[str], object]]:
        where = f"recipe rule {number}"
        tests: list[Callable[[str], object]] = []
        if rule.keys is not None:
            tests.append(re.compile(fnmatch.translate(rule.keys)).match)
        if rule.regex is not None:
            tests.append(re.compile(rule.regex).search)
        if rule.component is not None:
            assert components is not None  # component_map() makes one for component rules
            wanted = components.resolve(rule.component, where)
            tests.append(lambda key: components.component_of(key) == wanted)
        if rule.blocks is not None:
            blocks = set(self._blocks(rule.blocks, where))
            tests.append(lambda key: self.architecture.block_of(key) in blocks)
        if rule.layer is not None:
            kinds = set(self._kinds(rule.layer, where))
            tests.append(lambda key: not kinds.isdisjoint(self.architecture.layers_of(key)))
        return tests

    def _known(self, where: str, what: str) -> Architecture:
        if isinstance(self.architecture, Unknown):
            raise WeightmixError(
                f"{where}: selects {what}, but {unknown_text(self.layout_name, self.architecture)}"
            )
        return self.architecture

    def _blocks(self, given: str | list[str], where: str) -> list[str]:
        architecture = self._known(where, "blocks")
        text = ",".join(given) if isinstance(given, list) else given
        return select_blocks(text, architecture.blocks, architecture.name, where)

    def _kinds(self, given: str | list[str], where: str) -> list[str]:
        architecture = self._known(where, "layer kinds")
        present = {kind for c in architecture.classes.values() for kind in c.layers}
        kinds: list[str] = []
        for kind in given if isinstance(given, list) else given.split(","):
            kind = kind.strip().lower()
            if kind not in LAYER_KINDS:
                raise WeightmixError(
                    f"{where}: '{kind}' is not a layer kind{closest(kind, LAYER_KINDS)};"
                    f" kinds: {', '.join(LAYER_KINDS)}"
                )
            wanted = ATTENTION if kind == "attention" else (kind,)
            if present.isdisjoint(wanted):
                raise WeightmixError(
                    f"{where}: layer {kind}: {architecture.name} ({architecture.title}) has no"
                    f" such layers; it has {', '.join(sorted(present))}"
                )
            kinds += wanted
        return kinds

    def matching(self, key: str) -> tuple[int, ...]:
        found = tuple(i for i, tests in enumerate(self.tests) if all(t(key) for t in tests))
        self.hits.update(found)
        return found
