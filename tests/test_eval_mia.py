"""fedllm.eval.mia: score definitions by hand, and a real attack on a tiny model that memorised
its members (AUC > 0.9) vs the same attack between two disjoint held-out sets (AUC near 0.5)."""

import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from fedllm.client.train import train_local
from fedllm.data import load_wordnet, tokenize_all
from fedllm.eval.mia import lowest_fraction_mean, membership_scores, run_attacks
from fedllm.eval.scoring import Scored, score_examples
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model

FMT = {"prompt_format": "plain", "max_length": 40}


def test_scores_by_hand() -> None:
    lp = np.log(np.array([0.5, 0.25, 0.125, 0.5, 0.5]))
    # per-token μ and σ differ: Min-K%++ standardises each token by its own
    mu, sigma = np.array([-1.0, -1.0, -3.0, -1.0, -1.0]), np.array([2.0, 2.0, 1.0, 2.0, 2.0])
    target = Scored(np.arange(5), lp, mu=mu, sigma=sigma)
    base = Scored(np.arange(5), np.log(np.full(5, 0.25)))
    s = membership_scores([target], texts=["hello hello hello"], base_nll=[base.mean_nll], k=0.2)
    nll = -lp.sum()
    assert s["loss"][0] == pytest.approx(nll / 5)
    # the mean NLL (log-perplexity) over zlib bytes, as MIMIR and Carlini et al. 2021
    assert s["zlib"][0] == pytest.approx(nll / 5 / len(zlib.compress(b"hello hello hello")))
    assert s["min_k"][0] == pytest.approx(math.log(8))  # the lowest 20% of 5 tokens: 1 token
    # standardised: (ln .5+1)/2, (ln .25+1)/2, ln .125+3, ... -> the lowest is (1 - ln 4)/2
    assert s["min_k_pp"][0] == pytest.approx((math.log(4) - 1.0) / 2.0)
    assert s["reference"][0] == pytest.approx(nll / 5 - math.log(4))
    assert lowest_fraction_mean(np.array([3.0, 1.0, 2.0, 5.0]), 0.5) == 1.5


def test_zlib_divides_the_mean_nll_so_length_does_not_rank() -> None:
    """The audit's pair: A has 10 tokens at mean NLL 2.0, B 40 at 1.5. Over the total NLL A would
    rank lower (more member-like); over the mean, as the literature defines it, B does."""
    a_text, b_text = "ab" * 3, "the cat sat on a mat " * 2
    a_bytes, b_bytes = len(zlib.compress(a_text.encode())), len(zlib.compress(b_text.encode()))
    a = Scored(np.arange(10), np.full(10, -2.0))
    b = Scored(np.arange(40), np.full(40, -1.5))
    got = membership_scores([a, b], texts=[a_text, b_text])["zlib"]
    assert got.tolist() == pytest.approx([2.0 / a_bytes, 1.5 / b_bytes])
    assert 20.0 / a_bytes < 60.0 / b_bytes and got[0] > got[1]  # the two definitions disagree


@pytest.fixture(scope="module")
def memorised(tmp_path_factory: pytest.TempPathFactory):
    examples = load_wordnet(pos=("noun",), max_examples=400, seed=3)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    folder = build_tiny_model(tmp_path_factory.mktemp("mia") / "m", texts=texts, vocab_size=400)
    model, tok = load_base_model(Path(folder))
    members, held_a, held_b = examples[:48], examples[48:96], examples[96:144]
    model.requires_grad_(True)  # full fine-tuning: a small model memorises quickly
    items = tokenize_all(members, tok, **FMT)
    train_local(model, items, steps=40, batch_size=16, pad_id=tok.pad_token_id, lr=6e-3)
    model.eval()
    return model, tok, members, held_a, held_b


def scores(model, tok, examples):
    items = tokenize_all(examples, tok, **FMT)
    scored = score_examples(model, items, batch_size=16, pad_id=tok.pad_token_id, vocab_stats=True)
    return membership_scores(scored, texts=[e["response"] for e in examples])


def test_attack_separates_members_from_held_out(memorised) -> None:
    model, tok, members, held_a, _ = memorised
    result = run_attacks(scores(model, tok, members), scores(model, tok, held_a))
    assert result["loss"]["auc"] > 0.9
    assert result["min_k"]["auc"] > 0.9
    assert result["loss"]["tpr@fpr<0.01"]["enough_non_members"] is False  # only 48


def test_attack_between_two_held_out_sets_is_chance(memorised) -> None:
    model, tok, _, held_a, held_b = memorised
    result = run_attacks(scores(model, tok, held_a), scores(model, tok, held_b))
    for name in ("loss", "zlib", "min_k", "min_k_pp"):
        assert abs(result[name]["auc"] - 0.5) < 0.2, (name, result[name]["auc"])
