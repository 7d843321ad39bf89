"""Wall time and peak memory of the quickstart, against loading the base model alone.

    python bench/quickstart.py [--recipe recipes/quickstart.yaml] [--precision both] [key=value ...]

Runs `fedllm run` in a subprocess and samples the resident memory of its whole process tree
(driver, Ray workers and Ray's own daemons) every 0.2 s. The baseline, measured in the same run, is
a fresh process that loads the base model and runs one forward pass: the least any client must pay.
`--precision fp32|bf16|auto` sets `federation.precision`; `--precision both` runs the federation
in fp32 and then in bf16, back to back, and reports the bf16/fp32 wall ratio and both final
held-out losses (evaluation itself is fp32 in both). Writes results/quickstart.md (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results" / "quickstart.md"

BASELINE = """
import sys, torch
from fedllm.recipe import load_recipe
from fedllm.model.base import cached_base_model
cfg = load_recipe(sys.argv[1], sys.argv[2:])
model, tok = cached_base_model(cfg)
with torch.no_grad():
    model(**tok(["Define the word 'cat' (noun)."], return_tensors="pt"))
"""


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (processes may vanish meanwhile)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def watch(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`; return wall seconds and the peak RSS of its process tree in bytes."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {child.returncode}")
    return time.perf_counter() - start, peak


@dataclass(frozen=True)
class Run:
    """One timed federation: its precision, wall time, peak memory and server rows."""

    precision: str | None
    seconds: float
    peak: int
    server: list[dict]

    @property
    def label(self) -> str:
        return "`fedllm run`" + (f" {self.precision}" if self.precision else "")


def federation(recipe: str, overrides: list[str], tmp: str, precision: str | None) -> Run:
    """`fedllm run` of the recipe (at `precision` if given), timed and sampled for memory."""
    name = f"bench-{precision or 'recipe'}"
    extra = [f"federation.precision={precision}"] if precision else []
    cmd = [sys.executable, "-m", "fedllm.cli", "run", recipe, *overrides, *extra]
    seconds, peak = watch([*cmd, f"output_dir={tmp}", f"name={name}", "--overwrite"])
    text = Path(tmp, name, "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in text.split("\n") if x]
    return Run(precision, seconds, peak, [r for r in rows if r.get("kind") == "server"])


def report(args: argparse.Namespace, base_s: float, base_peak: int, runs: list[Run]) -> str:
    """The results page: the baseline, one row per run, losses, and bf16 ÷ fp32 when both ran."""
    gib = 1024**3
    flags = f" --precision {args.precision}" if args.precision else ""
    lines = [
        "# Quickstart: wall time and peak memory",
        "",
        f"`python bench/quickstart.py --recipe {args.recipe}{flags} {' '.join(args.overrides)}` "
        f"on {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| | wall seconds | peak RSS (GiB) | wall ratio | memory ratio |",
        "|---|---|---|---|---|",
        f"| load base + one forward (baseline) | {base_s:.0f} | {base_peak / gib:.2f} "
        "| 1.0 | 1.0 |",
    ]
    for run in runs:
        lines.append(
            f"| {run.label} ({len(run.server) - 1} rounds) | {run.seconds:.0f} | "
            f"{run.peak / gib:.2f} | {run.seconds / base_s:.1f} | {run.peak / base_peak:.1f} |"
        )
    lines.append("")
    for run in runs:
        base_loss, final = run.server[0]["held_out_loss"], run.server[-1]["held_out_loss"]
        lines += [
            f"{run.label}: held-out loss base {base_loss:.4f} → federated adapter {final:.4f} "
            f"(perplexity {math.exp(base_loss):.1f} → {math.exp(final):.1f}); round seconds "
            + ", ".join(f"{r['seconds']:.0f}" for r in run.server[1:])
            + ".",
            "",
        ]
    if len(runs) == 2:
        fp32, bf16 = runs
        l32, l16 = fp32.server[-1]["held_out_loss"], bf16.server[-1]["held_out_loss"]
        lines += [
            f"bf16 ÷ fp32: wall {bf16.seconds:.0f} s ÷ {fp32.seconds:.0f} s = "
            f"**{bf16.seconds / fp32.seconds:.3f}**; final held-out loss {l16:.4f} vs {l32:.4f} "
            f"(**{100 * (l16 - l32) / l32:+.2f}%**).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto", "both"],
        help="federation.precision for the run; 'both': fp32 then bf16, compared",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    with tempfile.TemporaryDirectory() as tmp:
        where = [*args.overrides, f"output_dir={tmp}", "name=bench"]
        base_s, base_peak = watch([sys.executable, "-c", BASELINE, args.recipe, *where])
        runs = [federation(args.recipe, args.overrides, tmp, p) for p in precisions]
    text = report(args, base_s, base_peak, runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
