"""fedllm.eval.leakage: exposures of canaries scored together (prompts shared) equal those of the
old path (each canary's 1 + n items scored in full on their own), and score_groups splits back."""

import math
from pathlib import Path

import numpy as np
import pytest

from fedllm.data import load_wordnet, tokenize_all
from fedllm.data.canary import make_canaries, reference_secrets
from fedllm.eval.exposure import exposure, log_perplexity_bits, secret_item
from fedllm.eval.leakage import canary_exposures, canary_set, score_groups
from fedllm.eval.scoring import score_examples
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    examples = load_wordnet(pos=("noun",), max_examples=60, seed=2)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    folder = build_tiny_model(tmp_path_factory.mktemp("lk") / "m", texts=texts, vocab_size=320)
    model, tok = load_base_model(Path(folder))
    model.eval()
    return model, tok, examples


def test_batched_canaries_equal_one_canary_at_a_time(tiny) -> None:
    model, tok, _ = tiny
    canaries = make_canaries(
        client=0,
        clients=[0],
        prefix="What is the secret number of {name}?",
        digits=5,
        repeats=[1, 4],
        per_repeat=2,
        seed=3,
    )
    cs = canary_set(canaries, tokenizer=tok, prompt_format="chat", digits=5, references=40, seed=3)
    assert len(cs.items) == 4 * 41
    rows = canary_exposures(model, cs, batch_size=8, pad_id=tok.pad_token_id)
    for canary, row in zip(canaries, rows, strict=True):
        secrets = [canary.secret, *reference_secrets(canary, n=40, digits=5, seed=3)]
        items = [secret_item(tok, canary.prompt, secret=s, prompt_format="chat") for s in secrets]
        old = score_examples(
            model, items, batch_size=8, pad_id=tok.pad_token_id, shared_prefix=False
        )
        px = [log_perplexity_bits(s.logprobs) for s in old]
        assert row["px_bits"] == pytest.approx(px[0], abs=1e-4)
        assert row["reference_px_median"] == pytest.approx(float(np.median(px[1:])), abs=1e-4)
        assert row["reference_px"] == pytest.approx(px[1:], abs=1e-3)  # kept for refits
        assert row["exposure"] == pytest.approx(exposure(px[0], px[1:]))
        assert row["max_rank_exposure"] == pytest.approx(math.log2(41))
        assert (row["client"], row["repeats"], row["index"]) == (
            canary.client,
            canary.repeats,
            canary.index,
        )


def test_score_groups_splits_back_in_order(tiny) -> None:
    model, tok, examples = tiny
    items = tokenize_all(examples[:9], tok, prompt_format="chat", max_length=40)
    groups = {(0, "a"): items[:4], (1, "a"): items[4:5], (1, "b"): items[5:]}
    out = score_groups(model, groups, batch_size=4, pad_id=tok.pad_token_id)
    alone = score_examples(model, items, batch_size=4, pad_id=tok.pad_token_id)
    flat = [s for key in groups for s in out[key]]
    assert [len(v) for v in out.values()] == [4, 1, 4]
    for a, b in zip(flat, alone, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
