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


def card_path(output: Path) -> Path:
    """A folder output holds its card; a file output has it beside it."""
    return output / CARD if output.is_dir() or output.suffix == "" else output.parent / CARD


def check_card(output: Path, overwrite: bool) -> Path:
    """Before the merge: the card would not replace a README.md that is not ours."""
    path = card_path(output)
    if path.exists() and not overwrite and not output.is_dir():
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
    title = plan.recipe.title or (plan.output.name if plan.output else "merge")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    lines += ["A merge made with weightmix.", "", "## Inputs", ""]
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


def read_card(checkpoint_path: Path) -> dict | None:
    """The front matter of a weightmix model card beside (or in) a checkpoint, if there is one."""
    path = card_path(checkpoint_path)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        if not text.startswith("---\n"):
            return None
        front = yaml.safe_load(text[4 : text.index("\n---", 4)])
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(front, dict) or "weightmix" not in (front.get("tags") or []):
        return None
    return front
