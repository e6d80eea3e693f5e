"""One recipe schema for YAML files, CLI flags and the Python API.

A recipe names its input models, a merge expression (methods nest), per-key rules, and the
output/compute settings. Everything a merge needs to be reproduced is in it.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    model_validator,
)

from weightmix.errors import WeightmixError, closest


def not_a_bool(value: Any) -> Any:
    """YAML reads yes/no/on/off/true as booleans: a number (or seed) must not be one."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean, not a number (YAML reads yes/no/on/off so)")
    return value


# strings that mean something when set: empty is an error, not "unset"
Text = Annotated[str, Field(min_length=1)]
Integer = Annotated[int, BeforeValidator(not_a_bool)]

MODEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
MODEL_NAME_RULE = "a letter or _ first, then letters, digits, _, - or ."
OnMissing = Literal["error", "keep", "skip"]


class _Strict(BaseModel):
    """A schema part whose unknown fields are errors that suggest the closest known field."""

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        fields = set(cls.model_fields)
        if isinstance(data, dict):
            for key in data:
                if key not in fields:
                    raise ValueError(
                        f"unknown {cls.__name__.lower()} field '{key}'{closest(str(key), fields)};"
                        f" known: {', '.join(sorted(fields))}"
                    )
        return data


def _expression_kind(value: Any) -> str:
    return "model" if isinstance(value, str) else "node"


# A model name, or a nested node; the discriminator keeps error messages to the branch meant.
Expression = Annotated[
    Union[Annotated["MergeNode", Tag("node")], Annotated[str, Tag("model")]],  # noqa: UP007
    Discriminator(_expression_kind),
]


class MergeNode(BaseModel):
    """`method` applied to `inputs` (model names or nested nodes); other fields are parameters."""

    model_config = ConfigDict(extra="allow")

    method: Text
    inputs: list[Expression]
    name: Text | None = None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


SELECTORS = ("keys", "regex", "component", "blocks", "layer")


