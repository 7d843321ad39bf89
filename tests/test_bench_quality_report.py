"""bench/_quality_report.py: the rows file a report is built from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
try:
    import _quality_report as R
finally:
    sys.path.pop(0)


def _write(path: Path, cells: list[tuple[str, str, int]]) -> None:
    path.write_text(
        "".join(json.dumps({"method": m, "regime": g, "seed": s}) + "\n" for m, g, s in cells)
    )


def test_rows_are_read_in_order_and_a_missing_file_is_no_rows(tmp_path: Path) -> None:
    _write(tmp_path / "rows.jsonl", [("fedit", "scarce", 0), ("fedit", "scarce", 1)])
    assert [r["seed"] for r in R.read_rows(tmp_path / "rows.jsonl")] == [0, 1]
    assert list(R.read_cells(tmp_path / "rows.jsonl")) == [
        ("fedit", "scarce", 0),
        ("fedit", "scarce", 1),
    ]
    assert (
        R.read_rows(tmp_path / "none.jsonl") == [] and R.read_cells(tmp_path / "none.jsonl") == {}
    )


def test_a_cell_written_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    cells = [("fedit", "scarce", 0), ("svd", "scarce", 0), ("fedit", "scarce", 0)]
    _write(tmp_path / "rows.jsonl", cells)
    with pytest.raises(
        ValueError, match=r"line 3 repeats the cell \('fedit', 'scarce', 0\) of line 1"
    ):
        R.read_cells(tmp_path / "rows.jsonl")
    # read_rows itself keeps both (local_tuning's rows repeat a cell once per tuning lr)
    assert len(R.read_rows(tmp_path / "rows.jsonl")) == 3
