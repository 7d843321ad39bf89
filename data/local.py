"""Examples from the user's own data: a JSON/JSONL/CSV/Parquet file or a `save_to_disk` folder.

Rows are prompt/response columns (`prompt_field`, `response_field`), or, found from the columns
when those are absent: a `messages` list of {role, content} turns (chat, loss on the assistant
turns), Alpaca's instruction/input/output, or MMLU's question/choices/answer.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedllm.data.chat import check_messages, messages_example
from fedllm.data.tables import Table, read_csv, read_json, read_jsonl

# File suffix → the `datasets` builder that reads it.
BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
# Text formats read with the standard library, as written (no type guessing): suffix → reader
TEXT_TABLES = {".json": read_json, ".jsonl": read_jsonl, ".csv": read_csv}
# Row layouts read without setting prompt_field/response_field: the columns each one needs.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "multiple_choice": ("question", "choices", "answer"),
}
LAYOUT_TEXT = ", ".join(
    f"{' + '.join(repr(c) for c in needs)} ({layout})" for layout, needs in LAYOUTS.items()
)


def load_local(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    label_field: str | None = None,
) -> list[dict[str, Any]]:
    """Read a local file or `datasets.save_to_disk` folder (a DatasetDict's "train" split)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"local dataset {path} not found; give a {'/'.join(BUILDERS)} file "
            "or a folder written by datasets' save_to_disk"
        )
    fields = {
        "prompt_field": prompt_field,
        "response_field": response_field,
        "label_field": label_field,
    }
    if not path.is_dir() and path.suffix.lower() in TEXT_TABLES:  # read as written, no guessing
        table = _read_table(path)
        return rows_to_examples(
            table.rows, columns=table.columns, origin=str(path), places=table.places, **fields
        )
    # A throwaway cache: the rows are copied out below, so nothing is left in ~/.cache.
    with tempfile.TemporaryDirectory(prefix="fedllm-data-") as cache_dir:
        dataset = _read_folder(path) if path.is_dir() else _read_file(path, cache_dir=cache_dir)
        columns = list(dataset.column_names)
        return rows_to_examples(dataset, columns=columns, origin=str(path), **fields)


