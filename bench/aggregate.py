"""Time and peak memory of each aggregation method on one module, as ratios to the dense SVD.

    python bench/aggregate.py [--quick] [--sections layers scaling model7b]
        [--model7b-clients 10 100] [--model7b-modules 128]
    # --quick: d=k=4096 only; writes results/aggregate.md (a subset of sections: aggregate-<…>.md)

Sections: "layers" (every method on d = k = 4096/8192 with 10/100 clients, ratios to FlexLoRA's
dense SVD and to forming ΔW* + torch.svd_lowrank), "scaling" (squeeze-rsvd's time as d and the
number of clients grow, against the same two dense routes), "model7b" (squeeze over a whole
7B-shaped model: 32 layers × q, k, v, o of 4096 × 4096). Every section also times rsvd as it ran
before float32 sketches ("before": float64 throughout, oversample 8) in the same run.

Peak memory is the rise of the process's resident set over the call: Linux's high-water mark
VmHWM is reset through /proc/self/clear_refs before each call and read after it, minus VmRSS before
(tracemalloc does not see torch's allocations). glibc is told to mmap every block ≥ 64 KiB
(MALLOC_MMAP_THRESHOLD_, set by re-executing this script) so freed tensors really leave the RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aggregate_scale
import torch

from fedllm.aggregators import Factors, get
from fedllm.aggregators.linalg import stack

PLAIN = aggregate_scale.PLAIN

RANKS = (4, 8, 16, 32, 64)  # client ranks, cycled
TARGET = 64  # global rank of the SVD-family methods: the largest client rank
OVERSAMPLE, POWER_ITERS = 8, 2
RESULTS = Path(__file__).parent / "results" / "aggregate.md"
SECTIONS = ("layers", "scaling", "model7b")


@dataclass(frozen=True)
class Row:
    method: str
    seconds: float
    peak_mib: float
    error: float | None  # ‖ΔW* − result‖_F / ‖ΔW*‖_F, None when not comparable


def status(field: str) -> int:
    """A field of /proc/self/status in KiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def measure(fn: Callable[[], Factors]) -> tuple[Factors, float, float]:
    """Run fn; return its result, wall seconds and peak RSS rise in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, seconds, (status("VmHWM") - before) / 1024


def clients(d: int, n: int, *, shared_A: bool, seed: int = 0) -> tuple[list[Factors], list[float]]:
    """n float32 clients with ranks cycling 4..64, α = 16, decaying column scales, weights ∝ n_i."""
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(max(RANKS), d, generator=g) / d**0.5
    updates = []
    for i in range(n):
        r = RANKS[i % len(RANKS)]
        decay = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
        A = A0[:r].clone() if shared_A else torch.randn(r, d, generator=g) / d**0.5
        updates.append(Factors(torch.randn(d, r, generator=g) * decay, A, 16.0 / r))
    weights = [float(100 + 37 * (i % 7)) for i in range(n)]
    return updates, weights


def lowrank_baseline(updates: list[Factors], weights: list[float]) -> Factors:
    """Form ΔW* (float64) and run torch.svd_lowrank with the same sketch as our rsvd."""
    total = sum(weights)
    U, V = stack(
        [u.B for u in updates],
        [u.A for u in updates],
        weights=[w / total * u.scaling for w, u in zip(weights, updates, strict=True)],
    )
    L, S, R = torch.svd_lowrank(U @ V, q=TARGET + OVERSAMPLE, niter=POWER_ITERS)
    root = S[:TARGET].sqrt()
    return Factors((L[:, :TARGET] * root).float(), (root[:, None] * R[:, :TARGET].T).float(), 1.0)


def cases(
    updates: list[Factors], weights: list[float], shared: list[Factors]
) -> dict[str, Callable[[], Factors]]:
    """Method label → a call returning the global factors."""

    def method(
        name: str, inputs: list[Factors] = updates, **options: object
    ) -> Callable[[], Factors]:
        return lambda: get(name)(inputs, weights, **options).global_  # type: ignore[arg-type]

    return {
        "flexlora (dense ΔW*, full SVD)": method("flexlora", global_rank=TARGET),
        "form ΔW* + torch.svd_lowrank": lambda: lowrank_baseline(updates, weights),
        "svd exact": method("svd", global_rank=TARGET, method="exact"),
        "svd rsvd": method("svd", global_rank=TARGET, method="rsvd"),
        "svd rsvd before (float64, oversample 8)": lambda: aggregate_scale.before(updates, weights),
        "squeeze plain (auto)": method("squeeze", **PLAIN),
        "squeeze plain rsvd": method("squeeze", method="rsvd", **PLAIN),
        "squeeze defaults (correction, residual 64, rows gauge)": method("squeeze"),
        "lorafair": method("lorafair"),
        "fedit": method("fedit"),
        "hetlora": method("hetlora"),
        "rblora": method("rblora"),
        "flora (exact stacking + merged state)": method("flora", global_rank=TARGET),
        "fedsa (A only)": method("fedsa"),
        "ffa (shared A₀; own inputs)": method("ffa", shared),
    }


def run_config(d: int, n: int) -> list[Row]:
    updates, weights = clients(d, n, shared_A=False)
    shared, _ = clients(d, n, shared_A=True)
    rows = []
    results: dict[str, Factors] = {}
    for label, fn in cases(updates, weights, shared).items():
        out, seconds, peak = measure(fn)
        if seconds < 2.0:  # fast: best of three for the time
            seconds = min([seconds] + [measure(fn)[1] for _ in range(2)])
        results[label] = out
        rows.append(Row(label, seconds, peak, None))
        print(f"  {label:40s} {seconds:9.3f} s  {peak:9.1f} MiB", flush=True)
    # Quality against the exact aggregate, formed here only for the check (not timed).
    total = sum(weights)
    U, V = stack(
        [u.B for u in updates],
        [u.A for u in updates],
        weights=[w / total * u.scaling for w, u in zip(weights, updates, strict=True)],
    )
    target = U @ V
    del U, V
    scale = torch.linalg.matrix_norm(target).item()
    for i, row in enumerate(rows):
        if not row.method.startswith(("ffa", "fedsa")):
            error = torch.linalg.matrix_norm(target - results[row.method].delta()).item() / scale
            rows[i] = Row(row.method, row.seconds, row.peak_mib, error)
    return rows


def table(d: int, n: int, rows: list[Row]) -> str:
    base = rows[0]
    stacked = sum(RANKS[i % len(RANKS)] for i in range(n))
    lines = [
        f"### d = k = {d}, {n} clients (Σrᵢ = {stacked}), global rank {TARGET}",
        "",
        "| method | time (s) | time ÷ dense | peak RSS rise (MiB) | memory ÷ dense "
        "| ‖ΔW*−W‖/‖ΔW*‖ | error ÷ dense's |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error is not None:
            quality = f"{r.error:.4f} | {r.error / base.error:.4f}"
        elif r.method.startswith("fedsa"):
            quality = "n/a: B stays on the clients | –"
        else:
            quality = "0 by construction | –"
        lines.append(
            f"| {r.method} | {r.seconds:.3f} | {r.seconds / base.seconds:.4f} | {r.peak_mib:.1f} "
            f"| {r.peak_mib / max(base.peak_mib, 1e-9):.4f} | {quality} |"
        )
    return "\n".join(lines)


def mmap_every_block() -> None:
    """Re-execute this script with glibc's MALLOC_MMAP_THRESHOLD_ at 64 KiB (read only when a
    process starts), so freed tensors leave the resident set the peak is measured from."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(
            sys.executable,
            [sys.executable, *sys.argv],
            {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )


