"""Constrained clients in a federation: the (rank, pruning) bandit against fixed arms, on devices
that differ in speed and memory, under a round deadline.

    python bench/constrained.py [--recipe recipes/tiny.yaml] [--rounds 2] [--seeds 0 1 2]
        [--settings bandit bandit-server bandit-q r32 r4-p50 r32-4bit] [--deadline S]
        [--slowdown 2.0]
        [key=value ...]

Every setting runs the recipe's federation (the real round loop, strategy and ClientApp) on a
`DeviceGrid` (fedllm.deploy.device_grid): the nodes answer one after another, each alone on the
machine, and each reply is timed as if the nodes had worked side by side, against the round's
deadline (federation.round_timeout, which is also every message's TTL). Device profiles
(fedllm.constrained.devices), cycled over the clients:
  fast   2 torch threads, no slowdown, no memory limit;
  slow   1 thread, local steps x --slowdown (emulated: the client sleeps the difference);
  small  1 thread, no slowdown, a memory budget halfway between what the largest pruned arm and
         the smallest unpruned full-precision arm need on this base (so it cannot train unpruned
         in full precision).
Settings: `bandit` (adaptive: ranks [4, 32] x pruning [0, 0.5], UCB, per client per round);
`bandit-q` (rank 32 x pruning [0, 0.5] x base precision [fp32, 4-bit]: quantization among the
arms, which fits the small device without pruning);
`bandit-server` (the same bandit rewarded by the server's score of each reply on the unpruned
base, adaptive.reward=server: 64 examples of the test set below, so the arms are chosen on a
sliver of the data that scores them);
`r32` (every client rank 32, no pruning); `r4-p50` (rank 4 on a base pruned to 0.5);
`r32-4bit` (rank 32 on a 4-bit base, bitsandbytes).
Calibration first, on this machine: every arm's estimated training memory on the real base, and
messages of CAL_STEPS local steps per arm and thread count (the faster of two, after a warm-up)
to split a message's time into overhead + per-step time. Predicted message time of a profile on
an arm = overhead + slowdown x steps x per-step time. Unless --deadline is given, the deadline
sits halfway between the slow profile's fastest and slowest arm: an adapting slow client can
meet it, one that does not adapt cannot. Round 1 also pays each node's first load (shard, base,
pruning), which the prediction leaves out. Quality: the server's own global test set
(data.test_set, 10% of every domain), so no client evaluates and quality does not depend on the
devices.
Writes results/constrained.md: command, load average, calibration, deadlines met per setting,
the arm each client ran every round and whether it met the deadline, test loss per seed. Each
(seed, setting) run also appends a row to results/constrained-rows.jsonl with its own deadline
and budget, so seeds run in separate invocations (one per session: a seed of the quickstart
workload takes about an hour) add up: the report covers every row of the same workload
(recipe, rounds, slowdown, overrides), each seed under the deadline calibrated in its own run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedllm.aggregators import RoundSpec
from fedllm.client.node_config import node_shard
from fedllm.constrained.devices import MEMORY_REFUSAL, round_memory
from fedllm.deploy.device_grid import DeviceGrid, run_devices
from fedllm.deploy.local_grid import server_identity
from fedllm.features import registry
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.model.base import adapter_shapes, cached_base_model
from fedllm.recipe import RunConfig, load_recipe
from fedllm.server.metrics import MetricsLog
from fedllm.server.strategy import LoraStrategy

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results" / "constrained.md"
ROWS = RESULTS.with_name("constrained-rows.jsonl")  # every (seed, setting) run, over invocations
BANDIT = {"ranks": [4, 32], "pruning": [0.0, 0.5]}
BANDIT_Q = {"ranks": [32], "pruning": [0.0, 0.5], "quantization": ["none", "4bit"]}
FIXED = {"r32": (32, 0.0, None), "r4-p50": (4, 0.5, None), "r32-4bit": (32, 0.0, "4bit")}
ADAPTIVE = {"bandit": BANDIT, "bandit-server": {**BANDIT, "reward": "server"}, "bandit-q": BANDIT_Q}
SETTINGS = [*ADAPTIVE, *FIXED]
BANDIT_ARMS = [
    (r, p, None if q == "none" else q)
    for b in ADAPTIVE.values()
    for r in b["ranks"]
    for p in b["pruning"]
    for q in b.get("quantization", ["none"])
]
ARMS = sorted({*BANDIT_ARMS, *FIXED.values()}, key=lambda a: (a[0], a[1], a[2] or ""))
# the server evaluates on its own global test set, so quality does not depend on the devices
EVALUATION = ["data.test_set={fraction: 0.1}", "federation.evaluate_clients=none"]
PROFILES = ("fast", "slow", "small")
CAL_STEPS = 3
MIB = 2**20


def arm_name(rank: int, pruning: float, quant: str | None) -> str:
    return f"r{rank}/p{pruning:g}" + (f"/{quant}" if quant else "")


def profiles(n: int) -> list[str]:
    """The profile of each of `n` clients (fast, slow, small, fast, ...)."""
    return [PROFILES[i % len(PROFILES)] for i in range(n)]


def devices(n: int, *, slowdown: float, budget_mib: float | None) -> list[dict]:
    spec = {
        "fast": {"threads": 2},
        "slow": {"threads": 1, "slowdown": slowdown},
        "small": {"threads": 1, "memory_mb": budget_mib},
    }
    return [{"name": p, "clients": 1, **spec[p]} for p in profiles(n)]


def recipe(base: list[str], args, *, name: str, setting: str, extra: list[str] = ()) -> RunConfig:
    """The setting's recipe: the bench's base overrides, its arms, then `extra`."""
    over = [*base, f"name={name}"]
    if setting in ADAPTIVE:
        over += ["lora.tiers=null", "lora.ranks=4", f"adaptive={json.dumps(ADAPTIVE[setting])}"]
    else:
        rank, pruning, quant = FIXED[setting]
        n = load_recipe(args.recipe, base).data.num_clients
        tier = {"name": setting, "rank": rank, "clients": n, "pruning": pruning}
        tier |= {"quantization": quant} if quant else {}
        over += ["lora.ranks=null", f"lora.tiers={json.dumps([tier])}"]
    return load_recipe(args.recipe, [*over, *extra])


# -- calibration ---------------------------------------------------------------------------------
def arm_memory(cfg: RunConfig, arm: tuple[int, float, str | None]) -> int:
    """Bytes the round of `arm` needs on partition 0's base, as the client estimates it."""
    rank, pruning, quant = arm
    plan = ClientPlan(0, rank, pruning, quant)
    node = {"partition-id": 0}
    rnd = ClientRound(cfg, 0, 1, RoundSpec(), ConfigRecord({}), node, RecordDict(), 0, plan)
    load = None if pruning > 0 else quant  # as fedllm.client.round.lora_model loads it
    model = cfg.model.model_copy(update={"quantization": load or "none"})
    base, rnd.tokenizer = cached_base_model(cfg.model_copy(update={"model": model}))
    rnd.shard = node_shard(cfg, node, rnd.tokenizer)
    for f in registry.build(cfg):
        base = f.prepare_base(base, rnd)
    return round_memory(base, rnd).total