class Rule(_Strict):
    """Per-key override: keys that every selector given matches (`keys` glob, `regex`,
    `component`, `blocks`, `layer` kinds) take a tensor from one model, are dropped, or get
    other parameters. Precedence: see README (later rules win)."""

    keys: Text | None = None
    regex: Text | None = None
    component: Text | None = None  # unet, vae, text_encoder ... of a known layout
    blocks: Text | list[Text] | None = None  # OUT03-OUT05, IN07, D00-D18 ...
    layer: Text | list[Text] | None = None  # self_attention, cross_attention, norm ...
    take: Text | None = None
    drop: bool = False
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_pattern_one_action(self) -> Rule:
        for name in ("blocks", "layer"):
            if getattr(self, name) == []:
                raise ValueError(f"'{name}' is an empty list: name at least one, or leave it out")
        if all(getattr(self, name) is None for name in SELECTORS):
            raise ValueError(
                "a rule needs a selector: 'keys' (a glob), 'regex', 'component', 'blocks' or"
                " 'layer' (several combine: a key must match all)"
            )
        if self.keys is not None and len(self.keys) > MAX_GLOB:
            raise ValueError(
                f"keys glob of {len(self.keys):,} characters: key names are far shorter; give"
                f" at most {MAX_GLOB:,}"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as error:
                raise ValueError(f"regex {self.regex!r} is invalid: {error}") from None
        actions = (self.take is not None) + self.drop + bool(self.params)
        if actions != 1:
            raise ValueError("a rule needs exactly one of 'take', 'drop: true' or 'params'")
        return self

    @property
    def pattern(self) -> str:
        """The selectors as messages show them: '*.bias', 'component vae, layer norm' ..."""
        parts = []
        for name in SELECTORS:
            value = getattr(self, name)
            if value is None:
                continue
            text = ",".join(value) if isinstance(value, list) else value
            parts.append(text if name == "keys" else f"{name} {text}")
        return ", ".join(parts)


class Recipe(_Strict):
    """A whole merge, as written in a YAML file, built from CLI flags, or made in Python."""

    models: dict[str, Text]
    merge: Expression
    rules: list[Rule] = Field(default_factory=list)
    dtype: Text | None = None  # output dtype of float tensors; None: each key as its first input
    compute_dtype: Text = "fp32"
    device: Text = "cpu"
    seed: Integer = 0
    on_missing: OnMissing = "error"
    strict_rules: bool = False  # rules that match nothing (or take nothing) are errors
    rounding: Literal["nearest", "stochastic"] = "nearest"  # casts to a narrower output dtype
    # write NaN/inf that the merge made from finite inputs (an fp16 overflow ...) instead of
    # refusing; also lets --check-finite go on past inputs that hold them
    allow_nonfinite: bool = False
    title: Text | None = None  # modelspec.title of the output; default: the output's file name
    components: list[Text] | None = None  # keep only these components (unet, vae ...)
    # whose layout the output takes: a model's name (default: the first model), or
    # "single_file" for one file with LDM/SGM/BFL key names even from diffusers pipelines
    layout: Text | None = None
    max_shard_size: Text | None = None
    # prompt parameters (concept, spectral's prompt_coefficients): the CLIP text encoder they
    # are read with (a model's name, or the path of a checkpoint, diffusers folder or CLIP text
    # encoder; default: the layout model) and CLIP's tokenizer (a folder)
    text_encoder: Text | None = None
    tokenizer: Text | None = None
    _base_dir: Path = PrivateAttr(default=Path("."))

    @model_validator(mode="after")
    def _model_names(self) -> Recipe:
        if not self.models:
            raise ValueError("models: name at least one input model")
        for name in self.models:
            if not MODEL_NAME.match(name):
                raise ValueError(f"model name '{name}' is not a valid name: {MODEL_NAME_RULE}")
        params = [*_node_params(self.merge), *(rule.params for rule in self.rules)]
        if _expanded_size(params, MAX_VALUES) > MAX_VALUES:
            raise ValueError(
                f"parameters hold more than {MAX_VALUES:,} values once their YAML aliases are"
                " written out (aliases of aliases multiply); write the values out instead"
            )
        problem = _non_finite_parameter(self)
        if problem:
            raise ValueError(problem)
        return self

    def model_path(self, name: str) -> Path:
        """The path of model `name`, relative paths taken from the recipe file's folder."""
        return self.resolve(self.models[name])

    def resolve(self, written: str) -> Path:
        """A path as the recipe wrote it, relative paths taken from the recipe file's folder."""
        path = Path(written).expanduser()
        return path if path.is_absolute() else self._base_dir / path

    def with_base_dir(self, folder: Path) -> Recipe:
        self._base_dir = folder
        return self

    @property
    def base_dir(self) -> Path:
        """The folder relative model paths are taken from (a recipe file's folder, or '.')."""
        return self._base_dir

    def to_yaml(self, relative_to: Path | None = None) -> str:
        """The recipe as YAML. With `relative_to`, relative model paths are rewritten relative
        to that folder, so that a file saved there finds the same models; absolute paths and
        paths that cannot be made relative (another drive) are written absolute."""
        data = _plain(self.model_dump(mode="python", exclude_none=True))
        data["rules"] = [_plain(rule.model_dump(exclude_defaults=True)) for rule in self.rules]
        if not data["rules"]:
            del data["rules"]
        if relative_to is not None:
            data["models"] = {name: self.path_from(name, relative_to) for name in self.models}
            for setting in ("text_encoder", "tokenizer"):
                written = getattr(self, setting)
                if written is not None and written not in self.models:
                    data[setting] = self.relative_path(written, relative_to)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def path_from(self, name: str, folder: Path) -> str:
        """Model `name`'s path as seen from `folder` (relative when the recipe's was)."""
        return self.relative_path(self.models[name], folder)

    def relative_path(self, written: str, folder: Path) -> str:
        """A path the recipe wrote, as seen from `folder` (relative when the recipe's was)."""
        if Path(written).expanduser().is_absolute():
            return written
        path = _physical(self.resolve(written))
        try:
            return Path(os.path.relpath(path, os.path.realpath(folder))).as_posix()
        except ValueError:  # another drive (Windows): only an absolute path reaches it
            return path


def _plain(value: Any) -> Any:
    """Numbers as YAML writes them (numpy's float64, float32 and int64 become float and int)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if callable(getattr(value, "tolist", None)):  # numpy's bool_, arrays ...
        return _plain(value.tolist())
    return value


def _physical(path: Path) -> str:
    """The absolute path the system opens for `path`: its folders' symlinks and '..' resolved
    as the kernel resolves them (lnk/../m is not m when lnk is a link), the file's own name
    kept (a model that is a link, as in the hub cache, stays that link)."""
    if path.name in ("", ".", ".."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(path.parent), path.name)


def parse_recipe(data: Any, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as a dict (e.g. parsed YAML) into a Recipe, or raise one line."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise WeightmixError(f"{source}: {_first_problem(error)}") from None
    except RecursionError:
        raise WeightmixError(f"{source}: a value is nested too deeply or holds itself") from None
    return recipe.with_base_dir(base_dir or Path("."))


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML file; model paths in it are relative to the file's folder."""
    path = Path(path)
    return parse_recipe(read_recipe_data(path), str(path), path.parent)


MAX_FLOW_DEPTH = 1000  # [ and { left open at once; a recipe needs a few


def flow_depth(text: str) -> int:
    """The most [ and { open at once, quotes not looked at: an upper bound on YAML's flow
    nesting, counted in linear time (10,000 open brackets take PyYAML ~2 s to refuse)."""
    depth = deepest = 0
    for run in re.finditer(r"[\[{]+|[\]}]+", text):
        if run[0][0] in "[{":
            depth += len(run[0])
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - len(run[0]))
    return deepest


