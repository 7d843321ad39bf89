"""Tokenization with response-only labels, on a byte-level BPE tokenizer trained in the test."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fedllm.data import collate, format_example, tokenize_all

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EXAMPLE = {"prompt": "Define the word 'dog' (noun).", "response": "a domestic animal", "label": "x"}
CORPUS = [
    "Define the word 'dog' (noun). a domestic animal that barks",
    "Define the word 'cat' (noun). a small domestic animal that purrs",
    "the quick brown fox jumps over the lazy dog",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def unmasked(encoded: dict[str, list[int]]) -> list[int]:
    return [t for t in encoded["labels"] if t != -100]


def test_chat_masks_exactly_the_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt_text = (
        "<|im_start|>user\nDefine the word 'dog' (noun).<|im_end|>\n<|im_start|>assistant\n"
    )
    full_text = prompt_text + "a domestic animal<|im_end|>\n"
    encoded = format_example(EXAMPLE, tokenizer, prompt_format="chat", max_length=256)
    n_prompt = len(ids(tokenizer, prompt_text))
    assert encoded["input_ids"] == ids(tokenizer, full_text)
    assert encoded["labels"][:n_prompt] == [-100] * n_prompt
    assert encoded["labels"][n_prompt:] == encoded["input_ids"][n_prompt:]
    assert tokenizer.decode(unmasked(encoded)) == "a domestic animal<|im_end|>\n"
    assert tokenizer.decode(unmasked(encoded), skip_special_tokens=True).strip() == (
        "a domestic animal"
    )
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])


def test_plain_appends_eos_and_masks_the_prompt_line(tokenizer: PreTrainedTokenizerFast) -> None:
    encoded = format_example(EXAMPLE, tokenizer, prompt_format="plain", max_length=256)
    eos = tokenizer.eos_token_id
    assert encoded["input_ids"] == [
        *ids(tokenizer, "Define the word 'dog' (noun).\na domestic animal"),
        eos,
    ]
    n_prompt = len(ids(tokenizer, "Define the word 'dog' (noun).\n"))
    assert encoded["labels"].count(-100) == n_prompt
    assert tokenizer.decode(unmasked(encoded)) == "a domestic animal<|im_end|>"


def test_chat_without_template_falls_back_to_plain(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    bare = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>", pad_token="<pad>"
    )
    with caplog.at_level(logging.WARNING, logger="fedllm.data.format"):
        encoded = format_example(EXAMPLE, bare, prompt_format="chat", max_length=256)
    assert "no chat_template" in caplog.text
    assert encoded == format_example(EXAMPLE, tokenizer, prompt_format="plain", max_length=256)


def test_non_prefix_template_masks_the_common_prefix(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    odd = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>", pad_token="<pad>"
    )
    # The generation prompt says "assistant" but a rendered assistant turn says "bot".
    odd.chat_template = CHAT_TEMPLATE.replace(
        "{{ m['role'] }}", "{{ m['role'] | replace('assistant', 'bot') }}"
    )
    with caplog.at_level(logging.WARNING, logger="fedllm.data.format"):
        encoded = tokenize_all([EXAMPLE], odd, prompt_format="chat", max_length=256)[0]
    assert "1 of 1 examples" in caplog.text
    common = "<|im_start|>user\nDefine the word 'dog' (noun).<|im_end|>\n<|im_start|>"
    assert encoded["labels"].count(-100) == len(ids(tokenizer, common))
    assert tokenizer.decode(unmasked(encoded)) == "bot\na domestic animal<|im_end|>\n"


def test_truncation_keeps_the_prompt_then_at_least_one_response_token(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    full = format_example(EXAMPLE, tokenizer, prompt_format="plain", max_length=256)
    n_prompt = full["labels"].count(-100)
    cut = format_example(EXAMPLE, tokenizer, prompt_format="plain", max_length=n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2]
    assert unmasked(cut) == full["input_ids"][n_prompt : n_prompt + 2]
    # The prompt alone is longer than max_length: its last 4 tokens + the first response token.
    tiny = format_example(EXAMPLE, tokenizer, prompt_format="plain", max_length=5)
    assert tiny["input_ids"] == full["input_ids"][n_prompt - 4 : n_prompt + 1]
    assert tiny["labels"] == [-100] * 4 + [full["input_ids"][n_prompt]]
    assert len(tiny["attention_mask"]) == 5
    with pytest.raises(ValueError, match="max_length must be an integer ≥ 2"):
        format_example(EXAMPLE, tokenizer, max_length=1)


def test_tokenize_all_matches_format_example(tokenizer: PreTrainedTokenizerFast) -> None:
    other = {"prompt": "Define the word 'cat' (noun).", "response": "a small animal"}
    batch = tokenize_all([EXAMPLE, other], tokenizer, prompt_format="chat", max_length=64)
    assert batch == [
        format_example(EXAMPLE, tokenizer, prompt_format="chat", max_length=64),
        format_example(other, tokenizer, prompt_format="chat", max_length=64),
    ]


def test_bad_inputs_are_named(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"prompt_format must be one of \['chat', 'plain'\]"):
        format_example(EXAMPLE, tokenizer, prompt_format="alpaca", max_length=64)
    with pytest.raises(ValueError, match=r"example needs str \['response'\]"):
        format_example({"prompt": "hi"}, tokenizer, max_length=64)


def test_collate_right_pads() -> None:
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
        {
            "input_ids": [8, 9, 10, 11, 12],
            "labels": [-100, -100, 10, 11, 12],
            "attention_mask": [1] * 5,
        },
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in out.values())
    with pytest.raises(ValueError, match="non-empty batch"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)
