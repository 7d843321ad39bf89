"""Task: held-out loss and perplexity on response tokens (the trainer's own objective)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedllm.data import tokenize_all
from fedllm.eval.scoring import nll_and_tokens, score_examples


class HeldOutLoss:
    """Mean response-token NLL (nats) and its perplexity over tokenized examples."""

    name = "held_out"

    def __init__(
        self, examples: Sequence[dict], tokenizer, *, prompt_format: str, max_length: int
    ) -> None:
        self.tokenizer = tokenizer
        self.items = tokenize_all(
            list(examples), tokenizer, prompt_format=prompt_format, max_length=max_length
        )

    def __len__(self) -> int:
        return len(self.items)

    def get_example(self, i: int) -> dict:
        return self.items[i]

    def evaluate(self, model, *, batch_size: int) -> dict:
        if not self.items:
            return {"examples": 0, "tokens": 0, "nll_sum": 0.0, "loss": float("nan")}
        scored = score_examples(
            model, self.items, batch_size=batch_size, pad_id=self.tokenizer.pad_token_id
        )
        nll, tokens = nll_and_tokens(scored)
        return {
            "examples": len(self.items),
            "tokens": tokens,
            "nll_sum": nll,
            "loss": nll / tokens,
            "perplexity": math.exp(nll / tokens),
        }