def read_yaml_file(path: Path, what: str, loader: type = yaml.SafeLoader) -> Any:
    """A YAML file (a recipe, a hyper config: `what`) as plain data, every way it can fail
    said in one line: unreadable, not UTF-8, nested too deeply (refused before PyYAML's
    quadratic scanner sees it), values YAML cannot hold, syntax."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise WeightmixError(f"{path}: cannot read {what}: {error.strerror or error}") from None
    return parse_yaml_bytes(data, str(path), what, loader)


def parse_yaml_bytes(data: bytes, path: str, what: str, loader: type = yaml.SafeLoader) -> Any:
    """YAML bytes (from the file or upload `path` names) as plain data, or one line."""
    try:
        text = data.decode("utf-8")
        if flow_depth(text) > MAX_FLOW_DEPTH:  # PyYAML's scanner is quadratic in this depth
            raise RecursionError
        return yaml.load(text, Loader=loader)
    except UnicodeDecodeError:
        raise WeightmixError(f"{path}: is not a text file; a {what} is UTF-8 YAML") from None
    except RecursionError:
        raise WeightmixError(f"{path}: nested too deeply to be a {what}") from None
    except (ValueError, OverflowError) as error:  # a number of 5000 digits, a date 2001-13-45
        problem = str(error).split(";")[0].splitlines()[0]
        raise WeightmixError(
            f"{path}: holds a value YAML cannot read ({problem}): fix it"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None)
        detail = f" ({problem})" if problem and "given twice" in problem else ""
        raise WeightmixError(
            f"{path}: not valid YAML{where}{detail}: fix the {what}'s syntax"
        ) from None


def read_recipe_data(path: Path) -> dict[str, Any]:
    """A recipe file's YAML as plain data, exactly as written (a key given twice is an error,
    not silently the last value)."""
    return _recipe_mapping(read_yaml_file(path, "recipe", _RecipeLoader), path)


def recipe_data_from_bytes(data: bytes, where: str) -> dict[str, Any]:
    """read_recipe_data() for a recipe's bytes (an upload), `where` naming it in messages."""
    return _recipe_mapping(parse_yaml_bytes(data, where, "recipe", _RecipeLoader), where)


