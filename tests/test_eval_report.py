"""eval/report.py's files: standard JSON (no NaN), and a report replaced whole or not at all."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedllm.eval import report as report_module
from fedllm.eval.report import control_md, finite, mia_md, sample_md, write_report


def minimal(run: str, accuracy: float) -> dict:
    return {
        "run": run,
        "tasks": {},
        "quality": {"global": {"clients": {"0": {"mc": {"examples": 0, "accuracy": accuracy}}}}},
        "leakage": {"exposure": [], "mia": {}, "extraction": {}},
        "seconds": 1.0,
        "settings": {"max_examples": 8},
    }


def strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_inf_are_null_so_report_json_is_standard_json(tmp_path: Path) -> None:
    """A task with no example (multiple_choice on WordNet) scores NaN; JSON has no NaN."""
    out = write_report(minimal("a", math.nan), tmp_path / "eval")
    data = strict((out / "report.json").read_text())
    assert data["quality"]["global"]["clients"]["0"]["mc"]["accuracy"] is None
    got = finite({"x": [math.inf, 1.5, -math.inf], "y": (2.0,)})
    assert got == {"x": [None, 1.5, None], "y": [2.0]}


def test_an_interrupted_write_leaves_the_previous_report_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = write_report(minimal("first", 0.5), tmp_path / "eval")
    (out / "mia.png").write_bytes(b"old plot")  # a file of the first report only

    def interrupted(*args: object, **kwargs: object) -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "exposure_md", interrupted)  # after report.json is written
    with pytest.raises(KeyboardInterrupt):
        write_report(minimal("second", 0.25), out)
    assert strict((out / "report.json").read_text())["run"] == "first"
    assert "first" in (out / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temp folder left
    monkeypatch.undo()
    write_report(minimal("second", 0.25), out)  # a finished one replaces the whole folder
    assert strict((out / "report.json").read_text())["run"] == "second"
    assert not (out / "mia.png").exists()


def test_the_too_few_note_names_the_count_each_level_needs() -> None:
    """96 non-members: both levels starred, and the note gives 101 and 1001 (FPR < α is strict,
    so exactly 1/α non-members still allow no false positive)."""
    short = {"value": 0.0, "enough_non_members": False}
    s = {
        "auc": 0.5,
        "members": 192,
        "non_members": 96,
        "tpr@fpr<0.01": {**short, "needs_non_members": 101},
        "tpr@fpr<0.001": {**short, "needs_non_members": 1001},
    }
    md = "\n".join(mia_md({"base": {"pooled": {"loss": s}}}))
    assert "| base | loss | 0.500 | — | 0.000* | 0.000* | 192 | 96 |" in md
    assert "more than 1/α non-members (101 for 1%, 1001 for 0.1%)" in md


def test_the_intervals_say_how_they_resampled_and_the_control_its_confidence() -> None:
    interval = {"resamples": 200, "confidence": 0.9, "seed": 4, "resampled": "matched sets"}
    s = {
        "auc": 0.6,
        "auc_interval": [0.55, 0.65],
        "interval": interval,
        "members": 240,
        "non_members": 120,
        "tpr@fpr<0.01": {"value": 0.1, "enough_non_members": True, "needs_non_members": 101},
        "tpr@fpr<0.001": {"value": 0.0, "enough_non_members": False, "needs_non_members": 1001},
    }
    control = {"ok": False, "outside": {"loss": [0.55, 0.65]}}
    md = "\n".join(mia_md({"base": {"pooled": {"loss": s}}}, control=control))
    assert "90% percentile bootstrap, 200 resamples (seed 4), whole matched sets" in md
    assert "the 10% chance a 90% interval leaves 0.5 out for each score" in md
    assert "1-in-20" not in md
    s["interval"] = {**interval, "resampled": "examples"}
    md = "\n".join(mia_md({"base": {"pooled": {"loss": s}}}))
    assert "members and non-members resampled separately within each client" in md
    assert "5% chance a 95% interval" in control_md(control)[0]


def test_examples_without_a_scored_token_are_counted_in_the_report() -> None:
    row = {
        "held_out": 40,
        "non_members": 36,
        "members": 71,
        "dropped_non_members": 2,
        "member_tokens_mean": 12.0,
        "non_member_tokens_mean": 12.5,
    }
    sample = {"0": {**row, "unscored_non_members": 2, "unscored_members": 1}, "1": row}
    md = "\n".join(sample_md(sample))
    assert "| 0 | 40 | 36 | 71 | 2 | 2 / 1 | 12.0 / 12.5 |" in md
    assert "| 1 | 40 | 36 | 71 | 2 | 0 / 0 | 12.0 / 12.5 |" in md  # an older report: none
    assert "**Note**: 2 non-members and 1 member have no scored token" in md
    assert "**Note**" not in "\n".join(sample_md({"1": row}))