def rows_to_examples(
    rows: Iterable[Mapping[str, Any]],
    *,
    columns: list[str],
    origin: str,
    prompt_field: str,
    response_field: str,
    label_field: str | None,
    places: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Map table rows to examples in the layout `detect_layout` finds; label "" if unset.
    `places`: each row's place in its file for errors (default: "<origin> row N").

    prompt/response rows: a None prompt becomes "" (a plain continuation); a null or empty
    response, a null label and a value that is a mapping or list are errors naming the row;
    numbers become their text. The other layouts check every row and name the file, the row and
    what is missing.
    """
    layout = detect_layout(
        columns, origin=origin, prompt_field=prompt_field, response_field=response_field
    )
    if label_field is not None and label_field not in columns:
        raise ValueError(
            f"label_field={label_field!r} is not a column of {origin}; its columns are {columns}"
        )
    has_id = "id" in columns
    examples: list[dict[str, Any]] = []
    for row_number, row in enumerate(_decoded(rows, origin)):
        where = places[row_number] if places else f"{origin} row {row_number + 1}"
        if label_field is not None and row[label_field] is None:
            raise ValueError(
                f"{where}: label {label_field!r} is null or missing{_row_keys(row, label_field)};"
                " every row needs one (it names the row's domain for data.partitioner=domain)"
            )
        label = "" if label_field is None else _text(row[label_field], where, field=label_field)
        example_id = _text(row["id"], where, field="id") if has_id else f"{origin}:{row_number}"
        if layout == "messages":
            if row["messages"] is None:  # the file's other rows have it: a row of another layout
                raise ValueError(
                    f"{where}: no 'messages'{_row_keys(row)}; the file's rows are chat rows, "
                    f"and every row needs the file's layout (one of {LAYOUT_TEXT})"
                )
            messages = check_messages(row["messages"], where=where)
            examples.append(messages_example(messages, label=label, example_id=example_id))
            continue
        if layout == "alpaca":
            prompt, response = alpaca_pair(row, where=where)
            extra: dict[str, Any] = {}
        elif layout == "multiple_choice":
            question, choices, answer = choice_row(row, where=where)
            prompt, response = question, choices[answer]
            extra = {"choices": choices, "answer": answer}
        else:
            response = _text(row[response_field], where, field=response_field)
            if row[response_field] is None or not response.strip():
                empty = "null or missing" if row[response_field] is None else "empty"
                raise ValueError(
                    f"{where}: {response_field!r} is {empty}{_row_keys(row, response_field)}; "
                    "every row needs a response to learn"
                )
            prompt, extra = _text(row[prompt_field], where, field=prompt_field), {}
        examples.append(
            {"prompt": prompt, "response": response, "label": label, "id": example_id, **extra}
        )
    return examples


def _row_keys(row: Mapping[str, Any], wanted: str | None = None) -> str:
    """' (this row has: a, b)': the row's keys that hold a value, for an error; with the key
    that was `wanted`, the closest of them (a typo in one row: 'respose')."""
    keys = [k for k, v in row.items() if v is not None]
    if not keys:
        return " (this row is empty)"
    others = [k for k in keys if k != wanted]  # the key itself, empty, is no typo of itself
    close = difflib.get_close_matches(wanted, others, n=1) if wanted else []
    typo = f"; is {close[0]!r} a typo of {wanted!r}?" if close else ""
    return f" (this row has: {', '.join(keys)}{typo})"


def detect_layout(
    columns: list[str], *, origin: str, prompt_field: str, response_field: str
) -> str:
    """The rows' layout: the prompt/response fields, else (fields left at their defaults) a
    'messages' list, Alpaca's instruction/output, or question/choices/answer, in that order."""
    if prompt_field in columns and response_field in columns:
        return "fields"
    if (prompt_field, response_field) == ("prompt", "response"):
        for layout, needs in LAYOUTS.items():
            if set(needs) <= set(columns):
                return layout
    argument, field = (
        ("prompt_field", prompt_field)
        if prompt_field not in columns
        else ("response_field", response_field)
    )
    raise ValueError(
        f"{argument}={field!r} is not a column of {origin}; its columns are {columns}; "
        f"rows are also read without setting fields when they have {LAYOUT_TEXT}"
    )


def alpaca_pair(row: Mapping[str, Any], *, where: str) -> tuple[str, str]:
    """(prompt, response) of an Alpaca row: instruction (+ "\\n\\n" + input if any) → output."""
    for column in ("instruction", "output"):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{where}: Alpaca row without {column!r} (got {value!r:.60}); every row needs a "
                "non-empty 'instruction' and 'output' ('input' is optional)"
            )
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"{where}: Alpaca 'input' must be a string or absent, got {extra!r:.60}")
    prompt = row["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
    return prompt, row["output"]


def choice_row(row: Mapping[str, Any], *, where: str) -> tuple[str, list[str], int]:
    """(question, choices, answer index) of a multiple-choice row (MMLU's layout).

    `answer` is a 0-based index (int or digits) or a letter (A = the first choice).
    """
    question, choices = row.get("question"), row.get("choices")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: multiple-choice row without 'question' (got {question!r:.60})")
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or len(choices) < 2:
        raise ValueError(
            f"{where}: 'choices' must be a list of at least 2 answers, got {choices!r:.80}"
        )
    if any(c is None for c in choices):
        raise ValueError(f"{where}: 'choices' holds a null: {list(choices)!r:.80}")
    if any(not str(c).strip() for c in choices):  # it adds no token to score
        raise ValueError(f"{where}: 'choices' holds an empty answer: {list(choices)!r:.80}")
    texts = [str(c) for c in choices]
    return question, texts, answer_index(row.get("answer"), len(texts), where=where)


def answer_index(answer: Any, n: int, *, where: str) -> int:
    """A choice index from 0..n-1, digits, or a letter A.. (case-insensitive)."""
    index: int | None = None
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        index = ord(answer.strip().upper()) - ord("A")
    if index is None or not 0 <= index < n:
        raise ValueError(
            f"{where}: 'answer' {answer!r:.80} is neither a choice index 0..{n - 1} nor a letter "
            f"A..{chr(ord('A') + n - 1)} for its {n} choices"
        )
    return index


def _read_table(path: Path) -> Table:
    """A JSON, JSON Lines or CSV file's rows as written (`fedllm.data.tables`, whose readers
    name a bad line); a file that is not UTF-8 or not JSON is named by `_unreadable`."""
    builder = _builder(path)
    read = TEXT_TABLES[path.suffix.lower()]
    try:
        table = read(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(_unreadable(path, builder, err=err)) from None
    if not table.rows:
        raise ValueError(f"{path} holds no rows; give at least one example")
    return table


def _builder(path: Path) -> str:
    """The `datasets` builder of `path`'s suffix, once the file is known to hold something."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"cannot read {path}: the suffix {path.suffix!r} is not one of {list(BUILDERS)}; "
            "a folder written by datasets' save_to_disk also works"
        )
    size = path.stat().st_size
    if size == 0 or (size < 1 << 16 and not path.read_bytes().strip()):
        raise ValueError(f"{path} is empty: it holds no rows; give at least one example")
    return builder


def _read_file(path: Path, *, cache_dir: str) -> Any:
    builder = _builder(path)
    import datasets  # imported on use: it takes over a second

    try:
        dataset = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=cache_dir
        )
    except Exception as err:  # datasets' own errors name neither the file nor the line
        raise ValueError(_unreadable(path, builder, err=err)) from None
    if len(dataset) == 0:
        raise ValueError(f"{path} has columns {dataset.column_names} but no rows")
    return dataset


def _unreadable(path: Path, builder: str, *, err: Exception) -> str:
    """Why `path` does not read as `builder`, where: a byte that is not UTF-8, where a JSON file
    breaks, or datasets' own words (Parquet)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        line, byte = raw[: bad.start].count(b"\n") + 1, raw[bad.start : bad.start + 1]
        return f"{path} line {line} is not UTF-8 text (byte {byte!r}); save it as UTF-8"
    if builder == "json":
        try:
            json.loads(text)
        except json.JSONDecodeError as bad:
            return (
                f"{path} is not valid JSON ({bad.msg} at line {bad.lineno} column {bad.colno}); "
                "give a list of objects, or JSON Lines (.jsonl) with one object per line"
            )
    if "corresponds to no data" in str(err):  # datasets' words for a file without rows
        return f"{path} holds no rows; give at least one example"
    return f"cannot read {path} as {builder.upper()}: {err}"


def _read_folder(path: Path) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(
            f"{path} is a folder but not one written by datasets' save_to_disk ({err}); "
            f"pass a {'/'.join(BUILDERS)} file instead"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(
                f"{path} holds a DatasetDict without a 'train' split; its splits are {list(loaded)}"
            )
        return loaded["train"]
    return loaded


def _text(value: Any, where: str, *, field: str) -> str:
    """A cell as text: None is "", a number its digits; a mapping or list is an error (its
    Python repr would be trained on as if it were text)."""
    if isinstance(value, Mapping | list | tuple):
        raise ValueError(
            f"{where}: {field!r} is a {type(value).__name__}, not text; flatten it to a string "
            "(or name another column)"
        )
    return "" if value is None else str(value)


def _decoded(rows: Iterable[Mapping[str, Any]], origin: str) -> Iterator[Mapping[str, Any]]:
    """`rows`, with a file that is not UTF-8 named (datasets decodes lazily, row by row)."""
    try:
        yield from rows
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{origin} is not UTF-8 text (byte {err.object[err.start : err.start + 1]!r} at "
            f"offset {err.start}); save it as UTF-8"
        ) from None
