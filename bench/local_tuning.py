"""Federation, then a little local tuning (FedAvg+FT): does it protect the clients the shared
adapter costs at home?

    python bench/local_tuning.py [--regimes scarce domain] [--methods fedit svd squeeze] [--lr LR]

The quality grid's per-client tables show every shared global adapter losing to local-only on the
own domains of some clients (docs/aggregators.md). The classic remedy is to personalise: each
client takes the final global adapter and trains it a few more steps on its own data. This reads
each finished grid cell's final global (its checkpoint; no federation is rerun) and, client by
client, scores on the client's own held-out split: the global as the grid's clients scored it
(whole; this must equal the grid's number, a check made here), the global cut to the client's
rank (what a round sends it), and that cut after one more round of local training as the client
app trains one (its rank and α/r, the recipe's optimiser, lr, batch and steps, seeded as a round
R+1). Rows go to <grid>/local-tuning.jsonl (a finished cell is skipped on the next call), the
report to results/local-tuning.md: per regime, paired over seeds against the global and against
local-only, and the per-client table of gains and losses against local-only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/_*.py next to this script

from fedllm.processes import hide_bitsandbytes

hide_bitsandbytes()  # as fedllm's commands do: no base here is quantised (peft would import it)

from _quality_clients import client_table, local_reference  # noqa: E402
from _quality_grid import METHODS, client_ranks, overrides, recipe_path  # noqa: E402
from _quality_report import by_method, diff_text, interval_text, read_rows  # noqa: E402
from _quality_runs import local_steps, nll_scorer, ratio, run_dir, train_round  # noqa: E402

from fedllm.aggregators import Factors, round_spec  # noqa: E402
from fedllm.client.round import client_seed  # noqa: E402
from fedllm.data.shards import ProcessCache, load_shard  # noqa: E402
from fedllm.model.adapters import adapter_holding  # noqa: E402
from fedllm.model.base import cached_base_model  # noqa: E402
from fedllm.recipe import RunConfig, load_recipe  # noqa: E402
from fedllm.server.checkpoint import load_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOLERANCE = 1e-4  # nats: the global's re-scored loss against the grid's row for that client
SCORES = ("global", "cut", "tuned")


def tune_cell(cfg: RunConfig, factors: dict[str, Factors]) -> dict[int, dict]:
    """Partition -> (NLL sum, tokens) of the whole global, of its cut to the client's rank and of
    that cut after one round of local training, with the steps taken, for every client."""
    cache = ProcessCache()
    base, tok = cached_base_model(cfg, cache=cache)
    nll, fed = nll_scorer(cfg, tok.pad_token_id), cfg.federation
    lora = {"dropout": cfg.lora.dropout, "target_modules": cfg.lora.target_modules}
    out = {}
    for pid in range(cfg.data.num_clients):
        shard = load_shard(cfg, pid, tokenizer=tok, cache=cache)
        model = adapter_holding(base, factors, **lora)
        scores = {"global": list(nll(model, shard.held_out))}
        model.unload()
        rank = cfg.client_rank(pid)
        cut = {m: f.truncate(rank, cfg.client_scaling(rank)) for m, f in factors.items()}
        model = adapter_holding(base, cut, **lora)
        scores["cut"] = list(nll(model, shard.held_out))
        steps = local_steps(cfg, len(shard.train))
        seed = client_seed(cfg, server_round=fed.rounds + 1, partition=pid)
        # scheduled as the last round (the grid's lr is constant; R + 1 is outside the plan)
        pad = tok.pad_token_id
        train_round(cfg, model, shard.train, steps=steps, rnd=fed.rounds, seed=seed, pad_id=pad)
        scores["tuned"] = list(nll(model, shard.held_out))
        model.unload()
        out[pid] = {**scores, "steps": steps, "rank": rank}
        text = ", ".join(f"{k} {ratio(scores[k]):.4f}" for k in SCORES)
        print(f"[tuning] client {pid + 1}/{cfg.data.num_clients}: {text}", flush=True)
    return out


def run(cell: tuple[str, str, int], *, grid: Path, row: dict, lr: float | None) -> dict | None:
    """One cell's tuning row, its round at `lr` (None: the cell's own), checked against the
    grid's row of the same cell (None: the grid's run folder is not here)."""
    label, regime, seed = cell
    folder, name = run_dir(grid, regime=regime, seed=seed, label=label)
    cfg = load_recipe(
        recipe_path(METHODS[label][0]),
        [
            *overrides(label, regime=regime, seed=seed, extra=[]),
            f"output_dir={folder}",
            f"name={name}",
            *([f"federation.lr={lr}"] if lr is not None else []),  # the tuning round's only
        ],
    )
    state = load_checkpoint(cfg.run_dir)
    if state is None or state["round"] != cfg.federation.rounds:
        print(f"[tuning] {cfg.run_dir}: no checkpoint of the finished cell here; skipped")
        return None
    factors = {m: Factors(b, a, s) for m, (b, a, s) in state["strategy"]["global"].items()}
    load, start = os.getloadavg()[0], time.perf_counter()
    clients = tune_cell(cfg, factors)
    for pid, c in clients.items():
        if abs(ratio(c["global"]) - (graded := row["clients"][str(pid)])) > TOLERANCE:
            raise SystemExit(
                f"{label} / {regime} / seed {seed}, client {pid}: the global scores "
                f"{ratio(c['global']):.6f} here and {graded:.6f} in the grid"
            )
    return {
        "method": label,
        "tune_lr": lr,  # None: at the cell's own lr
        "regime": regime,
        "seed": seed,
        "clients": {str(p): c for p, c in clients.items()},
        "seconds": time.perf_counter() - start,
        "load": load,  # 1-min load average at the cell's start (2 cores: above ~2, shared)
    }


def report(rows: list[dict], *, grid_rows: list[dict], regimes: list[str]) -> str:
    """Markdown: per regime with local-only (the grid's, at its own lr), own-domain loss of the
    global, its cut and the tuned cut, paired against the global and local-only; then client
    by client."""

    def pooled(row: dict, key: str) -> float:
        return ratio([sum(c[key][i] for c in row["clients"].values()) for i in (0, 1)])

    lines = [
        "# Federation, then local tuning (FedAvg+FT): own-domain loss client by client",
        "",
        "Written by `python bench/local_tuning.py` from the quality grid's final globals. Per "
        "client, on its own held-out split: global = the final global adapter as the grid's "
        "clients scored it (whole); cut = it cut to the client's rank (what a round sends); "
        "tuned = the cut after one more round of the client's local training. Own-domain loss "
        "is token-weighted over the clients; differences are paired over seeds (mean ± 95% "
        "t-interval; tie: the interval holds 0). Rows: `local-tuning-rows.jsonl`.",
    ]
    if loads := [r["load"] for r in rows if "load" in r]:
        lines += [
            "",
            f"Load average at the cells' start: {min(loads):.2f}–{max(loads):.2f} (2 cores).",
        ]
    for regime in regimes:
        cells = by_method(grid_rows, regime)
        mine = [r for r in rows if r["regime"] == regime]
        if not mine or (baseline := local_reference(cells)) is None:
            continue
        local = {s: r["personal"][-1] for s, r in cells[baseline].items()}
        lines += [
            "",
            f"## Regime `{regime}`"
            + (f" (local only: `{baseline}`)" if baseline != "local only" else ""),
            "",
            "| method | own: global | cut | tuned | tuned − global | tuned − local only | s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        table: dict[str, dict[int, dict]] = {baseline: cells[baseline]}
        for label in dict.fromkeys(shown_as(r) for r in mine):
            by_seed = {r["seed"]: r for r in mine if shown_as(r) == label}
            method = next(iter(by_seed.values()))["method"]
            own = {k: {s: pooled(r, k) for s, r in by_seed.items()} for k in SCORES}
            seconds = sum(r["seconds"] for r in by_seed.values()) / len(by_seed)
            lines.append(
                f"| {label} | {' | '.join(interval_text(own[k]) for k in SCORES)} "
                f"| {diff_text(own['tuned'], own['global'])} "
                f"| {diff_text(own['tuned'], local)} | {seconds:.0f} |"
            )
            table[method] = cells[method]
            table[f"{label} +tuned"] = {
                s: {"clients": {p: ratio(c["tuned"]) for p, c in r["clients"].items()}}
                for s, r in by_seed.items()
            }
        lines += ["", *client_table(table, order=list(table), ranks=client_ranks(regime))]
    return "\n".join(lines) + "\n"


def shown_as(row: dict) -> str:
    """A tuning row's label in the report: its method, and the tuning round's lr if it was not
    the cell's own."""
    lr = row.get("tune_lr")
    return row["method"] if lr is None else f"{row['method']} (tuned at lr {lr:g})"


def tunable(label: str) -> bool:
    """A method whose final global is the adapter its clients use (not merged into the base,
    B not kept on clients, no private module beside it)."""
    recipe = METHODS[label][0]
    if recipe is None or recipe == "sdflora":
        return False
    spec = round_spec(load_recipe(recipe_path(recipe)).aggregator.name)
    return not (spec.merge or spec.local_B)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="+", default=["scarce", "domain"])
    parser.add_argument("--methods", nargs="+", default=["fedit", "svd", "squeeze"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--grid", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--lr", type=float, help="the tuning round's lr (default: the cell's)")
    args = parser.parse_args()
    if wrong := [m for m in args.methods if m not in METHODS or not tunable(m)]:
        raise SystemExit(f"--methods: {wrong} are not grid methods whose global clients use")
    if args.threads:
        torch.set_num_threads(args.threads)
    grid_rows = read_rows(args.results / "quality-rows.jsonl")
    kept = args.grid / "local-tuning.jsonl"
    rows = read_rows(kept)
    done = {(r["method"], r["regime"], r["seed"]) for r in rows if r.get("tune_lr") == args.lr}
    index = {(r["method"], r["regime"], r["seed"]): r for r in grid_rows}
    out = args.results / "local-tuning.md"
    for regime in args.regimes:
        for seed in args.seeds:
            for cell in [(label, regime, seed) for label in args.methods]:
                if cell in done or cell not in index:
                    continue
                print(f"[tuning] {' / '.join(map(str, cell))}", flush=True)
                if (row := run(cell, grid=args.grid, row=index[cell], lr=args.lr)) is None:
                    continue
                kept.parent.mkdir(parents=True, exist_ok=True)
                with kept.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                # every regime tuned so far, not only this call's
                shown = list(dict.fromkeys([*args.regimes, *(r["regime"] for r in rows)]))
                out.write_text(report(rows, grid_rows=grid_rows, regimes=shown))
                copy = "".join(json.dumps(r) + "\n" for r in rows)
                (args.results / "local-tuning-rows.jsonl").write_text(copy)
    print(out.read_text() if rows else "no finished grid cells to tune")


if __name__ == "__main__":
    main()
