"""Per-token log-probabilities of tokenized examples, batched, sharing prompt prefixes.

Every quality task and leakage measurement reduces to this: the log-probability of each scored
token (labels != -100) given its prefix, and optionally the mean and standard deviation of log p
over the vocabulary at that position (for Min-K%++).

Two paths give the same numbers (to float rounding, tested):
- `shared_prefix=True` (default): the prefix every item shares (a chat template's system turn and
  instruction words) runs once per call; a prompt several items share (a canary's 1,000
  reference secrets, a question's options) runs once per batch; each item then runs only the
  rest, reading the common prefix's keys/values from one copy (`fedllm.model.shared_kv`) and
  its prompt group's from the group's cache (explicit positions; padding is masked).
- `shared_prefix=False`: every item runs in full, right-padded and length-sorted (the reference
  path, and the one-at-a-time baseline at batch_size=1).
Either way the output layer and the softmax run only where a scored token is predicted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.data import collate
from fedllm.model.shared_kv import attending_shared, prefix_kv


@dataclass(frozen=True)
class Scored:
    """One example's scored tokens: ids, log p (nats), optionally μ, σ of log p over the vocab."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None

    @property
    def nll_sum(self) -> float:
        """Summed NLL of the scored tokens (nats)."""
        return float(-self.logprobs.sum())

    @property
    def mean_nll(self) -> float:
        """Mean NLL per scored token (nats); NaN with no tokens."""
        return float(-self.logprobs.mean()) if len(self.logprobs) else float("nan")


@torch.no_grad()
def score_examples(
    model: torch.nn.Module,
    items: Sequence[dict],
    *,
    batch_size: int,
    pad_id: int,
    vocab_stats: bool = False,
    shared_prefix: bool = True,
) -> list[Scored]:
    """Score `items` (dicts with input_ids and labels); results in the order of `items`.

    batch_size bounds a forward pass at batch_size × (longest item) tokens in both paths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        return []
    plan = _prefix_plan(items) if shared_prefix else None
    if plan is not None:
        scored = _score_shared(
            model, items, plan=plan, batch_size=batch_size, pad_id=pad_id, vocab_stats=vocab_stats
        )
        if scored is not None:
            return scored
    return _score_full(model, items, batch_size=batch_size, pad_id=pad_id, vocab_stats=vocab_stats)


def nll_and_tokens(scored: Sequence[Scored]) -> tuple[float, int]:
    """Summed NLL (nats) and token count over examples: they combine exactly across clients."""
    return sum(s.nll_sum for s in scored), sum(len(s.logprobs) for s in scored)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _picked(
    logits: torch.Tensor, targets: torch.Tensor, *, vocab_stats: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log p of `targets` (N,) under `logits` (N, V), and μ, σ of log p over the vocabulary."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not vocab_stats:
        return picked, None, None
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu.unsqueeze(-1)).square()).sum(-1)  # two-pass: no cancellation
    return picked, mu, var.clamp(min=1e-12).sqrt()


def _split(
    targets: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    *,
    counts: Sequence[int],
) -> list[Scored]:
    """Cut flat per-token results into one Scored per row (`counts` tokens each)."""
    picked, mu, sigma = (None if t is None else t.double().cpu().numpy() for t in stats)
    ids = targets.cpu().numpy()
    out, at = [], 0
    for n in counts:
        cut = slice(at, at + n)
        out.append(
            Scored(
                token_ids=ids[cut],
                logprobs=picked[cut],
                mu=None if mu is None else mu[cut],
                sigma=None if sigma is None else sigma[cut],
            )
        )
        at += n
    return out


def _empty(vocab_stats: bool) -> Scored:
    none = np.zeros(0)
    return Scored(
        np.zeros(0, dtype=np.int64),
        none,
        none if vocab_stats else None,
        none if vocab_stats else None,
    )


def _score_full(
    model: torch.nn.Module,
    items: Sequence[dict],
    *,
    batch_size: int,
    pad_id: int,
    vocab_stats: bool,
) -> list[Scored]:
    """Every item in full, right-padded, in batches of similar length."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    out: list[Scored | None] = [None] * len(items)
    device = _device(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([items[i] for i in chunk], pad_id=pad_id)
        width = batch["input_ids"].shape[1]
        targets = batch["labels"][:, 1:].to(device)
        scored = targets != -100
        if not scored.any():
            for i in chunk:
                out[i] = _empty(vocab_stats)
            continue
        first = int(scored.any(0).nonzero()[0])  # earliest predicting position in the batch
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            logits_to_keep=width - first,
        ).logits  # positions first .. width-1
        keep = scored[:, first:]
        flat_targets = targets[:, first:][keep]
        stats = _picked(logits[:, :-1][keep], flat_targets, vocab_stats=vocab_stats)
        rows = _split(flat_targets, stats, counts=keep.sum(1).tolist())
        for idx, row in zip(chunk, rows, strict=True):
            out[idx] = row
    return [s for s in out if s is not None]


@dataclass(frozen=True)
class _Plan:
    """The common prefix; per item its prompt group (tokens after the prefix that other items
    share, run once per chunk) and its continuation (the rest but the last token, which predicts
    nothing), with the label each continuation position predicts (-100: none). An item whose
    prompt no other item shares has an empty group and carries its whole prompt remainder in its
    continuation (one pass instead of two)."""

    common: list[int]
    groups: list[tuple[int, ...]]
    continuations: list[list[int]]
    predicts: list[list[int]]


