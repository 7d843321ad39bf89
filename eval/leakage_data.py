"""A client's leakage inputs, built and tokenized once for every view: members matched to
non-members on domain and length (without examples that have no scored token), the subsets
extraction decodes from, its canaries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedllm.data import tokenize_all
from fedllm.data.canary import is_canary
from fedllm.data.chat import trained_text
from fedllm.data.shards import RawShard
from fedllm.eval.leakage import CanarySet, canary_set
from fedllm.eval.membership import drop_unscored, matched_sample, subsample
from fedllm.eval.settings import EvalSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fedllm.recipe import RunConfig


@dataclass(frozen=True)
class ClientData:
    """One client's leakage inputs, tokenized once for every view."""

    pid: int
    items: dict[str, list[dict]]  # "members" (matched to the non-members), "non_members"
    texts: dict[str, list[str]]  # their trained text, every assistant turn (for the zlib score)
    ids: dict[str, list[str]]  # their example ids (runs on the same examples compare paired)
    sets: list[int]  # per member: its non-member's index in items["non_members"] (matched set)
    extract: dict[str, list[dict]]  # the subsets extraction decodes from
    canaries: CanarySet | None
    sample: dict  # what was drawn and how well it matches (for the report)


def prepare_client(
    cfg: RunConfig, settings: EvalSettings, *, shard: RawShard, tokenizer: PreTrainedTokenizerBase
) -> ClientData:
    """Matched members/non-members, extraction subsets and canary items of one client."""
    fmt = {"prompt_format": cfg.data.prompt_format, "max_length": cfg.data.max_length}
    pid = shard.partition_id
    pool = [e for e in shard.train if not is_canary(e)]
    held = shard.held_out
    chosen = subsample(range(len(held)), limit=settings.mia_non_members, seed=pid)
    non = [held[j] for j in chosen]
    pool_items = tokenize_all(pool, tokenizer, **fmt)
    non_items = tokenize_all(non, tokenizer, **fmt)
    pool_tokens = [_scored_tokens(x) for x in pool_items]
    non_tokens = [_scored_tokens(x) for x in non_items]
    match = matched_sample(
        [str(e.get("label", "")) for e in pool],
        pool_tokens,
        non_member_domains=[str(e.get("label", "")) for e in non],
        non_member_lengths=non_tokens,
        per_non_member=settings.mia_members_per_non_member,
        seed=cfg.seed + pid,
    )
    # an example with no scored token would have NaN scores: left out, and counted
    match = drop_unscored(match, member_tokens=pool_tokens, non_member_tokens=non_tokens)
    m_items = [pool_items[i] for i in match.members]
    n_items = [non_items[j] for j in match.non_members]
    canaries = None
    if shard.canaries and cfg.data.canaries is not None:
        canaries = canary_set(
            shard.canaries,
            tokenizer=tokenizer,
            prompt_format=cfg.data.prompt_format,
            digits=cfg.data.canaries.digits,
            references=settings.references or cfg.data.canaries.references,
            seed=cfg.seed,
        )
    limit = settings.max_examples
    return ClientData(
        pid=pid,
        items={"members": m_items, "non_members": n_items},
        texts={
            "members": [trained_text(pool[i]) for i in match.members],
            "non_members": [trained_text(non[j]) for j in match.non_members],
        },
        ids={
            "members": [str(pool[i].get("id", "")) for i in match.members],
            "non_members": [str(non[j].get("id", "")) for j in match.non_members],
        },
        sets=match.sets,
        extract={
            part: [its[i] for i in subsample(range(len(its)), limit=limit, seed=pid)]
            for part, its in (("members", m_items), ("non_members", n_items))
        },
        canaries=canaries,
        sample={
            "held_out": len(held),
            "training": len(pool),
            "members": len(m_items),
            "non_members": len(n_items),
            "dropped_non_members": match.dropped,
            "unscored_non_members": match.unscored_non_members,
            "unscored_members": match.unscored_members,
            "member_tokens_mean": _mean([_scored_tokens(x) for x in m_items]),
            "non_member_tokens_mean": _mean([_scored_tokens(x) for x in n_items]),
        },
    )


def _scored_tokens(item: dict) -> int:
    return sum(t != -100 for t in item["labels"])


def _mean(values: list[int]) -> float:
    return float(np.mean(values)) if values else float("nan")
