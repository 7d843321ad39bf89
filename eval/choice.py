"""Multiple choice by option log-likelihood: the option with the highest mean token log-prob wins.

The mean (not the sum) keeps long options from losing just for being long. `MultipleChoiceTask`
is the base of the tasks that only differ in how they write their questions. Accuracy carries a
95% Wilson interval (questions taken as independent draws; the global one from the pooled
counts), so two runs' accuracies can be told apart from noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
    """Accuracy (with its Wilson interval) over questions {prompt, options, answer}; chance =
    mean of 1/len(options)."""
    if not questions:
        return {"examples": 0, "accuracy": float("nan"), "chance": float("nan")}
    items, owner = [], []
    for q, question in enumerate(questions):
        for option in question["options"]:
            items.append(
                prompt_response_item(
                    tokenizer, question["prompt"], response=option, prompt_format=prompt_format
                )
            )
            owner.append(q)
    scored = score_examples(model, items, batch_size=batch_size, pad_id=tokenizer.pad_token_id)
    means: list[list[float]] = [[] for _ in questions]
    for q, s in zip(owner, scored, strict=True):
        means[q].append(float(s.logprobs.mean()))
    correct = [int(np.argmax(m)) == q["answer"] for m, q in zip(means, questions, strict=True)]
    low, high = wilson(sum(correct), len(questions))
    return {
        "examples": len(questions),
        "correct": sum(correct),
        "accuracy": float(np.mean(correct)),
        "accuracy_low": low,
        "accuracy_high": high,
        "chance": float(np.mean([1 / len(q["options"]) for q in questions])),
    }


def wilson(k: int, n: int, *, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95% by default); (nan, nan) for
    n = 0. Unlike p ± z·√(p(1−p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends (float sums miss by 1e-16)
    return low, 1.0 if k == n else min(1.0, centre + half)


class MultipleChoiceTask(EvalTask):
    """Questions {prompt, options, answer} scored by `choose`: accuracy against chance."""

    metrics = (
        Metric("accuracy", "accuracy", 2),
        Metric("accuracy_low", "95% low", 2),
        Metric("accuracy_high", "95% high", 2),
        Metric("chance", "chance", 2),
    )

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

    @classmethod
    def combine(cls, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Example-weighted means (`EvalTask.combine`), the interval from the pooled counts."""
        combined = super().combine(results)
        rows = [r for r in results if r.get("examples")]
        if combined and all("correct" in r for r in rows):
            k, n = sum(r["correct"] for r in rows), sum(r["examples"] for r in rows)
            combined["correct"] = k
            if not cls.per_client:  # every client's model asked the same N questions: N draws
                questions = max(r["examples"] for r in rows)
                k, n = k * questions / n, questions
            combined["accuracy_low"], combined["accuracy_high"] = wilson(k, n)
        return combined

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
