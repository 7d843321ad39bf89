"""Task: held-out loss and perplexity on response tokens (the trainer's own objective)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedllm.data import tokenize_all
from fedllm.eval.scoring import nll_and_tokens, score_examples
from fedllm.eval.task import EvalTask, Metric, TaskSetup, register_task

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@register_task("held_out")
class HeldOutLoss(EvalTask):
    """Mean response-token NLL (nats) and its perplexity over tokenized examples."""

    metrics = (Metric("loss", "loss"), Metric("perplexity", "perplexity", 2))

    def __init__(
        self,
        examples: Sequence[dict],
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt_format: str,
        max_length: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.items = tokenize_all(
            list(examples), tokenizer, prompt_format=prompt_format, max_length=max_length
        )

    @classmethod
    def build(cls, examples: Sequence[dict], setup: TaskSetup) -> HeldOutLoss:
        return cls(
            examples,
            setup.tokenizer,
            prompt_format=setup.prompt_format,
            max_length=setup.max_length,
        )

    def __len__(self) -> int:
        return len(self.items)

    def get_example(self, i: int) -> dict:
        return self.items[i]

    def evaluate(self, model: torch.nn.Module, *, batch_size: int) -> dict:
        """Loss and perplexity, with the summed NLL and token count that `combine` needs."""
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

    @classmethod
    def combine(cls, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Token-weighted, so the global loss is the loss over all clients' tokens at once."""
        nll = sum(r["nll_sum"] for r in results)
        tokens = sum(r["tokens"] for r in results)
        if not tokens:
            return {}
        examples = sum(r["examples"] for r in results)
        return {
            "loss": nll / tokens,
            "perplexity": math.exp(nll / tokens),
            "tokens": tokens,
            "examples": examples,
        }
