"""Multiple choice by option log-likelihood: the option with the highest mean token log-prob wins.

The mean (not the sum) keeps long options from losing just for being long.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedllm.eval.prompting import prompt_response_item
from fedllm.eval.scoring import score_examples


def choose(
    model,
    questions: Sequence[dict],
    *,
    tokenizer,
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
