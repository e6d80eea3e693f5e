"""Merge expressions compiled from a recipe: trees of method calls over model names.

Compiling checks everything that does not depend on tensor data: method names, arity,
parameters, and merge spaces (a weight is not a delta: adding two models where a task
vector is expected is an error before anything runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from weightmix.blocks import BlockValue
from weightmix.errors import WeightmixError, closest
from weightmix.methods.registry import ANY, DELTA, SAME, WEIGHT, MethodSpec, get_method
from weightmix.methods.streaming import Streamer
from weightmix.recipe import Expression, MergeNode
from weightmix.rounding import Draw


@dataclass(frozen=True)
class Leaf:
    """A model's tensor for the key being merged."""

    model: str
    space: str = WEIGHT  # DELTA for a LoRA: a task vector, not a model

    def text(self) -> str:
        return self.model


@dataclass(frozen=True)
class Op:
    """`method(inputs..., **params)`; params are checked and complete (defaults filled)."""

    method: MethodSpec
    inputs: tuple[Node, ...]
    given: dict[str, Any]  # parameters as the recipe wrote them
    params: dict[str, Any] = field(compare=False)
    label: str  # where it sits in the recipe, for messages: merge, merge.inputs[1] ...
    name: str | None = None

    def text(self) -> str:
        return f"{self.method.name}({', '.join(i.text() for i in self.inputs)})"


Node = Leaf | Op


def compile_expression(
    expression: Expression, models: dict[str, object], deltas: frozenset[str] = frozenset()
) -> Node:
    """Turn the recipe's merge expression into a checked tree; `deltas` name the models that
    are task vectors (LoRAs)."""
    root = _compile(expression, models, "merge", deltas)
    names = [op.name for op in ops(root) if op.name]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise WeightmixError(f"recipe merge: node name '{sorted(duplicates)[0]}' is used twice")
    space_of(root)
    return root


def _compile(
    expression: Expression, models: dict[str, object], label: str, deltas: frozenset[str]
) -> Node:
    if isinstance(expression, str):
        if expression not in models:
            raise WeightmixError(
                f"recipe {label}: '{expression}' is not a model of this recipe"
                f"{closest(expression, models)}; models: {', '.join(models)}"
            )
        return Leaf(expression, DELTA if expression in deltas else WEIGHT)
    assert isinstance(expression, MergeNode)
    where = f"recipe {label}"
    method = get_method(expression.method, where)
    count = len(expression.inputs)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        raise WeightmixError(
            f"{where}: {method.name} takes {method.arity_text()} inputs, {count} given"
        )
    inputs = tuple(
        _compile(child, models, f"{label}.inputs[{i}]", deltas)
        for i, child in enumerate(expression.inputs)
    )
    given = expression.params
    params = method.resolve_params(given, count, where)
    return Op(method, inputs, given, params, label, expression.name)


def ops(node: Node) -> list[Op]:
    """Every method call in the tree, outermost first."""
    if isinstance(node, Leaf):
        return []
    return [node, *(op for child in node.inputs for op in ops(child))]


def leaves(node: Node) -> list[str]:
    """The models the tree reads, in first-use order, each once."""
    if isinstance(node, Leaf):
        return [node.model]
    seen: dict[str, None] = {}
    for child in node.inputs:
        seen.update(dict.fromkeys(leaves(child)))
    return list(seen)


def space_of(node: Node) -> str:
    """The merge space (weight or delta) of what `node` computes; raises on a mismatch."""
    if isinstance(node, Leaf):
        return node.space
    spaces = [space_of(child) for child in node.inputs]
    method = node.method
    for position, (child, space) in enumerate(zip(node.inputs, spaces)):
        expected = method.input_space(position)
        if expected not in (ANY, space):
            hint = (
                "; make one with subtract(model, base)"
                if expected == DELTA
                else "; apply it to a model with add(model, delta)"
            )
            raise WeightmixError(
                f"recipe {node.label}: input {position + 1} of {method.name} ({child.text()})"
                f" is a {space}, but {method.name} expects a {expected} there{hint}"
            )
    if method.output_space != SAME:
        return method.output_space
    if len(set(spaces)) > 1:
        raise WeightmixError(
            f"recipe {node.label}: {method.name} mixes weights and deltas"
            f" ({', '.join(f'{c.text()}: {s}' for c, s in zip(node.inputs, spaces))}):"
            " give it models only or deltas only"
        )
    return spaces[0]


