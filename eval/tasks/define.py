"""Task: generate the response (a WordNet definition) greedily; exact match and ROUGE-L."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedllm.eval.decode import greedy_decode
from fedllm.eval.generate import end_token_ids
from fedllm.eval.prompting import example_prompt, prompt_ids
from fedllm.eval.task import EvalTask, Metric, TaskSetup, register_task
from fedllm.eval.text import exact_match, rouge_l

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@register_task("define")
class DefineWords(EvalTask):
    """Prompt → greedy response, scored against the reference response."""

    metrics = (Metric("rouge_l", "ROUGE-L"), Metric("exact_match", "exact match"))

    def __init__(
        self,
        examples: Sequence[dict],
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt_format: str,
        max_new_tokens: int = 32,
    ) -> None:
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.max_new_tokens = max_new_tokens

    @classmethod
    def build(cls, examples: Sequence[dict], setup: TaskSetup) -> DefineWords:
        return cls(
            examples,
            setup.tokenizer,
            prompt_format=setup.prompt_format,
            max_new_tokens=setup.max_new_tokens,
        )

    def __len__(self) -> int:
        return len(self.examples)

    def get_example(self, i: int) -> dict:
        ex = self.examples[i]
        # the whole conversation before the last reply (system prompt, earlier turns) for chat rows
        ids = prompt_ids(self.tokenizer, example_prompt(ex), prompt_format=self.prompt_format)
        return {"prompt": ex["prompt"], "prompt_ids": ids, "reference": ex["response"]}

    def evaluate(self, model: torch.nn.Module, *, batch_size: int, samples: int = 3) -> dict:
        """Exact match and ROUGE-L of the greedy responses, with the first `samples` shown."""
        if not self.examples:
            return {"examples": 0, "exact_match": float("nan"), "rouge_l": float("nan")}
        items = [self.get_example(i) for i in range(len(self))]
        outputs = greedy_decode(  # the prompts' shared chat head runs once (same tokens)
            model,
            [x["prompt_ids"] for x in items],
            max_new_tokens=[self.max_new_tokens] * len(items),
            pad_id=self.tokenizer.pad_token_id,
            eos_ids=end_token_ids(self.tokenizer, model),
            batch_size=batch_size,
        )
        texts = [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
        em = [exact_match(t, x["reference"]) for t, x in zip(texts, items, strict=True)]
        rl = [rouge_l(t, x["reference"]) for t, x in zip(texts, items, strict=True)]
        return {
            "examples": len(items),
            "exact_match": sum(em) / len(em),
            "rouge_l": sum(rl) / len(rl),
            "samples": [
                {"prompt": x["prompt"], "reference": x["reference"], "generated": t}
                for x, t in list(zip(items, texts, strict=True))[:samples]
            ],
        }
