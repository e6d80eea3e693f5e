"""Prompt parameters in a plan: checked from headers while planning (text encoder, tokenizer,
widths), encoded just before the merge, and put in place of their text."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightmix.dialects.links import ConvertedCheckpoint
from weightmix.errors import WeightmixError
from weightmix.expression import Node, Op, ops, with_resolved
from weightmix.io.reader import Checkpoint, open_checkpoint
from weightmix.methods.prompted import (
    CROSS_ATTENTION_KV,
    PROMPT,
    EncodedPrompt,
    prompt_spectral_coefficients,
)
from weightmix.methods.registry import MethodSpec
from weightmix.prompts.encoders import (
    LAST_PRESENT,
    POSITION_EMBEDDING,
    TextEncoder,
    find_text_encoders,
)
from weightmix.prompts.tokenizer import TokenizerSource, find_tokenizer

EXTRA = "prompt parameters need transformers: pip install 'weightmix[prompts]'"


def prompt_params(method: MethodSpec) -> list[str]:
    """The method's parameters whose text is a prompt (typed PromptText)."""
    cached = _PROMPT_PARAMS.get(id(method))
    if cached is None or cached[0] is not method:  # asked once per key of a plan: remember
        names = [name for name, spec in method.params.items() if _is_prompt(spec.annotation)]
        cached = _PROMPT_PARAMS[id(method)] = (method, names)
    return list(cached[1])


_PROMPT_PARAMS: dict[int, tuple[MethodSpec, list[str]]] = {}


def _is_prompt(annotation: Any) -> bool:
    if PROMPT in getattr(annotation, "__metadata__", ()):
        return True
    return any(_is_prompt(inner) for inner in typing.get_args(annotation))


@dataclass
class Prompts:
    """What the plan needs to encode its prompts: the encoders, the tokens of each prompt."""

    encoders: list[TextEncoder]
    tokens: dict[str, list[int]]  # prompt text -> token ids, start and end tokens included
    seed: int
    opened: Checkpoint | None = None  # a --text-encoder opened for the prompts
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        """The context width the denoiser reads: the encoders' widths side by side."""
        return sum(e.width for e in self.encoders)

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


def prompt_calls(roots: list[Node]) -> list[Op]:
    """One call per place in the recipe whose method has a prompt parameter that is set."""
    found: dict[str, Op] = {}
    for root in roots:
        for op in ops(root):
            if any(op.params.get(name) is not None for name in prompt_params(op.method)):
                found.setdefault(op.label, op)
    return list(found.values())


def check_prompts(plan) -> Prompts | None:
    """Check every prompt of the plan from headers and tokenizer files; read no weight."""
    recipe = plan.recipe
    calls = prompt_calls([plan.root, *(k.expr for k in plan.keys if k.expr is not None)])
    if not calls:
        unused = [s for s in ("text_encoder", "tokenizer") if getattr(recipe, s) is not None]
        if unused:
            plan.notes.append(f"{unused[0]} is set but no method of this recipe reads a prompt")
        return None
    where = f"recipe {calls[0].label}: {calls[0].method.name}"
    _check_calls(plan, calls)
    if importlib.util.find_spec("transformers") is None:
        raise WeightmixError(f"{where}: {EXTRA}")
    encoders, source_path, opened = _text_encoders(plan, where)
    prompts = Prompts(encoders, {}, recipe.seed, opened)
    try:
        tokenizer_path = recipe.resolve(recipe.tokenizer) if recipe.tokenizer else None
        tokenizer_source = find_tokenizer(tokenizer_path, [source_path])
        _tokenize(prompts, calls, tokenizer_source)
        for call in calls:
            if call.method.name == "concept":
                _check_widths(plan, call, prompts)
            first = prompts.encoders[0]
            if call.params.get("prompt_coefficients") is not None and (
                not first.final_norm or first.context == LAST_PRESENT
            ):
                raise WeightmixError(
                    f"recipe {call.label}: prompt_coefficients needs the pooled embedding of"
                    f" {first.where}, whose file leaves out its last layer or final norm: give"
                    " --text-encoder with a complete CLIP"
                )
    except BaseException:
        prompts.close()
        raise
    shown = " + ".join(f"{e.where} {e.width} wide" for e in encoders)
    prompts.notes.append(f"prompts are read with {shown}; tokenizer: {tokenizer_source.text}")
    for encoder in encoders:
        prompts.notes += encoder.notes
    return prompts


def _check_calls(plan, calls: list[Op]) -> None:
    """One prompt per call (rules may not change it by key), and coefficients or
    prompt_coefficients, not both, for every key."""
    first = {call.label: call for call in calls}
    for key in plan.keys:
        for op in ops(key.expr) if key.expr is not None else []:
            call = first.get(op.label)
            if call is None:
                continue
            for name in prompt_params(op.method):
                if op.params.get(name) != call.params.get(name):
                    raise WeightmixError(
                        f"recipe {op.label}: {op.method.name}: a rule sets {name} for some keys"
                        f" ({key.key}): a call reads one prompt; write one call per prompt"
                    )
            if op.params.get("prompt_coefficients") is not None and "coefficients" in op.given:
                raise WeightmixError(
                    f"recipe {op.label}: {op.method.name}: give coefficients or"
                    f" prompt_coefficients, not both (at {key.key})"
                )


