"""How much DP noise on the factors reaches ΔW, per aggregator and gauge, from the quality grid's
own checkpoints (no training): the measurement behind docs/privacy.md's gauge paragraph.

    python bench/gauge_noise.py [--runs runs/bench-quality] [--regimes domain clientdp]

Client-level DP adds N(0, σ²) to every entry of the mean factor delta, with each scaling s folded
into B (privacy/client_dp.py), and the wrapped aggregator reads the noisy factors:
(sB + ξ_B)(A + ξ_A) = sBA + ξ_B·A + sB·ξ_A + ξ_B·ξ_A. To first order the noise energy in
ΔW = sBA is σ²·G with the gain G = Σ_modules (d‖A‖² + k‖sB‖²), which depends on how the global
splits into B and A (its gauge), not on ΔW. Each cell's last checkpoint gives G of
its final global, ‖ΔW‖ (the signal it carries), and the norm of each client's last factor delta
against the global it started from (what clipping at S meets: ΔB = s·B − s₀·B₀[:, :r],
ΔA = A − A₀[:r], as privacy/client_dp.py clips), and G of the same ΔW split at its SVD (the
split neither gauge is). Writes results/gauge-noise.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from fedllm.aggregators import Factors
from fedllm.privacy.client_dp import delta_norm, folded_delta

sys.path.insert(0, str(Path(__file__).parent))  # bench/_stats.py next to this script

from _stats import t_interval

RESULTS = Path(__file__).parent / "results" / "gauge-noise.md"
LABELS = ("fedit", "svd", "squeeze balanced", "squeeze")  # squeeze: its default options, rows gauge


def gain_and_signal(global_: dict, *, rank: int | None = None) -> tuple[float, float]:
    """(G = Σ (d‖A‖² + k‖sB‖²), ‖sBA‖ over all modules) of checkpointed global factors; G over
    the first `rank` components only (client-level DP noises what clients can move: a global
    above the largest client rank, svd's (up to Σrᵢ), keeps the rest noiseless)."""
    gain = signal = 0.0
    for B, A, s in global_.values():
        d, k = B.shape[0], A.shape[1]
        b, a = B[:, :rank], A[:rank]
        gain += d * float(a.square().sum()) + k * s * s * float(b.square().sum())
        signal += float((s * B @ A).square().sum())
    return gain, math.sqrt(signal)


def svd_gain(global_: dict, *, rank: int | None = None) -> float:
    """G of the same ΔW split at its SVD, sB = U·√S and A = √S·Vᵀ (each component's B column and
    A row at norm √Sⱼ): (d + k)·Σ Sⱼ over the first `rank` components. From the factors' QR,
    never the d×k product."""
    gain = 0.0
    for B, A, s in global_.values():
        d, k = B.shape[0], A.shape[1]
        _, rb = torch.linalg.qr(s * B.double())
        _, ra = torch.linalg.qr(A.double().T)
        gain += (d + k) * float(torch.linalg.svdvals(rb @ ra.T)[:rank].sum())
    return gain


def delta_norms(updates: dict, start: dict, *, round_: int) -> list[float]:
    """Each client's factor-delta norm against the global it started from, as client-level DP
    clips it (`folded_delta`, `delta_norm`), for the clients whose last update is of round
    `round_` (`start` is that round's start)."""
    reference = {module: Factors(*factors) for module, factors in start.items()}
    return [
        delta_norm(folded_delta({m: Factors(*f) for m, f in update.items()}, reference))
        for sent_in, update in updates.values()
        if sent_in == round_
    ]


def cell(folder: Path) -> dict | None:
    """G, ‖ΔW‖ and the mean client delta norm of one finished cell (None if it has not)."""
    latest, previous = folder / "checkpoint.pt", folder / "checkpoint.prev.pt"
    if not (folder / "final_eval.json").is_file() or not latest.is_file():
        return None
    checkpoint = torch.load(latest, weights_only=True)
    state = checkpoint["strategy"]
    rank = max(state["node_ranks"].values(), default=None)
    gain, signal = gain_and_signal(state["global"], rank=rank)
    svd = svd_gain(state["global"], rank=rank)
    out = {"gain": gain, "signal": signal, "svd": svd, "delta": math.nan}
    if previous.is_file() and checkpoint["pending"] is None:  # else prev is this round again
        start = torch.load(previous, weights_only=True)["strategy"]["global"]
        if norms := delta_norms(state["client_updates"], start, round_=checkpoint["round"]):
            out["delta"] = sum(norms) / len(norms)  # none in a private run
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/bench-quality", help="the grid's run folder")
    parser.add_argument("--regimes", nargs="+", default=["domain", "clientdp"])
    args = parser.parse_args()
    lines = [
        "# Noise gain of the global factors: how factor noise reaches ΔW, per gauge",
        "",
        f"Written by `python bench/gauge_noise.py --regimes {' '.join(args.regimes)}` from the "
        "quality grid's checkpoints (the final global of each cell; its seeds as in "
        "quality.md). G = Σ (d‖A‖² + k‖sB‖²): the first-order noise energy in ΔW per unit σ² "
        "of noise on the factors (s folded into B, as client-level DP noises them; a noise "
        "of σ per factor entry moves ΔW by about σ√G). ‖ΔW‖: the global's own size. Client "
        "Δ: the mean norm of a client's last factor delta (what client-level clipping at S "
        "meets). SVD split: G of the same ΔW split at its SVD (B = U√S, A = √S·Vᵀ, s folded "
        "into B), over the same components, as a ratio to the cell's own G. Mean ± 95% "
        "t-interval over seeds; the ratio to `squeeze balanced` is paired on the same seeds.",
        "",
    ]
    for regime in args.regimes:
        cells = {
            label: {
                int(s.name[1:]): c
                for s in sorted((Path(args.runs) / regime).glob("s*"))
                if (c := cell(s / label.replace(" ", "-"))) is not None
            }
            for label in LABELS
        }
        base = {seed: c["gain"] for seed, c in cells["squeeze balanced"].items()}
        lines += [
            f"## Regime `{regime}`",
            "",
            "| method | G | G / G(squeeze balanced) | SVD split / G | ‖ΔW‖ | client Δ | seeds |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for label, by_seed in cells.items():
            if not by_seed:
                continue
            ratios = [c["gain"] / base[seed] for seed, c in by_seed.items() if seed in base]
            values = [by_seed[s] for s in sorted(by_seed)]
            gain = t_interval(c["gain"] for c in values)
            deltas = [c["delta"] for c in values if not math.isnan(c["delta"])]
            cols = [
                f"{gain.mean:.3g}" + (f" ± {gain.half:.2g}" if gain.n > 1 else " (1 seed)"),
                t_interval(ratios).text(2) if ratios else "—",
                t_interval(c["svd"] / c["gain"] for c in values).text(2),
                t_interval(c["signal"] for c in values).text(3),
                t_interval(deltas).text(3) if deltas else "— (private run)",
            ]
            seeds = ", ".join(map(str, sorted(by_seed)))
            lines.append(f"| {label} | {' | '.join(cols)} | {seeds} |")
        lines.append("")
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
