"""Recipe + opened inputs -> a per-key plan. All validation happens here, from headers only,
before a single tensor byte is read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightmix.arch.families import Architecture, Unknown, detect
from weightmix.block_plan import BlockValues
from weightmix.blocks import BlockValue
from weightmix.errors import WeightmixError, closest
from weightmix.expression import (
    Leaf,
    Node,
    Op,
    compile_expression,
    is_random,
    leaves,
    ops,
    with_overrides,
)
from weightmix.io import (
    Checkpoint,
    DType,
    OutputTensor,
    TensorInfo,
    dtype_from_name,
    open_checkpoint,
)
from weightmix.io.dtypes import COMPUTE_DTYPES, OUTPUT_DTYPES, holds_every_value
from weightmix.io.folder_output import check_left_out, left_out_components
from weightmix.io.folders import FolderCheckpoint
from weightmix.io.writer import split_shards
from weightmix.layouts import SINGLE_FILE, align_layouts
from weightmix.lora.delta import LoraDelta
from weightmix.lora.formats import is_lora
from weightmix.output_checks import check_output, check_recipe_output
from weightmix.prompts import Prompts, check_prompts
from weightmix.recipe import Recipe
from weightmix.rounding import key_stream
from weightmix.selectors import RuleMatcher, component_map
from weightmix.units import count, parse_size

SHOWN = 3  # how many offending keys an error names before '(N in all)'


@dataclass(frozen=True)
class KeyPlan:
    """What to do for one output tensor."""

    key: str
    shape: tuple[int, ...]
    out_dtype: DType
    sources: dict[str, TensorInfo]  # model name -> the tensor it reads
    expr: Node | None  # None: copy sources[copy_from] (cast to out_dtype if needed)
    copy_from: str | None
    group: str  # how the dry run groups keys
    stream: int | None = None  # the key's random stream, when a method of expr draws numbers

    @property
    def numel(self) -> int:
        return next(iter(self.sources.values())).numel

    @property
    def out_nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass
class Plan:
    """A validated merge: the inputs are open (headers only), every key has its action."""

    recipe: Recipe
    checkpoints: dict[str, Checkpoint]
    root: Node
    keys: list[KeyPlan]  # in output order
    compute_dtype: DType
    device: torch.device
    output: Path | None
    max_shard_bytes: int | None
    notes: list[str] = field(default_factory=list)
    architecture: Architecture | Unknown | None = None  # of the layout model
    block_values: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    prompts: Prompts | None = None  # prompt parameters to encode before the merge
    overwrite: bool = False  # the output may replace an existing one (checked again when written)

    @property
    def base_folder(self) -> FolderCheckpoint | None:
        """The layout model when it is a model folder: the output then mirrors it."""
        layout = self.recipe.layout or next(iter(self.checkpoints))
        base = self.checkpoints.get(layout)
        return base if isinstance(base, FolderCheckpoint) else None

    def rounds(self, key: KeyPlan) -> bool:
        """Whether writing this key casts floats to an 8- or 16-bit dtype that cannot hold
        every value they may take (fp32 -> fp16, fp16 <-> bf16, fp16 -> fp8 ...): the casts
        that `rounding` (nearest or stochastic) applies to."""
        source = self.compute_dtype if key.expr is not None else key.sources[key.copy_from].dtype
        out = key.out_dtype
        return (
            out.is_float
            and source.is_float
            and out.itemsize <= 2
            and not holds_every_value(source, out)
        )

    def output_tensors(self) -> list[OutputTensor]:
        return [OutputTensor(k.key, k.out_dtype, k.shape) for k in self.keys]

    @property
    def output_bytes(self) -> int:
        return sum(k.out_nbytes for k in self.keys)

    @property
    def shard_count(self) -> int:
        return len(split_shards(self.output_tensors(), self.max_shard_bytes))

    def working_set(self, key: KeyPlan) -> int:
        """Bytes one key needs while it is processed: raw inputs, compute copies, the result."""
        raw = sum(info.nbytes for info in key.sources.values())
        if key.expr is None:
            return raw + key.out_nbytes
        temporaries = len(key.sources) + len(ops(key.expr)) + 1
        return raw + temporaries * key.numel * self.compute_dtype.itemsize + key.out_nbytes

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()
        if self.prompts is not None:
            self.prompts.close()


def build_plan(
    recipe: Recipe,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    save_recipe: str | os.PathLike | None = None,
    protected: list[Path] | tuple[Path, ...] = (),
) -> Plan:
    """Validate `recipe` against its inputs' headers (and the output path) and plan every key.
    `save_recipe`: where the recipe will be saved, checked like an output; `protected`: more
    files that are inputs (the recipe file being run)."""
    compute_dtype = dtype_from_name(recipe.compute_dtype, COMPUTE_DTYPES)
    out_dtype = dtype_from_name(recipe.dtype, OUTPUT_DTYPES) if recipe.dtype else None
    device = parse_device(recipe.device)
    max_shard = (
        parse_size(recipe.max_shard_size, "max_shard_size") if recipe.max_shard_size else None
    )
    checkpoints = _open_inputs(recipe)
    plan = None
    try:
        loras = frozenset(name for name, c in checkpoints.items() if is_lora(c))
        root = compile_expression(recipe.merge, recipe.models, loras)
        _check_rules(recipe, root)
        _check_param_range(root, compute_dtype, "recipe")
        layout = recipe.layout if recipe.layout in checkpoints else next(iter(checkpoints))
        _align(checkpoints, recipe.layout, loras, compute_dtype)
        shapes = {key: info.shape for key, info in checkpoints[layout].tensors.items()}
        architecture = detect(shapes)
        block_values = BlockValues(architecture, layout)
        check_block_values(recipe, root, block_values)
        keys, notes = _plan_keys(
            recipe, root, checkpoints, out_dtype, compute_dtype, architecture, block_values
        )
        notes += block_values.notes
        notes += [f"model {name}: {note}" for name, c in checkpoints.items() for note in c.notes]
        plan = Plan(recipe, checkpoints, root, keys, compute_dtype, device, None, max_shard, notes)
        plan.architecture = architecture
        plan.block_values = block_values.shown
        if recipe.rounding == "stochastic" and not any(plan.rounds(k) for k in keys):
            plan.notes.append(
                "rounding: stochastic changes nothing: no key is cast to an 8- or 16-bit dtype"
                " that cannot hold its values exactly"
            )
        _check_pipeline_components(plan)
        plan.prompts = check_prompts(plan)
        if plan.prompts is not None:
            plan.notes += plan.prompts.notes
        if output is not None:
            plan.output = check_output(Path(output), plan, overwrite)
            plan.overwrite = overwrite
        if save_recipe is not None:
            check_recipe_output(Path(save_recipe), plan, overwrite, [Path(p) for p in protected])
        return plan
    except BaseException:
        for checkpoint in checkpoints.values():
            checkpoint.close()
        if plan is not None and plan.prompts is not None:
            plan.prompts.close()
        raise


def _align(
    checkpoints: dict[str, Checkpoint], layout: str | None, loras: frozenset[str], dtype: DType
) -> None:
    """Models take the layout model's key names (see layouts.py); LoRAs are read as deltas
    with those names (see lora/delta.py)."""
    first = layout if layout in checkpoints else next(iter(checkpoints))
    if first in loras:
        raise WeightmixError(
            f"model {first} is a LoRA: the layout model (the first, or --layout) must be a model"
            " whose key names the output takes; put the model first"
        )
    models = {name: c for name, c in checkpoints.items() if name not in loras}
    align_layouts(models, layout)
    for name in checkpoints:
        if name in loras:
            checkpoints[name] = LoraDelta(checkpoints[name], models[first], f"model {name}", dtype)
        else:
            checkpoints[name] = models[name]


def _check_pipeline_components(plan: Plan) -> None:
    """A pipeline output without some components must still load (see check_left_out)."""
    base = plan.base_folder
    if base is None:
        return
    if plan.recipe.components:
        keep = f"keep them: components {','.join(plan.recipe.components)},{{}}"
    else:
        keep = "keep them: remove the drop rule (--drop) that matches {} keys"
    note = check_left_out(base, left_out_components(base, [k.key for k in plan.keys]), keep)
    if note is not None:
        plan.notes.append(note)


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise WeightmixError(f"device '{name}' is not a device: use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeightmixError(f"device '{name}': torch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise WeightmixError(
            f"device '{name}': torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
        )
    if device.type not in ("cpu", "cuda"):
        raise WeightmixError(f"device '{name}' is not supported: use cpu or cuda")
    return device


def _check_rules(recipe: Recipe, root: Node) -> None:
    """Every rule names a real model and parameters that some method of the merge takes."""
    nodes = ops(root)
    for number, rule in enumerate(recipe.rules, 1):
        where = f"recipe rule {number} ({rule.pattern})"
        if rule.take is not None and rule.take not in recipe.models:
            raise WeightmixError(
                f"{where}: takes from '{rule.take}', which is not a model of this recipe"
                f"{closest(rule.take, recipe.models)}; models: {', '.join(recipe.models)}"
            )
        for name in rule.params:
            if not any(_rule_param_applies(name, op) for op in nodes):
                known = sorted({p for op in nodes for p in op.method.params})
                raise WeightmixError(
                    f"{where}: no method of this merge has a parameter '{name}'"
                    f"{closest(name.rsplit('.', 1)[-1], known)};"
                    f" parameters: {', '.join(known) or 'none'}"
                )
    if recipe.layout not in (None, SINGLE_FILE, *recipe.models):
        raise WeightmixError(
            f"recipe: layout '{recipe.layout}' is neither a model of this recipe nor"
            f" '{SINGLE_FILE}'{closest(recipe.layout, [*recipe.models, SINGLE_FILE])}"
        )
    used = set(leaves(root)) | {rule.take for rule in recipe.rules if rule.take}
    used.add(recipe.layout)
    used.add(recipe.text_encoder)  # a model that only reads the prompts
    unused = [name for name in recipe.models if name not in used]
    if unused:
        raise WeightmixError(
            f"recipe: model '{unused[0]}' is never used by the merge or a rule: remove it or use it"
        )


def _check_param_range(tree: Node, compute_dtype: DType, where: str) -> None:
    """Numbers in parameters must fit the compute dtype (alpha 1e300 overflows fp32): refused
    while planning rather than failing inside torch halfway through the merge. Checked on the
    resolved values of each tree the plan uses (the recipe's, and each rule's variant)."""
    limit = torch.finfo(compute_dtype.torch).max
    for op in ops(tree):
        for name, value in op.params.items():
            if any(abs(number) > limit for number in _numbers(value)):
                raise WeightmixError(
                    f"{where} at {op.label}: parameter {name}={value!r} is beyond what the"
                    f" compute dtype {compute_dtype.short} holds (±{limit:.3g}); give a smaller"
                    " value, or --compute-dtype fp64"
                )


def _numbers(value: Any) -> list[float]:
    if isinstance(value, BlockValue):
        return value.numbers()
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [number for item in value for number in _numbers(item)]
    return []


def _rule_param_applies(name: str, op: Op) -> bool:
    """'alpha' applies to every method with an alpha; 'node.alpha' only to the node named so."""
    node_name, _, param = name.rpartition(".")
    return param in op.method.params and (not node_name or node_name == op.name)


def _open_inputs(recipe: Recipe) -> dict[str, Checkpoint]:
    opened: dict[str, Checkpoint] = {}
    try:
        for name in recipe.models:
            try:
                opened[name] = open_checkpoint(recipe.model_path(name))
            except WeightmixError as error:
                raise WeightmixError(f"model {name}: {error}") from None
    except BaseException:
        for checkpoint in opened.values():
            checkpoint.close()
        raise
    return opened


def _plan_keys(
    recipe: Recipe,
    root: Node,
    checkpoints: dict[str, Checkpoint],
    out_dtype: DType | None,
    compute_dtype: DType,
    architecture: Architecture | Unknown,
    block_values: BlockValues,
) -> tuple[list[KeyPlan], list[str]]:
    layout = block_values.layout_name
    components = component_map(recipe, (layout, checkpoints[layout]), architecture)
    matcher = RuleMatcher(recipe.rules, components, architecture, layout)
    all_keys = dict.fromkeys(key for ckpt in checkpoints.values() for key in ckpt.tensors)
    left_out = 0
    if recipe.components:
        assert components is not None
        kept = {components.resolve(name, "recipe components") for name in recipe.components}
        selected = {k: None for k in all_keys if components.component_of(k) in kept}
        left_out, all_keys = len(all_keys) - len(selected), selected
    variants: dict[tuple, tuple[str, Node | str | None, str]] = {}
    planned: list[KeyPlan] = []
    missing: list[Missing] = []
    mismatched: list[str] = []
    buffers: list[str] = []
    for key in all_keys:
        signature = matcher.matching(key)
        if signature not in variants:
            variants[signature] = _variant(recipe, root, signature, compute_dtype)
        action, target, label = variants[signature]
        if action == "drop":
            continue
        reads = [target] if action == "take" else leaves(target)
        lacking = [m for m in reads if key not in checkpoints[m]]
        if lacking:
            holders = [m for m in checkpoints if key in checkpoints[m]]
            integer = not any(checkpoints[m].tensors[key].dtype.is_float for m in holders)
            rule = label.removeprefix("taken by ") if action == "take" else None
            if integer and rule is None and recipe.on_missing == "error":
                # integer buffers (position_ids) are never merged: keep the one there is
                planned.append(
                    _copy(key, checkpoints, holders[0], None, "integer, some models lack it")
                )
                buffers.append(key)
                continue
            taker = None
            if rule is not None:  # the take rule that decided: the last take or drop matching
                taker = max(i for i in signature if recipe.rules[i].take or recipe.rules[i].drop)
            missing.append(Missing(key, holders, lacking, rule, taker))
            if recipe.on_missing == "keep":
                why = f"not in {', '.join(lacking)}, kept"
                planned.append(_copy(key, checkpoints, holders[0], out_dtype, why))
            continue
        sources = {m: checkpoints[m].tensors[key] for m in reads}
        problem = _mismatch(key, sources, checkpoints)
        if problem:
            mismatched.append(problem)
            continue
        first = sources[reads[0]]
        if action == "take":
            planned.append(_copy(key, checkpoints, target, out_dtype, label))
        elif not first.dtype.is_float:
            planned.append(_copy(key, checkpoints, reads[0], None, "non-float, never averaged"))
        elif isinstance(target, Leaf):
            planned.append(
                _copy(key, checkpoints, target.model, out_dtype, "the merge is one model")
            )
        else:
            tree = block_values.tree_for(target, key, _rules_text(signature, recipe))
            dtype = out_dtype or first.dtype
            stream = key_stream(recipe.seed, key) if is_random(tree) else None
            planned.append(KeyPlan(key, first.shape, dtype, sources, tree, None, label, stream))
    if mismatched:
        more = f" ({len(mismatched)} keys differ)" if len(mismatched) > 1 else ""
        raise WeightmixError(f"{mismatched[0]}{more}")
    empty_takes = _empty_takes(recipe, matcher.hits, missing, planned, checkpoints)
    if empty_takes and (recipe.on_missing == "error" or recipe.strict_rules):
        raise WeightmixError(empty_takes[0] + (" (--strict-rules)" if recipe.strict_rules else ""))
    if missing and recipe.on_missing == "error":
        raise WeightmixError(_missing_message(missing, hint=True))
    unmatched = [
        f"rule {i + 1} ({rule.pattern}) matches no key"
        for i, rule in enumerate(recipe.rules)
        if not matcher.hits[i]
    ]
    if unmatched and recipe.strict_rules:
        raise WeightmixError(
            f"{unmatched[0]} (--strict-rules): fix its selectors for these models, or drop it"
        )
    notes = [f"{count(left_out, 'key')} of other components left out"] if left_out else []
    notes += empty_takes
    if buffers:
        notes.append(
            f"{count(len(buffers), 'integer key')} that some models lack"
            f" {'is' if len(buffers) == 1 else 'are'} copied from a model that has"
            f" {'it' if len(buffers) == 1 else 'them'} (integer tensors are never merged;"
            f" --on-missing skip leaves them out): {', '.join(buffers[:SHOWN])}"
            f"{' ...' if len(buffers) > SHOWN else ''}"
        )
    notes += unmatched
    if missing:
        how = "copied from the model that has them" if recipe.on_missing == "keep" else "left out"
        were = "was" if len(missing) == 1 else "were"
        notes.append(
            f"{count(len(missing), 'key')} missing from some models {were} {how}"
            f" (--on-missing {recipe.on_missing}): {_missing_message(missing, hint=False)}"
        )
    if not planned:
        raise WeightmixError(
            "recipe: the merge writes no tensor at all (every key dropped or skipped)"
        )
    planned.sort(key=lambda k: (-k.out_dtype.itemsize, k.key))  # aligned like save_file's layout
    return planned, notes


def _rules_text(signature: tuple[int, ...], recipe: Recipe) -> str:
    """'recipe', or 'recipe rule 2, 3' for the rules whose params shape a key's tree."""
    numbers = [str(i + 1) for i in signature if recipe.rules[i].params]
    return f"recipe rule {', '.join(numbers)}" if numbers else "recipe"


