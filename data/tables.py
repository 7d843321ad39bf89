"""A local JSON, JSON Lines or CSV file as rows of Python values, read as written.

`datasets` (pandas and Arrow underneath) guesses types: a CSV cell `NA`, `null` or `None` became
a missing value, `007` the number 7.0, a JSON string "2024-01-01" a timestamp. Text a user wrote
is data here, so these files are read with the standard library: a CSV cell is its text (an
empty cell is None), a JSON value keeps its JSON type. Each row comes with its place in the
file (`line N`, or `row N` of a JSON array) for error messages.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Table:
    """Rows (every column present, None where a row has no value), their columns in first-seen
    order and each row's place in the file."""

    columns: list[str]
    rows: list[dict[str, Any]]
    places: list[str]


def read_jsonl(path: Path) -> Table:
    """One JSON object per line (blank lines skipped); call after the lines were checked."""
    objects, places = [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                objects.append(json.loads(line))
                places.append(f"{path} line {number}")
    return _table(objects, places)


def read_json(path: Path) -> Table:
    """A JSON array of objects (one row each) or one object (one row); a `.json` file holding
    JSON Lines, as `datasets` accepts, is read as JSON Lines. A UTF-8 byte-order mark is fine."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        lines = _json_lines(text)
        if lines is None:
            raise
        objects, numbers = lines
        return _table(objects, [f"{path} line {n}" for n in numbers])
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}; give a list of objects (one per row), "
            "or JSON Lines (.jsonl) with one object per line"
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {i + 1} is a JSON {type(row).__name__}, not an object")
    return _table(data, [f"{path} row {i + 1}" for i in range(len(data))])


def _json_lines(text: str) -> tuple[list[dict], list[int]] | None:
    """(objects, their line numbers) if every non-blank line of `text` is a JSON object."""
    objects, numbers = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(row, dict):
            return None
        objects.append(row)
        numbers.append(number)
    return (objects, numbers) if len(objects) > 1 else None


def read_csv(path: Path) -> Table:
    """A header row, then rows of text cells; a row shorter than the header leaves the rest None
    (a wider one was refused before). Raises UnicodeDecodeError for a file that is not UTF-8."""
    objects, places = [], []
    with path.open(encoding="utf-8-sig", newline="") as lines:
        reader = csv.reader(lines)
        try:
            header = next((record for record in reader if any(record)), [])  # blank lines aside
            if repeated := sorted({c for c in header if header.count(c) > 1}):
                raise ValueError(f"{path}: the header names a column twice: {repeated}")
            start = reader.line_num + 1
            for record in reader:
                if any(record):  # a blank line is no row
                    cells = [None if cell == "" else cell for cell in record]
                    objects.append(dict(zip(header, cells, strict=False)))
                    places.append(f"{path} line {start}")
                start = reader.line_num + 1
        except csv.Error as err:  # e.g. a cell longer than the csv module's field limit
            raise ValueError(
                f"{path} line {reader.line_num}: not readable as CSV ({err})"
            ) from None
    if not objects:
        raise ValueError(f"{path} has a header but no rows; give at least one example")
    return _table(objects, places, columns=header)


def _table(objects: list[dict], places: list[str], *, columns: list[str] | None = None) -> Table:
    order = dict.fromkeys(columns or [k for row in objects for k in row])
    names = list(order)
    return Table(names, [{c: row.get(c) for c in names} for row in objects], places)
