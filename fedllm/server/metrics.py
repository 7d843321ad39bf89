"""Run results as files a person can open: metrics.jsonl, a PNG plot, a Markdown summary.

`MetricsLog.write` is the one writer of a run's metrics: it appends to metrics.jsonl and hands
the same rows to the experiment trackers the recipe names (`fedllm.server.trackers`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedllm.server.trackers import Sink

METRICS = "metrics.jsonl"

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL of per-round, per-client and server rows, mirrored to tracker sinks."""

    def __init__(self, run_dir: Path, *, sinks: Sequence[Sink] = ()) -> None:
        self.path = run_dir / METRICS
        self.sinks = list(sinks)

    def truncate_after(self, last_round: int) -> None:
        """Drop rows of rounds after `last_round` (written before a crash, not checkpointed) and
        `stop` rows (the resumed run goes on, or writes its own at its end).

        The file is rewritten atomically (temporary file, fsync, rename), so a crash here leaves
        either the old rows or the kept ones; a half-written last line is dropped with the rest.
        """
        rows = [
            r
            for r in self.read()
            if int(r.get("round", 0)) <= last_round and r.get("kind") != "stop"
        ]
        tmp = self.path.with_name(f"{self.path.name}.tmp")
        tmp.unlink(missing_ok=True)  # "x": a fresh file, never through a link planted at the name
        with tmp.open("x") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def write(self, rows: list[dict], *, publish: bool = True) -> None:
        """Append `rows`, flushed and fsynced: a round's rows are on disk before its checkpoint.
        Then each tracker sink logs them (step = round), unless `publish=False`: the round loop
        publishes a round's rows once its checkpoint is saved, so a round that a crash makes the
        resumed run repeat reaches the trackers once (metrics.jsonl drops its first rows)."""
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if publish:
            self.publish(rows)

    def publish(self, rows: list[dict]) -> None:
        """Log rows to every sink; a sink that fails is dropped with a warning (metrics.jsonl
        stays the record, and a tracker's outage must not stop a federation)."""
        if not self.sinks:
            return
        from fedllm.server.trackers import mark_published, scalars_by_round

        steps = scalars_by_round(rows)
        for sink in list(self.sinks):
            try:
                for step, scalars in sorted(steps.items()):
                    sink.log(scalars, step)
            except Exception as err:  # any tracker library error
                log.warning("tracker %s failed (%s); it gets no more rows", sink.name, err)
                self.sinks.remove(sink)
        if steps:
            mark_published(self.path.parent, max(steps))

    def catch_up(self, last_round: int) -> list[int]:
        """Publish the rounds up to `last_round` the trackers never got (a crash between a
        round's checkpoint and its publish); returns those rounds. On --resume."""
        from fedllm.server.trackers import published_round

        mark = published_round(self.path.parent) if self.sinks else None
        if mark is None or mark >= last_round:
            return []
        rows = [r for r in self.read() if mark < int(r.get("round", 0)) <= last_round]
        self.publish(rows)
        return sorted({int(r["round"]) for r in rows if "round" in r})

    def close(self) -> None:
        """Close every tracker sink (metrics.jsonl needs no closing)."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # any tracker library error
                log.warning("tracker %s did not close cleanly: %s", sink.name, err)
        self.sinks = []

    def read(self) -> list[dict]:
        """Every row; a last line cut short by a crash is dropped with a warning.

        A line that is not a JSON object anywhere else is a ValueError naming the file and line:
        the file was edited or damaged, and guessing which rows to keep could lose rounds.
        """
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes().split(b"\n")
        lines = [(n, line) for n, line in enumerate(raw, 1) if line.strip()]
        rows: list[dict] = []
        for i, (n, line) in enumerate(lines):
            try:
                row = json.loads(line.decode())
            except UnicodeDecodeError:
                reason = "not UTF-8 text"
            except json.JSONDecodeError as err:
                reason = f"not valid JSON ({err.msg})"
            else:
                if isinstance(row, dict):
                    rows.append(row)
                    continue
                reason = f"a JSON {type(row).__name__}, not an object"
            if i == len(lines) - 1:
                log.warning(
                    "%s: dropping line %d, %s: the end of a row cut short by a crash",
                    self.path,
                    n,
                    reason,
                )
                break
            raise ValueError(
                f"{self.path}: line {n} is {reason}; every line must be one JSON object (a row). "
                "Fix or delete that line, or start the run again with --overwrite"
            )
        return rows


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it survives a power loss (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plot_held_out(rows: list[dict], path: Path, *, title: str) -> Path:
    """Held-out loss by round: the global (token-weighted) curve and one line per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    server = sorted(
        (r["round"], r["held_out_loss"])
        for r in rows
        if r.get("kind") == "server" and "held_out_loss" in r
    )
    clients: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("kind") == "eval":
            clients.setdefault(r["partition"], []).append((r["round"], r["held_out_loss"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for pid, points in sorted(clients.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, lw=1, alpha=0.6, label=f"client {pid}")
    if server:
        xs, ys = zip(*server, strict=True)
        ax.plot(xs, ys, lw=2.5, color="black", marker="o", label="global")
    test = sorted((r["round"], r["test_loss"]) for r in rows if "test_loss" in r)
    if test:  # the server's own global test set
        xs, ys = zip(*test, strict=True)
        ax.plot(xs, ys, lw=2.5, color="tab:red", marker="s", label="test set")
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def final_table(rows: list[dict], last_round: int) -> list[dict]:
    """Base (round 0) against the federated adapter (last round), per client and global."""
    evals = {(r["round"], r["partition"]): r for r in rows if r.get("kind") == "eval"}
    table = []
    for (rnd, pid), base in sorted(evals.items()):
        if rnd != 0 or (last_round, pid) not in evals:
            continue
        fed = evals[(last_round, pid)]
        row = _row(f"client {pid}", base=base["held_out_loss"], fed=fed["held_out_loss"])
        table.append({**row, **_tuned(fed)})
    server = {r["round"]: r for r in rows if r.get("kind") == "server" and "held_out_loss" in r}
    if 0 in server and last_round in server:
        row = _row(
            "global", base=server[0]["held_out_loss"], fed=server[last_round]["held_out_loss"]
        )
        if (common := _common_global(evals, last_round)) is not None:  # like with like (h99)
            row = _row("global", base=common[0], fed=common[1])
        final = [r for (rnd, _), r in evals.items() if rnd == last_round]
        every = final and all("tuned_loss" in r for r in final)  # else Δ would mix panels
        table.append({**row, **(_tuned(server[last_round]) if every else {})})
    test = {r["round"]: r for r in rows if r.get("kind") == "server" and "test_loss" in r}
    if 0 in test and last_round in test:  # the server's own test set (data.test_set)
        table.append(_row("test set", base=test[0]["test_loss"], fed=test[last_round]["test_loss"]))
    return table


def _common_global(
    evals: dict[tuple[int, int], dict], last_round: int
) -> tuple[float, float] | None:
    """(base, federated) token-weighted held-out loss over the clients that evaluated in both
    round 0 and `last_round`, when the two rounds' clients differ (a client that missed one
    made the server rows' global Δ compare different clients); None when they are the same."""
    at = {rnd: {p for (r, p) in evals if r == rnd} for rnd in (0, last_round)}
    both = at[0] & at[last_round]
    if at[0] == at[last_round] or not both:
        return None

    def mean(rnd: int) -> float:
        rows = [evals[(rnd, p)] for p in sorted(both)]
        tokens = sum(r.get("tokens", 0) for r in rows)
        if tokens <= 0:
            return sum(r["held_out_loss"] for r in rows) / len(rows)
        return sum(r["held_out_loss"] * r.get("tokens", 0) for r in rows) / tokens

    return mean(0), mean(last_round)


def perplexity(loss: float) -> float:
    """exp(loss): inf where that overflows a float (a loss above ~709.78, e.g. a hostile
    client's evaluation); never raises."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _tuned(row: dict[str, Any]) -> dict[str, float]:
    """The held-out loss of the clients' own tuned adapters (features.personal_tuning), if any."""
    return {"tuned_loss": row["tuned_loss"]} if "tuned_loss" in row else {}


def _row(who: str, *, base: float, fed: float) -> dict:
    return {
        "who": who,
        "base_loss": base,
        "federated_loss": fed,
        "base_ppl": perplexity(base),
        "federated_ppl": perplexity(fed),
        "change": fed - base,
    }


def table_markdown(table: list[dict]) -> str:
    """`final_table`'s rows as Markdown: base and federated loss and perplexity, and Δ loss;
    with personal tuning, the tuned adapters' loss and its change from the federated one."""
    tuned = any("tuned_loss" in r for r in table)
    lines = [
        "| | base loss | federated loss | base ppl | federated ppl | Δ loss |"
        + (" tuned loss | Δ tuned |" if tuned else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if tuned else ""),
    ]
    for r in table:
        line = (
            f"| {r['who']} | {r['base_loss']:.4f} | {r['federated_loss']:.4f} | "
            f"{r['base_ppl']:.2f} | {r['federated_ppl']:.2f} | {r['change']:+.4f} |"
        )
        if tuned:
            t = r.get("tuned_loss")
            line += " – | – |" if t is None else f" {t:.4f} | {t - r['federated_loss']:+.4f} |"
        lines.append(line)
    return "\n".join(lines)
