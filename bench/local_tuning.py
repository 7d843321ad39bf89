"""Federation, then a little local tuning (FedAvg+FT): does it protect the clients the shared
adapter costs at home?

    python bench/local_tuning.py [--regimes scarce domain] [--methods fedit svd squeeze]

The quality grid's per-client tables show every shared global adapter losing to local-only on the
own domains of some clients (docs/aggregators.md). The classic remedy is to personalise: each
client takes the final global adapter and trains it a few more steps on its own data. This reads
each finished grid cell's final global (its checkpoint; no federation is rerun) and, client by
client, evaluates it on the client's own held-out split, tunes it for one round of the grid's
local steps (same optimiser, lr, batch and seeding as a round R+1 of the client app), and
evaluates again. The global's own losses must equal the grid's (a check this script makes).
Rows go to <out>/local-tuning.jsonl (a finished cell is skipped on the next call) and the report
to results/local-tuning.md: per regime, tuned − global and tuned − local-only paired over seeds,
and the per-client table of gains and losses against local-only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/_*.py next to this script

from fedllm.processes import hide_bitsandbytes

hide_bitsandbytes()  # as fedllm's commands do: no base here is quantised (peft would import it)

from _quality_clients import client_table  # noqa: E402
from _quality_grid import METHODS, client_ranks, overrides, recipe_path  # noqa: E402
from _quality_report import by_method, diff_text, finals, interval_text  # noqa: E402
from _quality_runs import nll_scorer, ratio, run_dir, train_round  # noqa: E402

from fedllm.aggregators import Factors  # noqa: E402
from fedllm.client.schedule import num_local_steps  # noqa: E402
from fedllm.data.shards import ProcessCache, load_shard  # noqa: E402
from fedllm.model.adapters import attach_lora, write_factors  # noqa: E402
from fedllm.model.base import cached_base_model  # noqa: E402
from fedllm.recipe import RunConfig, load_recipe  # noqa: E402
from fedllm.server.checkpoint import load_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOLERANCE = 1e-4  # nats: the global's re-evaluated loss against the grid's row for that client


def tune_cell(cfg: RunConfig, factors: dict[str, Factors]) -> dict[int, dict]:
    """Partition -> {global, tuned: (nll sum, tokens)} for every client of a finished cell."""
    cache = ProcessCache()
    base, tok = cached_base_model(cfg, cache=cache)
    nll, fed = nll_scorer(cfg, tok.pad_token_id), cfg.federation
    rank = max(f.rank for f in factors.values())
    scaling = next(iter(factors.values())).scaling
    out = {}
    for pid in range(cfg.data.num_clients):
        shard = load_shard(cfg, pid, tok, cache=cache)
        model = attach_lora(
            base,
            rank=rank,
            alpha=scaling * rank,
            dropout=0.0,
            target_modules=cfg.lora.target_modules,
        )
        write_factors(model, factors)
        before = nll(model, shard.held_out)
        steps = num_local_steps(
            len(shard.train),
            batch_size=fed.batch_size,
            local_steps=fed.local_steps,
            local_epochs=fed.local_epochs,
            accumulation=fed.gradient_accumulation_steps,
        )
        # seeded as the client app seeds a round after the last; scheduled as the last round
        # (the grid's lr is constant)
        seed = cfg.seed * 100_003 + (fed.rounds + 1) * 1009 + pid
        train_round(cfg, model, shard.train, steps, fed.rounds, seed=seed, pad_id=tok.pad_token_id)
        after = nll(model, shard.held_out)
        model.unload()
        out[pid] = {"global": list(before), "tuned": list(after), "steps": steps}
        print(
            f"[tuning] client {pid + 1}/{cfg.data.num_clients}: own {ratio(before):.4f} -> "
            f"{ratio(after):.4f} after {steps} steps",
            flush=True,
        )
    return out


def run(label: str, regime: str, seed: int, *, grid: Path, row: dict) -> dict:
    """One cell's tuning row, checked against the grid's row of the same cell."""
    folder, name = run_dir(grid, regime, seed, label)
    cfg = load_recipe(
        recipe_path(METHODS[label][0]),
        [*overrides(label, regime, seed, []), f"output_dir={folder}", f"name={name}"],
    )
    state = load_checkpoint(cfg.run_dir)
    if state is None or state["round"] != cfg.federation.rounds:
        raise SystemExit(f"{cfg.run_dir}: no checkpoint of the finished cell")
    factors = {m: Factors(b, a, s) for m, (b, a, s) in state["strategy"]["global"].items()}
    start = time.perf_counter()
    clients = tune_cell(cfg, factors)
    for pid, c in clients.items():
        grid_loss = row["clients"][str(pid)]
        if abs(ratio(c["global"]) - grid_loss) > TOLERANCE:
            raise SystemExit(
                f"{label} / {regime} / seed {seed}, client {pid}: the global scores "
                f"{ratio(c['global']):.6f} here and {grid_loss:.6f} in the grid"
            )
    return {
        "method": label,
        "regime": regime,
        "seed": seed,
        "clients": {str(p): c for p, c in clients.items()},
        "seconds": time.perf_counter() - start,
    }


def report(rows: list[dict], grid_rows: list[dict], regimes: list[str]) -> str:
    """Markdown: per regime, own-domain loss global vs tuned, paired against local-only."""

    def pooled(row: dict, key: str) -> float:
        sums = [row["clients"][p][key] for p in row["clients"]]
        return sum(s[0] for s in sums) / sum(s[1] for s in sums)

    lines = [
        "# Federation, then local tuning (FedAvg+FT): own-domain loss client by client",
        "",
        "Written by `python bench/local_tuning.py` from the quality grid's final globals: each "
        "client evaluates the final global adapter on its own held-out split, tunes it for one "
        "round of local steps on its own data, and evaluates again. Own-domain loss is "
        "token-weighted over the clients; differences are paired over seeds (mean ± 95% "
        "t-interval; tie: the interval holds 0). Local-only and the global rows are the grid's.",
    ]
    for regime in regimes:
        mine = [r for r in rows if r["regime"] == regime]
        if not mine:
            continue
        cells = by_method(grid_rows, regime)
        local = finals(cells["local only"], "personal")
        lines += [
            "",
            f"## Regime `{regime}`",
            "",
            "| method | own, global | own, tuned | tuned − global | tuned − local only | seconds |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        tuned_cells: dict[str, dict[int, dict]] = {"local only": cells["local only"]}
        for label in dict.fromkeys(r["method"] for r in mine):
            by_seed = {r["seed"]: r for r in mine if r["method"] == label}
            glob = {s: pooled(r, "global") for s, r in by_seed.items()}
            tuned = {s: pooled(r, "tuned") for s, r in by_seed.items()}
            seconds = sum(r["seconds"] for r in by_seed.values()) / len(by_seed)
            lines.append(
                f"| {label} | {interval_text(glob)} | {interval_text(tuned)} "
                f"| {diff_text(tuned, glob)} | {diff_text(tuned, local)} | {seconds:.0f} |"
            )
            tuned_cells[label] = cells[label]
            tuned_cells[f"{label} +tuned"] = {
                s: {"clients": {p: ratio(c["tuned"]) for p, c in r["clients"].items()}}
                for s, r in by_seed.items()
            }
        lines += ["", *client_table(tuned_cells, list(tuned_cells), client_ranks(regime))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="+", default=["scarce", "domain"])
    parser.add_argument("--methods", nargs="+", default=["fedit", "svd", "squeeze"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--grid", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid_rows = [json.loads(line) for line in (args.results / "quality-rows.jsonl").open()]
    kept = args.grid / "local-tuning.jsonl"
    rows = [json.loads(line) for line in kept.open()] if kept.exists() else []
    done = {(r["method"], r["regime"], r["seed"]) for r in rows}
    index = {(r["method"], r["regime"], r["seed"]): r for r in grid_rows}
    for regime in args.regimes:
        for seed in args.seeds:
            for label in args.methods:
                cell = (label, regime, seed)
                if cell in done or cell not in index:
                    continue
                print(f"[tuning] {label} / {regime} / seed {seed}", flush=True)
                row = run(label, regime, seed, grid=args.grid, row=index[cell])
                with kept.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                out = args.results / "local-tuning.md"
                out.write_text(report(rows, grid_rows, args.regimes))
    print((args.results / "local-tuning.md").read_text() if rows else "no finished grid cells")


if __name__ == "__main__":
    main()
