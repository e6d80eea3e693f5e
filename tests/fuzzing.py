"""Fuzz targets for every parser a stranger's file or a user's typed value reaches.

Shared by the property tests (tests/test_fuzz.py, few examples) and the long runner
(bench/fuzz.py, 100,000 inputs per parser). Each parser has:

- seeds: real-shaped inputs (a small safetensors file with SD1.5 key names, a shard index, the
  config.json and model_index.json files diffusers and transformers write, torch.save pickles,
  examples/demo.yaml, the values the CLI documents);
- a hypothesis strategy drawing a seed and a list of mutations (byte flips, truncation,
  splicing, JSON-structure changes: huge, negative or wrongly typed values, deep nesting,
  duplicate keys, non-UTF-8), which returns the input as bytes;
- a target taking those bytes: it must end in success or a WeightmixError whose message is one
  printable line. Anything else is raised as a `FuzzFailure` or left to propagate.

Inputs are bytes so that a failing one can be saved and replayed (`bench/fuzz.py --replay`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

from weightmix.arch import architecture_keys, scaled_shape
from weightmix.errors import WeightmixError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEEP = 100_000  # nesting a parser must refuse with a WeightmixError, not a RecursionError


class FuzzFailure(AssertionError):
    """A target ended in something other than success or a one-line WeightmixError."""


# ---------------------------------------------------------------- mutations

# numbers that break parsers: limits of integer types, huge, negative, fractional, not finite
INTERESTING_NUMBERS: list[Any] = [
    0,
    1,
    -1,
    2**31 - 1,
    2**31,
    2**32,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    10**18,
    10**30,
    10**300,
    int("9" * 4000),  # as many digits as Python converts (4300) allows, nearly
    0.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
]
# raw JSON/YAML fragments a mutation may splice in as text
INTERESTING_TEXT: list[bytes] = [
    b"[" * DEEP,
    b"{" * 2000 + b'"a":' * 1000,
    b"9" * 5000,  # more digits than Python converts to int by default
    b"-" + b"9" * 30,
    b"1e999",
    b"NaN",
    b"-Infinity",
    b"\\ud800",  # a lone surrogate, valid JSON escape, invalid UTF-8 text
    b"\xff\xfe\x00",
    b"\xc3\x28",
    b"\n",
    b"\r\n",
    b"\x00",
    b'"',
    b"\\",
    b",",
    b"null",
    b"[]",
    b"{}",
    b"&a [*a]",
    b"!!python/object/apply:os.system ['true']",
    b"*undefined",
    b"'",
    b": ",
    b"- ",
]
INTERESTING_VALUES: list[Any] = [
    *INTERESTING_NUMBERS,
    None,
    True,
    False,
    "",
    "a\nb",
    "\ud800",
    "../../etc",
    "/",
    [],
    {},
    [1, 2],
    ["x"] * 3,
    {"a": 1},
    [2**40, 2**40, 2**40],
    [10**200, 10**200],
    [0, 10**30],
    [-1, 4],
    [1] * 64,
]

MAX_INPUT = 1 << 20  # bytes: mutations grow inputs up to this, not past it
DIGITS = re.compile(rb"[0-9]+")

# one mutation: (operation, three integers that pick positions and values)
Op = tuple[int, int, int, int]
OPS = st.tuples(
    st.integers(0, 13), st.integers(0, 2**31), st.integers(0, 2**31), st.integers(0, 2**31)
)


def mutate_bytes(data: bytes, op: Op, others: list[bytes]) -> bytes:
    """Apply one byte-level mutation to `data`; `others` are seeds to splice from. Inputs
    stay under MAX_INPUT bytes: a mutation that would pass it is skipped."""
    mutated = _mutate_bytes(data, op, others)
    return mutated if len(mutated) <= MAX_INPUT else data


def _mutate_bytes(data: bytes, op: Op, others: list[bytes]) -> bytes:
    kind, a, b, c = op
    kind %= 9
    size = len(data)
    at = a % (size + 1)
    if kind == 0 and size:  # flip bits of one byte
        at %= size
        return data[:at] + bytes([data[at] ^ (1 << (b % 8))]) + data[at + 1 :]
    if kind == 1 and size:  # set one byte to an interesting value
        at %= size
        value = (0, 0xFF, 0x7F, 0x80, ord("["), ord('"'), ord("9"), ord("-"))[b % 8]
        return data[:at] + bytes([value]) + data[at + 1 :]
    if kind == 2:  # truncate
        return data[:at]
    if kind == 3:  # delete a range
        return data[:at] + data[at + 1 + b % 64 :]
    if kind == 4:  # duplicate a range
        piece = data[at : at + 1 + b % 256]
        return data[:at] + piece * (1 + c % 4) + data[at:]
    if kind == 5:  # insert interesting text
        return data[:at] + INTERESTING_TEXT[b % len(INTERESTING_TEXT)] + data[at:]
    if kind == 6 and others:  # splice another seed in
        other = others[b % len(others)]
        start = c % (len(other) + 1)
        return data[:at] + other[start : start + 1 + a % 512] + data[at:]
    if kind == 7:  # replace a run of digits by an interesting number
        runs = [m.span() for _, m in zip(range(1000), DIGITS.finditer(data))]
        if runs:
            first, last = runs[b % len(runs)]
            number = INTERESTING_NUMBERS[c % len(INTERESTING_NUMBERS)]
            return data[:first] + _text(number) + data[last:]
    if kind == 8:  # swap two chunks
        other = b % (size + 1)
        first, second = sorted((at, other))
        length = min(1 + c % 32, second - first)
        return (
            data[:first]
            + data[second : second + length]
            + data[first + length : second]
            + data[first : first + length]
            + data[second + length :]
        )
    return data


def _text(number: Any) -> bytes:
    if isinstance(number, float) and not math.isfinite(number):
        return b"NaN" if math.isnan(number) else (b"Infinity" if number > 0 else b"-Infinity")
    return repr(number).encode()


def mutate_json(document: Any, op: Op) -> Any:
    """Apply one structural mutation to a parsed JSON document (returns the new document)."""
    kind, a, b, c = op
    paths = list(_paths(document))
    path = paths[a % len(paths)]
    parent, last = _parent(document, path)
    if parent is None:  # the root itself
        return _new_value(b, c) if kind % 5 == 0 else document
    choice = kind % 5
    if choice in (0, 1):  # replace a value
        parent[last] = _new_value(b, c)
    elif choice == 2 and isinstance(parent, dict):  # delete a key
        del parent[last]
    elif choice == 2 and isinstance(parent, list):
        parent.pop(last)
    elif choice == 3 and isinstance(parent, dict):  # rename a key
        value = parent.pop(last)
        names = ["", "__metadata__", "weight_map", "_class_name", "a\nb", "\ud800", "../x", "/"]
        parent[names[b % len(names)] if c % 2 else f"{last}{b % 10}"] = value
    elif choice == 4:  # wrap a value in a list or an object
        parent[last] = [parent[last]] if b % 2 else {"x": parent[last]}
    return document


def _new_value(b: int, c: int) -> Any:
    if c % 7 == 0:
        value: Any = 1
        for _ in range(b % 500):
            value = [value]
        return value
    return copy.deepcopy(INTERESTING_VALUES[b % len(INTERESTING_VALUES)])


def _paths(document: Any, path: tuple = ()):
    yield path
    if len(path) >= 6:
        return
    if isinstance(document, dict):
        for key, value in list(document.items())[:200]:
            yield from _paths(value, (*path, key))
    elif isinstance(document, list):
        for index, value in enumerate(document[:50]):
            yield from _paths(value, (*path, index))


def _parent(document: Any, path: tuple) -> tuple[Any, Any]:
    if not path:
        return None, None
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    return parent, path[-1]


def dump_json(document: Any, duplicate: bool = False) -> bytes:
    """JSON text of `document` (NaN allowed, non-ASCII kept); with `duplicate`, the first member
    of the top-level object is written twice, as a stranger's file may."""
    text = json.dumps(document, ensure_ascii=False, allow_nan=True)
    if duplicate and isinstance(document, dict) and document:
        key, value = next(iter(document.items()))
        member = json.dumps({key: value}, ensure_ascii=False)[1:-1]
        text = "{" + member + ", " + text[1:]
    return text.encode("utf-8", "surrogatepass")


