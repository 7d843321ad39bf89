"""Task: which WordNet domain (lexicographer file) a word belongs to, by option log-likelihood.

Options are the correct domain plus distractors of the same part of speech (noun.animal vs
noun.plant ...); parts of speech with a single domain (adverbs) give no question, adjectives
(three domains) three options. Distractors come from every domain, but a client's answers from
its own few: `prior` is the accuracy of a model that knows only how often each domain is this
client's answer (no word), the baseline to read `accuracy` against, well above `chance`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedllm.data.wordnet import LEXNAMES
from fedllm.eval.choice import MultipleChoiceTask
from fedllm.eval.task import Metric, TaskSetup, register_task

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

_WORD = re.compile(r"^Define the word '(.+)' \((\w+)\)\.$")


@register_task("domain")
class WordDomain(MultipleChoiceTask):
    """Multiple choice over WordNet domains for WordNet 'Define the word' examples."""

    metrics = (*MultipleChoiceTask.metrics, Metric("prior", "domain prior", 2))

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
        asked: list[tuple[list[str], int]] = []  # (options with their part of speech, answer)
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
            asked.append((options, options.index(label)))
            word, pos_name = match.groups()
            questions.append(
                {
                    "prompt": f"Which WordNet category does the {pos_name} '{word}' belong to?",
                    "options": [o.split(".", 1)[1] for o in options],
                    "answer": options.index(label),
                }
            )
        super().__init__(questions, tokenizer=tokenizer, prompt_format=prompt_format)
        self.prior = domain_prior(asked)

    def evaluate(self, model: torch.nn.Module, *, batch_size: int, **kw: Any) -> dict:
        """Accuracy and chance (`choose`), and the domain prior of these questions."""
        return {**super().evaluate(model, batch_size=batch_size, **kw), "prior": self.prior}

    @classmethod
    def build(cls, examples: Sequence[dict], setup: TaskSetup) -> WordDomain:
        return cls(
            examples, seed=setup.seed, tokenizer=setup.tokenizer, prompt_format=setup.prompt_format
        )


def domain_prior(asked: Sequence[tuple[Sequence[str], int]]) -> float:
    """Accuracy of picking, among each question's options, the one most often the answer in
    `asked` ((options, answer index) pairs; ties split evenly): what knowing a client's domains
    alone scores."""
    if not asked:
        return float("nan")
    counts = Counter(options[answer] for options, answer in asked)
    score = 0.0
    for options, answer in asked:
        top = max(counts[o] for o in options)
        best = [i for i, o in enumerate(options) if counts[o] == top]
        score += (answer in best) / len(best)
    return score / len(asked)
