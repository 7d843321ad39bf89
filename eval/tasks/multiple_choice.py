"""Task: multiple-choice questions in MMLU's layout (question, choices, answer), from your files.

Each choice is scored as the response to the question (mean token log-likelihood, see
`fedllm.eval.choice`) and the best-scoring one is the model's answer. `answer` is a 0-based
index or a letter (A = the first choice).

Three ways in: `MultipleChoiceFile.from_file("mmlu.jsonl", tokenizer=...)` reads a JSONL (or a
JSON array) of such rows; in `fedllm eval`, the task asks each client's held-out examples that came
from a question/choices/answer data source (`data.source: mmlu.jsonl`), and has no questions
(so no rows in the report) for other data; and `fedllm eval RUN --mc-file FILE` asks an outside
file's questions (`file_task`, task `mc_<file name>`) under every client's views: base and global
answer alike for every client, local is each client's own adapter.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedllm.data.local import choice_row
from fedllm.eval.choice import MultipleChoiceTask
from fedllm.eval.task import TaskSetup, register_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COLUMNS = ("question", "choices", "answer")  # MMLU's layout
LAYOUT = '{"question": ..., "choices": [...], "answer": 0 or "A"}'


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


def file_task(path: str | Path) -> type[MultipleChoiceTask]:
    """The task `mc_<file name>` asking an outside file's questions of every client's views
    (`fedllm eval --mc-file`); the file is read and checked here, before any model loads."""
    path = Path(path).expanduser()
    questions = read_questions(path)

    def build(cls, examples: Sequence[dict], setup: TaskSetup) -> MultipleChoiceTask:
        return cls(questions, tokenizer=setup.tokenizer, prompt_format=setup.prompt_format)

    doc = f"Multiple choice from {path} ({len(questions)} questions): accuracy by log-likelihood."
    digest = hashlib.sha256(json.dumps(questions, sort_keys=True).encode()).hexdigest()
    attributes = {
        "__doc__": doc,
        "build": classmethod(build),
        "inputs_digest": digest,
        "per_client": False,
    }
    task = type("OutsideFile", (MultipleChoiceTask,), attributes)  # one level: not a file task's
    return register_task(file_task_name(path))(task)


def file_task_name(path: str | Path) -> str:
    """`mc_` and the file's name in lower-case letters, digits and '_' (a valid task name)."""
    stem = re.sub(r"[^a-z0-9]+", "_", Path(path).stem.lower()).strip("_")
    return f"mc_{stem}" if stem else "mc_file"


def read_questions(path: str | Path) -> list[dict]:
    """Questions {prompt, options, answer} from a JSONL/JSON file; bad rows name file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"multiple-choice file {path} not found; give a JSONL file of {LAYOUT} rows"
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
        if not {"question", "choices"} & row.keys():  # another layout altogether
            raise ValueError(
                f"{where}: a multiple-choice file needs the columns {', '.join(COLUMNS)} "
                f"(MMLU's layout: {LAYOUT}); this row has: {', '.join(map(str, row)) or 'none'}"
            )
        question, choices, answer = choice_row(row, where=where)
        questions.append({"prompt": question, "options": choices, "answer": answer})
    if not questions:
        raise ValueError(f"{path} holds no questions; give one {LAYOUT} row per line")
    return questions


def _json(text: str, *, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
