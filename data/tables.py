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
from collections.abc import Iterable
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
    """One JSON object per line (blank lines skipped), read once; a line that is not one names
    its number. Raises UnicodeDecodeError for a file that is not UTF-8; a byte-order mark (as
    Windows editors save) is fine."""
    with path.open(encoding="utf-8-sig") as lines:
        objects, numbers = _line_objects(lines, path)
    return _table(objects, [f"{path} line {n}" for n in numbers])


def read_json(path: Path) -> Table:
    """A JSON array of objects (one row each) or one object (one row); a `.json` file holding
    JSON Lines, as `datasets` accepts, is read as JSON Lines. A UTF-8 byte-order mark is fine."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            objects, numbers = _line_objects(text.splitlines(), path)
        except ValueError:
            objects = []
        if len(objects) < 2:  # not JSON Lines either: the whole file's JSON error stands
            raise
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


def _line_objects(lines: Iterable[str], path: Path) -> tuple[list[dict], list[int]]:
    """(objects, their line numbers) of JSON Lines, blank lines skipped; a line that is not one
    JSON object is a ValueError naming it."""
    objects, numbers = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.rstrip())
        except json.JSONDecodeError as bad:
            raise ValueError(
                f"{path} line {number} is not valid JSON ({bad.msg} at column {bad.colno}); "
                "every line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path} line {number} is a JSON {type(row).__name__}, not an object; every "
                'line must be one JSON object ({"prompt": ..., "response": ...})'
            )
        objects.append(row)
        numbers.append(number)
    return objects, numbers


def read_csv(path: Path) -> Table:
    """A header row, then rows of text cells, read once; a row shorter than the header leaves
    the rest None, a wider one (a comma left unquoted) is refused naming its line. Raises
    UnicodeDecodeError for a file that is not UTF-8."""
    objects, places = [], []
    with path.open(encoding="utf-8-sig", newline="") as lines:
        reader = csv.reader(lines)
        try:
            header = next((record for record in reader if any(record)), [])  # blank lines aside
            if repeated := sorted({c for c in header if header.count(c) > 1}):
                raise ValueError(f"{path}: the header names a column twice: {repeated}")
            start = reader.line_num + 1
            for record in reader:
                if len(record) > len(header):
                    raise ValueError(
                        f"{path} line {reader.line_num} has {len(record)} fields, the header "
                        f"{len(header)}; quote a field that holds a comma"
                    )
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
