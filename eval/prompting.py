"""Prompt rendering shared by the tasks and the canaries: the same text the trainer saw.

A prompt is a string (one user turn) or a conversation's turns before the reply (`example_prompt`
gives either for an example). `prompt_response_item` puts labels on the response's own tokens only
(no end-of-turn tail), so a sum of its log-probs is the log-likelihood of exactly that response
after that prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedllm.data.chat import context, plain_text, render
from fedllm.data.format import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Prompt = str | Sequence[Mapping[str, str]]


def example_prompt(example: Mapping[str, Any]) -> Prompt:
    """What a reply to `example` is generated from: its prompt, or its turns before the reply."""
    return context(example)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, *, prompt_format: str
) -> tuple[str, bool]:
    """(prompt text up to where the response starts, whether to add special tokens)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if prompt_format == "chat" and getattr(tokenizer, "chat_template", None):
        return render(tokenizer, messages, generation_prompt=True), False
    if isinstance(prompt, str):
        return f"{prompt}\n", True
    if tokenizer.eos_token is None:
        raise ValueError("prompt_format='plain' ends assistant turns with eos; set eos_token")
    return plain_text(messages, eos=tokenizer.eos_token)[0], True


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, *, prompt_format: str
) -> list[int]:
    """Token ids of the rendered prompt (what generation starts from)."""
    text, special = render_prompt(tokenizer, prompt, prompt_format=prompt_format)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def prompt_response_item(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, *, response: str, prompt_format: str
) -> dict:
    """input_ids of prompt + response, labels on the response tokens only."""
    head, special = render_prompt(tokenizer, prompt, prompt_format=prompt_format)
    head_ids = tokenizer(head, add_special_tokens=special)["input_ids"]
    full_ids = tokenizer(head + response, add_special_tokens=special)["input_ids"]
    n = 0
    while n < min(len(head_ids), len(full_ids)) and head_ids[n] == full_ids[n]:
        n += 1
    if n == len(full_ids):
        raise ValueError(f"response {response!r} adds no tokens after the prompt")
    labels = [IGNORE_INDEX] * n + full_ids[n:]
    return {"input_ids": full_ids, "labels": labels, "attention_mask": [1] * len(full_ids)}
