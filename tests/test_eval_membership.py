"""fedllm.eval.membership: members matched to non-members on domain and length, by hand and on a
recipe's real shards (same domain counts, near-equal lengths, no shared examples)."""

from collections import Counter

import pytest

from fedllm.data import tokenize_all
from fedllm.data.canary import is_canary
from fedllm.data.shards import raw_shard
from fedllm.eval.membership import MatchedSample, drop_unscored, matched_sample, subsample
from fedllm.model.base import prepare_base_model
from fedllm.model.loading import load_base_model
from fedllm.recipe import build_config


def test_matching_by_hand() -> None:
    # members: two nouns of length 5 and 9, one verb of length 4, one noun of length 30
    domains = ["noun", "noun", "verb", "noun"]
    lengths = [5, 9, 4, 30]

    def sample(non_domains: list[str], non_lengths: list[int], per: int) -> MatchedSample:
        return matched_sample(
            domains,
            lengths,
            non_member_domains=non_domains,
            non_member_lengths=non_lengths,
            per_non_member=per,
            seed=0,
        )

    # non-members: a noun of length 8 takes the 9 (nearest), a verb of length 20 the only verb
    s = sample(["noun", "verb"], [8, 20], 1)
    assert s.non_members == [0, 1] and s.members == [1, 2] and s.dropped == 0
    assert s.sets == [0, 1]  # each member's matched set: its non-member's place in non_members
    # two per non-member: the noun takes 9 and 5; the verb has one member only and is dropped
    s = sample(["noun", "verb"], [8, 20], 2)
    assert s.non_members == [0] and sorted(s.members) == [0, 1] and s.dropped == 1
    # the verb first: it is dropped, so the noun (non-member 1) is set 0 of the kept ones
    s = sample(["verb", "noun"], [20, 8], 2)
    assert s.non_members == [1] and s.sets == [0, 0]
    # an unknown domain is never matched across domains
    s = sample(["adj"], [5], 1)
    assert s.members == [] and s.non_members == [] and s.dropped == 1


def test_examples_without_a_scored_token_leave_with_their_set_or_alone() -> None:
    """Non-members 4, 7, 9 (sets 0, 1, 2) with members 0, 1 / 2, 3 / 4, 5. Non-member 7 has no
    scored token: its set goes whole (member 2's own zero is not counted). Member 1 has none:
    it goes alone and set 0 keeps member 0. The kept sets renumber 0, 1."""
    sample = MatchedSample(
        members=[0, 1, 2, 3, 4, 5], non_members=[4, 7, 9], dropped=1, sets=[0, 0, 1, 1, 2, 2]
    )
    member_tokens = [3, 0, 0, 5, 6, 2]
    non_member_tokens = {4: 3, 7: 0, 9: 4}
    got = drop_unscored(sample, member_tokens=member_tokens, non_member_tokens=non_member_tokens)
    assert got == MatchedSample(
        members=[0, 4, 5],
        non_members=[4, 9],
        dropped=1,
        sets=[0, 1, 1],
        unscored_members=1,
        unscored_non_members=1,
    )
    whole = drop_unscored(sample, member_tokens=[1] * 6, non_member_tokens={4: 1, 7: 1, 9: 1})
    assert whole == sample  # nothing to drop


def test_members_are_not_reused_and_ties_are_seeded() -> None:
    domains, lengths = ["a"] * 6, [10] * 6  # all equally near

    def sample(seed: int) -> MatchedSample:
        return matched_sample(
            domains,
            lengths,
            non_member_domains=["a"] * 3,
            non_member_lengths=[10] * 3,
            per_non_member=2,
            seed=seed,
        )

    picks = {tuple(sample(s).members) for s in range(5)}
    assert all(len(set(p)) == 6 for p in picks)  # 3 non-members x 2, never the same member twice
    assert len(picks) > 1  # the seed decides ties
    assert sample(4) == sample(4)
    with pytest.raises(ValueError, match="per_non_member"):
        matched_sample(
            domains,
            lengths,
            non_member_domains=["a"],
            non_member_lengths=[1],
            per_non_member=0,
            seed=0,
        )


def test_subsample_keeps_order_and_is_seeded() -> None:
    assert subsample([4, 5, 6], limit=None, seed=0) == [4, 5, 6]
    picked = subsample(list(range(100)), limit=10, seed=3)
    assert len(picked) == 10 and picked == sorted(picked)
    assert picked == subsample(list(range(100)), limit=10, seed=3)


def test_matched_sample_on_real_shards_has_the_non_members_domains_and_lengths() -> None:
    cfg = build_config(
        {
            "name": "m",
            "model": {"name": "tiny"},
            "data": {
                "source": "wordnet",
                "pos": ["noun", "verb"],
                "max_examples": 400,
                "num_clients": 2,
                "partitioner": "domain",
                "held_out": 0.2,
                "max_length": 48,
            },
        }
    )
    _, tok = load_base_model(prepare_base_model(cfg))
    for pid in range(2):
        shard = raw_shard(cfg, pid)
        pool = [e for e in shard.train if not is_canary(e)]
        fmt = {"prompt_format": "chat", "max_length": 48}
        length = [sum(t != -100 for t in x["labels"]) for x in tokenize_all(pool, tok, **fmt)]
        n_len = [
            sum(t != -100 for t in x["labels"]) for x in tokenize_all(shard.held_out, tok, **fmt)
        ]
        s = matched_sample(
            [e["label"] for e in pool],
            length,
            non_member_domains=[e["label"] for e in shard.held_out],
            non_member_lengths=n_len,
            per_non_member=2,
            seed=pid,
        )
        assert len(s.non_members) + s.dropped == len(shard.held_out)
        assert s.dropped <= 0.1 * len(shard.held_out)
        assert len(s.members) == 2 * len(s.non_members) == 2 * len(set(s.non_members))
        assert len(set(s.members)) == len(s.members)
        # every domain appears exactly twice as often among members as among non-members
        doms_m = Counter(pool[i]["label"] for i in s.members)
        doms_n = Counter(shard.held_out[j]["label"] for j in s.non_members)
        assert doms_m == Counter({d: 2 * c for d, c in doms_n.items()})
        pairs = [
            abs(length[i] - n_len[j])
            for n, j in enumerate(s.non_members)
            for i in s.members[2 * n : 2 * n + 2]
        ]
        # nearest length within the domain: most pairs within a token, far closer than chance
        assert sum(d <= 1 for d in pairs) >= 0.6 * len(pairs)
        chance = sum(abs(a - b) for a in length for b in n_len) / (len(length) * len(n_len))
        assert sum(pairs) / len(pairs) < chance / 2
        mean_m = sum(length[i] for i in s.members) / len(s.members)
        mean_n = sum(n_len[j] for j in s.non_members) / len(s.non_members)
        assert abs(mean_m - mean_n) < 0.5
        train_ids = {e["id"] for e in pool}
        assert not any(shard.held_out[j]["id"] in train_ids for j in s.non_members)