def check_block_values(recipe: Recipe, root: Node, block_values: BlockValues) -> None:
    """Every value given per block, in the merge and in each rule, resolved against the
    architecture now: a wrong list is an error even where a rule matches no key."""
    block_values.check(root, "recipe")
    for index, rule in enumerate(recipe.rules):
        if rule.params:
            tree = _variant(recipe, root, (index,), None)[1]
            block_values.check(tree, f"recipe rule {index + 1}")


def _variant(
    recipe: Recipe, root: Node, signature: tuple[int, ...], compute_dtype: DType | None
) -> tuple[str, Any, str]:
    """For a set of matching rules: ('drop'|'take'|'merge', model or tree, group label)."""
    action: tuple[str, Any, str] | None = None
    param_rules = []
    for index in signature:
        rule = recipe.rules[index]
        if rule.drop:
            action = ("drop", None, f"dropped by rule {index + 1}")
        elif rule.take is not None:
            action = ("take", rule.take, f"taken by rule {index + 1} ({rule.pattern})")
        else:
            param_rules.append(index)
    if action is not None:
        return action
    if not param_rules:
        return ("merge", root, root.text())

    def overrides(op: Op) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for index in param_rules:
            for name, value in recipe.rules[index].params.items():
                if _rule_param_applies(name, op):
                    chosen[name.rpartition(".")[2]] = value
        return chosen

    numbers = ", ".join(str(i + 1) for i in param_rules)
    tree = with_overrides(root, overrides, f"recipe rule {numbers}")
    if compute_dtype is not None:
        _check_param_range(tree, compute_dtype, f"recipe rule {numbers}")
    return ("merge", tree, f"{root.text()} with rule {numbers}")


