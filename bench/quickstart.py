"""Wall time and peak memory of the quickstart, against loading the base model alone.

    python bench/quickstart.py [--recipe recipes/quickstart.yaml] [key=value ...]

Runs `fedllm run` in a subprocess and samples the resident memory of its whole process tree
(driver, Ray workers and Ray's own daemons) every 0.2 s. The baseline, measured in the same run, is
a fresh process that loads the base model and runs one forward pass: the least any client must pay.
Writes results/quickstart.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides, f"output_dir={tmp}", "name=bench"]
        base_s, base_peak = watch([sys.executable, "-c", BASELINE, args.recipe, *overrides])
        cmd = [sys.executable, "-m", "fedllm.cli", "run", args.recipe, *overrides, "--overwrite"]
        run_s, run_peak = watch(cmd)
        rows = [
            json.loads(x) for x in Path(tmp, "bench", "metrics.jsonl").read_text().split("\n") if x
        ]
    server = [r for r in rows if r.get("kind") == "server"]
    base_loss, final_loss = server[0]["held_out_loss"], server[-1]["held_out_loss"]
    gib = 1024**3
    lines = [
        "# Quickstart: wall time and peak memory",
        "",
        f"`python bench/quickstart.py --recipe {args.recipe} {' '.join(args.overrides)}` on "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| | wall seconds | peak RSS (GiB) | wall ratio | memory ratio |",
        "|---|---|---|---|---|",
        f"| load base + one forward (baseline) | {base_s:.0f} | {base_peak / gib:.2f} "
        "| 1.0 | 1.0 |",
        f"| `fedllm run` ({len(server) - 1} rounds) | {run_s:.0f} | {run_peak / gib:.2f} | "
        f"{run_s / base_s:.1f} | {run_peak / base_peak:.1f} |",
        "",
        f"Held-out loss: base {base_loss:.4f} → federated adapter {final_loss:.4f} "
        f"(perplexity {2.718281828**base_loss:.1f} → {2.718281828**final_loss:.1f}).",
        "",
        "Round seconds: " + ", ".join(f"{r['seconds']:.0f}" for r in server[1:]) + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