def json_mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A JSON seed, mutated structurally (most of the time), then byte by byte (sometimes)."""

    def build(index: int, structural: list[Op], raw: list[Op], duplicate: bool) -> bytes:
        document = json.loads(seeds[index % len(seeds)])
        for op in structural:
            document = mutate_json(document, op)
        data = dump_json(document, duplicate)
        for op in raw:
            data = mutate_bytes(data, op, seeds)
        return data

    return st.builds(
        build,
        st.integers(0, len(seeds) - 1),
        st.lists(OPS, max_size=4),
        st.lists(OPS, max_size=3),
        st.booleans(),
    )


def byte_mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed mutated byte by byte."""

    def build(index: int, raw: list[Op]) -> bytes:
        data = seeds[index % len(seeds)]
        for op in raw:
            data = mutate_bytes(data, op, seeds)
        return data

    return st.builds(build, st.integers(0, len(seeds) - 1), st.lists(OPS, min_size=1, max_size=5))


# ---------------------------------------------------------------- checks


def check_error(error: WeightmixError) -> None:
    """A WeightmixError users see: one line, printable as UTF-8, not empty."""
    message = str(error)
    if not message or "\n" in message or "\r" in message:
        raise FuzzFailure(f"WeightmixError is not one line: {message!r}")
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise FuzzFailure(f"WeightmixError cannot be printed as UTF-8: {message!r}") from None
    if "allocate" in message and "memory" in message:  # torch's allocator, hidden as an error
        raise FuzzFailure(f"an allocation failed, as the file asked for: {message[:300]!r}")