def _prefix_plan(items: Sequence[dict]) -> _Plan | None:
    """Split items after the common prefix; None when the items share no prefix to reuse."""
    firsts = []
    for item in items:
        first = next((i for i, t in enumerate(item["labels"]) if t != -100), None)
        if first is None or first < 1 or len(item["labels"]) != len(item["input_ids"]):
            return None
        firsts.append(first)
    limit = min(firsts) - 1  # every item keeps >= 1 prompt token for its continuation row
    ref = items[0]["input_ids"]
    common = 0
    while common < limit and all(it["input_ids"][common] == ref[common] for it in items):
        common += 1
    if common == 0:
        return None
    prompts = [tuple(it["input_ids"][common : f - 1]) for it, f in zip(items, firsts, strict=True)]
    shared = {key for key, n in Counter(prompts).items() if n > 1 and key}
    groups, continuations, predicts = [], [], []
    for item, first, prompt in zip(items, firsts, prompts, strict=True):
        start = first - 1 if prompt in shared else common
        groups.append(prompt if prompt in shared else ())
        # the last token predicts nothing scored: it is never run
        continuations.append(list(item["input_ids"][start:-1]))
        predicts.append(list(item["labels"][start + 1 :]))
    return _Plan(list(ref[:common]), groups, continuations, predicts)


def _chunks(plan: _Plan, order: list[int], *, budget: int) -> list[list[int]]:
    """Consecutive items whose prompt-group pass and continuation pass each fit `budget` tokens."""
    chunks: list[list[int]] = []
    current: list[int] = []
    groups: set[tuple[int, ...]] = set()
    g_width = c_width = 0
    for i in order:
        group, cont = plan.groups[i], plan.continuations[i]
        gw, cw = max(g_width, len(group)), max(c_width, len(cont))
        ng = len(groups) + (group not in groups)
        if current and max(ng * gw, (len(current) + 1) * cw) > budget:
            chunks.append(current)
            current, groups, gw, cw = [], set(), len(group), len(cont)
        current.append(i)
        groups.add(group)
        g_width, c_width = gw, cw
    if current:
        chunks.append(current)
    return chunks


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (a width-0 tensor for empty rows)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[k, : len(r)] = 1
    return ids, mask


def _score_shared(
    model: torch.nn.Module,
    items: Sequence[dict],
    *,
    plan: _Plan,
    batch_size: int,
    pad_id: int,
    vocab_stats: bool,
) -> list[Scored] | None:
    """The common prefix once, each prompt group once per chunk, then the continuations."""
    device = _device(model)
    c = len(plan.common)
    kv = prefix_kv(model, plan.common)
    if kv is None:
        return None  # no reusable key/value cache (e.g. gradient checkpointing in train mode)
    budget = batch_size * max(len(it["input_ids"]) for it in items)
    order = sorted(
        range(len(items)),
        key=lambda i: (plan.groups[i], len(plan.continuations[i])),
    )
    out: list[Scored | None] = [None] * len(items)
    for chunk in _chunks(plan, order, budget=budget):
        keys = list(dict.fromkeys(plan.groups[i] for i in chunk))
        row_group = torch.as_tensor([keys.index(plan.groups[i]) for i in chunk], device=device)
        g_ids, g_mask = pad_right(keys, pad_id)
        g_ids, g_mask = g_ids.to(device), g_mask.to(device)
        c_ids, c_mask = pad_right([plan.continuations[i] for i in chunk], pad_id)
        c_ids, c_mask = c_ids.to(device), c_mask.to(device)
        t_ids = pad_right([plan.predicts[i] for i in chunk], -100)[0].to(device)
        first = int((t_ids != -100).any(0).nonzero()[0])  # earliest position that predicts one
        after_group: dict = {}  # the rows' own prompt group, as keys/values before their tokens
        with attending_shared(model):
            if g_ids.shape[1]:
                cache = model(
                    input_ids=g_ids,
                    attention_mask=g_mask,
                    position_ids=(c + torch.arange(g_ids.shape[1], device=device)).expand_as(g_ids),
                    use_cache=True,
                    logits_to_keep=1,
                    shared_kv=kv,
                ).past_key_values
                cache.batch_select_indices(row_group)
                after_group = {"past_key_values": cache, "use_cache": True}
            start = c + g_mask.sum(1)[row_group]  # each row's position after its prompt group
            logits = model(
                input_ids=c_ids,
                attention_mask=torch.cat([g_mask[row_group], c_mask], dim=1),
                position_ids=start[:, None] + torch.arange(c_ids.shape[1], device=device),
                logits_to_keep=c_ids.shape[1] - first,
                shared_kv=kv,
                **after_group,
            ).logits  # continuation positions first .. end
        keep = t_ids != -100
        flat_targets = t_ids[keep]
        stats = _picked(logits[keep[:, first:]], flat_targets, vocab_stats=vocab_stats)
        for idx, row in zip(
            chunk, _split(flat_targets, stats, counts=keep.sum(1).tolist()), strict=True
        ):
            out[idx] = row
    return [s for s in out if s is not None]
