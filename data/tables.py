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
    """A JSON array of objects, or an object of equal-length column lists."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(
                f"{path}: its columns have different lengths ({sorted(lengths)}); give a list "
                "of objects, one per row"
            )
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if not isinstance(data, list):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}; give a list of objects (one per row), "
            "or JSON Lines (.jsonl) with one object per line"
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {i + 1} is a JSON {type(row).__name__}, not an object")
    return _table(data, [f"{path} row {i + 1}" for i in range(len(data))])


def read_csv(path: Path) -> Table:
    """A header row, then rows of text cells; a row shorter than the header leaves the rest None
    (a wider one was refused before). Raises UnicodeDecodeError for a file that is not UTF-8."""
    objects, places = [], []
    with path.open(encoding="utf-8-sig", newline="") as lines:
        reader = csv.reader(lines)
        header = next(reader, [])
        if repeated := sorted({c for c in header if header.count(c) > 1}):
            raise ValueError(f"{path}: the header names a column twice: {repeated}")
        start = reader.line_num + 1
        for record in reader:
            if any(record):  # a blank line is no row
                cells = [None if cell == "" else cell for cell in record]
                objects.append(dict(zip(header, cells, strict=False)))
                places.append(f"{path} line {start}")
            start = reader.line_num + 1
    if not objects:
        raise ValueError(f"{path} has a header but no rows; give at least one example")
    return _table(objects, places, columns=header)


def _table(objects: list[dict], places: list[str], *, columns: list[str] | None = None) -> Table:
    order = dict.fromkeys(columns or [k for row in objects for k in row])
    names = list(order)
    return Table(names, [{c: row.get(c) for c in names} for row in objects], places)
