"""fedllm.data.canary and its recipe section: deterministic secrets, k copies in the chosen
clients' train shards only, held-out untouched, bad input named by its dotted key."""

import pytest

from fedllm.data.canary import canary_examples, is_canary, make_canaries, reference_secrets
from fedllm.data.shards import raw_shard
from fedllm.recipe import ConfigError, build_config

RECIPE = {
    "data": {
        "source": "wordnet",
        "pos": ["noun"],
        "max_examples": 120,
        "num_clients": 3,
        "canaries": {"repeats": [1, 4], "per_repeat": 2, "clients": [1], "digits": 6},
    },
}


def test_canaries_are_deterministic_and_distinct() -> None:
    kw = {"clients": [0], "prefix": "Code of {name}?", "digits": 9, "repeats": [1, 16]}
    a = make_canaries(client=0, seed=0, **kw)
    assert a == make_canaries(client=0, seed=0, **kw)
    assert a != make_canaries(client=0, seed=1, **kw)
    assert make_canaries(client=1, seed=0, **kw) == []
    assert [c.repeats for c in a] == [1, 16]
    assert all(len(c.secret) == 9 and c.secret.isdigit() for c in a)
    assert a[0].prompt == "Code of account 0-1-0?" and a[0].prompt != a[1].prompt
    copies = canary_examples(a)
    assert len(copies) == 17 and all(is_canary(e) for e in copies)
    assert copies[-1] == {
        "prompt": a[1].prompt,
        "response": a[1].secret,
        "label": "canary",
        "id": "canary:0:16:0",
    }


def test_reference_secrets_exclude_the_canary() -> None:
    (c,) = make_canaries(client=0, clients=[0], prefix="p", digits=1, repeats=[1])
    refs = reference_secrets(c, n=50, digits=1)
    assert len(refs) == 50 and c.secret not in refs and set(refs) <= set("0123456789")


def test_shards_get_k_copies_in_chosen_clients_only() -> None:
    with_c = build_config(RECIPE)
    without = build_config({"data": {**RECIPE["data"], "canaries": None}})
    for pid in range(3):
        a, b = raw_shard(with_c, pid), raw_shard(without, pid)
        assert a.held_out == b.held_out
        assert [e for e in a.train if not is_canary(e)] == b.train
        inserted = [e for e in a.train if is_canary(e)]
        assert len(inserted) == (2 * (1 + 4) if pid == 1 else 0)
        assert a.train[len(b.train) :] == inserted  # copies come last
    assert len(raw_shard(with_c, 1).canaries) == 4


def test_bad_canary_config_is_named() -> None:
    data = RECIPE["data"]
    with pytest.raises(ConfigError, match=r"data.canaries.clients \[5\] must be partition ids"):
        build_config({"data": {**data, "canaries": {"clients": [5]}}})
    with pytest.raises(ConfigError, match=r"data\.canaries\.repeats"):
        build_config({"data": {**data, "canaries": {"repeats": [0]}}})
    with pytest.raises(ConfigError, match=r"data\.canaries\.digit"):
        build_config({"data": {**data, "canaries": {"digit": 9}}})