def _copy(
    key: str, checkpoints: dict[str, Checkpoint], model: str, out_dtype: DType | None, why: str
) -> KeyPlan:
    info = checkpoints[model].tensors[key]
    dtype = out_dtype if out_dtype is not None and info.dtype.is_float else info.dtype
    return KeyPlan(
        key, info.shape, dtype, {model: info}, None, model, f"copied from {model}: {why}"
    )


def _mismatch(
    key: str, sources: dict[str, TensorInfo], checkpoints: dict[str, Checkpoint]
) -> str | None:
    (first_model, first), *others = sources.items()
    for model, info in others:
        where = f"'{first_model}' ({checkpoints[first_model].path.name})"
        there = f"'{model}' ({checkpoints[model].path.name})"
        if info.shape != first.shape:
            return (
                f"key '{key}' has shape {list(first.shape)} in {where}"
                f" but {list(info.shape)} in {there}: the models differ in architecture;"
                " take such keys from one model with a rule (--take 'PATTERN=MODEL')"
            )
        if info.dtype.is_float != first.dtype.is_float:
            return (
                f"key '{key}' is {first.dtype.name} in {where} but {info.dtype.name} in {there}:"
                " integer and float tensors cannot be merged; take it from one model with a rule"
            )
    return None


@dataclass(frozen=True)
class Missing:
    """A key that some models the merge (or a take rule) reads do not have."""

    key: str
    holders: list[str]  # the models that have it
    lacking: list[str]  # the models read for it that do not
    rule: str | None  # 'rule N (pattern)' when a take rule names a model that lacks it
    rule_index: int | None = None  # that rule's index in the recipe

    def text(self) -> str:
        found = ", ".join(self.holders) or "no model"
        if self.rule is not None:
            source = self.lacking[0]
            verb = "has" if len(self.holders) == 1 else "have"
            return (
                f"{self.rule} takes '{self.key}' from {source}, which lacks it ({found} {verb} it)"
            )
        return f"'{self.key}' is in {found} but not in {', '.join(self.lacking)}"