def with_overrides(node: Node, overrides: Callable[[Op], dict[str, Any]], where: str) -> Node:
    """A copy of the tree whose parameters include `overrides(op)` (e.g. from per-key rules)."""
    if isinstance(node, Leaf):
        return node
    inputs = tuple(with_overrides(child, overrides, where) for child in node.inputs)
    extra = overrides(node)
    if not extra and all(new is old for new, old in zip(inputs, node.inputs)):
        return node
    given = {**node.given, **extra}
    params = node.method.resolve_params(given, len(inputs), f"{where} at {node.label}")
    return Op(node.method, inputs, given, params, node.label, node.name)


def block_dependent(node: Node) -> bool:
    """Whether some parameter of the tree is given per block (see blocks.py)."""
    return any(isinstance(v, BlockValue) for op in ops(node) for v in op.params.values())


def specialize(node: Node, choose: Callable[[Op, str, BlockValue], Any]) -> Node:
    """A copy of the tree whose per-block parameters are replaced by `choose(op, name, value)`:
    the number of one block."""
    if isinstance(node, Leaf):
        return node
    inputs = tuple(specialize(child, choose) for child in node.inputs)
    params = {
        name: choose(node, name, value) if isinstance(value, BlockValue) else value
        for name, value in node.params.items()
    }
    return Op(node.method, inputs, node.given, params, node.label, node.name)


def with_resolved(node: Node, resolved: Callable[[Op], dict[str, Any]]) -> Node:
    """A copy of the tree whose parameters include `resolved(op)`: values weightmix computed
    from checked ones (an encoded prompt), put in place without checking them again."""
    if isinstance(node, Leaf):
        return node
    inputs = tuple(with_resolved(child, resolved) for child in node.inputs)
    params = {**node.params, **resolved(node)}
    return Op(node.method, inputs, node.given, params, node.label, node.name)


def is_elementwise(node: Node) -> bool:
    """True when every method in the tree is elementwise, so the tree may run in chunks."""
    return all(op.method.elementwise for op in ops(node))


def streamed_ops(node: Node) -> list[Op] | None:
    """The calls of a tree that run with statistics passes (see methods/streaming.py) when the
    whole tree can run in chunks that way: every other call elementwise, no streamed call
    inside another's inputs, each call once in the tree. None when it cannot."""
    found = ops(node)
    if len({id(op) for op in found}) != len(found):
        return None
    streamed = [op for op in found if not op.method.elementwise]
    for op in streamed:
        if not op.method.streams(op.params):
            return None
        if not all(inner.method.elementwise for child in op.inputs for inner in ops(child)):
            return None
    return streamed


def statistic_id(op: Op) -> str:
    """Which model-wide statistic a call uses: one per place in the recipe and method."""
    return f"{op.label}:{op.method.name}"


def statistic_depth(op: Op) -> int:
    """How many calls with a model statistic lie under this one on the deepest path: their
    statistics must be gathered first, since they compute this call's inputs."""
    inner = [o for child in op.inputs for o in ops(child) if o.method.model_statistic]
    return max((statistic_depth(o) + 1 for o in inner), default=0)


def is_random(node: Node) -> bool:
    """Whether some method of the tree draws random numbers (DARE, DELLA ...)."""
    return any(op.method.random for op in ops(node))


def evaluate(
    node: Node,
    tensors: dict[str, torch.Tensor],
    draw: Draw | None = None,
    streamers: dict[int, Streamer] | None = None,
    statistics: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Compute the tree for one key from the models' tensors (already in compute dtype);
    `draw` gives the key's random numbers to methods that draw them. With `streamers` (by
    id of the call) the tensors are one chunk and those calls are computed by their streamer.
    `statistics` holds the model-wide statistics of calls that need one, by call label."""
    if isinstance(node, Leaf):
        return tensors[node.model]
    inputs = [evaluate(child, tensors, draw, streamers, statistics) for child in node.inputs]
    streamer = streamers.get(id(node)) if streamers else None
    if streamer is not None:
        salted = draw.salted(node.label) if draw is not None and node.method.random else None
        return streamer.apply(inputs, salted)
    extra: dict[str, Any] = {}
    if node.method.random:
        if draw is None:
            raise RuntimeError(f"{node.method.name} draws random numbers but got no draw")
        extra["draw"] = draw.salted(node.label)
    if node.method.model_statistic is not None:
        if statistics is None or statistic_id(node) not in statistics:
            raise RuntimeError(f"{node.method.name} needs its model statistic, none was gathered")
        extra["statistic"] = statistics[statistic_id(node)]
    return node.method(*inputs, **extra, **node.params)
