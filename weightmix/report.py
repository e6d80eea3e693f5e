"""Human-readable descriptions of a plan (for --dry-run) and of a checkpoint (for inspect)."""

from __future__ import annotations

import json
from collections import Counter

from weightmix.arch.families import Architecture, Unknown, detect
from weightmix.engine import (
    DEFAULT_BUDGET,
    STREAMED,
    Census,
    census,
    chunked,
    default_threads,
    estimate_peak,
    mode,
)
from weightmix.errors import WeightmixError
from weightmix.io import Checkpoint
from weightmix.plan import Plan
from weightmix.provenance import KEY_INPUTS, KEY_RECIPE
from weightmix.units import count, format_size


def describe_plan(plan: Plan, budget: int = DEFAULT_BUDGET, threads: int | None = None) -> str:
    """What a merge will do: keys per action, inputs read, output size, peak memory."""
    lines = []
    target = str(plan.output) if plan.output else "(no output path given)"
    dtypes = Counter(k.out_dtype.short for k in plan.keys)
    dtype_text = ", ".join(f"{n} {d}" for d, n in dtypes.most_common())
    lines.append(f"plan: {count(len(plan.keys), 'tensor')} -> {target}")
    shards = plan.shard_count
    shard_text = f" in {shards} shards" if shards > 1 else ""
    lines.append(f"  output: {format_size(plan.output_bytes)}{shard_text} ({dtype_text})")
    lines.append(f"  compute: {plan.compute_dtype.short} on {plan.device}")
    if plan.architecture is not None:
        lines.append(f"  architecture: {_architecture_text(plan.architecture)}")
    for label, values in plan.block_values.items():
        lines.append(f"  per block: {label}")
        lines.extend(f"    {line}" for line in _wrapped([f"{b} {v:g}" for b, v in values]))
    groups: dict[str, list] = {}
    for key in plan.keys:
        groups.setdefault(key.group, []).append(key)
    lines.append("  keys:")
    for group, keys in sorted(groups.items(), key=lambda item: -len(item[1])):
        reads = ", ".join(sorted({m for k in keys for m in k.sources}))
        lines.append(f"    {len(keys):6d}  {group}  (reads {reads})")
    lines.append("  inputs:")
    for name, ckpt in plan.checkpoints.items():
        tensors = count(len(ckpt.tensors), "tensor")
        lines.append(f"    {name} = {ckpt.path} ({format_size(ckpt.size)}, {tensors})")
    workers = threads or default_threads()
    whole = [k for k in plan.keys if not chunked(plan, k)]
    how = f"chunk buffers of {workers} worker threads"
    streamed = sum(1 for k in plan.keys if mode(plan, k) == STREAMED)
    if streamed:
        how += f", {count(streamed, 'key')} in chunks after statistics passes"
    if whole:
        largest = max(whole, key=plan.working_set)
        how += (
            f", {count(len(whole), 'key')} computed whole (largest {largest.key}:"
            f" {format_size(plan.working_set(largest))})"
        )
    peak = estimate_peak(plan, budget, workers)
    lines.append(f"  estimated peak memory: {format_size(peak)} beyond Python and torch ({how})")
    lines.extend(describe_census(census(plan)))
    lines.extend(f"  note: {note}" for note in plan.notes)
    return "\n".join(lines)


def describe_census(counted: list[Census]) -> list[str]:
    """Per choice call (lossless, maxdiff): the share of elements each input supplies."""
    if not counted:
        return []
    lines = ["  shares (each input's elements chosen, read from the inputs as the merge would):"]
    for entry in counted:
        lines.append(f"    {entry.call} at {entry.label}:")
        for part, counts in sorted(entry.counts.items()):
            total = sum(counts) or 1
            shares = ", ".join(
                f"{name} {100 * n / total:.1f}%" for name, n in zip(entry.inputs, counts) if n
            )
            lines.append(f"      {part}: {shares or 'nothing'} of {count(sum(counts), 'element')}")
        if entry.skipped:
            keys = count(entry.skipped, "key")
            lines.append(f"      {keys} not counted: their inputs need whole tensors")
    return lines


