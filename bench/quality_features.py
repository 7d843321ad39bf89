"""FedProx and server momentum against their base methods, over seeds, with paired intervals.

    for s in 0 1 2; do
      python bench/quality.py --only fedit svd fedprox fedavgm "svd +fedavgm" \\
          --set seed=$s --out runs/bq-s$s --tag features-s$s
    done
    python bench/quality_features.py runs/bq-s0 runs/bq-s1 runs/bq-s2

Reads each seed's rows (the `results-*.json` that `bench/quality.py` leaves in its --out folder)
and writes results/quality-features.md: final held-out loss per method as mean ± 95% interval
(Student t over seeds), and each feature's paired difference to its base method on the same
seeds. A difference whose interval contains 0 is a tie.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy import stats

RESULTS = Path(__file__).parent / "results"
PAIRS = [("fedprox", "svd"), ("fedavgm", "fedit"), ("svd +fedavgm", "svd")]


def final_losses(folder: Path) -> dict[str, float]:
    """label -> final global held-out loss of one seed's runs."""
    rows = [r for f in sorted(folder.glob("results-*.json")) for r in json.loads(f.read_text())]
    return {r["label"]: r["loss"][-1] for r in rows}


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval); half-width 0 for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, half


def report(seeds: list[dict[str, float]], folders: list[Path]) -> str:
    labels = sorted({label for s in seeds for label in s})
    lines = [
        "# FedProx and server momentum: final held-out loss over seeds",
        "",
        f"Seeds: {len(seeds)} ({', '.join(str(f) for f in folders)}); workload and commands in "
        "the header of `bench/quality_features.py`; one row per method, mean ± 95% interval.",
        "",
        "| method | final held-out loss | per seed |",
        "|---|---:|---|",
    ]
    for label in labels:
        values = [s[label] for s in seeds if label in s]
        mean, half = interval(values)
        lines.append(
            f"| {label} | {mean:.4f} ± {half:.4f} | {', '.join(f'{v:.4f}' for v in values)} |"
        )
    lines += [
        "",
        "| feature − base (same seeds) | mean ± 95% interval | verdict |",
        "|---|---:|---|",
    ]
    for feature, base in PAIRS:
        diffs = [s[feature] - s[base] for s in seeds if feature in s and base in s]
        if not diffs:
            continue
        mean, half = interval(diffs)
        verdict = (
            "tie" if abs(mean) <= half or len(diffs) < 2 else ("better" if mean < 0 else "worse")
        )
        lines.append(f"| {feature} − {base} | {mean:+.4f} ± {half:.4f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="one bench/quality.py --out per seed")
    args = parser.parse_args()
    seeds = [final_losses(f) for f in args.folders]
    text = report(seeds, args.folders)
    (RESULTS / "quality-features.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