def run_one(target: Target, data: bytes) -> str:
    """Run `target` on one input: 'ok', or 'error' for a WeightmixError that passes
    check_error (or the CLI's exit 2). Any other ending propagates as an exception."""
    try:
        outcome = target.run(data)
    except WeightmixError as error:
        check_error(error)
        return "error"
    return outcome or "ok"


def _printable(text: str) -> None:
    """What the CLI prints must encode as UTF-8 (stdout is strict)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FuzzFailure(f"output cannot be printed as UTF-8: {text[:200]!r}") from None


# ---------------------------------------------------------------- seeds


def sd1_state(count: int = 16, divisor: int = 16) -> dict[str, torch.Tensor]:
    """`count` SD1.5 keys (UNet and text encoder) with shapes divided by `divisor`, fp16, plus
    the int64 position_ids real files carry."""
    specs = [s for s in architecture_keys("sd1-ldm") if s.dtype == "F32"]
    unet = [s for s in specs if s.component == "diffuser"][: count // 2]
    clip = [s for s in specs if s.component == "clip_l"][: count - count // 2]
    generator = torch.Generator().manual_seed(0)
    state = {
        s.key: torch.randn(scaled_shape(s.shape, divisor), generator=generator).half()
        for s in unet + clip
    }
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
        77
    ).reshape(1, 77)
    return state


def sd1_spread_state(seed: int, every: int = 12, divisor: int = 64) -> dict[str, torch.Tensor]:
    """Every `every`-th SD1.5 key in name order (so every block and component) plus the
    embeddings detection looks for, shapes divided by `divisor`, floats in fp16."""
    specs = sorted(architecture_keys("sd1-ldm"), key=lambda s: s.key)
    anchors = ("time_embed", "position", "token_embedding")
    chosen = [s for i, s in enumerate(specs) if i % every == 0 or any(a in s.key for a in anchors)]
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for spec in chosen:
        shape = scaled_shape(spec.shape, divisor)
        if spec.dtype == "F32":
            state[spec.key] = torch.randn(shape, generator=generator).half()
        else:
            state[spec.key] = torch.zeros(shape, dtype=torch.int64)
    return state


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """A safetensors file as the reference library writes it."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def split_safetensors(data: bytes) -> tuple[bytes, bytes]:
    """(header JSON, data section) of a safetensors file."""
    length = int.from_bytes(data[:8], "little")
    return data[8 : 8 + length], data[8 + length :]


