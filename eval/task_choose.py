"""Task: pick a word's definition among distractors (other examples' responses).

Asked with the training prompt itself, so it measures the fine-tuned skill without generation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedllm.eval.choice import choose


class ChooseDefinition:
    """Multiple choice: the example's response vs `num_options - 1` other responses."""

    name = "choose"

    def __init__(self, examples: Sequence[dict], *, seed: int = 0, num_options: int = 4) -> None:
        rng = random.Random(f"fedllm-choose:{seed}")
        responses = sorted({ex["response"] for ex in examples})
        self.questions: list[dict] = []
        if len(responses) < num_options:
            return
        for ex in examples:
            others = [r for r in rng.sample(responses, num_options) if r != ex["response"]]
            options = [ex["response"], *others[: num_options - 1]]
            rng.shuffle(options)
            self.questions.append(
                {
                    "prompt": ex["prompt"],
                    "options": options,
                    "answer": options.index(ex["response"]),
                }
            )

    def __len__(self) -> int:
        return len(self.questions)

    def get_example(self, i: int) -> dict:
        return self.questions[i]

    def evaluate(self, model, *, tokenizer, prompt_format: str, batch_size: int) -> dict:
        return choose(
            model,
            self.questions,
            tokenizer=tokenizer,
            prompt_format=prompt_format,
            batch_size=batch_size,
        )
