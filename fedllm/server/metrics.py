"""Run results as files a person can open: metrics.jsonl, a PNG plot, a Markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL of per-round, per-client and server rows."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS

    def truncate_after(self, last_round: int) -> None:
        """Drop rows of rounds after `last_round` (written before a crash, not checkpointed)."""
        rows = [r for r in self.read() if int(r.get("round", 0)) <= last_round]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, rows: list[dict]) -> None:
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


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
        table.append(_row(f"client {pid}", base["held_out_loss"], fed["held_out_loss"]))
    server = {r["round"]: r for r in rows if r.get("kind") == "server" and "held_out_loss" in r}
    if 0 in server and last_round in server:
        table.append(
            _row("global", server[0]["held_out_loss"], server[last_round]["held_out_loss"])
        )
    return table


def _row(who: str, base: float, fed: float) -> dict:
    return {
        "who": who,
        "base_loss": base,
        "federated_loss": fed,
        "base_ppl": math.exp(base),
        "federated_ppl": math.exp(fed),
        "change": fed - base,
    }


def table_markdown(table: list[dict]) -> str:
    lines = [
        "| | base loss | federated loss | base ppl | federated ppl | Δ loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['who']} | {r['base_loss']:.4f} | {r['federated_loss']:.4f} | "
            f"{r['base_ppl']:.2f} | {r['federated_ppl']:.2f} | {r['change']:+.4f} |"
        )
    return "\n".join(lines)
