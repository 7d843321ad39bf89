"""Greedy decoding that runs the prompts' common head once (extraction's many short decodes).

Prompts that start alike (a chat template's system turn, "Define the word '") share that head:
it runs once and every row reads its keys/values from that one copy (`fedllm.model.shared_kv`);
each row runs the rest of its prompt, then one token per step with explicit positions (padding
between the rows' own tokens is masked).
Each row stops at its own token budget or an end token, and finished rows leave the batch.
Tokens agree with `fedllm.eval.generate.greedy_generate` (same argmax, up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedllm.eval.generate import greedy_generate
from fedllm.eval.scoring import pad_right
from fedllm.model.shared_kv import attending_shared, prefix_kv


def common_head(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the prefix every prompt shares, leaving each prompt at least one token."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: Sequence[int],
    pad_id: int,
    eos_ids: Sequence[int],
    batch_size: int,
) -> list[list[int]]:
    """Each prompt's greedy continuation: at most max_new_tokens[i] tokens, cut before an end."""
    if len(max_new_tokens) != len(prompts):
        raise ValueError("max_new_tokens needs one budget per prompt")
    if batch_size < 1 or any(n < 1 for n in max_new_tokens) or any(not p for p in prompts):
        raise ValueError("batch_size, every budget and every prompt must be >= 1")
    if not prompts:
        return []
    head = common_head(prompts)
    kv = prefix_kv(model, prompts[0][:head]) if head else None
    if kv is None:
        return greedy_generate(
            model, prompts, max_new_tokens=max(max_new_tokens), pad_id=pad_id,
            eos_ids=eos_ids, batch_size=batch_size,
        )  # fmt: skip
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), max_new_tokens[i]))
    out: list[list[int]] = [[] for _ in prompts]
    size = decode_rows(prompts, max_new_tokens, head=head, batch_size=batch_size)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        for i, tokens in zip(
            rows,
            _decode_rows(
                model,
                kv,
                head=head,
                prompts=[prompts[i] for i in rows],
                budgets=[max_new_tokens[i] for i in rows],
                pad_id=pad_id,
                ends=set(eos_ids),
            ),
            strict=True,
        ):
            out[i] = tokens
    return out


MIN_ROWS = 512  # decode steps of fewer rows are overhead-bound on a CPU (measured: 0.65x at 512)


def decode_rows(
    prompts: Sequence[Sequence[int]], budgets: Sequence[int], *, head: int, batch_size: int
) -> int:
    """Rows decoded together: at least MIN_ROWS (a step runs one token per row, and its matrix
    products only pay off over many rows; the head is shared, so a row costs only its own
    tokens' keys/values), more when the prompt pass stays within the token budget a full
    forward of batch_size rows would have (batch_size × longest prompt + budget)."""
    width = max(len(p) + n for p, n in zip(prompts, budgets, strict=True))
    rest = max(len(p) - head for p in prompts)
    return max(MIN_ROWS, batch_size, batch_size * width // max(rest, 1))


def _decode_rows(model, kv, *, head: int, prompts, budgets, pad_id: int, ends: set[int]):
    """Greedy tokens for one batch of prompts whose first `head` tokens' keys/values are `kv`
    (read by every row from one copy: `fedllm.model.shared_kv`)."""
    device = next(model.parameters()).device
    n = len(prompts)
    rest_ids, mask = (t.to(device) for t in pad_right([p[head:-1] for p in prompts], pad_id))
    position = head + mask.sum(1)  # where each row's last prompt token sits
    step_ids = torch.as_tensor([[p[-1]] for p in prompts], device=device)
    active = torch.arange(n, device=device)  # rows still decoding, as indices into `prompts`
    out: list[list[int]] = [[] for _ in prompts]
    with attending_shared(model):
        cache = None
        if rest_ids.shape[1]:
            cache = model(
                input_ids=rest_ids,
                attention_mask=mask,
                position_ids=(head + torch.arange(rest_ids.shape[1], device=device)).expand(n, -1),
                use_cache=True,
                logits_to_keep=1,
                shared_kv=kv,
            ).past_key_values
        while len(active):
            one = torch.ones((len(active), 1), dtype=torch.long, device=device)
            mask = torch.cat([mask, one], dim=1)
            step = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
                use_cache=True,
                shared_kv=kv,
            )
            cache, chosen = step.past_key_values, step.logits[:, -1].argmax(-1)
            keep = []
            for k, (row, token) in enumerate(zip(active.tolist(), chosen.tolist(), strict=True)):
                if token in ends:
                    continue
                out[row].append(token)
                if len(out[row]) < budgets[row]:
                    keep.append(k)
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.as_tensor(keep, device=device)
                cache.batch_select_indices(index)
                active, mask, position, chosen = (
                    active[index],
                    mask[index],
                    position[index],
                    chosen[index],
                )
            step_ids = chosen[:, None]
            position = position + 1
    return out