def message_time(cfg: RunConfig) -> tuple[float, float]:
    """(overhead s, s per local step) of partition 0's training message: a warm-up, then the
    faster of two timed messages of CAL_STEPS steps, through the real ClientApp on a one-node
    DeviceGrid."""
    from fedllm.client.app import make_client_app

    strategy = LoraStrategy(cfg, shapes=adapter_shapes(cfg), features=registry.build(cfg))
    grid = DeviceGrid([make_client_app(cfg)])
    timed = []
    with server_identity(grid.run.run_id):
        for rnd in (1, 2, 3):
            messages = strategy.configure_train(rnd, strategy.global_record(), ConfigRecord(), grid)
            (mid,) = grid.push_messages(messages)
            (reply,) = grid.pull_messages([mid])
            if reply.has_error():
                raise RuntimeError(f"calibration message failed: {reply.error.reason}")
            train = float(reply.content["metrics"]["train-seconds"])
            timed.append((grid.seconds[mid] - train, train / CAL_STEPS))
    return min(timed[1:], key=lambda t: t[1])


def calibrate(base: list[str], args, out: Path) -> dict:
    """Every arm's memory need and message time at 1 and 2 threads; the small budget, the
    deadline and each profile's predicted time per arm."""
    n = load_recipe(args.recipe, base).data.num_clients
    steps = load_recipe(args.recipe, base).federation.local_steps
    if steps is None:
        raise SystemExit("bench/constrained.py predicts from federation.local_steps; set it")
    cal = [f"output_dir={out}", f"federation.local_steps={CAL_STEPS}", "federation.rounds=3"]
    need, timing = {}, {}
    for arm in ARMS:
        rank, pruning, quant = arm
        tier = {"name": "cal", "rank": rank, "clients": n, "pruning": pruning}
        tier |= {"quantization": quant} if quant else {}
        arms = [*base, *cal, "lora.ranks=null", f"lora.tiers={json.dumps([tier])}"]
        for threads in (1, 2):
            dev = json.dumps([{"clients": n, "threads": threads}])
            cfg = load_recipe(args.recipe, [*arms, f"name=cal-{threads}", f"devices={dev}"])
            timing[arm, threads] = message_time(cfg)
            print(f"calibrated {arm_name(*arm)} at {threads} thread(s): {timing[arm, threads]}")
        need[arm] = arm_memory(cfg, arm)
    plain = [need[a] for a in ARMS if a[1] == 0 and a[2] is None]
    pruned = [need[a] for a in ARMS if a[1] > 0 and a[2] is None]
    budget = (max(pruned) + min(plain)) / 2 / MIB if max(pruned) < min(plain) else None
    spec = {d["name"]: d for d in devices(3, slowdown=args.slowdown, budget_mib=None)}

    def predicted(profile: str, arm) -> float:
        d = spec[profile]
        overhead, step = timing[arm, d["threads"]]
        return overhead + d.get("slowdown", 1.0) * steps * step

    pred = {(p, a): predicted(p, a) for p in PROFILES for a in ARMS}
    slow = [pred["slow", a] for a in ARMS]
    deadline = args.deadline or (min(slow) + max(slow)) / 2
    return {"need": need, "timing": timing, "budget": budget, "pred": pred, "deadline": deadline}


