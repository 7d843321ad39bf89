"""From a recipe to each client's private shard: load, hold out the test set, partition, tokenize.

Every step is deterministic for the data seed (`data.seed`, else the run's), so a client (in
simulation or on its own SuperNode) rebuilds exactly its own partition with nothing sent to it. A
`ProcessCache` keeps what one process computes for every client it serves: the parsed examples and
the recipe's split (global test set, every client's indices) once, each client's tokenized shard
once, and the loaded base model (and a pruned base) across messages. It is passed explicitly, from
the app that owns it down to the code that reads it; nothing is cached at module level.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

from fedllm.data import load_examples, partition, split_held_out, tokenize_all
from fedllm.data.canary import Canary, canary_examples, make_canaries
from fedllm.data.partition import hold_out_test
from fedllm.model.loading import LastValueCache
from fedllm.recipe import RunConfig


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


@dataclass(frozen=True)
class Split:
    """A recipe's examples cut into the global test set and each client's example indices."""

    examples: list[dict]
    test: list[int]
    parts: list[list[int]]


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


def load_all_examples(cfg: RunConfig, *, cache: ProcessCache | None = None) -> list[dict]:
    """Every example of the federation (each client keeps only its partition of these), parsed
    once per `cache` (afresh without one)."""
    options = source_options(cfg)
    key = (cfg.data.source, cfg.data.max_examples, cfg.data_seed, tuple(sorted(options.items())))

    def parse() -> list[dict]:
        return load_examples(
            cfg.data.source, max_examples=cfg.data.max_examples, seed=cfg.data_seed, **options
        )

    return cache.examples.get(key, parse) if cache is not None else parse()


def data_key(cfg: RunConfig) -> Hashable:
    """What a split and a shard depend on: the seed and the whole data section."""
    return (cfg.data_seed, cfg.data.model_dump_json())


def split_examples(cfg: RunConfig, examples: list[dict]) -> Split:
    """The recipe's global test set (if any) drawn first, then the rest partitioned over clients."""
    test, pool = [], list(range(len(examples)))
    if (t := cfg.data.test_set) is not None:
        try:
            test, pool = hold_out_test(
                examples,
                fraction=t.fraction,
                labels=t.labels,
                max_examples=t.max_examples,
                seed=cfg.data_seed,
            )
        except ValueError as err:
            raise ValueError(f"data.test_set: {err}") from None
    parts = partition(
        examples if not test else [examples[i] for i in pool],
        num_clients=cfg.data.num_clients,
        method=cfg.data.partitioner,
        alpha=cfg.data.dirichlet_alpha,
        seed=cfg.data_seed,
    )
    if test:  # back to indices into `examples`
        parts = [[pool[j] for j in part] for part in parts]
    return Split(examples, test, parts)


def partition_indices(cfg: RunConfig, examples: list[dict]) -> list[list[int]]:
    """Each client's example indices (the global test set, if any, left out)."""
    return split_examples(cfg, examples).parts


