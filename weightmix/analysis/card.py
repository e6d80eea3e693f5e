"""Model cards: a README.md in the Hugging Face convention (YAML front matter, then Markdown)
that says how a merge was made: its inputs with fingerprints, the recipe, each method's formula
in words. Written beside a file output, inside a folder output."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from weightmix.errors import WeightmixError
from weightmix.expression import ops
from weightmix.io.writer import write_file
from weightmix.plan import Plan
from weightmix.provenance import KEY_INPUTS, KEY_RECIPE

CARD = "README.md"


def card_path(output: Path, folder: bool | None = None) -> Path:
    """A folder output holds its card; a file output has it beside it."""
    folder = output.is_dir() if folder is None else folder
    return output / CARD if folder else output.parent / CARD


def check_card(output: Path, overwrite: bool, folder: bool) -> Path:
    """Before the merge: the card would not replace a README.md that is not ours."""
    path = card_path(output, folder)
    if path.exists() and not path.is_file():
        raise WeightmixError(f"{path} exists and is not a file: the model card cannot go there")
    if path.exists() and not overwrite and not folder:
        raise WeightmixError(f"{path} exists: pass --overwrite to replace it with the model card")
    return path


def library(plan: Plan) -> str | None:
    base = plan.base_folder
    if base is None:
        return None
    if base.pipeline:
        return "diffusers"
    return "transformers" if (base.path / "config.json").is_file() and any(
        p.name.startswith("model") for p in base.files) else "diffusers"  # fmt: skip


def model_card(plan: Plan, metadata: dict[str, str]) -> str:
    inputs = json.loads(metadata[KEY_INPUTS])
    front: dict[str, object] = {
        "base_model": [str(plan.recipe.models[entry["name"]]) for entry in inputs],
        "tags": ["merge", "weightmix"],
    }
    if (name := library(plan)) is not None:
        front["library_name"] = name
    base = plan.base_folder
    inherited = _front_matter(base.path / CARD) if base is not None else None
    if inherited and inherited.get("license"):  # the base's license still applies
        front["license"] = inherited["license"]
    title = plan.recipe.title or (plan.output.name if plan.output else "merge")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    made = plan.output.name if plan.output is not None else ""
    lines += [f"A merge made with weightmix: `{made}`.", "", "## Inputs", ""]
    for entry in inputs:
        lines.append(f"- `{entry['name']}`: {plan.recipe.models[entry['name']]}"
                     f" (fingerprint `{entry['fingerprint']}`)")  # fmt: skip
    lines += ["", "## Methods", ""]
    seen = set()
    for op in ops(plan.root):
        if op.method.name not in seen:
            seen.add(op.method.name)
            lines.append(f"- `{op.method.name}`: {op.method.summary}")
    lines += ["", "## Recipe", "", "```yaml", metadata[KEY_RECIPE].rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(path: Path, plan: Plan, metadata: dict[str, str]) -> Path:
    write_file(path, model_card(plan, metadata).encode("utf-8"))
    return path


def _front_matter(path: Path) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8")
        if not text.startswith("---\n"):
            return None
        front = yaml.safe_load(text[4 : text.index("\n---", 4)])
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return None
    return front if isinstance(front, dict) else None


def read_card(checkpoint_path: Path) -> dict | None:
    """The front matter of the weightmix model card made with this checkpoint, if any (a
    card beside a file names the file it was made with)."""
    path = card_path(checkpoint_path)
    front = _front_matter(path) if path.is_file() else None
    if front is None or "weightmix" not in (front.get("tags") or []):
        return None
    if not checkpoint_path.is_dir():
        made = f"`{checkpoint_path.name}`"
        stem = f"`{checkpoint_path.name.split('-0000')[0]}"  # a shard of a sharded output
        text = path.read_text(encoding="utf-8")
        if made not in text and stem not in text:
            return None
    return front