def _text_encoders(plan, where: str) -> tuple[list[TextEncoder], Path, Checkpoint | None]:
    recipe = plan.recipe
    given = recipe.text_encoder
    opened = None
    if given is None or given in recipe.models:
        name = given or (recipe.layout if recipe.layout in recipe.models else None)
        name = name or next(iter(recipe.models))
        checkpoint = plan.checkpoints[name]
        if isinstance(checkpoint, ConvertedCheckpoint):
            checkpoint = checkpoint.source  # the model as saved: its own key names
        path, label = recipe.model_path(name), f"model {name}"
    else:
        path = recipe.resolve(given)
        try:
            opened = checkpoint = open_checkpoint(path)
        except WeightmixError as error:
            raise WeightmixError(f"text_encoder (--text-encoder): {error}") from None
        label = f"text encoder {path}"
    try:
        encoders = find_text_encoders(checkpoint, label)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    if not encoders:
        if opened is not None:
            opened.close()
        if given is not None:
            raise WeightmixError(
                f"{where}: text_encoder {given} ({path}) holds no CLIP text encoder: give a"
                " checkpoint, diffusers folder or text encoder file that has one"
            )
        raise WeightmixError(
            f"{where}: the prompt needs a text encoder, and {label} ({path}) has none and no"
            " --text-encoder was given: give --text-encoder (a checkpoint, diffusers folder or"
            " CLIP text encoder file)"
        )
    return encoders, path, opened


def _tokenize(prompts: Prompts, calls: list[Op], source: TokenizerSource) -> None:
    tokenizer = source.load()
    longest = min(e.info(POSITION_EMBEDDING).shape[0] for e in prompts.encoders)
    for call in calls:
        for name in prompt_params(call.method):
            text = call.params.get(name)
            if text is None or text in prompts.tokens:
                continue
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            if len(ids) <= 2:
                raise WeightmixError(
                    f"recipe {call.label}: {call.method.name} parameter {name} {text!r} has no"
                    " tokens: give words"
                )
            if longest < 3:
                raise WeightmixError(
                    f"{prompts.encoders[0].where}: the text encoder reads {longest} positions:"
                    " no room for a prompt between its start and end tokens"
                )
            if len(ids) > longest:
                prompts.notes.append(
                    f"prompt {text!r}: {len(ids) - 2} tokens, the text encoder reads"
                    f" {longest - 2}: the rest is left out"
                )
                ids = [*ids[: longest - 1], ids[-1]]
            for encoder in prompts.encoders:
                vocabulary = encoder.config["vocab_size"]
                if max(ids) >= vocabulary:
                    raise WeightmixError(
                        f"tokenizer {source.text}: gives token {max(ids)} for {text!r}, outside"
                        f" the vocabulary of {vocabulary} of {encoder.where}: give the tokenizer"
                        " of this text encoder (--tokenizer)"
                    )
            prompts.tokens[text] = ids


def _check_widths(plan, call: Op, prompts: Prompts) -> None:
    """concept changes the cross-attention keys and values it merges: they must read text
    as wide as the prompt's embedding, and there must be some."""
    changed = 0
    for key in plan.keys:
        if key.expr is None or not CROSS_ATTENTION_KV.search(key.key):
            continue
        if not any(op.label == call.label for op in ops(key.expr)):
            continue
        changed += 1
        if key.shape[-1] != prompts.width:
            widths = " + ".join(f"{e.where} {e.width}" for e in prompts.encoders)
            raise WeightmixError(
                f"recipe {call.label}: concept: {key.key} reads {key.shape[-1]}-wide text, but"
                f" the prompt's embedding is {prompts.width} wide ({widths}): give the text"
                " encoder of this model family (--text-encoder)"
            )
    if not changed:
        raise WeightmixError(
            f"recipe {call.label}: concept: none of the keys it merges is a cross-attention key"
            " or value (attn2.to_k, attn2.to_v): it would change nothing; merge a UNet with"
            " cross-attention (and no rule that takes or drops those keys)"
        )


def encode_prompts(plan, prompts: Prompts) -> None:
    """Encode each prompt (reads the text encoders' weights) and put the encodings in place
    of the prompt texts in every key's expression (spectral's coefficients computed too)."""
    from weightmix.prompts.clip import run_encoder

    encoded: dict[str, EncodedPrompt] = {}
    for text, ids in prompts.tokens.items():
        contexts, pooled = [], None
        for number, encoder in enumerate(prompts.encoders):
            context, final = run_encoder(encoder, ids)
            contexts.append(context[1:-1])  # the prompt's own tokens
            if number == 0 and final is not None:
                pooled = final[-1].double()  # the first encoder's end token
        tokens = torch.cat(contexts, dim=1).double()
        encoded[text] = EncodedPrompt(text, tokens, pooled)

    def resolved(op: Op) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in prompt_params(op.method):
            text = op.params.get(name)
            if isinstance(text, str):
                values[name] = encoded[text]
                if name == "prompt_coefficients":
                    pooled = encoded[text].pooled
                    values["coefficients"] = prompt_spectral_coefficients(pooled, prompts.seed)
        return values

    plan.root = with_resolved(plan.root, resolved)
    plan.keys = [
        k if k.expr is None else dataclasses.replace(k, expr=with_resolved(k.expr, resolved))
        for k in plan.keys
    ]
