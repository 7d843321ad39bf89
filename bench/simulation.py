"""Per-round overhead of Flower's simulation engine against the same work in a plain loop.

    python bench/simulation.py [--recipe recipes/tiny.yaml] [key=value ...]

Both sides run the recipe's rounds with the same clients, ranks, local steps, aggregator and
held-out evaluation. The simulation side is `fedllm run` (Ray actors, Flower messages,
checkpoints); the plain side calls the same building blocks (cached base, peft adapter,
`train_local`, the registered aggregator, `evaluate_nll`) in one process. The ratio of their mean
round times is what Flower costs per round. Writes results/simulation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedllm.aggregators import get, round_spec
from fedllm.client.round import client_seed
from fedllm.client.schedule import round_steps
from fedllm.client.train import evaluate_nll, train_local
from fedllm.data.shards import ProcessCache, load_shard
from fedllm.launch import absolute_paths
from fedllm.model.adapters import attach_lora, initial_factors, read_factors, write_factors
from fedllm.model.base import adapter_shapes, cached_base_model
from fedllm.model.wire import server_options
from fedllm.recipe import RunConfig, load_recipe

RESULTS = Path(__file__).parent / "results" / "simulation.md"


def plain_rounds(cfg: RunConfig) -> list[float]:
    """Wall seconds of each round run as a plain loop over the clients, no Flower involved."""
    base, tok = cached_base_model(cfg)
    n = cfg.data.num_clients
    ranks = [cfg.client_rank(i) for i in range(n)]
    top = max(ranks)
    global_ = initial_factors(
        adapter_shapes(cfg), rank=top, scaling=cfg.client_scaling(top), seed=cfg.seed
    )
    cache = ProcessCache()  # the partition once, as a ClientApp process does
    shards = [load_shard(cfg, pid, tokenizer=tok, cache=cache) for pid in range(n)]
    fed, aggregate = cfg.federation, get(cfg.aggregator.name)
    seconds = []
    for rnd in range(1, fed.rounds + 1):
        start = time.perf_counter()
        updates, weights = [], []
        for pid, shard in enumerate(shards):
            rank = ranks[pid]
            model = attach_lora(
                base,
                rank=rank,
                alpha=cfg.client_scaling(rank) * rank,
                dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
            )
            write_factors(model, global_)
            steps = round_steps(fed, len(shard.train))  # as the ClientApp counts them
            train_local(
                model,
                shard.train,
                steps=steps,
                batch_size=fed.batch_size,
                pad_id=tok.pad_token_id,
                optimizer=fed.optimizer,
                lr=fed.lr,
                weight_decay=fed.weight_decay,
                schedule=fed.schedule,
                warmup_steps=fed.warmup_steps,
                max_grad_norm=fed.max_grad_norm,
                seed=client_seed(cfg, server_round=rnd, partition=pid),
            )
            updates.append(read_factors(model))
            weights.append(float(len(shard.train)))
            model.unload()
        global_ = {
            module: aggregate(
                [u[module] for u in updates],
                weights,
                global_rank=cfg.aggregator.global_rank,
                seed=cfg.seed + rnd,
                **server_options(round_spec(cfg.aggregator.name), cfg.aggregator.options),
            ).global_
            for module in sorted(global_)
        }
        model = attach_lora(
            base,
            rank=top,
            alpha=cfg.client_scaling(top) * top,
            dropout=0.0,
            target_modules=cfg.lora.target_modules,
        )
        write_factors(model, global_)
        with torch.no_grad():
            for shard in shards:
                evaluate_nll(
                    model,
                    shard.held_out,
                    batch_size=fed.eval_batch_size,
                    pad_id=tok.pad_token_id,
                )
        model.unload()
        seconds.append(time.perf_counter() - start)
        print(f"plain round {rnd}: {seconds[-1]:.1f}s", flush=True)
    return seconds


def simulated_rounds(recipe: str, overrides: list[str], out: Path) -> tuple[list[float], float]:
    """Round seconds (from metrics.jsonl) and total wall time of `fedllm run` in a subprocess."""
    cmd = [
        sys.executable,
        "-m",
        "fedllm.cli",
        "run",
        recipe,
        *overrides,
        f"output_dir={out}",
        "name=bench_sim",
        "--overwrite",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (out / "bench_sim" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r["seconds"] for r in rows if r.get("kind") == "server" and r["round"] >= 1]
    return rounds, wall


def steady_mean(seconds: list[float]) -> float:
    """Mean round time after the first round (which pays one-off warm-up on both sides)."""
    tail = seconds[1:] or seconds
    return sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.overrides = args.overrides or ["federation.rounds=4"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sim, wall = simulated_rounds(args.recipe, args.overrides, out)
        cfg = absolute_paths(
            load_recipe(args.recipe, [*args.overrides, f"output_dir={out}", "name=bench_plain"])
        )
        plain = plain_rounds(cfg)
    mean_sim, mean_plain = steady_mean(sim), steady_mean(plain)
    load = os.getloadavg()[0]
    lines = [
        "# Flower simulation overhead per round",
        "",
        f"Recipe `{args.recipe}` {' '.join(args.overrides)}; {cfg.data.num_clients} clients, "
        f"{cfg.federation.rounds} rounds; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the end. "
        "Command: `python bench/simulation.py "
        f"--recipe {args.recipe} {' '.join(args.overrides)}`",
        "",
        "| | round seconds (each) | mean after round 1 | ratio |",
        "|---|---|---|---|",
        f"| plain loop (baseline) | {', '.join(f'{s:.1f}' for s in plain)} | "
        f"{mean_plain:.1f} | 1.00 |",
        f"| Flower simulation | {', '.join(f'{s:.1f}' for s in sim)} | {mean_sim:.1f} | "
        f"{mean_sim / mean_plain:.2f} |",
        "",
        f"Whole `fedllm run` wall time {wall:.0f}s (Ray start, model load, round-0 evaluation, "
        "final adapter and plot included).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
