"""Local JSON, JSON Lines and CSV files are read as written: no cell becomes a missing value, a
number or a date because it looks like one (audit h86: `NA` prompts were blanked, `007` became
7.0, "2024-01-01" a timestamp), and each error names the file's line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.data import load_local
from fedllm.data.tables import read_csv, read_json, read_jsonl


def test_csv_cells_are_their_text_and_only_an_empty_cell_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "na.csv"
    path.write_text(
        "prompt,response,topic\nNA,null,NA\nNone,N/A,#N/A\n007,1e3,2024-01-01\n,1.50,x\n",
        encoding="utf-8",
    )
    examples = load_local(path, label_field="topic")
    pairs = [(e["prompt"], e["response"], e["label"]) for e in examples]
    assert pairs == [
        ("NA", "null", "NA"),
        ("None", "N/A", "#N/A"),
        ("007", "1e3", "2024-01-01"),
        ("", "1.50", "x"),  # an empty prompt: a plain continuation, as before
    ]
    table = read_csv(path)
    assert table.rows[3]["prompt"] is None and table.places[3] == f"{path} line 5"


def test_json_lines_keep_their_json_types_and_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": "a", "response": "2024-01-01", "id": "00042"},
        {"prompt": "b", "response": 7, "id": 43},
    ]
    path.write_text(
        json.dumps(rows[0]) + "\n\n\n" + json.dumps(rows[1]) + "\n" + '{"prompt": "c"}\n',
        encoding="utf-8",
    )
    table = read_jsonl(path)
    assert table.columns == ["prompt", "response", "id"]
    assert table.places == [f"{path} line 1", f"{path} line 4", f"{path} line 5"]
    assert table.rows[2] == {"prompt": "c", "response": None, "id": None}
    with pytest.raises(ValueError, match=r"mixed\.jsonl line 5: 'response' is null or missing"):
        load_local(path)  # blank lines counted: the line an editor shows
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    examples = load_local(path)
    assert [(e["response"], e["id"]) for e in examples] == [("2024-01-01", "00042"), ("7", "43")]


def test_a_json_file_is_a_list_of_rows_one_object_or_json_lines(tmp_path: Path) -> None:
    """What `datasets` read before stays readable (audit h89): one object is one row (a single
    conversation too), JSON Lines in a .json file are lines, a byte-order mark is fine."""
    row = {"prompt": "p", "response": "0.10"}
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([row]), encoding="utf-8")
    one = tmp_path / "one.json"
    one.write_text(json.dumps(row, indent=2), encoding="utf-8-sig")
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n", encoding="utf-8")
    assert read_json(rows).rows == read_json(one).rows == [row]
    assert read_json(lines).rows == [row, row]
    assert read_json(lines).places == [f"{lines} line 1", f"{lines} line 3"]
    chat = tmp_path / "chat.json"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat.write_text(json.dumps({"messages": turns}), encoding="utf-8")
    assert [e["response"] for e in load_local(chat)] == ["hello"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([row, "text"]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json row 2 is a JSON str, not an object"):
        load_local(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "p",', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        load_local(broken)


def test_a_csv_of_a_header_only_or_a_repeated_column_is_refused(tmp_path: Path) -> None:
    header = tmp_path / "header.csv"
    header.write_text("prompt,response\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has a header but no rows"):
        load_local(header)
    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,response,prompt\na,b,c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"names a column twice: \['prompt'\]"):
        load_local(twice)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt,response\ncaf\xe9,r\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv line 2 is not UTF-8 text"):
        load_local(latin)


def test_an_empty_response_suggests_no_typo_of_itself(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": ""}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_local(path)
    assert "'response' is empty (this row has: prompt, response)" in str(err.value)
    assert "typo" not in str(err.value)


def test_a_csv_cell_past_the_csv_modules_limit_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("\nprompt,response\np," + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"long\.csv line 3: not readable as CSV \(field larger"):
        load_local(path)  # a leading blank line is no header either


def test_json_lines_saved_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    # h110: Windows editors save one; the CSV and JSON readers already skipped it
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "response": "r"}\n')
    assert read_jsonl(path).rows == [{"prompt": "p", "response": "r"}]