class ProcessCache:
    """What one process keeps across the messages it serves: the parsed examples, the recipe's
    split and each tokenized shard once; the most recent base model and pruned base.

    Its owner hands it down: the ClientApp (`make_client_app`) to its rounds, the server's `Run`
    to its evaluator. Up to `max_examples` tokenized examples are kept, least recently used first
    out; `base` and `pruned` hold one model each (a new key frees the old one before it loads).
    A process that needs no reuse passes none and builds afresh. Flower's simulation
    engine pickles the ClientApp into every message it runs, so a pickled cache travels as a
    handle: unpickled in a worker it is that worker's own cache of the same handle, kept across
    messages (the latest few handles per process).
    """

    _attached: ClassVar[OrderedDict[str, ProcessCache]] = OrderedDict()
    _attached_lock: ClassVar[threading.Lock] = threading.Lock()
    MAX_ATTACHED: ClassVar[int] = 4

    def __init__(self, *, max_examples: int = 50_000) -> None:
        self.token = uuid.uuid4().hex
        self.max_examples = max_examples
        self.splits = 0  # how often this cache split a recipe's data (for tests and benches)
        self.tokenized = 0  # how many shards it tokenized
        self._lock = threading.RLock()
        self._split: tuple[Hashable, Split] | None = None
        self._shards: OrderedDict[Hashable, tuple[Any, Shard]] = OrderedDict()
        self._held = 0  # tokenized examples kept
        self.examples = LastValueCache()  # the federation's parsed examples
        self.base = LastValueCache()  # (model, tokenizer): fedllm.model.base.cached_base_model
        self.pruned = LastValueCache()  # a pruned base: fedllm.constrained.pruned.pruned_base

    def split(self, cfg: RunConfig) -> Split:
        """The recipe's split, computed on first use (a new recipe replaces the old one)."""
        key = data_key(cfg)
        with self._lock:
            if self._split is None or self._split[0] != key:
                self._split = None
                self._split = (key, split_examples(cfg, load_all_examples(cfg, cache=self)))
                self.splits += 1
            return self._split[1]

    def shard(self, cfg: RunConfig, partition_id: int, *, tokenizer: Any) -> Shard:
        """Client `partition_id`'s tokenized shard, tokenized once per tokenizer."""
        key = (data_key(cfg), partition_id)
        with self._lock:
            hit = self._shards.get(key)
            if hit is not None and hit[0] is tokenizer:
                self._shards.move_to_end(key)
                return hit[1]
        shard = tokenize_shard(cfg, raw_shard(cfg, partition_id, cache=self), tokenizer=tokenizer)
        with self._lock:
            self.tokenized += 1
            if (old := self._shards.pop(key, None)) is not None:
                self._held -= _size(old[1])
            self._shards[key] = (tokenizer, shard)
            self._held += _size(shard)
            while self._held > self.max_examples and len(self._shards) > 1:
                _, (_, dropped) = self._shards.popitem(last=False)
                self._held -= _size(dropped)
        return shard

    def __reduce__(self) -> tuple:
        with ProcessCache._attached_lock:
            ProcessCache._remember(self)
        return (ProcessCache.attach, (self.token, self.max_examples))

    @classmethod
    def attach(cls, token: str, max_examples: int) -> ProcessCache:
        """This process's cache for `token` (a new one the first time the handle arrives)."""
        with cls._attached_lock:
            cache = cls._attached.get(token)
            if cache is None:
                cache = cls(max_examples=max_examples)
                cache.token = token
            cls._remember(cache)
            return cache

    @classmethod
    def _remember(cls, cache: ProcessCache) -> None:
        cls._attached[cache.token] = cache
        cls._attached.move_to_end(cache.token)
        while len(cls._attached) > cls.MAX_ATTACHED:
            cls._attached.popitem(last=False)


def _size(shard: Shard) -> int:
    return len(shard.train) + len(shard.held_out)


def raw_shard(cfg: RunConfig, partition_id: int, *, cache: ProcessCache | None = None) -> RawShard:
    """Client `partition_id`'s examples (train = members, held_out = non-members) + canaries.

    Built from the client's own indices of the split `cache` keeps (a fresh split without one).
    """
    split = (cache if cache is not None else ProcessCache()).split(cfg)
    examples, parts = split.examples, split.parts
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} outside [0, {len(parts)})")
    train_idx, held_idx = split_held_out(
        parts[partition_id], fraction=cfg.data.held_out, seed=cfg.data_seed + partition_id
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
            seed=cfg.data_seed,
        )
    return RawShard(
        partition_id=partition_id,
        train=[examples[i] for i in train_idx] + canary_examples(canaries),
        held_out=[examples[i] for i in held_idx],
        labels=tuple(sorted({examples[i]["label"] for i in parts[partition_id]})),
        canaries=tuple(canaries),
    )


def tokenize_shard(cfg: RunConfig, raw: RawShard, *, tokenizer: Any) -> Shard:
    """`raw` tokenized with the base model's tokenizer and the recipe's format."""
    fmt = {"prompt_format": cfg.data.prompt_format, "max_length": cfg.data.max_length}
    return Shard(
        partition_id=raw.partition_id,
        train=tokenize_all(raw.train, tokenizer, **fmt),
        held_out=tokenize_all(raw.held_out, tokenizer, **fmt),
        labels=raw.labels,
        canaries=raw.canaries,
    )


def load_shard(
    cfg: RunConfig, partition_id: int, *, tokenizer: Any, cache: ProcessCache | None = None
) -> Shard:
    """Client `partition_id`'s shard, tokenized with the base model's tokenizer (kept by
    `cache` for the next message of this process; built afresh without one)."""
    return (cache if cache is not None else ProcessCache()).shard(
        cfg, partition_id, tokenizer=tokenizer
    )


def global_test_set(cfg: RunConfig, *, cache: ProcessCache | None = None) -> list[dict]:
    """The recipe's global test set (`data.test_set`), untokenized; empty without one."""
    split = (cache if cache is not None else ProcessCache()).split(cfg)
    return [split.examples[i] for i in split.test]
