"""Task: which WordNet domain (lexicographer file) a word belongs to, by option log-likelihood.

Options are the correct domain plus distractors of the same part of speech (noun.animal vs
noun.plant ...); parts of speech with a single domain (adverbs) give no question.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedllm.data.wordnet import LEXNAMES
from fedllm.eval.choice import MultipleChoiceTask
from fedllm.eval.task import TaskSetup, register_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_WORD = re.compile(r"^Define the word '(.+)' \((\w+)\)\.$")


@register_task("domain")
class WordDomain(MultipleChoiceTask):
    """Multiple choice over WordNet domains for WordNet 'Define the word' examples."""

    def __init__(
        self,
        examples: Sequence[dict],
        *,
        seed: int = 0,
        num_options: int = 4,
        tokenizer: PreTrainedTokenizerBase | None = None,
        prompt_format: str = "chat",
    ) -> None:
        rng = random.Random(f"fedllm-domain:{seed}")
        questions: list[dict] = []
        for ex in examples:
            match = _WORD.match(ex.get("prompt", ""))
            label = ex.get("label", "")
            if match is None or label not in LEXNAMES:
                continue
            pos = label.split(".")[0]
            others = sorted(n for n in LEXNAMES if n.startswith(pos + ".") and n != label)
            if not others:
                continue
            options = [label, *rng.sample(others, min(num_options - 1, len(others)))]
            rng.shuffle(options)
            word, pos_name = match.groups()
            questions.append(
                {
                    "prompt": f"Which WordNet category does the {pos_name} '{word}' belong to?",
                    "options": [o.split(".", 1)[1] for o in options],
                    "answer": options.index(label),
                }
            )
        super().__init__(questions, tokenizer=tokenizer, prompt_format=prompt_format)

    @classmethod
    def build(cls, examples: Sequence[dict], setup: TaskSetup) -> WordDomain:
        return cls(
            examples, seed=setup.seed, tokenizer=setup.tokenizer, prompt_format=setup.prompt_format
        )
