"""Log-probabilities of many continuations of one prompt whose first tokens repeat.

A canary's secret and its 1,000 reference secrets are nine-digit strings after one prompt:
they share their first one, two and three digits with many others. Scoring each in full runs
every token of every string. Here the prompt runs once; then the continuations' distinct
prefixes run level by level, one token each, and one forward per prefix gives the next-token
distribution that all its children read their log-probability from. Once a level has nearly as
many distinct prefixes as continuations (sharing no longer pays), every continuation's remaining
tokens run in one forward on its prefix's keys/values. The numbers equal `score_examples`' (to
float rounding, tested); a nine-digit block takes about 0.65x the tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from fedllm.eval.scoring import pad_right

SHARING_PAYS = 0.8  # run another level while it has at most this fraction of the rows


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    prompt: Sequence[int],
    continuations: Sequence[Sequence[int]],
    *,
    rows: int,
    pad_id: int,
) -> list[np.ndarray]:
    """log p (nats) of each continuation's tokens after `prompt`, in the order given.

    `prompt` needs >= 2 tokens and every continuation >= 1; `rows` bounds the continuations
    scored together (the keys/values held: rows x (prompt + longest continuation) tokens).
    """
    if len(prompt) < 2 or rows < 1 or any(len(c) < 1 for c in continuations):
        raise ValueError("need a prompt of >= 2 tokens, rows >= 1 and non-empty continuations")
    device = next(model.parameters()).device
    root = model(
        input_ids=torch.as_tensor([list(prompt[:-1])], device=device),
        use_cache=True,
        logits_to_keep=1,
    ).past_key_values
    order = sorted(range(len(continuations)), key=lambda i: tuple(continuations[i]))
    out: list[np.ndarray] = [np.zeros(0)] * len(continuations)
    for start in range(0, len(order), rows):
        chunk = order[start : start + rows]
        scored = _score_chunk(
            model,
            copy.deepcopy(root),
            prompt,
            [tuple(continuations[i]) for i in chunk],
            pad_id=pad_id,
        )
        for i, logprobs in zip(chunk, scored, strict=True):
            out[i] = logprobs
    return out


def _score_chunk(model, cache, prompt, conts: list[tuple[int, ...]], *, pad_id: int):
    """log p of `conts` (sorted) after `prompt`, whose tokens but the last are in `cache`."""
    device = next(model.parameters()).device
    logp: list[list[float]] = [[] for _ in conts]
    nodes: list[tuple[int, ...]] = [()]  # the distinct prefixes of this level, one cache row each
    tokens = [prompt[-1]]  # each node's last token: the one this level runs
    depth = 0
    while True:
        logits = model(
            input_ids=torch.as_tensor(tokens, device=device)[:, None],
            attention_mask=torch.ones(
                (len(nodes), len(prompt) + depth), dtype=torch.long, device=device
            ),
            position_ids=torch.full((len(nodes), 1), len(prompt) - 1 + depth, device=device),
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        table = torch.log_softmax(logits.float(), dim=-1)
        row = {node: k for k, node in enumerate(nodes)}
        active = [i for i, c in enumerate(conts) if len(c) > depth]
        for i in active:
            logp[i].append(float(table[row[conts[i][:depth]], conts[i][depth]]))
        deeper = [i for i in active if len(conts[i]) > depth + 1]
        if not deeper:
            break
        children = list(dict.fromkeys(conts[i][: depth + 1] for i in deeper))
        if len(children) > SHARING_PAYS * len(deeper):
            _rest(model, cache, prompt, conts, deeper, row, depth, logp, pad_id=pad_id)
            break
        cache.batch_select_indices(torch.as_tensor([row[c[:-1]] for c in children], device=device))
        nodes, tokens = children, [c[-1] for c in children]
        depth += 1
    return [np.asarray(x, dtype=np.float64) for x in logp]


def _rest(model, cache, prompt, conts, deeper, row, depth, logp, *, pad_id: int) -> None:
    """Every continuation's tokens after `depth` + 1 in one forward on its prefix's cache row."""
    device = next(model.parameters()).device
    cache.batch_select_indices(
        torch.as_tensor([row[conts[i][:depth]] for i in deeper], device=device)
    )
    ids, mask = pad_right([conts[i][depth:-1] for i in deeper], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    seen = len(prompt) + depth
    logits = model(
        input_ids=ids,
        attention_mask=torch.cat(
            [torch.ones((len(deeper), seen), dtype=torch.long, device=device), mask], dim=1
        ),
        position_ids=(seen + torch.arange(ids.shape[1], device=device)).expand_as(ids),
        past_key_values=cache,
        use_cache=True,
    ).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for k, i in enumerate(deeper):
        targets = torch.as_tensor(conts[i][depth + 1 :], device=device)
        picked = logprobs[k, : len(targets)].gather(-1, targets[:, None]).squeeze(-1)
        logp[i].extend(picked.double().cpu().tolist())
