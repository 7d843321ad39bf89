"""Multiple choice by option log-likelihood: the option with the highest mean token log-prob wins.

The mean (not the sum) keeps long options from losing just for being long. `MultipleChoiceTask`
is the base of the tasks that only differ in how they write their questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedllm.eval.prompting import prompt_response_item
from fedllm.eval.scoring import score_examples
from fedllm.eval.task import EvalTask, Metric

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def choose(
    model: torch.nn.Module,
    questions: Sequence[dict],
    *,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    batch_size: int,
) -> dict:
    """Accuracy over questions {prompt, options, answer}; chance = mean of 1/len(options)."""
    if not questions:
        return {"examples": 0, "accuracy": float("nan"), "chance": float("nan")}
    items, owner = [], []
    for q, question in enumerate(questions):
        for option in question["options"]:
            items.append(
                prompt_response_item(
                    tokenizer, question["prompt"], option, prompt_format=prompt_format
                )
            )
            owner.append(q)
    scored = score_examples(model, items, batch_size=batch_size, pad_id=tokenizer.pad_token_id)
    means: list[list[float]] = [[] for _ in questions]
    for q, s in zip(owner, scored, strict=True):
        means[q].append(float(s.logprobs.mean()))
    correct = [int(np.argmax(m)) == q["answer"] for m, q in zip(means, questions, strict=True)]
    return {
        "examples": len(questions),
        "accuracy": float(np.mean(correct)),
        "chance": float(np.mean([1 / len(q["options"]) for q in questions])),
    }


class MultipleChoiceTask(EvalTask):
    """Questions {prompt, options, answer} scored by `choose`: accuracy against chance."""

    metrics = (Metric("accuracy", "accuracy", 2), Metric("chance", "chance", 2))

    def __init__(
        self,
        questions: Sequence[dict],
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        prompt_format: str = "chat",
    ) -> None:
        self.questions = list(questions)
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format

    def __len__(self) -> int:
        return len(self.questions)

    def get_example(self, i: int) -> dict:
        return self.questions[i]

    def evaluate(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int,
        tokenizer: PreTrainedTokenizerBase | None = None,
        prompt_format: str | None = None,
    ) -> dict:
        """Accuracy and chance; the tokenizer may come here, as writing questions needs none."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__}.evaluate needs a tokenizer")
        return choose(
            model,
            self.questions,
            tokenizer=tokenizer,
            prompt_format=prompt_format or self.prompt_format,
            batch_size=batch_size,
        )
