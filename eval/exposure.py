"""Canary exposure (Carlini et al., "The Secret Sharer", 2019).

Px(s) = Σ over the secret's tokens of −log₂ p(xₜ | x<ₜ), conditioned on the canary's prompt.
Rank-based, against n sampled reference secrets, the canary counted among the candidates as in
the paper (|R| = n + 1, so exposure lies in [0, log₂(n + 1)]):
  rank = #(references with Px lower than the canary's) + 1,  exposure = log₂(n + 1) − log₂ rank,
so a canary more likely than every reference gets log₂(n + 1) (the most n samples can show) and
one less likely than all of them 0.
Skew-normal extrapolation: fit a skew-normal to the references' Px, exposure = −log₂ CDF(Px canary),
which can reach beyond log₂(n + 1) (capped at log₂ |R| when the size of the secret space is given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedllm.eval.prompting import prompt_response_item

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def exposure(canary_log_perplexity: float, reference_log_perplexities: Sequence[float]) -> float:
    """Rank-based exposure of a canary among n sampled references (both Px in bits)."""
    refs = _finite(reference_log_perplexities)
    if not math.isfinite(canary_log_perplexity):
        raise ValueError(f"canary_log_perplexity must be finite, got {canary_log_perplexity}")
    rank = int((refs < canary_log_perplexity).sum()) + 1
    return math.log2(len(refs) + 1) - math.log2(rank)


def exposure_skewnormal(
    canary_log_perplexity: float,
    reference_log_perplexities: Sequence[float],
    *,
    space_size: float | None = None,
) -> float:
    """−log₂ of the fitted skew-normal CDF at the canary's Px (capped at log₂ space_size)."""
    from scipy.stats import skewnorm

    refs = _finite(reference_log_perplexities)
    if refs.std() == 0:
        raise ValueError("reference log-perplexities are all equal; no distribution to fit")
    shape, loc, scale = skewnorm.fit(refs)
    bits = -float(skewnorm.logcdf(canary_log_perplexity, shape, loc, scale)) / math.log(2)
    if space_size is not None:
        bits = min(bits, math.log2(space_size))
    return max(bits, 0.0)


def secret_item(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, secret: str, prompt_format: str
) -> dict:
    """Token ids of prompt + secret, with labels on the secret's tokens only (for Px)."""
    return prompt_response_item(tokenizer, prompt, response=secret, prompt_format=prompt_format)


def log_perplexity_bits(logprobs_nats: np.ndarray) -> float:
    """Px in bits from natural-log token probabilities."""
    return float(-np.asarray(logprobs_nats).sum() / math.log(2))


def _finite(values: Sequence[float]) -> np.ndarray:
    refs = np.asarray(values, dtype=float)
    if refs.size == 0:
        raise ValueError("need at least one reference log-perplexity")
    if not np.isfinite(refs).all():
        raise ValueError("reference log-perplexities must be finite")
    return refs
