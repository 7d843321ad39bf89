"""fedllm.eval.scoring: batched scores equal one-at-a-time scores and the model's own loss."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm.data import collate, load_wordnet, tokenize_all
from fedllm.eval.scoring import nll_and_tokens, score_examples
from fedllm.model.loading import build_tiny_model, load_base_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    examples = load_wordnet(pos=("verb",), max_examples=40, seed=1)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    folder = build_tiny_model(tmp_path_factory.mktemp("sc") / "m", texts=texts, vocab_size=320)
    model, tok = load_base_model(Path(folder))
    model.eval()
    return model, tok, tokenize_all(examples[:12], tok, prompt_format="chat", max_length=40)


def test_batched_equals_one_at_a_time(setup) -> None:
    model, tok, items = setup
    batched = score_examples(model, items, batch_size=5, pad_id=tok.pad_token_id, vocab_stats=True)
    single = score_examples(model, items, batch_size=1, pad_id=tok.pad_token_id, vocab_stats=True)
    for b, s, item in zip(batched, single, items, strict=True):
        assert b.token_ids.tolist() == [t for t in item["labels"] if t != -100]
        np.testing.assert_allclose(b.logprobs, s.logprobs, atol=1e-5)
        np.testing.assert_allclose(b.mu, s.mu, atol=1e-5)
        np.testing.assert_allclose(b.sigma, s.sigma, atol=1e-5)
        assert (b.sigma > 0).all() and (b.mu < 0).all()


def test_sum_matches_the_model_loss(setup) -> None:
    model, tok, items = setup
    nll, tokens = nll_and_tokens(
        score_examples(model, items, batch_size=4, pad_id=tok.pad_token_id)
    )
    batch = collate(items, pad_id=tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()  # mean over all response tokens of the batch
    assert tokens == int((batch["labels"][:, 1:] != -100).sum())
    assert nll / tokens == pytest.approx(loss, rel=1e-4)
