"""Batched greedy decoding with left padding (transformers' `generate`, no sampling).

Prompts are sorted by length so a batch pads little; outputs come back in the input order, cut at
the first end-of-sequence token. Batched and one-at-a-time decoding give the same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def end_token_ids(
    tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None
) -> list[int]:
    """Tokens that end a response: the tokenizer's eos, the end-of-turn token its chat template
    writes after a reply, and the eos ids of `model`'s generation config (when given)."""
    ids = {tokenizer.eos_token_id, *template_end_ids(tokenizer)}
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if isinstance(i, int))


def template_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token the chat template puts right after an assistant reply, if any.

    Found by rendering a probe conversation, so no template's end-of-turn name is hard-coded
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn> alike).
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that refuses the probe simply gives no end-of-turn token
        log.debug("the chat template refused the end-of-turn probe", exc_info=True)
        return []
    if _PROBE not in text:
        return []
    tail = tokenizer(text.rsplit(_PROBE, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "added_tokens_decoder", {})) | set(tokenizer.all_special_ids)
    return [tail[0]] if tail and tail[0] in special else []


_PROBE = "fedllm end-of-turn probe"


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int],
    batch_size: int,
) -> list[list[int]]:
    """The greedy continuation (new tokens only, up to the first end token) of each prompt."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"batch_size and max_new_tokens must be >= 1 ({batch_size}, {max_new_tokens})"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids),
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    ends = set(eos_ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(prompts[i])
            input_ids[row, width - n :] = torch.as_tensor(list(prompts[i]), dtype=torch.long)
            mask[row, width - n :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
        )
        for row, i in enumerate(chunk):
            tokens: list[int] = []
            for t in generated[row, width:].tolist():
                if t in ends:
                    break
                tokens.append(t)
            out[i] = tokens
    return out
