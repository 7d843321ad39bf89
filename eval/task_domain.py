"""Task: which WordNet domain (lexicographer file) a word belongs to, by option log-likelihood.

Options are the correct domain plus distractors of the same part of speech (noun.animal vs
noun.plant ...); parts of speech with a single domain (adverbs) give no question.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from fedllm.data.wordnet import LEXNAMES
from fedllm.eval.choice import choose

_WORD = re.compile(r"^Define the word '(.+)' \((\w+)\)\.$")


class WordDomain:
    """Multiple choice over WordNet domains for WordNet 'Define the word' examples."""

    name = "domain"

    def __init__(self, examples: Sequence[dict], *, seed: int = 0, num_options: int = 4) -> None:
        rng = random.Random(f"fedllm-domain:{seed}")
        self.questions: list[dict] = []
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
            self.questions.append(
                {
                    "prompt": f"Which WordNet category does the {pos_name} '{word}' belong to?",
                    "options": [o.split(".", 1)[1] for o in options],
                    "answer": options.index(label),
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
