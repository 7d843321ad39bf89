"""Examples → token ids whose labels cover only the response (prompt positions are -100).

"chat" renders the tokenizer's chat template; "plain" is f"{prompt}\\n{response}{eos}".
An example with a `messages` list (fedllm.data.chat) is trained on its assistant turns only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedllm.data.chat import common_prefix, plain_text, template_text

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMATS = ("chat", "plain")
IGNORE_INDEX = -100


def format_example(
    example: Mapping[str, Any], tokenizer: Any, *, prompt_format: str = "chat", max_length: int
) -> dict[str, list[int]]:
    """input_ids, labels (-100 on the prompt) and attention_mask, cut to `max_length` tokens."""
    resolved = _resolve_format(tokenizer, prompt_format)
    encoded, prefix_ok = _encode(example, tokenizer, prompt_format=resolved, max_length=max_length)
    if not prefix_ok:
        logger.warning(
            "the tokenized prompt is not a prefix of the tokenized prompt+response; "
            "only their common prefix is masked from the loss"
        )
    return encoded


def tokenize_all(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    prompt_format: str = "chat",
    max_length: int,
) -> list[dict[str, list[int]]]:
    """format_example over all examples, logging each kind of fallback at most once."""
    resolved = _resolve_format(tokenizer, prompt_format)
    encoded: list[dict[str, list[int]]] = []
    mismatched = 0
    for example in examples:
        item, prefix_ok = _encode(example, tokenizer, prompt_format=resolved, max_length=max_length)
        encoded.append(item)
        mismatched += not prefix_ok
    if mismatched:
        logger.warning(
            "%d of %d examples: the tokenized prompt is not a prefix of the tokenized "
            "prompt+response (for messages: the chat template renders the turns before an "
            "assistant turn differently); only their common prefix is masked from the loss",
            mismatched,
            len(encoded),
        )
    return encoded


def truncation(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    prompt_format: str = "chat",
    max_length: int,
) -> tuple[int, int, int]:
    """What `max_length` cuts from `examples`: (examples cut, trained tokens kept, trained
    tokens uncut). A cut reply also loses its end-of-turn token: it never learns to stop."""
    resolved = _resolve_format(tokenizer, prompt_format)
    cut = kept = whole = 0
    for example in examples:
        full, _ = _encode(example, tokenizer, prompt_format=resolved, max_length=1 << 30)
        short, _ = _encode(example, tokenizer, prompt_format=resolved, max_length=max_length)
        cut += len(full["input_ids"]) > max_length
        whole += sum(t != IGNORE_INDEX for t in full["labels"])
        kept += sum(t != IGNORE_INDEX for t in short["labels"])
    return cut, kept, whole


def collate(batch: Sequence[Mapping[str, Any]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with `pad_id`, labels with -100, attention_mask with 0."""
    import torch  # imported on use: loaders and partitions should not pay its seconds of import

    if not batch:
        raise ValueError("collate needs a non-empty batch")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an integer token id, got {pad_id!r}")
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        if len(item["labels"]) != n:
            raise ValueError(f"batch item {row}: {n} input_ids but {len(item['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _resolve_format(tokenizer: Any, prompt_format: str) -> str:
    if prompt_format not in FORMATS:
        raise ValueError(f"prompt_format must be one of {list(FORMATS)}, got {prompt_format!r}")
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        logger.warning("the tokenizer has no chat_template; using prompt_format='plain'")
        return "plain"
    return prompt_format


def _encode(
    example: Mapping[str, Any], tokenizer: Any, *, prompt_format: str, max_length: int
) -> tuple[dict[str, list[int]], bool]:
    """(encoded example, whether the prompt tokens were an exact prefix of the full tokens)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer ≥ 2, got {max_length!r}")
    if example.get("messages"):
        return _encode_messages(
            example, tokenizer, prompt_format=prompt_format, max_length=max_length
        )
    missing = [key for key in ("prompt", "response") if not isinstance(example.get(key), str)]
    if missing:
        raise ValueError(f"example needs str {missing}; it has keys {sorted(example)}")
    prompt, response = example["prompt"], example["response"]
    if prompt_format == "chat":
        user = [{"role": "user", "content": prompt}]
        assistant = [{"role": "assistant", "content": response}]
        prompt_text = tokenizer.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True
        )
        full_text = tokenizer.apply_chat_template(user + assistant, tokenize=False)
        special, eos = False, None  # the template writes its own special tokens
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                "prompt_format='plain' ends responses with eos; set tokenizer.eos_token"
            )
        prompt_text, full_text, special = f"{prompt}\n", f"{prompt}\n{response}", True
    prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=special)["input_ids"]
    if eos is not None and (not full_ids or full_ids[-1] != eos):
        full_ids = [*full_ids, eos]
    n_prompt = common_prefix(prompt_ids, full_ids)
    prefix_ok = n_prompt == len(prompt_ids)
    input_ids, n_prompt = _truncate(full_ids, n_prompt, max_length=max_length)
    labels = [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    encoded = {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}
    return encoded, prefix_ok


def _encode_messages(
    example: Mapping[str, Any], tokenizer: Any, *, prompt_format: str, max_length: int
) -> tuple[dict[str, list[int]], bool]:
    """A conversation rendered and tokenized once; labels on tokens overlapping assistant turns."""
    where = f"example {example.get('id', '?')}"
    messages = example["messages"]
    if prompt_format == "chat":
        text, spans, clean = template_text(tokenizer, messages, where=where)
        special = False  # the template writes its own special tokens
    else:
        if tokenizer.eos_token is None:
            raise ValueError(
                "prompt_format='plain' ends assistant turns with eos; set tokenizer.eos_token"
            )
        (text, spans), clean, special = plain_text(messages, eos=tokenizer.eos_token), True, True
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{where}: 'messages' rows need a fast tokenizer (character offsets); "
            f"{type(tokenizer).__name__} is not one"
        )
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if s < e and any(s < end and e > start for start, end in spans) else IGNORE_INDEX
        for token, (s, e) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    ids, labels = _truncate_labelled(ids, labels, max_length=max_length)
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}, clean


def _truncate_labelled(
    ids: list[int], labels: list[int], *, max_length: int
) -> tuple[list[int], list[int]]:
    """Cut the end; if no trained token would remain, end the window at the first trained one."""
    if len(ids) <= max_length or any(t != IGNORE_INDEX for t in labels[:max_length]):
        return ids[:max_length], labels[:max_length]
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
    if first is None:
        return ids[:max_length], labels[:max_length]
    start = first + 1 - max_length
    return ids[start : first + 1], labels[start : first + 1]


def _truncate(ids: list[int], n_prompt: int, *, max_length: int) -> tuple[list[int], int]:
    """Cut the response's end; if the prompt alone fills max_length, keep its last tokens + one."""
    if len(ids) <= max_length:
        return list(ids), n_prompt
    if n_prompt < max_length or n_prompt == len(ids):
        return ids[:max_length], min(n_prompt, max_length)
    kept_prompt = ids[n_prompt - (max_length - 1) : n_prompt]
    return [*kept_prompt, ids[n_prompt]], max_length - 1
