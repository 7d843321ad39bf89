"""fedllm.eval.branches: continuations of one prompt scored level by level over their shared
prefixes give score_examples' numbers, in the order given, with fewer tokens run."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm.data import load_wordnet
from fedllm.eval.branches import score_continuations
from fedllm.eval.scoring import score_examples
from fedllm.model.loading import build_tiny_model, load_base_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    examples = load_wordnet(pos=("noun",), max_examples=60, seed=2)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    folder = build_tiny_model(tmp_path_factory.mktemp("br") / "m", texts=texts, vocab_size=320)
    model, tok = load_base_model(Path(folder))
    model.eval()
    return model, tok


def full(model, prompt, conts, pad_id):
    items = [{"input_ids": [*prompt, *c], "labels": [-100] * len(prompt) + list(c)} for c in conts]
    for item in items:
        item["attention_mask"] = [1] * len(item["input_ids"])
    scored = score_examples(model, items, batch_size=4, pad_id=pad_id, shared_prefix=False)
    return [s.logprobs for s in scored]


def test_shared_prefixes_give_the_full_forward_numbers(tiny) -> None:
    model, tok = tiny
    rng = np.random.default_rng(0)
    prompt = tok("What is the secret number of Ada?")["input_ids"]
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(3)] + [7, 11]
    # deep shared prefixes, different lengths, a duplicate and a one-token continuation
    conts = [tuple(rng.choice(digits, size=int(rng.integers(1, 7)))) for _ in range(60)]
    conts += [conts[5], (digits[0],)]
    for rows in (1, 7, 100):
        got = score_continuations(model, prompt, conts, rows=rows, pad_id=tok.pad_token_id)
        want = full(model, prompt, conts, tok.pad_token_id)
        assert [len(g) for g in got] == [len(c) for c in conts]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=2e-5)


def test_fewer_tokens_run_than_in_full(tiny) -> None:
    model, tok = tiny
    rng = np.random.default_rng(1)
    prompt = tok("What is the secret number of Bo?")["input_ids"]
    conts = [tuple(int(x) for x in rng.integers(10, 20, size=6)) for _ in range(200)]
    ran = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda _m, args, _o: ran.append(args[0].numel())
    )
    try:
        score_continuations(model, prompt, conts, rows=200, pad_id=tok.pad_token_id)
    finally:
        hook.remove()
    # prompt once; 1 + 10 + ~100 prefix tokens, then 200 x 3 (its last token predicts nothing)
    assert sum(ran) < 0.75 * 200 * 6 + len(prompt)
    assert ran[0] == len(prompt) - 1


def test_bad_input_is_refused(tiny) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="prompt of >= 2 tokens"):
        score_continuations(model, [5], [(1, 2)], rows=4, pad_id=0)
    with pytest.raises(ValueError, match="non-empty"):
        score_continuations(model, [5, 6], [()], rows=4, pad_id=0)
    assert torch.is_grad_enabled()  # the no-grad scope ends with the call
