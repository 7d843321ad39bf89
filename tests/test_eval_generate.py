"""fedllm.eval.generate: batched greedy decoding (left padding) equals one-at-a-time decoding."""

from pathlib import Path

import pytest
import torch

from fedllm.client.train import train_local
from fedllm.data import load_wordnet, tokenize_all
from fedllm.eval.generate import end_token_ids, greedy_generate
from fedllm.eval.prompting import prompt_ids
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    examples = load_wordnet(pos=("adj",), max_examples=60, seed=2)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    folder = build_tiny_model(tmp_path_factory.mktemp("gen") / "m", texts=texts, vocab_size=320)
    model, tok = load_base_model(Path(folder))
    model.requires_grad_(True)  # a little training makes the next-token distribution peaked
    items = tokenize_all(examples[:24], tok, prompt_format="chat", max_length=40)
    train_local(model, items, steps=30, batch_size=8, pad_id=tok.pad_token_id, lr=3e-3)
    model.eval()
    return model, tok, examples


def test_batched_greedy_equals_single(setup) -> None:
    model, tok, examples = setup
    prompts = [prompt_ids(tok, e["prompt"], prompt_format="chat") for e in examples[:10]]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise padding"
    kw = {"max_new_tokens": 12, "pad_id": tok.pad_token_id, "eos_ids": end_token_ids(tok)}
    batched = greedy_generate(model, prompts, batch_size=10, **kw)
    single = greedy_generate(model, prompts, batch_size=1, **kw)
    assert batched == single
    assert any(len(o) > 0 for o in batched)


def test_greedy_is_the_argmax_continuation(setup) -> None:
    model, tok, examples = setup
    prompt = prompt_ids(tok, examples[0]["prompt"], prompt_format="chat")
    out = greedy_generate(
        model, [prompt], max_new_tokens=5, pad_id=tok.pad_token_id, eos_ids=[], batch_size=1
    )[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_end_tokens_and_bad_input(setup) -> None:
    model, tok, _ = setup
    assert set(end_token_ids(tok)) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(model, [[]], max_new_tokens=2, pad_id=0, eos_ids=[], batch_size=1)
