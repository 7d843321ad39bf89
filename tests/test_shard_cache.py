"""fedllm.data.shards.ProcessCache and the global test split: the partition computed once per
process, each shard tokenized once, shards equal to the ones built from the partition by hand,
and a test set no client holds."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import pytest

from fedllm.data import load_examples, partition, split_held_out, tokenize_all
from fedllm.data import shards as shards_module
from fedllm.data.partition import hold_out_test
from fedllm.data.shards import ProcessCache, global_test_set, load_shard, raw_shard
from fedllm.model.base import cached_base_model
from fedllm.recipe import build_config, load_recipe

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
DATA = {"source": "wordnet", "pos": ["noun"], "max_examples": 300, "num_clients": 5}


def recipe(**data):
    return build_config({"seed": 3, "data": {**DATA, "partitioner": "dirichlet", **data}})


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """Count the real partitioner's and tokenizer's calls made through the shards module."""
    calls = {"partition": 0, "tokenize": 0}

    def counting_partition(*args, **kwargs):
        calls["partition"] += 1
        return partition(*args, **kwargs)

    def counting_tokenize(*args, **kwargs):
        calls["tokenize"] += 1
        return tokenize_all(*args, **kwargs)

    monkeypatch.setattr(shards_module, "partition", counting_partition)
    monkeypatch.setattr(shards_module, "tokenize_all", counting_tokenize)
    return calls


@functools.cache
def nouns(seed: int) -> list[dict]:
    return load_examples("wordnet", max_examples=300, seed=seed, pos=("noun",))


def by_hand(cfg, pid: int) -> tuple[list[dict], list[dict]]:
    """Client `pid`'s (train, held_out) as the code before the cache built them."""
    examples = nouns(cfg.seed)
    parts = partition(
        examples,
        num_clients=5,
        method=cfg.data.partitioner,
        alpha=cfg.data.dirichlet_alpha,
        seed=cfg.seed,
    )
    train, held = split_held_out(parts[pid], fraction=cfg.data.held_out, seed=cfg.seed + pid)
    return [examples[i] for i in train], [examples[i] for i in held]


def test_the_partition_is_built_once_and_shards_are_unchanged(counted) -> None:
    cfg, cache = recipe(), ProcessCache()
    for pid in [0, 1, 2, 3, 4, 2, 0]:
        shard = raw_shard(cfg, pid, cache=cache)
        assert (shard.train, shard.held_out) == by_hand(cfg, pid)
    assert counted["partition"] == 1 and cache.splits == 1
    raw_shard(cfg, 0)  # without a cache: built afresh
    assert counted["partition"] == 2
    raw_shard(recipe(num_clients=4), 0, cache=cache)  # another recipe replaces the split
    assert cache.splits == 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path_factory.mktemp('tok')}"])
    return cached_base_model(cfg)[1]


def test_each_shard_is_tokenized_once_per_tokenizer(counted, tokenizer) -> None:
    cfg, cache = recipe(), ProcessCache()
    first = load_shard(cfg, 1, tokenizer=tokenizer, cache=cache)
    assert load_shard(cfg, 1, tokenizer=tokenizer, cache=cache) is first
    assert counted["tokenize"] == 2 and cache.tokenized == 1  # its train and held-out lists
    train, held = by_hand(cfg, 1)
    fmt = {"prompt_format": cfg.data.prompt_format, "max_length": cfg.data.max_length}
    assert first.train == tokenize_all(train, tokenizer, **fmt)
    assert first.held_out == tokenize_all(held, tokenizer, **fmt)
    load_shard(cfg, 2, tokenizer=tokenizer, cache=cache)
    assert cache.tokenized == 2 and counted["partition"] == 1


def test_the_cache_keeps_at_most_max_examples(tokenizer) -> None:
    cfg = recipe(partitioner="iid")  # 60 examples per client
    cache = ProcessCache(max_examples=130)
    shards = [load_shard(cfg, pid, tokenizer=tokenizer, cache=cache) for pid in range(3)]
    assert load_shard(cfg, 2, tokenizer=tokenizer, cache=cache) is shards[2]
    assert load_shard(cfg, 1, tokenizer=tokenizer, cache=cache) is shards[1]
    assert cache.tokenized == 3
    assert (
        load_shard(cfg, 0, tokenizer=tokenizer, cache=cache) is not shards[0]
    )  # the oldest went out
    assert cache.tokenized == 4


def test_a_pickled_cache_comes_back_as_this_process_cache() -> None:
    """Flower's simulation pickles the ClientApp into every message: its cache must survive."""
    cache = ProcessCache()
    cache.split(recipe())
    again = pickle.loads(pickle.dumps(cache))
    assert again is cache and again.splits == 1
    sent = pickle.dumps(cache)
    ProcessCache._attached.pop(cache.token)  # as a worker process that never saw it
    fresh = pickle.loads(sent)
    assert fresh is not cache and fresh.token == cache.token and fresh.splits == 0
    assert pickle.loads(sent) is fresh  # the next message in that worker


def test_the_test_set_is_drawn_from_every_label_and_held_by_no_client() -> None:
    cfg = recipe(partitioner="domain", test_set={"fraction": 0.1, "labels": ["noun.plant"]})
    cache = ProcessCache()
    split = cache.split(cfg)
    labels = {e["label"] for e in split.examples}
    test = global_test_set(cfg, cache=cache)
    assert {e["label"] for e in test} >= {
        label for label in labels if sum(e["label"] == label for e in split.examples) >= 2
    }
    plants = [i for i, e in enumerate(split.examples) if e["label"] == "noun.plant"]
    assert set(plants) <= set(split.test)
    held = {i for part in split.parts for i in part}
    assert not held & set(split.test)
    assert held | set(split.test) == set(range(len(split.examples)))
    for pid in range(5):
        assert "noun.plant" not in raw_shard(cfg, pid, cache=cache).labels


def test_hold_out_test_counts_by_hand() -> None:
    examples = (
        [{"label": "a"}] * 10 + [{"label": "b"}] * 4 + [{"label": "c"}] + [{"label": "d"}] * 3
    )
    test, rest = hold_out_test(examples, fraction=0.25, labels=["d"], seed=1)
    # a: round(2.5) = 3, b: 1, c: a single example stays with the clients, d: all 3
    picked = [examples[i]["label"] for i in test]
    assert sorted(picked) == ["a", "a", "a", "b", "d", "d", "d"]
    assert sorted(test + rest) == list(range(18)) and 14 in rest
    assert (test, rest) == hold_out_test(examples, fraction=0.25, labels=["d"], seed=1)
    capped, rest = hold_out_test(examples, fraction=0.25, labels=["d"], max_examples=4, seed=1)
    assert len(capped) == 4 and len(rest) == 18 - 3 - len([i for i in capped if i < 15])
    assert not {15, 16, 17} & set(rest)  # a held-out domain never goes back to the clients
    with pytest.raises(ValueError, match=r"\['x'\] are not in the data"):
        hold_out_test(examples, fraction=0.1, labels=["x"])


def test_an_unknown_test_label_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"data\.test_set: label\(s\) \['noun\.nothing'\]"):
        raw_shard(recipe(test_set={"labels": ["noun.nothing"]}), 0)
