"""The constrained bench's rows (one per seed and setting, kept across invocations) and its
Markdown report (bench/results/constrained.md)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from _constrained_setup import ARMS, MIB, PROFILES, ROWS, SETTINGS, arm_name, profiles


def workload(args: argparse.Namespace) -> str:
    """What makes runs comparable across invocations (seeds and settings may differ)."""
    return shlex.join(
        [
            Path(args.recipe).name,
            f"rounds={args.rounds}",
            f"slowdown={args.slowdown:g}",
            *(["deadline=" + str(args.deadline)] if args.deadline else []),
            *args.overrides,
        ]
    )


def save_row(args: argparse.Namespace, *, seed: int, setting: str, result: dict, cal: dict) -> None:
    row = {"workload": workload(args), "seed": seed, "setting": setting}
    row |= {k: v for k, v in result.items() if k != "cells"}
    row["cells"] = [
        [rnd, pid, arm, out] for (rnd, pid), (arm, out) in sorted(result["cells"].items())
    ]
    row |= {"deadline": cal["deadline"], "budget": cal["budget"], "cpu": _cpu()}
    row |= {"load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}
    with ROWS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def saved_results(args: argparse.Namespace) -> dict:
    """(seed, setting) -> result (with the deadline, budget and CPU of its own invocation) of
    every saved row of this workload; a later row of the same seed and setting replaces one."""
    rows = [json.loads(x) for x in ROWS.read_text().splitlines()] if ROWS.exists() else []
    results = {}
    for r in (r for r in rows if r["workload"] == workload(args)):
        cells = {(rnd, pid): (arm, out) for rnd, pid, arm, out in r["cells"]}
        results[r["seed"], r["setting"]] = {**r, "cells": cells}
    return results


def _cpu() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "?")


def report(
    args: argparse.Namespace, *, cal: dict, results: dict, n: int, load: tuple[float, float]
) -> list[str]:
    """The markdown report: this invocation's calibration, and every saved (seed, setting) run
    of the workload, each under the deadline and budget of its own invocation."""
    seeds = sorted({seed for seed, _ in results})
    settings = [x for x in SETTINGS if any(setting == x for _, setting in results)]
    ran_under = {
        (r["deadline"], r["budget"], r["cpu"]): [] for r in results.values()
    }  # calibrations, in order of first use
    for (seed, setting), r in results.items():
        ran_under[r["deadline"], r["budget"], r["cpu"]].append(f"{setting} s{seed}")
    lines = _head(args, cal=cal, ran_under=ran_under, n=n, seeds=seeds, load=load)
    lines += ["", *_calibration(cal)]
    lines += ["", *_outcomes(results, seeds=seeds, settings=settings, n=n)]
    for seed in seeds:
        lines += ["", *_per_round(results, seed=seed, settings=settings, n=n, rounds=args.rounds)]
    return [*lines, "", OUTCOMES]


def _head(
    args: argparse.Namespace,
    *,
    cal: dict,
    ran_under: dict,
    n: int,
    seeds: list[int],
    load: tuple[float, float],
) -> list[str]:
    """The command, the machine's load, the devices and the deadline each run was held to."""
    cmd = shlex.join(["python", "bench/constrained.py", *sys.argv[1:]])
    who = profiles(n)
    budget = "none (pruning does not shrink the estimate below the unpruned arms)"
    if cal["budget"] is not None:
        budget = f"{cal['budget']:.2f} MiB"
    return [
        "# Constrained clients: the (rank, pruning) bandit against fixed arms",
        "",
        f"Command: `{cmd}`. Load average {load[0]:.2f} at start, {load[1]:.2f} at the end "
        f"({os.cpu_count()} cores). Recipe {args.recipe}, {n} clients, {args.rounds} rounds, "
        f"seeds {seeds} (this invocation: {args.seeds}; the others from "
        "`constrained-rows.jsonl`). The federation runs on `DeviceGrid`: nodes take turns on "
        "the machine and each reply is timed as if they had worked side by side.",
        "",
        f"Devices (clients 0..{n - 1}): {', '.join(who)}. fast: 2 threads; slow: 1 thread, "
        f"local steps x{args.slowdown:g} (emulated by sleeping); small: 1 thread, memory budget "
        f"{budget}. Deadline: {cal['deadline']:.2f} s"
        + (" (--deadline)." if args.deadline else " (halfway across the slow profile's arms)."),
        "",
        "Each run used the deadline and budget calibrated in its own invocation: "
        + "; ".join(
            f"{', '.join(who_ran)}: {d:.2f} s, {'no budget' if b is None else f'{b:.2f} MiB'} ({c})"
            for (d, b, c), who_ran in ran_under.items()
        )
        + ".",
    ]


