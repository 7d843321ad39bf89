"""Leakage of one client's data under one model: canary exposure, membership inference, extraction.

Each function takes the active model and plain examples; the harness chooses the views (base as a
control, the released global adapter, the client's own adapter as the server sees it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedllm.data import tokenize_all
from fedllm.data.canary import Canary, reference_secrets
from fedllm.eval.exposure import exposure, exposure_skewnormal, log_perplexity_bits, secret_item
from fedllm.eval.extraction import extraction_rates
from fedllm.eval.generate import end_token_ids
from fedllm.eval.mia import membership_scores
from fedllm.eval.roc import roc_auc
from fedllm.eval.scoring import Scored, score_examples


def canary_exposures(
    model,
    canaries: Sequence[Canary],
    *,
    tokenizer,
    prompt_format: str,
    digits: int,
    references: int,
    batch_size: int,
    seed: int = 0,
) -> list[dict]:
    """Px (bits) of each canary's secret and its rank-based and skew-normal exposure."""
    rows = []
    for canary in canaries:
        refs = reference_secrets(canary, n=references, digits=digits, seed=seed)
        items = [
            secret_item(tokenizer, canary.prompt, s, prompt_format=prompt_format)
            for s in [canary.secret, *refs]
        ]
        scored = score_examples(model, items, batch_size=batch_size, pad_id=tokenizer.pad_token_id)
        px = [log_perplexity_bits(s.logprobs) for s in scored]
        rows.append(
            {
                "client": canary.client,
                "repeats": canary.repeats,
                "index": canary.index,
                "px_bits": px[0],
                "reference_px_median": float(np.median(px[1:])),
                "exposure": exposure(px[0], px[1:]),
                "exposure_skewnormal": exposure_skewnormal(px[0], px[1:], space_size=10.0**digits),
                # membership of the secret itself: canary (member) vs reference secrets
                "auc_vs_references": roc_auc(px[:1], px[1:]),
                "references": references,
                "max_rank_exposure": math.log2(references),
                "space_bits": digits * math.log2(10),
            }
        )
    return rows


def score_membership(
    model,
    examples: Sequence[dict],
    *,
    tokenizer,
    prompt_format: str,
    max_length: int,
    batch_size: int,
    base_scored: Sequence[Scored] | None = None,
) -> dict[str, np.ndarray]:
    """Every MIA score of `examples` (tokenized exactly as the trainer did) under `model`."""
    items = tokenize_all(
        list(examples), tokenizer, prompt_format=prompt_format, max_length=max_length
    )
    scored = score_examples(
        model, items, batch_size=batch_size, pad_id=tokenizer.pad_token_id, vocab_stats=True
    )
    texts = [ex["response"] for ex in examples]
    return membership_scores(scored, texts=texts, base=base_scored)


def base_scores(
    model,
    examples: Sequence[dict],
    *,
    tokenizer,
    prompt_format: str,
    max_length: int,
    batch_size: int,
) -> list[Scored]:
    """The base model's token scores of `examples` (for the reference-calibrated score)."""
    items = tokenize_all(
        list(examples), tokenizer, prompt_format=prompt_format, max_length=max_length
    )
    return score_examples(model, items, batch_size=batch_size, pad_id=tokenizer.pad_token_id)


def extraction(
    model,
    examples: Sequence[dict],
    *,
    tokenizer,
    prompt_format: str,
    max_length: int,
    prefix_tokens: int,
    suffix_tokens: int,
    batch_size: int,
) -> dict:
    """extraction_rates on examples tokenized as the trainer did."""
    items = tokenize_all(
        list(examples), tokenizer, prompt_format=prompt_format, max_length=max_length
    )
    return extraction_rates(
        model,
        items,
        prefix_tokens=prefix_tokens,
        suffix_tokens=suffix_tokens,
        pad_id=tokenizer.pad_token_id,
        end_ids=end_token_ids(tokenizer),
        batch_size=batch_size,
    )
