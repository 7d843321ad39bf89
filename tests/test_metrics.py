"""metrics.jsonl: a last line cut short by a crash is dropped with a warning, a bad line elsewhere
is an error naming file and line, and written rows are fsynced before the checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from pathlib import Path

import pytest

from fedllm.server.metrics import METRICS, MetricsLog, final_table, perplexity, table_markdown

ROWS = [
    {"kind": "server", "round": 0, "held_out_loss": 3.0},
    {"kind": "client", "round": 1, "partition": 0},
    {"kind": "server", "round": 1, "held_out_loss": 2.5},
    {"kind": "client", "round": 2, "partition": 0},
]


def _log_with(tmp_path: Path, tail: bytes) -> MetricsLog:
    """A metrics file holding ROWS, then `tail` (e.g. half a row written when the run died)."""
    log = MetricsLog(tmp_path)
    log.write(ROWS)
    with log.path.open("ab") as f:
        f.write(tail)
    return log


HALF_ROW = json.dumps({"kind": "server", "round": 2, "held_out_loss": 2.25}).encode()[:23]


@pytest.mark.parametrize("tail", [HALF_ROW, HALF_ROW + b"\n", b'{"kind": "cli\xe2', b"\x00" * 32])
def test_read_drops_a_half_written_last_line_with_a_warning(
    tmp_path: Path, tail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    log = _log_with(tmp_path, tail)
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        assert log.read() == ROWS
    assert f"{tmp_path / METRICS}: dropping line 5" in caplog.text


def test_truncate_after_tolerates_a_half_written_last_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = _log_with(tmp_path, HALF_ROW)
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        log.truncate_after(1)
    assert "dropping line 5" in caplog.text
    assert log.path.read_text().splitlines() == [json.dumps(r) for r in ROWS[:3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS]  # no temporary left
    log.write([{"kind": "server", "round": 2}])  # appending after the repair gives whole lines
    assert [r["round"] for r in log.read()] == [0, 1, 1, 2]


@pytest.mark.parametrize("bad", [b"{not json", b"[1, 2]"])
def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(
    tmp_path: Path, bad: bytes
) -> None:
    log = MetricsLog(tmp_path)
    log.write(ROWS[:2])
    with log.path.open("ab") as f:
        f.write(bad + b"\n")
    log.write(ROWS[2:])
    with pytest.raises(ValueError, match=rf"{METRICS}: line 3 is .*--overwrite") as err:
        log.read()
    assert str(tmp_path / METRICS) in str(err.value)
    with pytest.raises(ValueError, match="line 3"):
        log.truncate_after(1)
    assert log.path.read_bytes().count(b"\n") == 5, "a failed truncate leaves the file as it was"


def test_blank_lines_and_a_missing_file_are_fine(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    assert log.read() == []
    log.path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n\n")
    assert log.read() == ROWS[:2]


def test_write_flushes_and_fsyncs_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, bytes]] = []
    real = os.fsync
    log = MetricsLog(tmp_path)

    def spy(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, log.path.read_bytes() if kind == "file" else b""))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    log.write(ROWS[:2])
    # at the fsync the rows were already flushed to the file
    assert synced == [("file", "".join(json.dumps(r) + "\n" for r in ROWS[:2]).encode())]
    synced.clear()
    log.truncate_after(0)
    assert [k for k, _ in synced] == ["file", "dir"]


def test_the_perplexity_of_an_overflowing_loss_is_inf_never_an_error() -> None:
    """exp(loss) overflows a float above ln(max float) ≈ 709.78. A hostile evaluation reply
    (nll-sum 1e300 over 1 token, held-out-loss 1e300) passes the evaluation checks, so the
    final table raised OverflowError at the end of the run, before the final adapter was saved,
    and again on every --resume."""
    assert perplexity(2.0) == math.exp(2.0)
    assert perplexity(709.0) == math.exp(709.0)  # still a float
    assert perplexity(710.0) == math.inf and perplexity(1e300) == math.inf
    assert perplexity(-1e300) == 0.0 and math.isnan(perplexity(math.nan))
    rows = [
        {"kind": "eval", "round": 0, "partition": 0, "held_out_loss": 3.0},
        {"kind": "server", "round": 0, "held_out_loss": 3.0},
        {"kind": "eval", "round": 1, "partition": 0, "held_out_loss": 1e300},
        {"kind": "server", "round": 1, "held_out_loss": 1e300},
    ]
    table = final_table(rows, 1)
    want = {"base_loss": 3.0, "federated_loss": 1e300, "base_ppl": math.exp(3.0)}
    want |= {"federated_ppl": math.inf, "change": 1e300 - 3.0}
    assert table == [{"who": "client 0", **want}, {"who": "global", **want}]
    lines = table_markdown(table).splitlines()[2:]
    assert all(line.startswith(("| client 0 | 3.0000 |", "| global | 3.0000 |")) for line in lines)
    assert all("| 20.09 | inf | +1000000" in line for line in lines), lines


def test_the_final_table_shows_the_tuned_adapters_where_clients_tuned() -> None:
    """features.personal_tuning: the last round's eval rows carry tuned_loss, the server row
    their mean; a client that sent none (its tuning failed) shows a dash, and so does the global
    row then (its Δ would compare two panels)."""
    rows = [
        {"kind": "eval", "round": 0, "partition": 0, "held_out_loss": 3.0},
        {"kind": "eval", "round": 0, "partition": 1, "held_out_loss": 3.5},
        {"kind": "server", "round": 0, "held_out_loss": 3.25},
        {"kind": "eval", "round": 1, "partition": 0, "held_out_loss": 2.5, "tuned_loss": 2.25},
        {"kind": "eval", "round": 1, "partition": 1, "held_out_loss": 3.0},
        {"kind": "server", "round": 1, "held_out_loss": 2.75, "tuned_loss": 2.25},
    ]
    table = final_table(rows, 1)
    assert [r.get("tuned_loss") for r in table] == [2.25, None, None]  # global: not every client
    header, _, c0, c1, world = table_markdown(table).splitlines()
    assert header.endswith("| Δ loss | tuned loss | Δ tuned |")
    assert c0.endswith("| -0.5000 | 2.2500 | -0.2500 |")
    assert c1.endswith("| -0.5000 | – | – |") and world.endswith("| -0.5000 | – | – |")
    rows[4] |= {"tuned_loss": 2.5}
    rows[5] |= {"tuned_loss": 2.375}  # the token-weighted mean, as the server writes it
    *_, world = table_markdown(final_table(rows, 1)).splitlines()
    assert world.endswith("| -0.5000 | 2.3750 | -0.3750 |")
    plain = [{k: v for k, v in r.items() if k != "tuned_loss"} for r in rows]
    assert "tuned" not in table_markdown(final_table(plain, 1))


def test_the_global_row_compares_the_clients_that_evaluated_in_both_rounds() -> None:
    # h99: every client -0.5, but the global said 4.6667 -> 3.5 (-1.1667): a client missing
    # from the last round was in the base loss and not in the federated one
    rows = [
        {"kind": "eval", "round": 0, "partition": 0, "held_out_loss": 4.0, "tokens": 10},
        {"kind": "eval", "round": 0, "partition": 1, "held_out_loss": 4.0, "tokens": 10},
        {"kind": "eval", "round": 0, "partition": 2, "held_out_loss": 6.0, "tokens": 10},
        {"kind": "server", "round": 0, "held_out_loss": 14 / 3},
        {"kind": "eval", "round": 2, "partition": 0, "held_out_loss": 3.5, "tokens": 10},
        {"kind": "eval", "round": 2, "partition": 1, "held_out_loss": 3.5, "tokens": 10},
        {"kind": "server", "round": 2, "held_out_loss": 3.5},
    ]
    world = final_table(rows, 2)[-1]
    assert world["who"] == "global" and world["change"] == pytest.approx(-0.5)
    assert (world["base_loss"], world["federated_loss"]) == (4.0, 3.5)
    rows.insert(6, {"kind": "eval", "round": 2, "partition": 2, "held_out_loss": 5.5, "tokens": 10})
    rows[-1]["held_out_loss"] = 12.5 / 3  # every client in both: the server's own numbers
    assert final_table(rows, 2)[-1]["federated_loss"] == 12.5 / 3


def test_truncate_after_drops_stop_rows(tmp_path: Path) -> None:
    """A resumed run goes on past its old stop (a larger budget), or writes its own at its end:
    the old `stop` row would sit mid-file."""
    log = MetricsLog(tmp_path)
    stop = {"kind": "stop", "round": 2, "reason": "privacy budget"}
    log.write([{"kind": "server", "round": 1}, {"kind": "server", "round": 2}, stop])
    log.truncate_after(2)
    assert log.read() == [{"kind": "server", "round": 1}, {"kind": "server", "round": 2}]