def join_safetensors(header: bytes, body: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + body


UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.30.0",
    "act_fn": "silu",
    "attention_head_dim": 2,
    "block_out_channels": [8, 16],
    "center_input_sample": False,
    "cross_attention_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 4,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
UNET_WEIGHTS = {
    "conv_in.weight": (8, 4, 3, 3),
    "conv_in.bias": (8,),
    "conv_out.weight": (4, 8, 3, 3),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight": (8, 8),
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "out_channels": 3,
    "sample_size": 16,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
}
VAE_WEIGHTS = {
    "encoder.conv_in.weight": (8, 3, 3, 3),
    "decoder.conv_out.weight": (3, 8, 3, 3),
    "decoder.conv_in.weight": (16, 4, 3, 3),
}
CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 16,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "torch_dtype": "float32",
    "transformers_version": "4.44.0",
    "vocab_size": 100,
}
CLIP_WEIGHTS = {
    "text_model.embeddings.token_embedding.weight": (100, 16),
    "text_model.encoder.layers.0.self_attn.q_proj.weight": (16, 16),
    "text_model.encoder.layers.1.self_attn.q_proj.weight": (16, 16),
}
FLUX_CONFIG = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.30.0",
    "attention_head_dim": 8,
    "guidance_embeds": True,
    "in_channels": 4,
    "joint_attention_dim": 16,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 1,
    "patch_size": 1,
    "pooled_projection_dim": 8,
}
FLUX_WEIGHTS = {
    "x_embedder.weight": (16, 4),
    "context_embedder.weight": (16, 16),
    "time_text_embed.text_embedder.linear_1.weight": (16, 8),
    "transformer_blocks.0.attn.to_q.weight": (16, 16),
    "single_transformer_blocks.0.attn.to_q.weight": (16, 16),
}
PIPELINE_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.30.0",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None],
}


def _zeros(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(shape) for key, shape in shapes.items()}


@dataclass
class Target:
    """One parser under fuzzing: its seeds, a strategy of inputs, and the call that parses one."""

    name: str
    seeds: list[bytes]
    strategy: st.SearchStrategy[bytes]
    run: Callable[[bytes], str | None]


