"""Leakage measures under one model, each batched across clients: canary exposure, MIA scores.

The harness (fedllm.eval.leakage_run) prepares items once and calls these once per view: a canary
set's items (every canary and its reference secrets, tokenized once for every view) score in one
pass that runs each canary's prompt once; membership items of several clients score together and
are split back per client.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedllm.data.canary import Canary, reference_secrets
from fedllm.eval.exposure import exposure, exposure_skewnormal, log_perplexity_bits, secret_item
from fedllm.eval.roc import roc_auc
from fedllm.eval.scoring import Scored, score_examples

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class CanarySet:
    """Canaries with their reference secrets, tokenized: item 0 of each block is the canary."""

    canaries: tuple[Canary, ...]
    items: tuple[dict, ...]  # len(canaries) blocks of 1 + references items
    references: int
    digits: int


def canary_set(
    canaries: Sequence[Canary],
    *,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    digits: int,
    references: int,
    seed: int = 0,
) -> CanarySet:
    """Each canary's secret and `references` sampled secrets, after its prompt, as items."""
    items = [
        secret_item(tokenizer, canary.prompt, secret=s, prompt_format=prompt_format)
        for canary in canaries
        for s in [canary.secret, *reference_secrets(canary, n=references, digits=digits, seed=seed)]
    ]
    return CanarySet(tuple(canaries), tuple(items), references, digits)


def canary_exposures(
    model: torch.nn.Module, cs: CanarySet, *, batch_size: int, pad_id: int
) -> list[dict]:
    """Px (bits) of each canary's secret and its rank-based and skew-normal exposure."""
    scored = score_examples(model, cs.items, batch_size=batch_size, pad_id=pad_id)
    px_all = [log_perplexity_bits(s.logprobs) for s in scored]
    block = cs.references + 1
    return [
        exposure_row(c, px_all[b * block : (b + 1) * block], digits=cs.digits)
        for b, c in enumerate(cs.canaries)
    ]


def exposure_row(canary: Canary, px: Sequence[float], *, digits: int) -> dict:
    """One report row from the canary's Px (px[0]) and its references' (px[1:])."""
    references = len(px) - 1
    return {
        "client": canary.client,
        "repeats": canary.repeats,
        "index": canary.index,
        "px_bits": px[0],
        "reference_px_median": float(np.median(px[1:])),
        "reference_px": [round(float(x), 4) for x in px[1:]],  # for refits (bench/exposure_refs.py)
        "exposure": exposure(px[0], px[1:]),
        "exposure_skewnormal": exposure_skewnormal(px[0], px[1:], space_size=10.0**digits),
        # membership of the secret itself: canary (member) vs reference secrets
        "auc_vs_references": roc_auc(px[:1], px[1:]),
        "references": references,
        "max_rank_exposure": math.log2(references + 1),
        "space_bits": digits * math.log2(10),
    }


def score_groups(
    model: torch.nn.Module,
    groups: dict[Hashable, Sequence[dict]],
    *,
    batch_size: int,
    pad_id: int,
    vocab_stats: bool = False,
) -> dict[Hashable, list[Scored]]:
    """score_examples of every group's items in one call (fuller batches), split per group."""
    flat = [item for items in groups.values() for item in items]
    scored = score_examples(
        model, flat, batch_size=batch_size, pad_id=pad_id, vocab_stats=vocab_stats
    )
    out, at = {}, 0
    for key, items in groups.items():
        out[key] = scored[at : at + len(items)]
        at += len(items)
    return out
