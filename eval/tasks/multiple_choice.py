"""Task: multiple-choice questions in MMLU's layout (question, choices, answer), from your files.

Each choice is scored as the response to the question (mean token log-likelihood, see
`fedllm.eval.choice`) and the best-scoring one is the model's answer. `answer` is a 0-based
index or a letter (A = the first choice).

Two ways in: `MultipleChoiceFile.from_file("mmlu.jsonl", tokenizer=...)` reads a JSONL (or a JSON
array) of such rows; in `fedllm eval`, the task asks each client's held-out examples that came
from a question/choices/answer data source (`data.source: mmlu.jsonl`), and has no questions
(so no rows in the report) for other data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedllm.data.local import choice_row
from fedllm.eval.choice import MultipleChoiceTask
from fedllm.eval.task import TaskSetup, register_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@register_task("multiple_choice")
class MultipleChoiceFile(MultipleChoiceTask):
    """Multiple choice (question, choices, answer): accuracy by choice log-likelihood."""

    @classmethod
    def build(cls, examples: Sequence[dict], setup: TaskSetup) -> MultipleChoiceFile:
        """Questions from the examples that carry choices (a multiple-choice data source)."""
        questions = [
            {"prompt": ex["prompt"], "options": list(ex["choices"]), "answer": int(ex["answer"])}
            for ex in examples
            if ex.get("choices") and ex.get("answer") is not None
        ]
        return cls(questions, tokenizer=setup.tokenizer, prompt_format=setup.prompt_format)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        prompt_format: str = "chat",
    ) -> MultipleChoiceFile:
        """The questions of a local JSONL file (or JSON array) of question/choices/answer rows."""
        return cls(read_questions(path), tokenizer=tokenizer, prompt_format=prompt_format)


def read_questions(path: str | Path) -> list[dict]:
    """Questions {prompt, options, answer} from a JSONL/JSON file; bad rows name file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"multiple-choice file {path} not found; give a JSONL file of "
            '{"question": ..., "choices": [...], "answer": 0 or "A"} rows'
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        array = _json(text, where=str(path))
        if not isinstance(array, list):
            raise ValueError(f"{path}: a .json file must hold a list of rows (or use .jsonl)")
        rows = [(f"{path} row {i}", row) for i, row in enumerate(array)]
    else:
        rows = [
            (f"{path} line {n}", _json(line, where=f"{path} line {n}"))
            for n, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    questions = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        question, choices, answer = choice_row(row, where=where)
        questions.append({"prompt": question, "options": choices, "answer": answer})
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def _json(text: str, *, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
