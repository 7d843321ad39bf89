"""Verbatim extraction: greedy-decode a suffix from a prefix of an example and compare.

The prefix is the prompt plus the first `prefix_tokens` response tokens; the target is the next
(up to) `suffix_tokens` response tokens. Reported: the rate of exact suffix matches and the mean
token-level ROUGE-L, for training examples (members) and, as the baseline of what the task alone
explains, for held-out examples. Decoding shares the prompts' common head (fedllm.eval.decode)
and stops each row at its own suffix length.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from fedllm.eval.decode import greedy_decode
from fedllm.eval.text import rouge_l_tokens


def split_prefix_suffix(
    item: dict, *, prefix_tokens: int, suffix_tokens: int, end_ids: Sequence[int] = ()
) -> tuple[list[int], list[int]] | None:
    """(prefix ids, true suffix ids up to an end token), or None when there is no suffix."""
    labels = item["labels"]
    first = next((i for i, t in enumerate(labels) if t != -100), None)
    if first is None:
        return None
    cut = first + prefix_tokens
    suffix = []
    for t in item["input_ids"][cut : cut + suffix_tokens]:
        if t in end_ids:
            break
        suffix.append(t)
    if not suffix:
        return None
    return list(item["input_ids"][:cut]), suffix


def extraction_rates(
    model: torch.nn.Module,
    items: Sequence[dict],
    *,
    prefix_tokens: int,
    suffix_tokens: int,
    pad_id: int,
    end_ids: Sequence[int],
    batch_size: int,
) -> dict:
    """Exact-suffix rate and mean ROUGE-L of greedy continuations over `items`."""
    return grouped_extraction_rates(
        model,
        {"all": items},
        prefix_tokens=prefix_tokens,
        suffix_tokens=suffix_tokens,
        pad_id=pad_id,
        end_ids=end_ids,
        batch_size=batch_size,
    )["all"]


def grouped_extraction_rates(
    model: torch.nn.Module,
    groups: dict[Hashable, Sequence[dict]],
    *,
    prefix_tokens: int,
    suffix_tokens: int,
    pad_id: int,
    end_ids: Sequence[int],
    batch_size: int,
) -> dict[Hashable, dict]:
    """`extraction_rates` of each group, decoded together (full batches across groups)."""
    cut = {"prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens, "end_ids": end_ids}
    pairs = [
        (key, p)
        for key, items in groups.items()
        for p in (split_prefix_suffix(x, **cut) for x in items)
        if p is not None
    ]
    generated = greedy_decode(
        model,
        [prefix for _, (prefix, _) in pairs],
        max_new_tokens=[len(suffix) for _, (_, suffix) in pairs],
        pad_id=pad_id,
        eos_ids=end_ids,
        batch_size=batch_size,
    )
    exact: dict[Hashable, list[float]] = {key: [] for key in groups}
    rouge: dict[Hashable, list[float]] = {key: [] for key in groups}
    for (key, (_, suffix)), out in zip(pairs, generated, strict=True):
        out = out[: len(suffix)]
        exact[key].append(float(out == suffix))
        rouge[key].append(rouge_l_tokens(out, suffix))
    return {
        key: {
            "examples": len(exact[key]),
            "exact": sum(exact[key]) / len(exact[key]) if exact[key] else float("nan"),
            "rouge_l": sum(rouge[key]) / len(rouge[key]) if rouge[key] else float("nan"),
        }
        for key in groups
    }
