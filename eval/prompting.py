"""Prompt rendering shared by the tasks and the canaries: the same text the trainer saw.

`prompt_response_item` puts labels on the response's own tokens only (no end-of-turn tail), so a
sum of its log-probs is the log-likelihood of exactly that response after that prompt.
"""

from __future__ import annotations

from fedllm.data.format import IGNORE_INDEX


def render_prompt(tokenizer, prompt: str, *, prompt_format: str) -> tuple[str, bool]:
    """(prompt text up to where the response starts, whether to add special tokens)."""
    if prompt_format == "chat" and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, False
    return f"{prompt}\n", True


def prompt_ids(tokenizer, prompt: str, *, prompt_format: str) -> list[int]:
    """Token ids of the rendered prompt (what generation starts from)."""
    text, special = render_prompt(tokenizer, prompt, prompt_format=prompt_format)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def prompt_response_item(tokenizer, prompt: str, response: str, *, prompt_format: str) -> dict:
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
