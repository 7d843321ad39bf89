"""fedllm.eval.extraction: the prefix/suffix split by hand, and a memorised model reproducing its
training suffixes far more often than held-out ones."""

from pathlib import Path

from fedllm.client.train import train_local
from fedllm.data import load_wordnet, tokenize_all
from fedllm.eval.extraction import extraction_rates, split_prefix_suffix
from fedllm.eval.generate import end_token_ids
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model


def test_split_prefix_suffix_by_hand() -> None:
    item = {"input_ids": [5, 6, 7, 8, 9, 2, 10], "labels": [-100, -100, 7, 8, 9, 2, 10]}
    assert split_prefix_suffix(item, prefix_tokens=1, suffix_tokens=2) == ([5, 6, 7], [8, 9])
    # the suffix stops at an end token; a response consumed by the prefix has no suffix
    assert split_prefix_suffix(item, prefix_tokens=1, suffix_tokens=9, end_ids=[2]) == (
        [5, 6, 7],
        [8, 9],
    )
    assert split_prefix_suffix(item, prefix_tokens=3, suffix_tokens=2, end_ids=[2]) is None
    assert (
        split_prefix_suffix({"input_ids": [1], "labels": [-100]}, prefix_tokens=0, suffix_tokens=2)
        is None
    )


def test_memorised_members_are_extracted(tmp_path: Path) -> None:
    examples = load_wordnet(pos=("verb",), max_examples=300, seed=7)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    model, tok = load_base_model(build_tiny_model(tmp_path / "m", texts=texts, vocab_size=400))
    members, held = examples[:24], examples[24:48]
    fmt = {"prompt_format": "chat", "max_length": 40}
    model.requires_grad_(True)
    train_local(
        model,
        tokenize_all(members, tok, **fmt),
        steps=90,
        batch_size=8,
        pad_id=tok.pad_token_id,
        lr=6e-3,
    )
    model.eval()
    kw = {
        "prefix_tokens": 2,
        "suffix_tokens": 6,
        "pad_id": tok.pad_token_id,
        "end_ids": end_token_ids(tok),
        "batch_size": 8,
    }
    m = extraction_rates(model, tokenize_all(members, tok, **fmt), **kw)
    h = extraction_rates(model, tokenize_all(held, tok, **fmt), **kw)
    assert m["examples"] == 24
    assert m["exact"] >= 0.5 and h["exact"] <= 0.1
    assert m["rouge_l"] > h["rouge_l"] + 0.3
