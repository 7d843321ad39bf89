"""What pruning, 4-bit bases and compressed messages save a client, and what the federation pays.

    python bench/pruning.py [--steps 5] [--skip-federation] [key=value ...]

Part 1 (clients), SmolLM2-135M from recipes/pruned.yaml (LoRA rank 8 on q/v/down_proj): each
configuration runs in a fresh process (prune / load, then timed local steps) while a thread samples
its resident memory. Reported as ratios against the unpruned full-precision client of the same run.
Part 2 (federation): the held-out loss of recipes/pruned.yaml (a third of the clients pruned to 0.5)
against the same federation with no pruning and no quantization, on a reduced workload.
Writes results/pruning.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "pruned.yaml"
RESULTS = Path(__file__).parent / "results" / "pruning.md"
CONFIGS = [  # (label, pruning, quantization)
    ("full precision, pruning 0 (baseline)", 0.0, None),
    ("full precision, pruning 0.3", 0.3, None),
    ("full precision, pruning 0.5", 0.5, None),
    ("4-bit, pruning 0", 0.0, "4bit"),
    ("4-bit, pruning 0.5", 0.5, "4bit"),
]


def worker(pruning: float, *, quant: str | None, steps: int, overrides: list[str]) -> dict:
    """One client configuration in this process: set-up, timed steps, peak RSS, reply bytes.

    One torch thread: on a shared machine two-thread OpenMP regions stall on a busy core, which
    made the same configuration 1.5 s or 39 s per step from one run to the next.
    """
    import gc

    import torch

    torch.set_num_threads(1)

    from flwr.app import ConfigRecord

    from fedllm.aggregators import RoundSpec
    from fedllm.client.round import lora_model
    from fedllm.client.train import train_local
    from fedllm.constrained.compression import Compression
    from fedllm.constrained.pruned import PrunedBase
    from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate
    from fedllm.model import wire
    from fedllm.recipe import load_recipe

    cfg = load_recipe(RECIPE, overrides)
    plan = ClientPlan(partition=0, rank=8, pruning=pruning, quantization=quant)
    rnd = ClientRound(cfg, 0, 1, RoundSpec(), ConfigRecord({}), {"partition-id": 0}, None, 0, plan)
    pruned = PrunedBase(cfg)
    me = psutil.Process()
    with lora_model(rnd, [pruned], merged=None) as model:
        tok, shard = rnd.tokenizer, rnd.shard
        if pruning > 0:  # a device keeps only its pruned base (no cache holds the full one)
            gc.collect()
        run = {"examples": shard.train, "batch_size": cfg.federation.batch_size}
        run |= {"pad_id": tok.pad_token_id, "lr": cfg.federation.lr}
        train_local(model, steps=1, **run)  # warm-up
        rss_model, peak, done = me.memory_info().rss, [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], me.memory_info().rss)
                time.sleep(0.05)

        thread = threading.Thread(target=sample)
        thread.start()
        stamps = [time.perf_counter()]
        train_local(
            model, steps=steps, seed=1, on_step=lambda *_: stamps.append(time.perf_counter()), **run
        )
        done.set()
        thread.join()
        from fedllm.model.adapters import read_factors

        update = ClientUpdate(read_factors(model), {}, plan.rank)
        plain = pruned.reply(
            {"update": wire.outgoing(update.factors, RoundSpec())}, update, rnd=rnd
        )
        over = {"dtype": "bfloat16"}
        c = cfg.model_copy(update={"compression": cfg.compression.model_copy(update=over)})
        bf16 = Compression(c).reply(plain, update, rnd=rnd)
        sizes = {
            n: sum(r.count_bytes() for r in a.values())
            for n, a in (("fp32", plain), ("bf16", bf16))
        }
    return {
        "step_seconds": statistics.median(b - a for a, b in itertools.pairwise(stamps)),
        "rss_model": rss_model,
        "rss_peak_train": max(peak[0], rss_model),
        "bytes_fp32": sizes["fp32"],
        "bytes_bf16": sizes["bf16"],
    }


def run_federation(out: Path, overrides: list[str]) -> float:
    """Final global held-out loss of one `fedllm run`."""
    cmd = [sys.executable, "-m", "fedllm.cli", "run", str(RECIPE), f"output_dir={out}", *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    server = [r for r in rows if r["kind"] == "server" and "held_out_loss" in r]
    return server[0]["held_out_loss"], server[-1]["held_out_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-federation", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        pruning, quant = json.loads(args.worker)
        print(json.dumps(worker(pruning, quant=quant, steps=args.steps, overrides=args.overrides)))
        return
    rows, load0 = [], os.getloadavg()[0]
    for label, pruning, quant in CONFIGS:
        spec = json.dumps([pruning, quant])
        cmd = [sys.executable, __file__, "--worker", spec, "--steps", str(args.steps)]
        out = subprocess.run([*cmd, *args.overrides], check=True, capture_output=True, text=True)
        rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
        print(label, rows[-1][1], flush=True)
    base = rows[0][1]
    lines = [
        "# Pruned and quantized clients (bench/pruning.py)",
        "",
        f"SmolLM2-135M, LoRA rank 8 on q_proj/v_proj/down_proj, batch 8, {args.steps} timed local "
        "steps after one warm-up (median step), each configuration in a fresh process with one "
        "torch thread; load average "
        f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end. Ratios are against the "
        "unpruned full-precision client measured in the same run (lower is better).",
        "",
        "| client | step time | peak RSS in training | reply bytes fp32 | reply bytes bf16 |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        t, m = r["step_seconds"], r["rss_peak_train"]
        b32, b16 = r["bytes_fp32"], r["bytes_bf16"]
        lines.append(
            f"| {label} | {t / base['step_seconds']:.2f}× ({t:.2f} s) "
            f"| {m / base['rss_peak_train']:.2f}× ({m / 2**20:.0f} MiB) "
            f"| {b32 / base['bytes_fp32']:.2f}× ({b32:,}) "
            f"| {b16 / base['bytes_fp32']:.2f}× ({b16:,}) |"
        )
    if not args.skip_federation:
        small = ["federation.rounds=2", "federation.local_steps=5", "data.max_examples=600"]
        with tempfile.TemporaryDirectory() as tmp:
            tiers = "lora.tiers=[{name: gpu, rank: 16, clients: 1}, {name: laptop, rank: 8, "
            plain = f"{tiers}clients: 1}}, {{name: phone, rank: 4, clients: 1}}]"
            pruned = f"{tiers}clients: 1}}, {{name: phone, rank: 4, clients: 1, pruning: 0.5}}]"
            over = [*small, *args.overrides]
            base0, plain_loss = run_federation(Path(tmp), [*over, "name=plain", plain])
            _, pruned_loss = run_federation(Path(tmp), [*over, "name=pruned", pruned])
        lines += [
            "",
            "## Federation held-out loss (reduced workload: recipes/pruned.yaml with 3 clients, "
            "2 rounds of 5 local steps, 600 WordNet examples, bf16 messages, no 4-bit tier, "
            "to keep the run short)",
            "",
            "| federation | held-out loss after round 2 | vs no pruning |",
            "|---|---:|---:|",
            f"| base model (round 0) | {base0:.4f} | |",
            f"| no pruning, full precision (ranks 16/8/4) | {plain_loss:.4f} | 1.000× |",
            f"| phone tier (1 of 3 clients) pruned to 0.5 | {pruned_loss:.4f} | "
            f"{pruned_loss / plain_loss:.3f}× |",
        ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
