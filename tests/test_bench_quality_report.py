"""bench/_quality_report.py: the rows file a report is built from."""

from __future__ import annotations

import json
import re
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


def _cell(method: str, seed: int, curve: list[float]) -> dict:
    return {
        "method": method,
        "regime": "domain",
        "seed": seed,
        "semantics": "adapter",
        "personal": curve,
        "test": curve,
        "mb_moved": 1.0,
        "seconds": 10.0,
        "load": 0.5,
    }


def test_a_regime_table_gives_intervals_paired_differences_and_whether_curves_flattened() -> None:
    """By hand: svd's finals 3.2, 3.3, 3.1 are 3.2 ± t(0.975, 2)·0.1/√3 = 0.2484; its last
    rounds moved −0.30, −0.28, −0.32 (−0.3 ± 4.3027·0.02/√3 = 0.0497: still falling); fedit's
    moved +0.0002, −0.0002, 0 (within 0.001 of 0: flat); svd − fedit −0.1 ± 0.0005."""
    rows = [
        _cell("svd", 0, [4.0, 3.50, 3.20]),
        _cell("svd", 1, [4.0, 3.58, 3.30]),
        _cell("svd", 2, [4.0, 3.42, 3.10]),
        _cell("fedit", 0, [4.0, 3.30, 3.3002]),
        _cell("fedit", 1, [4.0, 3.40, 3.3998]),
        _cell("fedit", 2, [4.0, 3.20, 3.20]),
    ]
    lines = R.regime_tables(rows, "domain", pairs=[("svd", "fedit")])
    svd = next(x for x in lines if x.startswith("| svd | adapter"))
    assert svd == (
        "| svd | adapter | 3.2000 ± 0.2484 | 3.2000 ± 0.2484 | 3.2000 ± 0.2484 "
        "| -0.3000 ± 0.0497 better | 1.0 | 10 | — | 0, 1, 2 |"
    )
    fedit = next(x for x in lines if x.startswith("| fedit | adapter"))
    assert re.search(r"\| [+-]0\.0000 ± 0\.0005 same \|", fedit), fedit
    assert "| svd − fedit | -0.1000 ± 0.0005 better | -0.1000 ± 0.0005 better |" in lines
    paired = next(x for x in lines if x.startswith("| svd | -0.1000"))
    assert paired.startswith("| svd | -0.1000 ± 0.0005 better | — |")  # no local-only cells
    curves = lines[lines.index("| method | r0 | r1 | r2 |") :]
    assert curves[2:] == [
        "| svd | 4.0000 | 3.5000 | 3.2000 |",
        "| fedit | 4.0000 | 3.3000 | 3.3000 |",
    ]