class Workspace:
    """Seed files and folders, built once in a scratch folder; each target writes its input
    over one file there and parses it. Only the input file changes between runs."""

    def __init__(self, root: Path | None = None):
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="weightmix-fuzz-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self._build()

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)

    def _build(self) -> None:
        root = self.root
        state = sd1_state()
        self.safetensors_seeds = [
            safetensors_bytes(state),
            safetensors_bytes(
                dict(list(state.items())[:4]), {"format": "pt", "modelspec.title": "seed"}
            ),
            safetensors_bytes(
                {"a": torch.zeros(0), "b": torch.ones(2, 0, 3, dtype=torch.bfloat16)}
            ),
        ]
        # a sharded set: two shards and the index that lists them
        keys = list(state)
        shards = {
            "model-00001-of-00002.safetensors": {k: state[k] for k in keys[: len(keys) // 2]},
            "model-00002-of-00002.safetensors": {k: state[k] for k in keys[len(keys) // 2 :]},
        }
        self.index_folder = root / "sharded"
        self.index_folder.mkdir(exist_ok=True)
        weight_map = {}
        for name, part in shards.items():
            (self.index_folder / name).write_bytes(safetensors_bytes(part))
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {"total_size": 123456}, "weight_map": weight_map}
        self.index_seeds = [json.dumps(index, indent=2).encode()]
        # component folders: config.json beside weights with the keys the config is checked on
        self.config_folders = {}
        self.config_seeds = []
        for name, config, weights, stem in (
            ("unet", UNET_CONFIG, UNET_WEIGHTS, "diffusion_pytorch_model"),
            ("vae", VAE_CONFIG, VAE_WEIGHTS, "diffusion_pytorch_model"),
            ("text_encoder", CLIP_CONFIG, CLIP_WEIGHTS, "model"),
            ("transformer", FLUX_CONFIG, FLUX_WEIGHTS, "diffusion_pytorch_model"),
        ):
            folder = root / "component" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{stem}.safetensors").write_bytes(safetensors_bytes(_zeros(weights)))
            (folder / "config.json").write_text(json.dumps(config, indent=2))
            self.config_folders[len(self.config_seeds)] = folder
            self.config_seeds.append(json.dumps(config, indent=2).encode())
        # a pipeline folder: model_index.json over component subfolders
        self.pipeline = root / "pipeline"
        for name in ("unet", "vae", "text_encoder"):
            shutil.copytree(root / "component" / name, self.pipeline / name, dirs_exist_ok=True)
        for name in ("scheduler", "tokenizer"):
            (self.pipeline / name).mkdir(exist_ok=True)
        (self.pipeline / "scheduler" / "scheduler_config.json").write_text(
            '{"_class_name": "PNDMScheduler"}'
        )
        self.pipeline_seeds = [json.dumps(PIPELINE_INDEX, indent=2).encode()]
        # pickles as torch.save writes them: zip format, the old format, wrapped in state_dict
        small = dict(list(state.items())[:3])
        self.pickle_seeds = []
        for obj, zipped in (
            (small, True),
            ({"state_dict": small, "global_step": 10, "epoch": 1}, True),
            (small, False),
            ({"model": {"state_dict": small}, "optimizer": {"lr": 0.1}}, False),
        ):
            buffer = io.BytesIO()
            torch.save(obj, buffer, _use_new_zipfile_serialization=zipped)
            self.pickle_seeds.append(buffer.getvalue())
        # recipes: the demo recipe and a block-weight recipe
        self.recipe_seeds = [
            (EXAMPLES / "demo.yaml").read_bytes(),
            (EXAMPLES / "attention-swap.yaml").read_bytes(),
            b"models: {a: a.safetensors, b: b.safetensors}\n"
            b"merge: {method: weighted_sum, inputs: [a, b],"
            b" alpha: {gradient: [0, 1]}}\n"
            b"rules:\n  - {blocks: [IN00-IN03], layer: cross_attention, params: {alpha: 0.3}}\n"
            b"  - {regex: '^first_stage_model\\.', take: a}\n"
            b"dtype: fp16\nseed: 7\non_missing: keep\nmax_shard_size: 5GB\n",
        ]
        # search files (weightmix search): read and prepared (planned), no trial run
        self.search_seeds = [
            b"models: {A: cli/A.safetensors, B: cli/B.safetensors}\n"
            b"merge:\n  method: weighted_sum\n  inputs: [A, B]\n"
            b"  alpha: {search: [0, 1], step: 0.05, per: [IN, M00, OUT, default]}\n"
            b"search:\n  objective: {distance: cli/B.safetensors}\n  trials: 30\n  seed: 0\n",
            b"models: {A: cli/A.safetensors, B: cli/B.safetensors}\n"
            b"merge: {method: {choice: [weighted_sum, add_cosine_a]}, inputs: [A, B],"
            b" alpha: {search: [0.1, 1], log: true, per: block}}\n"
            b"rules:\n  - {blocks: [IN00-IN03], params: {alpha: {choice: [0.2, GRAD_V]}}}\n"
            b"search: {objective: {callable: 'scores:score', direction: minimize},"
            b" sampler: random, workers: 2, timeout: 60, study: s, storage: 'sqlite:///s.db'}\n",
            b"models: {A: cli/A.safetensors, B: cli/B.safetensors}\n"
            b"merge:\n  method: weighted_sum\n  alpha: 0.5\n  inputs:\n"
            b"    - {method: weighted_sum, inputs: [A, B], alpha: {search: [0, 1]}}\n    - B\n"
            b"search: {objective: {balance: true}, trials: 5, sampler: cmaes}\n",
        ]
        # two small SD1.5 checkpoints for CLI merges (dry runs): every 12th key, so that each
        # block and component is there (the architecture is detected, 26 block values apply)
        # and a dry run plans in ~17 ms, not the ~130 ms of all 1,132 keys
        self.cli_models = [root / "cli" / "A.safetensors", root / "cli" / "B.safetensors"]
        self.cli_models[0].parent.mkdir(exist_ok=True)
        for seed, path in enumerate(self.cli_models):
            if not path.exists():
                path.write_bytes(safetensors_bytes(sd1_spread_state(seed)))

    # ------------------------------------------------------------ targets

    def targets(self) -> dict[str, Target]:
        """Every parser under fuzzing, by name."""
        return {
            "safetensors": Target(
                "safetensors", self.safetensors_seeds, self._safetensors(), self.run_safetensors
            ),
            "index": Target(
                "index", self.index_seeds, json_mutations(self.index_seeds), self.run_index
            ),
            "config": Target("config", self.config_seeds, self._configs(), self.run_config),
            "model_index": Target(
                "model_index",
                self.pipeline_seeds,
                json_mutations(self.pipeline_seeds),
                self.run_model_index,
            ),
            "pickle": Target("pickle", self.pickle_seeds, self._pickles(), self.run_pickle),
            "recipe": Target(
                "recipe", self.recipe_seeds, byte_mutations(self.recipe_seeds), self.run_recipe
            ),
            "cli": Target("cli", CLI_SEEDS, cli_values(), self.run_cli),
            "search": Target(
                "search", self.search_seeds, byte_mutations(self.search_seeds), self.run_search
            ),
        }

    def _safetensors(self) -> st.SearchStrategy[bytes]:
        """Mutate the header's JSON structure (keeping the length field right, so that the
        mutation reaches the header's checks), or the file's bytes."""
        headers = [split_safetensors(seed)[0] for seed in self.safetensors_seeds]

        def build(index: int, structural: list[Op], raw: list[Op], dup: bool, fix: bool) -> bytes:
            seed = self.safetensors_seeds[index % len(self.safetensors_seeds)]
            header, body = split_safetensors(seed)
            document = json.loads(header)
            for op in structural:
                document = mutate_json(document, op)
            header = dump_json(document, dup)
            if fix:  # mutate the header only: the length field stays right
                for op in raw:
                    header = mutate_bytes(header, op, headers)
                return join_safetensors(header, body)
            data = join_safetensors(header, body)
            for op in raw:
                data = mutate_bytes(data, op, headers)
            return data

        return st.builds(
            build,
            st.integers(0, len(self.safetensors_seeds) - 1),
            st.lists(OPS, max_size=4),
            st.lists(OPS, max_size=3),
            st.booleans(),
            st.booleans(),
        )

    def _configs(self) -> st.SearchStrategy[bytes]:
        """A config seed mutated; its first byte says which folder it belongs to."""
        return st.builds(
            lambda index, data: bytes([index]) + data,
            st.integers(0, len(self.config_seeds) - 1),
            json_mutations(self.config_seeds),
        )

    def _pickles(self) -> st.SearchStrategy[bytes]:
        return byte_mutations(self.pickle_seeds)

    def run_safetensors(self, data: bytes) -> None:
        """Open a safetensors file, describe it as `weightmix inspect --keys` does, and read
        its tensors."""
        path = self.root / "input.safetensors"
        path.write_bytes(data)
        self._open_and_read(path)

    def run_index(self, data: bytes) -> None:
        path = self.index_folder / "model.safetensors.index.json"
        path.write_bytes(data)
        self._open_and_read(path)

    def run_config(self, data: bytes) -> None:
        folder = self.config_folders[data[0] % len(self.config_folders)] if data else None
        if folder is None:
            return
        (folder / "config.json").write_bytes(data[1:])
        self._open_and_read(folder)

    def run_model_index(self, data: bytes) -> None:
        path = self.pipeline / "model_index.json"
        path.write_bytes(data)
        self._open_and_read(self.pipeline)

    def run_pickle(self, data: bytes) -> None:
        path = self.root / "input.ckpt"
        path.write_bytes(data)
        self._open_and_read(path)

    def run_recipe(self, data: bytes) -> None:
        """Read a recipe file and validate it (as `weightmix merge recipe.yaml` first does)."""
        from weightmix.recipe import load_recipe

        path = self.root / "recipe.yaml"
        path.write_bytes(data)
        recipe = load_recipe(path)
        _printable(recipe.to_yaml())

    def run_search(self, data: bytes) -> None:
        """Read a search file and prepare it (every variable planned at its ends and middle,
        a target's keys checked), as `weightmix search` does before its first trial."""
        from weightmix.search.run import prepare
        from weightmix.search.spec import load_search

        path = self.root / "search.yaml"
        path.write_bytes(data)
        spec = load_search(path)
        prepare(spec)
        _printable("\n".join(v.describe() for v in spec.variables))

    def run_cli(self, data: bytes) -> str:
        """`weightmix merge A B --dry-run` with fuzzed option values: exit 0, or exit 2 with one
        line on stderr; never a traceback."""
        from weightmix.cli import main

        flags = json.loads(data.decode("utf-8", "surrogatepass"))
        argv = ["merge", *map(str, self.cli_models), "--dry-run", "-q", *flags]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(argv)
        lines = err.getvalue().splitlines()
        if code not in (0, 2):
            raise FuzzFailure(f"exit code {code}: {err.getvalue()[:500]!r}")
        if code == 2 and (len(lines) != 1 or not lines[0].startswith("weightmix: error: ")):
            raise FuzzFailure(f"exit 2 without one error line: {err.getvalue()[:500]!r}")
        _printable(out.getvalue())
        _printable(err.getvalue())
        return "error" if code == 2 else "ok"

    def _open_and_read(self, path: Path) -> None:
        from weightmix.io import open_checkpoint
        from weightmix.report import describe_checkpoint

        with open_checkpoint(path) as checkpoint:
            _printable(describe_checkpoint(checkpoint, True))
            for info in list(checkpoint.tensors.values())[:8]:
                checkpoint.read(info)


# ---------------------------------------------------------------- CLI values

# what users type, per option of `weightmix merge` (see weightmix/cli.py)
CLI_VALUES: dict[str, list[str]] = {
    "--alpha": [
        "0.3",
        ",".join(["0", "1"] * 13),
        "IN00-IN05=0.2,M00=1,default=0.5",
        "OUT=0.75,default=0.5",
        "{gradient: [0, 1]}",
        "{gradient: [0, 0.5, 1]}",
        "GRAD_V",
        "ALL_A",
        "1e999",
        "nan",
    ],
    "--weights": ["1,2", "0.5, 0.5", "[1, 2]"],
    "-p": ["alpha=0.5", "alpha=[0, 1]", "density=0.5", "weights=[1,2]", "seed=3"],
    "-m": ["weighted_sum", "add_difference", "ties", "slerp", "dare"],
    "--dtype": ["fp16", "bf16", "fp32", "float16", "half", "fp8_e4m3fn"],
    "--compute-dtype": ["fp32", "fp64", "bf16"],
    "--device": ["cpu", "cuda", "cuda:0", "mps"],
    "--rounding": ["nearest", "stochastic"],
    "--seed": ["0", "42", "-1"],
    "--components": ["unet,text_encoder", "vae", "unet, vae,"],
    "--layout": ["A", "B", "single_file"],
    "--max-shard-size": ["5GB", "100MB", "1.5 GiB", "1000"],
    "--rule": ["*.bias:alpha=0.2", '*attn2*:alpha="IN=0.25,default=0.75"', "model.*:weights=[1,2]"],
    "--take": ["cond_stage_model.*=A", "*=B"],
    "--drop": ["model_ema.*", "*"],
    "--on-missing": ["error", "keep", "skip"],
    "--title": ["merged", ""],
    "--threads": ["1", "2"],
}
CLI_SEEDS = [
    json.dumps([flag, value]).encode() for flag, values in CLI_VALUES.items() for value in values
]


def cli_values() -> st.SearchStrategy[bytes]:
    """One to three options with seed values mutated as text."""
    flags = list(CLI_VALUES)

    def option(flag_index: int, value_index: int, raw: list[Op]) -> list[str]:
        flag = flags[flag_index % len(flags)]
        values = CLI_VALUES[flag]
        value = values[value_index % len(values)].encode()
        for op in raw:
            value = mutate_bytes(value, op, [v.encode() for v in values])
        return [flag, value.decode("utf-8", "surrogateescape")]

    one = st.builds(
        option,
        st.integers(0, len(flags) - 1),
        st.integers(0, 50),
        st.lists(OPS, max_size=3),
    )
    return st.lists(one, min_size=1, max_size=3).map(
        lambda options: json.dumps([part for pair in options for part in pair]).encode(
            "utf-8", "surrogatepass"
        )
    )
