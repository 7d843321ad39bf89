"""fedllm.eval.leakage_data: a client's MIA sample leaves out examples with no scored token
(their scores would be NaN and stop the attack), keeping its matched sets whole."""

import numpy as np
import pytest

from fedllm.data.shards import RawShard
from fedllm.eval import leakage_data
from fedllm.eval.leakage_data import prepare_client
from fedllm.eval.mia import membership_scores, run_attacks
from fedllm.eval.scoring import Scored
from fedllm.eval.settings import EvalSettings
from fedllm.recipe import build_config


def fake_tokenize(examples, tokenizer, *, prompt_format, max_length):
    """Two prompt tokens, then one scored token per response word (none for an empty one)."""
    out = []
    for e in examples:
        n = len(e["response"].split())
        out.append({"input_ids": [1] * (2 + n), "labels": [-100] * 2 + [5] * n})
    return out


def example(ident: str, label: str, words: int) -> dict:
    return {"prompt": "p", "response": " ".join(["w"] * words), "label": label, "id": ident}


def test_unscored_examples_are_left_out_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """One domain per non-member, two members each, so the matching is forced: n0 (3 tokens)
    gets t0 (3) and t1 (0), n1 (0) gets t2 (0) and t3 (1), n2 (5) gets t4 (5) and t5 (6). n1
    goes with its set; t1 goes alone. The attack then runs on finite scores."""
    monkeypatch.setattr(leakage_data, "tokenize_all", fake_tokenize)
    train = [
        example("t0", "a", 3),
        example("t1", "a", 0),
        example("t2", "b", 0),
        example("t3", "b", 1),
        example("t4", "c", 5),
        example("t5", "c", 6),
    ]
    held = [example("n0", "a", 3), example("n1", "b", 0), example("n2", "c", 5)]
    shard = RawShard(partition_id=0, train=train, held_out=held, labels=("a", "b", "c"))
    cfg = build_config({"name": "x", "model": {"name": "tiny"}, "data": {"source": "wordnet"}})
    d = prepare_client(cfg, EvalSettings(), shard=shard, tokenizer=None)
    assert d.ids == {"members": ["t0", "t4", "t5"], "non_members": ["n0", "n2"]}
    assert d.sets == [0, 1, 1]
    assert d.sample["members"] == 3 and d.sample["non_members"] == 2
    assert d.sample["unscored_non_members"] == 1 and d.sample["unscored_members"] == 1
    assert d.sample["dropped_non_members"] == 0
    assert d.sample["member_tokens_mean"] == pytest.approx((3 + 5 + 6) / 3)

    def scored(items: list[dict]) -> list[Scored]:
        lengths = [sum(t != -100 for t in x["labels"]) for x in items]
        return [Scored(np.arange(n), -np.linspace(1.0, 2.0, n)) for n in lengths]

    sm, sn = (
        membership_scores(scored(d.items[part]), texts=d.texts[part])
        for part in ("members", "non_members")
    )
    attacks = run_attacks(sm, sn, resamples=20, member_sets=d.sets)
    assert attacks["loss"]["members"] == 3 and attacks["loss"]["non_members"] == 2
    assert np.isfinite(attacks["zlib"]["auc"])