def _empty_takes(
    recipe: Recipe,
    hits: dict[int, int],
    missing: list[Missing],
    planned: list[KeyPlan],
    checkpoints: dict[str, Checkpoint],
) -> list[str]:
    """For each take rule whose model has none of the keys it matches (FLUX.1-schnell has no
    guidance embedder): what it means, which architecture the output gets with those keys and
    without them, and how to choose."""
    messages = []
    by_rule: dict[int, list[Missing]] = {}
    for item in missing:
        if item.rule_index is not None:
            by_rule.setdefault(item.rule_index, []).append(item)
    for index, items in by_rule.items():
        if len(items) != hits.get(index, 0):
            continue  # the model has some of the keys: the usual missing-key message
        rule = recipe.rules[index]
        model, holder = rule.take, items[0].holders[0]
        what = _title(checkpoints[model])
        text = (
            f"rule {index + 1} ({rule.pattern}) takes {count(len(items), 'key')}"
            f" ({', '.join(repr(m.key) for m in items[:2])}{' ...' if len(items) > 2 else ''})"
            f" from {model}, which has none of them{f' ({model} is {what})' if what else ''}"
        )
        shapes = {k.key: k.shape for k in planned}
        shapes.update({m.key: checkpoints[m.holders[0]].tensors[m.key].shape for m in items})
        with_them = detect(shapes)
        without = detect({k: v for k, v in shapes.items() if k not in {m.key for m in items}})
        if with_them.name != without.name:
            text += f"; with them the output is {with_them.name}, without them {without.name}"
        if rule.keys is not None and rule.pattern == rule.keys:  # a plain glob: flags say it
            how = f"--take '{rule.keys}={holder}'", f"--drop '{rule.keys}'"
        else:
            how = f"take: {holder} in rule {index + 1}", f"drop: true in rule {index + 1}"
        messages.append(f"{text}: take them from {holder} ({how[0]}) or leave them out ({how[1]})")
    return messages


def _title(checkpoint: Checkpoint) -> str | None:
    found = detect({key: info.shape for key, info in checkpoint.tensors.items()})
    return None if isinstance(found, Unknown) else found.title


def _missing_message(missing: list[Missing], hint: bool) -> str:
    shown = "; ".join(m.text() for m in missing[:SHOWN])
    more = f" ({len(missing)} keys in all)" if len(missing) > SHOWN else ""
    if not hint:
        return f"{shown}{more}"
    return (
        f"keys differ between models: {shown}{more}. Pass --on-missing keep to copy such keys"
        " from the model that has them, or --on-missing skip to leave them out"
        + ("; or take them from a model that has them" if any(m.rule for m in missing) else "")
    )
