"""FedProx and server momentum against their base methods, from the quality grid's rows.

    python bench/quality.py --methods features svd fedit --seeds 0 1 2
    python bench/quality_features.py [--out runs/bench-quality]     # results/quality-features.md

Reads the cells `bench/quality.py` left in <out>/rows.jsonl and writes, per regime, each feature's
paired difference to its base method on the same seeds (mean ± 95% Student-t interval over seeds),
on the clients' own held-out splits and on the global test set. A difference whose interval contains
0 is a tie; one whose whole interval is within 0.001 nats of 0 is "same". (The earlier per-seed
files quality-features-s*.md came from the one-seed harness this replaced.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _quality_grid import PAIRS
from _quality_report import (
    NEGLIGIBLE,
    RESULTS,
    by_method,
    diff_text,
    finals,
    interval_text,
    read_rows,
)

FEATURES = [(a, b) for a, b in PAIRS if a in ("fedprox", "fedavgm", "svd +fedavgm")]


def report(rows: list[dict], source: Path) -> str:
    lines = [
        "# FedProx and server momentum: paired differences to their base methods",
        "",
        f"From `{source}` (cells of `bench/quality.py`; commands, seeds and load there and in "
        "`quality.md`). fedprox: svd + μ = 0.01; fedavgm: fedit + server momentum β = 0.9; "
        "svd +fedavgm: svd + β = 0.9. Negative: lower loss than the base; tie: the 95% interval "
        f"contains 0; same: the whole interval within {NEGLIGIBLE} nats of 0.",
    ]
    for regime in sorted({r["regime"] for r in rows}):
        cells = by_method(rows, regime)
        lines += [
            "",
            f"## Regime `{regime}`",
            "",
            "| feature − base | feature own-domain | own-domain difference | test difference |",
            "|---|---:|---:|---:|",
        ]
        for a, b in FEATURES:
            if a in cells and b in cells:
                own = diff_text(finals(cells[a], "personal"), finals(cells[b], "personal"))
                test = diff_text(finals(cells[a], "test"), finals(cells[b], "test"))
                alone = interval_text(finals(cells[a], "personal"))
                lines.append(f"| {a} − {b} | {alone} | {own} | {test} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    source = args.out / "rows.jsonl"
    rows = read_rows(source)
    if not rows:
        raise SystemExit(f"{source}: no finished cells; run bench/quality.py first")
    text = report(rows, source)
    (args.results / "quality-features.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
