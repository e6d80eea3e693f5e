"""Block-valued parameters resolved for one merge: each BlockValue of the merge trees becomes
one number per block of the layout model's architecture (checked against the parameter's
type), and each key's tree gets the numbers of the key's block. Methods see plain numbers."""

from __future__ import annotations

from typing import Any

from weightmix.arch.families import Architecture, Unknown
from weightmix.blocks import BlockValue, per_block, span
from weightmix.errors import WeightmixError
from weightmix.expression import Node, Op, block_dependent, ops, specialize
from weightmix.selectors import unknown_text


class BlockValues:
    """Resolves the BlockValues of merge trees once each and specialises trees per block."""

    def __init__(self, architecture: Architecture | Unknown, layout_name: str):
        self.architecture = architecture
        self.layout_name = layout_name
        self._values: dict[int, list[float]] = {}
        self._trees: dict[tuple[int, str], Node] = {}
        self._dependent: dict[int, bool] = {}  # trees are shared by many keys
        self.shown: dict[str, list[tuple[str, float]]] = {}  # for the dry run
        self.notes: list[str] = []

    def tree_for(self, tree: Node, key: str, where: str) -> Node:
        """`tree` with every block value replaced by the number of `key`'s block."""
        dependent = self._dependent.get(id(tree))
        if dependent is None:
            dependent = self._dependent[id(tree)] = block_dependent(tree)
        if not dependent:
            return tree
        architecture = self._architecture(tree, where)
        block = architecture.block_of(key)
        if block not in architecture.blocks:
            raise WeightmixError(
                f"key '{key}' is in no block of model {self.layout_name} ({architecture.name},"
                f" blocks {span(architecture.blocks)}), so the value it should get per block"
                " is unknown: give such keys one number with a rule"
            )
        found = self._trees.get((id(tree), block))
        if found is None:
            index = architecture.blocks.index(block)
            found = specialize(
                tree, lambda op, name, value: self._values_of(op, name, value, where)[index]
            )
            for op in ops(found):  # the method's own checks, on this block's numbers
                check = op.method.check
                problem = check(len(op.inputs), op.params) if check is not None else None
                if problem:
                    raise WeightmixError(
                        f"{where} at {op.label}, block {block}: {op.method.name}: {problem}"
                    )
            self._trees[(id(tree), block)] = found
        return found

    def check(self, tree: Node, where: str) -> None:
        """Resolve every block value of `tree` now (errors before any key is planned)."""
        for op in ops(tree):
            for name, value in op.params.items():
                if isinstance(value, BlockValue):
                    self._architecture(tree, where)
                    self._values_of(op, name, value, where)

    def _architecture(self, tree: Node, where: str) -> Architecture:
        if isinstance(self.architecture, Unknown):
            op, name, value = _first_block_value(tree)
            raise WeightmixError(
                f"{where} at {op.label}: {op.method.name} parameter {name} is given per block"
                f" ({value.describe()}), but {unknown_text(self.layout_name, self.architecture)}:"
                " give it one number"
            )
        return self.architecture

    def _values_of(self, op: Op, name: str, value: BlockValue, where: str) -> list[float]:
        known = self._values.get(id(value))
        if known is not None:
            return known
        architecture = self._architecture(op, where)
        label = f"{where} at {op.label}: {op.method.name} parameter"
        values, note = per_block(value, architecture.blocks, architecture.name, f"{label} {name}")
        spec = op.method.params[name]
        values = [
            spec.check_value(v, label, f"{value.written!r} (block {b}: {v:g})")
            for b, v in zip(architecture.blocks, values)
        ]
        if note and note not in self.notes:
            self.notes.append(note)
        self._values[id(value)] = values
        shown = "" if where == "recipe" else f"{where.removeprefix('recipe ')}: "
        self.shown[f"{shown}{op.label}.{name} = {_written(value)}"] = list(
            zip(architecture.blocks, values)
        )
        return values


def _first_block_value(tree: Node) -> tuple[Op, str, BlockValue]:
    for op in ops(tree):
        for name, value in op.params.items():
            if isinstance(value, BlockValue):
                return op, name, value
    raise AssertionError("no block value in a block-dependent tree")


def _written(value: BlockValue) -> str:
    text: Any = value.written
    shown = text if isinstance(text, str) else repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."
