"""Task: pick a word's definition among distractors (other examples' responses).

Asked with the training prompt itself (a chat row's whole conversation before its reply, as
`define` and training see it), so it measures the fine-tuned skill without generation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedllm.eval.choice import MultipleChoiceTask
from fedllm.eval.prompting import example_prompt
from fedllm.eval.task import TaskSetup, register_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@register_task("choose")
class ChooseDefinition(MultipleChoiceTask):
    """Multiple choice: the example's response vs `num_options - 1` other responses."""

    def __init__(
        self,
        examples: Sequence[dict],
        *,
        seed: int = 0,
        num_options: int = 4,
        tokenizer: PreTrainedTokenizerBase | None = None,
        prompt_format: str = "chat",
    ) -> None:
        rng = random.Random(f"fedllm-choose:{seed}")
        questions = _questions(examples, rng=rng, num_options=num_options)
        super().__init__(questions, tokenizer=tokenizer, prompt_format=prompt_format)

    @classmethod
    def build(cls, examples: Sequence[dict], setup: TaskSetup) -> ChooseDefinition:
        return cls(
            examples, seed=setup.seed, tokenizer=setup.tokenizer, prompt_format=setup.prompt_format
        )


def _questions(examples: Sequence[dict], *, rng: random.Random, num_options: int) -> list[dict]:
    """One question per example; none when there are fewer distinct responses than options."""
    responses = sorted({ex["response"] for ex in examples})
    if len(responses) < num_options:
        return []
    questions = []
    for ex in examples:
        others = [r for r in rng.sample(responses, num_options) if r != ex["response"]]
        options = [ex["response"], *others[: num_options - 1]]
        rng.shuffle(options)
        answer = options.index(ex["response"])
        questions.append({"prompt": example_prompt(ex), "options": options, "answer": answer})
    return questions
