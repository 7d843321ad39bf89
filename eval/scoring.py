"""Per-token log-probabilities of tokenized examples, batched (right padding, length-sorted).

Every quality task and leakage measurement reduces to this one forward pass: the log-probability
of each scored token (labels != -100) given its prefix, and optionally the mean and standard
deviation of log p over the vocabulary at that position (for Min-K%++).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.data import collate


@dataclass(frozen=True)
class Scored:
    """One example's scored tokens: ids, log p (nats), optionally μ, σ of log p over the vocab."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None

    @property
    def nll_sum(self) -> float:
        return float(-self.logprobs.sum())

    @property
    def mean_nll(self) -> float:
        return float(-self.logprobs.mean()) if len(self.logprobs) else float("nan")


@torch.no_grad()
def score_examples(
    model: torch.nn.Module,
    items: Sequence[dict],
    *,
    batch_size: int,
    pad_id: int,
    vocab_stats: bool = False,
) -> list[Scored]:
    """Score `items` (dicts with input_ids and labels) in batches of similar length.

    Results come back in the order of `items`. batch_size=1 is the one-at-a-time baseline.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    out: list[Scored | None] = [None] * len(items)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([items[i] for i in chunk], pad_id=pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch["labels"][:, 1:].to(device)
        scored = targets != -100
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        if vocab_stats:
            p = logp.exp()
            mu = (p * logp).sum(-1)
            var = (p * logp.square()).sum(-1) - mu.square()
            sigma = var.clamp(min=1e-12).sqrt()
        for row, idx in enumerate(chunk):
            mask = scored[row]
            out[idx] = Scored(
                token_ids=targets[row][mask].cpu().numpy(),
                logprobs=picked[row][mask].double().cpu().numpy(),
                mu=mu[row][mask].double().cpu().numpy() if vocab_stats else None,
                sigma=sigma[row][mask].double().cpu().numpy() if vocab_stats else None,
            )
    return [s for s in out if s is not None]


def nll_and_tokens(scored: Sequence[Scored]) -> tuple[float, int]:
    """Summed NLL (nats) and token count over examples: they combine exactly across clients."""
    return sum(s.nll_sum for s in scored), sum(len(s.logprobs) for s in scored)
