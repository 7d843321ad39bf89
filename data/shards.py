"""From a recipe to each client's private shard: load, partition, hold out, tokenize.

Every step is deterministic for the recipe's seed, so a client (in simulation or on its own
SuperNode) rebuilds exactly its own partition without anything being sent to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.data import load_examples, partition, split_held_out, tokenize_all
from fedllm.data.canary import Canary, canary_examples, make_canaries
from fedllm.model.loading import LastValueCache
from fedllm.recipe import RunConfig

ALL_EXAMPLES = LastValueCache()  # the federation's examples, parsed once per process


@dataclass(frozen=True)
class Shard:
    """One client's private data: tokenized train and held-out examples, plus raw counts."""

    partition_id: int
    train: list[dict]
    held_out: list[dict]
    labels: tuple[str, ...]
    canaries: tuple[Canary, ...] = ()


@dataclass(frozen=True)
class RawShard:
    """One client's untokenized examples; inserted canary copies come last in `train`."""

    partition_id: int
    train: list[dict]
    held_out: list[dict]
    labels: tuple[str, ...]
    canaries: tuple[Canary, ...] = ()


def source_options(cfg: RunConfig) -> dict:
    """The loader options that apply to the recipe's data source."""
    data = cfg.data
    if data.source == "wordnet":
        return {"pos": tuple(data.pos)}
    if data.source == "fortunes":
        return {}
    return {
        "prompt_field": data.prompt_field,
        "response_field": data.response_field,
        "label_field": data.label_field,
    }


def load_all_examples(cfg: RunConfig) -> list[dict]:
    """Every example of the federation (each client keeps only its partition of these).

    Parsed once per process (WordNet takes seconds), like the base model.
    """
    options = source_options(cfg)
    key = (cfg.data.source, cfg.data.max_examples, cfg.seed, tuple(sorted(options.items())))
    return ALL_EXAMPLES.get(
        key,
        lambda: load_examples(
            cfg.data.source, max_examples=cfg.data.max_examples, seed=cfg.seed, **options
        ),
    )


def partition_indices(cfg: RunConfig, examples: list[dict]) -> list[list[int]]:
    return partition(
        examples,
        num_clients=cfg.data.num_clients,
        method=cfg.data.partitioner,
        alpha=cfg.data.dirichlet_alpha,
        seed=cfg.seed,
    )


def raw_shard(cfg: RunConfig, partition_id: int) -> RawShard:
    """Client `partition_id`'s examples (train = members, held_out = non-members) + canaries."""
    examples = load_all_examples(cfg)
    parts = partition_indices(cfg, examples)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} outside [0, {len(parts)})")
    train_idx, held_idx = split_held_out(
        parts[partition_id], fraction=cfg.data.held_out, seed=cfg.seed + partition_id
    )
    if not train_idx:
        raise ValueError(
            f"client {partition_id} has no training examples (data.source={cfg.data.source!r}, "
            f"{len(parts[partition_id])} examples in its partition)"
        )
    canaries: list[Canary] = []
    if cfg.data.canaries is not None:
        c = cfg.data.canaries
        canaries = make_canaries(
            client=partition_id,
            clients=c.clients,
            prefix=c.prefix,
            digits=c.digits,
            repeats=c.repeats,
            per_repeat=c.per_repeat,
            seed=cfg.seed,
        )
    return RawShard(
        partition_id=partition_id,
        train=[examples[i] for i in train_idx] + canary_examples(canaries),
        held_out=[examples[i] for i in held_idx],
        labels=tuple(sorted({examples[i]["label"] for i in parts[partition_id]})),
        canaries=tuple(canaries),
    )


def load_shard(cfg: RunConfig, partition_id: int, tokenizer) -> Shard:
    """Client `partition_id`'s shard, tokenized with the base model's tokenizer."""
    raw = raw_shard(cfg, partition_id)
    fmt = {"prompt_format": cfg.data.prompt_format, "max_length": cfg.data.max_length}
    return Shard(
        partition_id=partition_id,
        train=tokenize_all(raw.train, tokenizer, **fmt),
        held_out=tokenize_all(raw.held_out, tokenizer, **fmt),
        labels=raw.labels,
        canaries=raw.canaries,
    )