# -- runs ----------------------------------------------------------------------------------------
def outcome(row: dict) -> str:
    if row["status"] == "ok":
        return "met"
    if row["status"] == "failed" and MEMORY_REFUSAL in (row.get("reason") or ""):
        return "no memory"
    if row["status"] == "missed" and row.get("arm_new_base"):
        return "missed (new base)"  # the bandit replays the arm, warm, before scoring it
    return row["status"]  # missed, failed, rejected


def run(cfg: RunConfig, setting: str) -> dict:
    """One federation: per round and client (arm, outcome), the held-out losses, wall time."""
    start = time.perf_counter()
    run_dir, _ = run_devices(cfg)
    seconds = time.perf_counter() - start
    rows = MetricsLog(run_dir).read()
    server = {r["round"]: r for r in rows if r.get("kind") == "server"}
    fixed = FIXED.get(setting)
    cells = {}
    for r in (r for r in rows if r.get("kind") == "client"):
        if fixed is not None:
            arm = fixed
        else:
            quant = r.get("arm_quantization", "none")
            arm = (r["arm_rank"], r["arm_pruning"], None if quant == "none" else quant)
        cells[r["round"], r["node"] - 1001] = (arm_name(*arm), outcome(r))
    return {
        "cells": cells,
        "base": server[0].get("test_loss"),
        "final": server[cfg.federation.rounds].get("test_loss"),
        "seconds": seconds,
    }


def workload(args) -> str:
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