def _recipe_mapping(data: Any, path: Path | str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise WeightmixError(f"{path}: a recipe is a YAML mapping with 'models' and 'merge'")
    if _refers_to_itself(data):
        raise WeightmixError(
            f"{path}: a YAML alias refers to the value that holds it (e.g. &w [1, *w]);"
            " write the value out"
        )
    return data


MAX_GLOB = 1000
"""The longest `keys` glob: fnmatch translates a glob in time quadratic in its '[' (100,000 of
them took minutes); real key names are under 200 characters."""

MAX_VALUES = 100_000
"""The most values a recipe's parameters may hold with their YAML aliases written out: an alias
of a list of ten aliases of lists of ten ... is a few lines that stand for a billion values,
which every later walk (the NaN check, the plan, the recipe saved in the output) would visit."""


def _expanded_size(value: Any, limit: int) -> int:
    """How many values `value` holds with every alias written out, counted up to limit + 1.
    Iterative, each shared list or mapping measured once (linear in the YAML written); a value
    that holds itself counts once (it is refused on its own)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, leaving = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        children = list(item.values()) if isinstance(item, dict) else item
        if leaving:
            total = len(item) + sum(sizes.get(id(child), 0) for child in children)
            sizes[id(item)] = min(total, limit + 1)
            on_path.discard(id(item))
        elif id(item) not in sizes and id(item) not in on_path:
            on_path.add(id(item))
            stack.append((item, True))
            stack.extend((child, False) for child in children)
    return sizes.get(id(value), 0)


def _refers_to_itself(value: Any) -> bool:
    """Whether a list or mapping holds itself (YAML aliases can build such values). Iterative,
    and each shared value is walked once, however often aliases repeat it."""
    done: set[int] = set()
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, leaving = stack.pop()
        if leaving:
            on_path.discard(id(item))
            done.add(id(item))
            continue
        if not isinstance(item, (dict, list)) or id(item) in done:
            continue
        if id(item) in on_path:
            return True
        on_path.add(id(item))
        stack.append((item, True))
        stack.extend(
            (child, False) for child in (item.values() if isinstance(item, dict) else item)
        )
    return False


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping key given twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[tuple[type, Any]] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *defaults': explicit keys may override merged ones
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys: the schema refuses them later
            if (type(key), key) in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice", key_node.start_mark
                )
            seen.add((type(key), key))
        return super().construct_mapping(node, deep)


def _non_finite_parameter(recipe: Recipe) -> str | None:
    """The first parameter (of a merge node or a rule) whose value holds NaN or ±inf."""
    found = _find_non_finite(recipe.merge, "merge")
    if found:
        return found
    for number, rule in enumerate(recipe.rules, 1):
        for name, value in rule.params.items():
            if holds_non_finite(value):
                return _non_finite_message(f"rule {number} params.{name}", value)
    return None


def _node_params(expression: Any) -> list[dict[str, Any]]:
    """The parameters of every merge node in `expression`."""
    if not isinstance(expression, MergeNode):
        return []
    return [expression.params, *(p for child in expression.inputs for p in _node_params(child))]


def _find_non_finite(expression: Any, label: str) -> str | None:
    if not isinstance(expression, MergeNode):
        return None
    for name, value in expression.params.items():
        if holds_non_finite(value):
            return _non_finite_message(f"{label}.{name}", value)
    for index, child in enumerate(expression.inputs):
        found = _find_non_finite(child, f"{label}.inputs[{index}]")
        if found:
            return found
    return None


def holds_non_finite(value: Any) -> bool:
    """Whether a parameter value is, or contains, a NaN or an infinity."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(holds_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(holds_non_finite(v) for v in value.values())
    return False


def _non_finite_message(where: str, value: Any) -> str:
    return f"{where} = {value!r}: NaN and infinity are not allowed; give a finite number"


def _first_problem(error: ValidationError) -> str:
    problems = error.errors()
    first = problems[0]
    location = ".".join(str(part) for part in first["loc"] if part not in ("node", "model"))
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "string_too_short":
        message = "is empty: give a value, or leave the field out"
    others = len(problems) - 1
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return f"{location + ': ' if location else ''}{message}{more}"


def node(method: str, *inputs: Expression, name: str | None = None, **params: Any) -> MergeNode:
    """Build a merge expression in Python: node('weighted_sum', 'a', 'b', alpha=0.3)."""
    return MergeNode(method=method, inputs=list(inputs), name=name, **params)


MergeNode.model_rebuild()