def _calibration(cal: dict) -> list[str]:
    """Each arm's estimated memory and step time, and the reply time predicted per profile."""
    lines = [
        "## Calibration (this invocation)",
        "",
        "| arm | est. memory | overhead, s/step (1 thread) | (2 threads) "
        "| predicted: fast | slow | small |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        (o1, s1), (o2, s2) = cal["timing"][arm, 1], cal["timing"][arm, 2]
        p = [cal["pred"][prof, arm] for prof in PROFILES]
        lines.append(
            f"| {arm_name(*arm)} | {cal['need'][arm] / MIB:.2f} MiB | {o1:.2f} s, {s1:.3f} s "
            f"| {o2:.2f} s, {s2:.3f} s | {p[0]:.2f} s | {p[1]:.2f} s | {p[2]:.2f} s |"
        )
    return lines


def _outcomes(results: dict, *, seeds: list[int], settings: list[str], n: int) -> list[str]:
    """Per setting: deadlines met (in all and by client) and the final test loss per seed."""
    who = profiles(n)
    lines = [
        "## Deadlines met and quality",
        "",
        "| setting | deadlines met | by client | test loss after the last round (per seed) "
        "| mean | base model | wall |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for setting in settings:
        per_seed = [results[seed, setting] for seed in seeds if (seed, setting) in results]
        if not per_seed:
            continue
        cells = [c for r in per_seed for c in r["cells"].values()]
        met = sum(o == "met" for _, o in cells)
        by_client = []
        for pid in range(n):
            mine = [c for r in per_seed for (_, p), c in r["cells"].items() if p == pid]
            by_client.append(f"{who[pid]} {sum(o == 'met' for _, o in mine)}/{len(mine)}")
        finals = [r["final"] for r in per_seed if r["final"] is not None]
        mean = f"{statistics.mean(finals):.4f}" if finals else "—"
        losses = ", ".join(f"{x:.4f}" for x in finals) or "—"
        lines.append(
            f"| {setting} | {met}/{len(cells)} | {', '.join(by_client)} | {losses} | {mean} "
            f"| {per_seed[0]['base']:.4f} | {sum(r['seconds'] for r in per_seed):.0f} s |"
        )
    return lines


def _per_round(results: dict, *, seed: int, settings: list[str], n: int, rounds: int) -> list[str]:
    """One seed's arm and outcome for every client and round, setting by setting."""
    who = profiles(n)
    lines = [f"## Arm and outcome per client and round (seed {seed})", ""]
    head = " | ".join(f"c{p} {who[p]}" for p in range(n))
    lines += [f"| setting | round | {head} |", "|---|---:|" + "---|" * n]
    for setting in (x for x in settings if (seed, x) in results):
        cells = results[seed, setting]["cells"]
        for rnd in range(1, rounds + 1):
            row = [cells.get((rnd, p)) for p in range(n)]
            text = " | ".join(f"{c[0]} {c[1]}" if c else "—" for c in row)
            lines.append(f"| {setting} | {rnd} | {text} |")
    return lines


OUTCOMES = (
    "Outcomes: met (the reply came in before the deadline and was aggregated), missed (no "
    "reply in time: dropped, the bandit scores the arm 0), missed (new base) (a miss in a "
    "round whose arm changed the client's pruning or precision: the bandit replays the arm "
    "next round, warm, and scores that round instead), no memory (the client refused "
    "a plan whose estimated training memory exceeds its budget: the bandit never offers "
    "that arm to it again). Test loss: the server's own global test set (10% of every "
    "domain, held out before the partition) with the global adapter on the full-precision "
    "unpruned base; no client evaluates, so quality does not depend on the devices."
)
