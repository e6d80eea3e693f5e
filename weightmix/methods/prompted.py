"""Prompt-conditioned merging: the `concept` merge of cross-attention keys and values, and the
seeded projection that turns a prompt into the spectral blend's coefficients (seed 000).

A prompt parameter is text in the recipe; before the merge runs, weightmix/prompts encodes it
with a CLIP text encoder and puts an EncodedPrompt in its place. Methods only see that."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from weightmix.methods.registry import WEIGHT, Finite, Tensor, merge_method
from weightmix.methods.streaming import ModelStatistic

PROMPT = "prompt"  # marks a parameter whose text is encoded before the merge
PromptText = Annotated[str, Field(min_length=1), PROMPT]
# cross-attention key and value projections: the only weights of a UNet that read the text
CROSS_ATTENTION_KV = re.compile(r"(^|\.)attn2\.to_[kv]\.weight$")
SPECTRAL_COEFFICIENTS = 16  # how many coefficients a prompt gives the spectral blend


@dataclass(frozen=True, eq=False)
class EncodedPrompt:
    """A prompt as the text encoder read it. `tokens`: the denoiser's context rows of the
    prompt's own tokens (no start, end or padding tokens), float64, one row per token;
    `pooled`: the first text encoder's end-of-text state after its final norm."""

    text: str
    tokens: Tensor
    pooled: Tensor | None  # None: the first encoder's file lacks its last layer or norm

    def __str__(self) -> str:
        return self.text

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def basis(self) -> Tensor:
        """Orthonormal columns spanning the token rows (width × rank), from an SVD that drops
        directions below 1e-10 of the largest singular value."""
        _, values, vectors = torch.linalg.svd(self.tokens, full_matrices=False)
        rank = int((values > values[0] * 1e-10).sum()) if values.numel() else 0
        return vectors[:rank].T.contiguous()


def prompt_spectral_coefficients(pooled: Tensor | None, seed: int) -> list[float]:
    """c = R · p / |p|, R a SPECTRAL_COEFFICIENTS × width matrix of standard normal numbers drawn
    from the recipe seed (numpy PCG64DXSM): each c is then standard normal over prompts. Fixed and
    untrained, like the seed's "hypernetwork": the prompt picks the filter, with no meaning."""
    if pooled is None:
        raise RuntimeError("prompt_coefficients: the text encoder gave no pooled embedding")
    rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([seed, 0x5EC7])))
    projection = rng.standard_normal((SPECTRAL_COEFFICIENTS, pooled.numel()))
    direction = pooled.double().numpy() / max(float(pooled.double().norm()), 1e-30)
    return [float(c) for c in projection @ direction]


class ConceptSpan(ModelStatistic):
    """Which keys `concept` changes, from key names: cross-attention keys and values
    (attn2.to_k / attn2.to_v weights). They receive the prompt's orthonormal basis Q."""

    reads_tensors = False

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        prompt = params["prompt"]
        if not isinstance(prompt, EncodedPrompt):
            raise RuntimeError("concept: the prompt was not encoded before the merge")
        self.basis = prompt.basis()
        if self.basis.shape[1] == 0:
            raise RuntimeError(f"concept: prompt {prompt.text!r} spans no direction")

    def add(self, key: str, component: str | None, inputs: Sequence[Tensor]) -> None:
        raise RuntimeError("ConceptSpan reads no tensors")

    def for_key(self, key: str, component: str | None) -> Tensor | None:
        return self.basis if CROSS_ATTENTION_KV.search(key) else None


@merge_method(inputs=WEIGHT, output=WEIGHT, model_statistic=ConceptSpan)
def concept(
    a: Tensor,
    b: Tensor,
    *,
    prompt: PromptText,
    alpha: Finite = 1.0,
    statistic: Tensor | None,
) -> Tensor:
    """Concept merge (weightmix's own): for each cross-attention key and value projection
    W = W_A + α·(W_B − W_A)·P, P = Q·Qᵀ the projection onto the span of the prompt's token
    embeddings (the context rows the denoiser reads, from the text encoder). For a text
    embedding e in that span W·e = W_A·e + α(W_B − W_A)·e (B's answer at α = 1); orthogonal to
    it W·e = W_A·e. Every other key is A's."""
    if statistic is None:
        return a
    if a.shape[-1] != statistic.shape[0]:
        raise RuntimeError(f"concept: {a.shape[-1]}-wide weight, {statistic.shape[0]}-wide text")
    basis = statistic.to(device=a.device, dtype=torch.float64)
    projected = ((b.double() - a.double()) @ basis) @ basis.T
    return (a.double() + alpha * projected).to(a.dtype)
