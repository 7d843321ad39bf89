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

sys.path.insert(0, str(Path(__file__).parent))  # bench/_*.py next to this script

from _constrained_report import report, save_row, saved_results
from _constrained_setup import (
    ARMS,
    CAL_STEPS,
    EVALUATION,
    FIXED,
    MIB,
    PROFILES,
    RESULTS,
    SETTINGS,
    arm_name,
    devices,
    recipe,
)

ROOT = Path(__file__).parents[1]


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
    rnd.shard = node_shard(cfg, node, tokenizer=rnd.tokenizer)
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


def calibrate(base: list[str], args: argparse.Namespace, out: Path) -> dict:
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
                save_row(args, seed=seed, setting=setting, result=result, cal=cal)
                print(setting, seed, result["final"], flush=True)
                # after every run: an interrupted invocation leaves the report of what finished
                lines = report(
                    args,
                    cal=cal,
                    results=saved_results(args),
                    n=n,
                    load=(load0, os.getloadavg()[0]),
                )
                RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