def describe_checkpoint(checkpoint: Checkpoint, list_keys: bool = False) -> str:
    """Key count, dtypes, size, metadata, and the weightmix recipe when there is one."""
    tensors = checkpoint.tensors.values()
    dtypes = Counter(t.dtype.short for t in tensors)
    data = sum(t.nbytes for t in tensors)
    lines = [
        f"{checkpoint.path}",
        f"  files: {len(checkpoint.files)}  size: {format_size(checkpoint.size)}"
        f"  tensors: {len(checkpoint.tensors)} ({format_size(data)} of tensor data)",
        "  dtypes: " + ", ".join(f"{d} {n}" for d, n in dtypes.most_common()),
    ]
    lines += _architecture_lines(checkpoint)
    metadata = checkpoint.metadata
    others = {k: v for k, v in metadata.items() if k not in (KEY_RECIPE, KEY_INPUTS)}
    if others:
        lines.append("  metadata:")
        lines.extend(f"    {k}: {_short(v)}" for k, v in sorted(others.items()))
    if KEY_INPUTS in metadata:
        lines.append("  merged from (weightmix):")
        lines.extend(f"    {line}" for line in _inputs_lines(metadata[KEY_INPUTS]))
    if KEY_RECIPE in metadata:
        lines.append("  recipe (weightmix):")
        lines.extend("    " + line for line in metadata[KEY_RECIPE].rstrip().splitlines())
    if list_keys:
        lines.append("  keys:")
        lines.extend(
            f"    {t.key}  {t.dtype.short}  {list(t.shape)}"
            for t in sorted(tensors, key=lambda t: t.key)
        )
    return "\n".join(lines)


def _architecture_text(architecture: Architecture | Unknown) -> str:
    if isinstance(architecture, Unknown):
        nearest = ", ".join(f"{n} {share:.0%}" for n, share in architecture.candidates)
        unfit = ", ".join(architecture.unfit[:3])
        return (
            f"unknown (nearest: {nearest or 'none'}; keys that fit none: {unfit or 'none'});"
            " merged key by key, without blocks or layer kinds"
        )
    return f"{architecture.name} ({architecture.title}), {count(len(architecture.blocks), 'block')}"


def _architecture_lines(checkpoint: Checkpoint) -> list[str]:
    """The detected architecture, its components and its blocks, with keys per each."""
    architecture = detect({key: info.shape for key, info in checkpoint.tensors.items()})
    lines = [f"  architecture: {_architecture_text(architecture)}"]
    if isinstance(architecture, Unknown):
        return lines
    components = Counter(c.component for c in architecture.classes.values() if c.component)
    lines.append("  components: " + ", ".join(f"{c} {n}" for c, n in components.most_common()))
    blocks = Counter(c.block for c in architecture.classes.values() if c.block)
    lines.append("  keys per block:")
    lines.extend(
        f"    {line}" for line in _wrapped([f"{b} {blocks[b]}" for b in architecture.blocks])
    )
    if architecture.unfit:
        unfit = ", ".join(architecture.unfit[:5])
        lines.append(f"  keys outside {architecture.name}: {len(architecture.unfit)} ({unfit})")
    return lines


def _wrapped(items: list[str], width: int = 96) -> list[str]:
    lines, line = [], ""
    for item in items:
        if line and len(line) + len(item) + 2 > width:
            lines.append(line)
            line = ""
        line = f"{line}, {item}" if line else item
    return [*lines, line] if line else lines


def recorded_recipe(checkpoint: Checkpoint) -> str:
    """The recipe YAML a weightmix output records, or a one-line error when it has none."""
    text = checkpoint.metadata.get(KEY_RECIPE)
    if text is None:
        raise WeightmixError(
            f"{checkpoint.path}: has no weightmix recipe in its metadata (it was not written by"
            " weightmix, or its metadata was stripped)"
        )
    return text


def _inputs_lines(text: str) -> list[str]:
    try:
        inputs = json.loads(text)
        return [
            f"{i['name']}: {', '.join(i['files'])} ({format_size(i['size'])},"
            f" fingerprint {i['fingerprint'][:16]}...)"
            for i in inputs
        ]
    except (ValueError, KeyError, TypeError):
        return [_short(text)]


def _short(value: str, limit: int = 200) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"