def main() -> None:
    mmap_every_block()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = k = 4096 only")
    parser.add_argument("--dims", type=int, nargs="+", help="override d = k (smoke tests)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run"
    )
    parser.add_argument("--model7b-clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument(
        "--model7b-modules", type=int, default=128, help="fewer than 128 for a smoke run"
    )
    args = parser.parse_args()
    dims = args.dims or ((4096,) if args.quick else (4096, 8192))
    load_before = os.getloadavg()
    started = time.time()
    sections = []
    for d in dims if "layers" in args.sections else ():
        for n in args.clients:
            print(f"d = k = {d}, {n} clients", flush=True)
            sections.append(table(d, n, run_config(d, n)))
    if "scaling" in args.sections:
        sections.append(aggregate_scale.scaling_section())
    if "model7b" in args.sections:
        sections.append(
            aggregate_scale.model7b_section(
                tuple(args.model7b_clients), modules=args.model7b_modules
            )
        )
    load_after = os.getloadavg()
    command = " ".join(["python bench/aggregate.py", *sys.argv[1:]])
    header = [
        "# Aggregation benchmark: one module, factored routes vs forming ΔW*",
        "",
        f"Command: `{command}` ({time.time() - started:.0f} s in all). torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average {load_before[0]:.1f} at start and {load_after[0]:.1f} at the end "
        "(a shared machine: treat times as ±30 %).",
        "",
        f"Clients: float32 factors, ranks cycling {RANKS}, α = 16, weights ∝ examples; B columns "
        f"decay as 1/j so ΔW* has a decaying spectrum. SVD-family methods target rank {TARGET}; "
        "rsvd uses its defaults (oversample 16, 2 power iterations) and runs its big products "
        "and tall QRs in float32 (the clients' precision), its small core in float64; exact, "
        "dense and both baselines work in float64 (svd_lowrank with oversample "
        f'{OVERSAMPLE}, {POWER_ITERS} power iterations). "before" rows: rsvd as it ran before '
        "float32 sketches (float64, oversample 8). The dense route's error is the optimal "
        'truncation error, so "error ÷ dense\'s" is the ratio to the optimum. FedIT-family '
        "methods are included for cost; their "
        "error column shows their bias on this data. Memory: rise of peak RSS over the call "
        "(VmHWM reset via /proc/self/clear_refs; glibc mmap threshold 64 KiB so frees return "
        "memory). Time: one run, or best of three when under 2 s.",
    ]
    out = RESULTS
    partial = args.model7b_clients != [10, 100] or args.model7b_modules != 128
    if set(args.sections) != set(SECTIONS) or args.dims or partial:
        out = RESULTS.with_name(f"aggregate-{'-'.join(args.sections)}.md")  # a partial run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(["\n".join(header), *sections]) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