def save_row(args, seed: int, setting: str, result: dict, cal: dict) -> None:
    row = {"workload": workload(args), "seed": seed, "setting": setting}
    row |= {k: v for k, v in result.items() if k != "cells"}
    row["cells"] = [
        [rnd, pid, arm, out] for (rnd, pid), (arm, out) in sorted(result["cells"].items())
    ]
    row |= {"deadline": cal["deadline"], "budget": cal["budget"], "cpu": _cpu()}
    row |= {"load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}
    with ROWS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def saved_results(args) -> dict:
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


def report(args, cal: dict, results: dict, n: int, load: tuple[float, float]) -> list[str]:
    """The markdown report: this invocation's calibration, and every saved (seed, setting) run
    of the workload, each under the deadline and budget of its own invocation."""
    cmd = shlex.join(["python", "bench/constrained.py", *sys.argv[1:]])
    seeds = sorted({seed for seed, _ in results})
    settings = [x for x in SETTINGS if any(setting == x for _, setting in results)]
    ran_under = {
        (r["deadline"], r["budget"], r["cpu"]): [] for r in results.values()
    }  # calibrations, in order of first use
    for (seed, setting), r in results.items():
        ran_under[r["deadline"], r["budget"], r["cpu"]].append(f"{setting} s{seed}")
    who = profiles(n)
    budget = "none (pruning does not shrink the estimate below the unpruned arms)"
    if cal["budget"] is not None:
        budget = f"{cal['budget']:.2f} MiB"
    lines = [
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
        "",
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
    lines += [
        "",
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
    for seed in seeds:
        lines += ["", f"## Arm and outcome per client and round (seed {seed})", ""]
        head = " | ".join(f"c{p} {who[p]}" for p in range(n))
        lines += [f"| setting | round | {head} |", "|---|---:|" + "---|" * n]
        for setting in (x for x in settings if (seed, x) in results):
            cells = results[seed, setting]["cells"]
            for rnd in range(1, args.rounds + 1):
                row = [cells.get((rnd, p)) for p in range(n)]
                text = " | ".join(f"{c[0]} {c[1]}" if c else "—" for c in row)
                lines.append(f"| {setting} | {rnd} | {text} |")
    lines += [
        "",
        "Outcomes: met (the reply came in before the deadline and was aggregated), missed (no "
        "reply in time: dropped, the bandit scores the arm 0), missed (new base) (a miss in a "
        "round whose arm changed the client's pruning or precision: the bandit replays the arm "
        "next round, warm, and scores that round instead), no memory (the client refused "
        "a plan whose estimated training memory exceeds its budget: the bandit never offers "
        "that arm to it again). Test loss: the server's own global test set (10% of every "
        "domain, held out before the partition) with the global adapter on the full-precision "
        "unpruned base; no client evaluates, so quality does not depend on the devices.",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    ap.add_argument("--deadline", type=float, help="seconds (default: calibrated)")
    ap.add_argument("--slowdown", type=float, default=2.0, help="the slow profile's factor")
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("overrides", nargs="*", help="recipe key=value for every run")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)).resolve()
        base = [f"federation.rounds={args.rounds}", f"output_dir={out}", *EVALUATION]
        base += args.overrides
        n = load_recipe(args.recipe, base).data.num_clients
        cal = calibrate(base, args, out)
        print(f"deadline {cal['deadline']:.2f} s, small budget {cal['budget']} MiB", flush=True)
        for seed in args.seeds:
            for setting in args.settings:
                dev = devices(n, slowdown=args.slowdown, budget_mib=cal["budget"])
                extra = [f"seed={seed}", f"devices={json.dumps(dev)}"]
                extra += [f"federation.round_timeout={cal['deadline']}"]
                cfg = recipe(base, args, name=f"{setting}-s{seed}", setting=setting, extra=extra)
                result = run(cfg, setting)
                save_row(args, seed, setting, result, cal)
                print(setting, seed, result["final"], flush=True)
                # after every run: an interrupted invocation leaves the report of what finished
                lines = report(args, cal, saved_results(args), n, (load0, os.getloadavg()[0]))
                RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
