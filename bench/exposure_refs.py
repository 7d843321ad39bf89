"""How many reference secrets exposure needs: refits on subsets of an eval's references.

    python bench/exposure_refs.py runs/leakage/eval/report.json [--sizes 100 250 500] [--draws 50]
    # writes bench/results/exposure-refs.md

`fedllm eval` keeps every reference's Px (bits) in report.json. For each exposure row (view ×
canary) this draws `--draws` subsets of n references without replacement, refits the skew-normal
and recomputes the exposure, and compares it with the estimate from all references: the median
and the 2.5–97.5% range of the subset estimates, and the largest |difference|. A size is enough when
the spread it adds is small against the differences the study reads (k = 1 vs 4 vs 16 repeats, a
run vs its DP twin). No model runs here: seconds to a few minutes (each refit ~50 ms).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from fedllm.eval.exposure import exposure, exposure_skewnormal

OUT = Path(__file__).parent / "results" / "exposure-refs.md"


def subset_estimates(
    px: float, refs: np.ndarray, *, size: int, draws: int, space: float, seed: int
) -> np.ndarray:
    """Skew-normal exposures of one canary from `draws` random n-subsets of `refs`."""
    rng = np.random.default_rng(seed)
    subsets = (rng.choice(refs, size=size, replace=False) for _ in range(draws))
    return np.array([exposure_skewnormal(px, sub, space_size=space) for sub in subsets])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a fedllm eval report.json")
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 250, 500])
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = json.loads(args.report.read_text())["leakage"]["exposure"]
    if not rows or "reference_px" not in rows[0]:
        raise SystemExit(f"{args.report}: no exposure rows with reference_px (rerun fedllm eval)")
    full_n = len(rows[0]["reference_px"])
    sizes = [n for n in args.sizes if n < full_n]
    lines = [
        "# Canary exposure from fewer reference secrets",
        "",
        f"Command: `python bench/exposure_refs.py {args.report} --sizes "
        f"{' '.join(map(str, args.sizes))} --draws {args.draws}`. Source: {full_n} references per "
        f"canary in `{args.report}`; each cell: {args.draws} subsets drawn without replacement, "
        "skew-normal refit, exposure in bits (median [2.5%, 97.5%] of the subset estimates).",
        "",
        f"| view | k | canary | exposure ({full_n} refs) | "
        + " | ".join(f"n = {n}" for n in sizes)
        + " | rank exposure (all) |",
        "|---|---:|---:|---:|" + "---|" * len(sizes) + "---:|",
    ]
    worst = {n: 0.0 for n in sizes}
    for i, r in enumerate(rows):
        refs = np.asarray(r["reference_px"], dtype=float)
        space = 2.0 ** r["space_bits"]
        full = exposure_skewnormal(r["px_bits"], refs, space_size=space)
        cells = []
        for n in sizes:
            est = subset_estimates(
                r["px_bits"], refs, size=n, draws=args.draws, space=space, seed=i
            )
            lo, mid, hi = np.percentile(est, [2.5, 50, 97.5])
            worst[n] = max(worst[n], float(np.abs(est - full).max()))
            cells.append(f"{mid:.1f} [{lo:.1f}, {hi:.1f}]")
        rank = exposure(r["px_bits"], refs)
        lines.append(
            f"| {r['view']} | {r['repeats']} | {r['index']} | {full:.1f} | "
            + " | ".join(cells)
            + f" | {rank:.1f} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "Largest |subset − all| over every row and draw: "
        + ", ".join(f"n = {n}: {worst[n]:.1f} bits" for n in sizes)
        + f". Rank exposure is capped at log₂(n + 1) ({math.log2(full_n + 1):.1f} bits with all).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
