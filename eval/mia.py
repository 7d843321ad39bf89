"""Membership-inference scores (as in MIMIR); for every score, LOWER means "more likely a member".

- loss:      mean token NLL of the example under the attacked model
- zlib:      mean token NLL (nats, the log-perplexity) / zlib-compressed byte length of the
             example's scored text, as MIMIR's ZLIBAttack and Carlini et al. 2021 (not the total
             NLL, which would rank a long example by its length as much as by its loss)
- min_k:     −mean of the lowest k·100% token log-probs (Min-K% Prob, k = 0.2)
- min_k_pp:  −mean of the lowest k·100% of zₜ = (log p(xₜ) − μₜ)/σₜ, with μₜ, σₜ the mean and
             standard deviation of log p(v) under the model's own distribution p(·|x<ₜ) (Min-K%++)
- reference: mean NLL under the attacked model − mean NLL under the base model (calibration)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedllm.eval.roc import attack_summary, paired_auc_difference
from fedllm.eval.scoring import Scored

SCORES = ("loss", "zlib", "min_k", "min_k_pp", "reference")


def lowest_fraction_mean(values: np.ndarray, k: float) -> float:
    """Mean of the ceil(k·n) smallest values (at least one)."""
    if len(values) == 0:
        return float("nan")
    n = max(1, math.ceil(k * len(values)))
    return float(np.sort(values)[:n].mean())


def zlib_score(mean_nll: float, text: str) -> float:
    """Log-perplexity over zlib entropy: `mean_nll` / the byte length of zlib-compressed `text`."""
    return mean_nll / len(zlib.compress(text.encode("utf-8")))


def membership_scores(
    target: Sequence[Scored],
    *,
    texts: Sequence[str],
    base_nll: Sequence[float] | None = None,
    k: float = 0.2,
) -> dict[str, np.ndarray]:
    """Every score for every example (the target needs vocab_stats for min_k_pp); `base_nll`,
    the reference model's mean NLL of each, makes the reference score."""
    if len(texts) != len(target) or (base_nll is not None and len(base_nll) != len(target)):
        raise ValueError("target, texts and base_nll must describe the same examples")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    out: dict[str, list[float]] = {name: [] for name in SCORES}
    for i, s in enumerate(target):
        out["loss"].append(s.mean_nll)
        out["zlib"].append(zlib_score(s.mean_nll, texts[i]))
        out["min_k"].append(-lowest_fraction_mean(s.logprobs, k))
        if s.mu is not None and s.sigma is not None:
            out["min_k_pp"].append(-lowest_fraction_mean((s.logprobs - s.mu) / s.sigma, k))
        if base_nll is not None:
            out["reference"].append(s.mean_nll - base_nll[i])
    return {name: np.asarray(v) for name, v in out.items() if v}


def run_attacks(
    members: dict[str, np.ndarray], non_members: dict[str, np.ndarray], **interval: Any
) -> dict[str, dict]:
    """attack_summary (AUC, TPR@FPR, intervals) for each score present in both groups.

    `interval` passes on to attack_summary: resamples, confidence, seed, member/non-member strata
    and member_sets (each member's matched non-member, so that sets are resampled whole).
    """
    return {
        name: attack_summary(members[name], non_members[name], **interval)
        for name in SCORES
        if name in members and name in non_members
    }


def against_base(
    members: dict[str, np.ndarray],
    non_members: dict[str, np.ndarray],
    *,
    base_members: dict[str, np.ndarray],
    base_non_members: dict[str, np.ndarray],
    **interval: Any,
) -> dict[str, dict]:
    """Per score: AUC − the base model's AUC on the same examples, with a paired interval.

    The reference score is left out: under the base model it is 0 for every example.
    """
    return {
        name: paired_auc_difference(
            members[name],
            non_members[name],
            base_members=base_members[name],
            base_non_members=base_non_members[name],
            **interval,
        )
        for name in SCORES
        if name != "reference" and name in members and name in base_members
    }
