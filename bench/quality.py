"""Every aggregation method on one federated workload: held-out loss per round and bytes moved.

    python bench/quality.py [--only LABEL ...] [--out DIR]   # writes results/quality.{md,png}

All methods share the seed, the shards (WordNet, domain non-IID), the clients and their ranks; each
runs the real ServerApp loop, LoraStrategy and ClientApp through `fedllm.deploy.local_grid`
(Flower's
serialisation both ways, per-node Context; no Ray start-up). References on the same shards: a
centralised LoRA on the pooled training data (upper) and local-only training (lower), both with the
same examples processed per round. The workload is the quickstart's model, data, clients and ranks
with a much smaller budget (see WORKLOAD), so that every row fits on this shared CPU. (The tiny
random-init model was tried first: every method, centralised and local-only, ended within 0.02 of
each other, so it could not tell aggregators apart.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from peft import PeftModel

from fedllm.aggregators import round_spec
from fedllm.client.train import evaluate_nll, train_local
from fedllm.data.shards import Shard, load_shard
from fedllm.deploy.local_grid import run_local
from fedllm.model.adapters import attach_lora
from fedllm.model.base import cached_base_model
from fedllm.recipe import RunConfig, load_recipe

ROOT = Path(__file__).parents[1]


def _squeeze(*, correction: bool, residual: int) -> list[str]:
    return [
        f"aggregator.options.correction={str(correction).lower()}",
        f"aggregator.options.residual_rank={residual}",
    ]


RESULTS = Path(__file__).parent / "results"
WORKLOAD = [  # overrides of every recipes/<method>.yaml (the quickstart workload): a smaller budget
    "data.max_examples=320",
    "data.prompt_format=plain",
    "data.max_length=32",
    "data.held_out=0.1",
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.batch_size=4",
    "federation.lr=0.003",
]
R_MAX = 32  # the quickstart's largest client rank (ranks 4/8/16/32)
METHODS: dict[str, tuple[str, list[str]]] = {  # label -> (recipe, extra overrides)
    "fedit": ("fedit", []),
    "ffa": ("ffa", []),
    "hetlora": ("hetlora", []),
    "rblora": ("rblora", []),
    "flora": ("flora", []),
    "flexlora": ("flexlora", []),
    "fedsa": ("fedsa", []),
    "lorafair": ("lorafair", []),
    "squeeze plain": ("squeeze", _squeeze(correction=False, residual=0)),
    "squeeze +correction": ("squeeze", _squeeze(correction=True, residual=0)),
    "squeeze +residual": ("squeeze", _squeeze(correction=False, residual=R_MAX)),
    "squeeze +correction +residual": ("squeeze", _squeeze(correction=True, residual=R_MAX)),
    # features (fedllm/features): FedProx on svd, server momentum on fedit (FedAvgM) and on svd
    "fedprox": ("fedprox", []),
    "fedavgm": ("fedavgm", []),
    "svd +fedavgm": ("svd", ["features.server_momentum.beta=0.9"]),
}
EXTRA = {  # on request only (--only): not needed for the comparison
    # svd sends clients the same top-rⱼ factors of ΔW* as "squeeze plain"; only its kept global
    # rank differs (Σrᵢ instead of max rᵢ), so it is left out to save ~4 CPU-minutes.
    "svd": ("svd", []),
    "lorafair iterative": ("lorafair", ["aggregator.options.solver=iterative"]),
}


def config(recipe: str, name: str, out: Path, extra: list[str]) -> RunConfig:
    overrides = [*WORKLOAD, f"output_dir={out}", f"name={name}", *extra]
    return load_recipe(ROOT / "recipes" / f"{recipe}.yaml", overrides)


def federated(label: str, out: Path) -> dict:
    """Run one method; its global held-out loss per round and cumulative bytes per round."""
    recipe, extra = {**METHODS, **EXTRA}[label]
    cfg = config(recipe, label.replace(" ", "").replace("+", "-"), out, extra)
    start = time.perf_counter()
    run_dir, _ = run_local(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    server = {r["round"]: r for r in rows if r.get("kind") == "server"}
    moved, total = [0], 0
    for rnd in range(1, cfg.federation.rounds + 1):
        total += server[rnd]["bytes_sent"] + server[rnd]["bytes_received"]
        moved.append(total)
    spec = round_spec(cfg.aggregator.name)
    kind = "merge" if spec.merge else "A only, B local" if spec.local_B else "adapter"
    kind += ", A frozen" if spec.freeze_A else ""
    return {
        "label": label,
        "semantics": kind,
        "loss": [server[r]["held_out_loss"] for r in range(cfg.federation.rounds + 1)],
        "bytes": moved,
        "seconds": time.perf_counter() - start,
    }


def references(out: Path) -> list[dict]:
    """Centralised LoRA on the pooled shards (rank R_MAX) and local-only training, per round."""
    cfg = config("svd", "references", out, [])
    fed = cfg.federation
    base, tok = cached_base_model(cfg)
    shards = [load_shard(cfg, pid, tok) for pid in range(cfg.data.num_clients)]
    pooled = [ex for s in shards for ex in s.train]
    common = {
        "batch_size": fed.batch_size,
        "pad_id": tok.pad_token_id,
        "optimizer": fed.optimizer,
        "lr": fed.lr,
        "max_grad_norm": fed.max_grad_norm,
    }

    def lora(rank: int) -> PeftModel:
        scaling = cfg.client_scaling(rank)
        return attach_lora(
            base,
            rank=rank,
            alpha=scaling * rank,
            dropout=0.0,
            target_modules=cfg.lora.target_modules,
        )

    def held_out(model: PeftModel, which: Shard) -> tuple[float, int]:
        model.eval()
        nll, tokens = evaluate_nll(
            model, which.held_out, batch_size=fed.eval_batch_size, pad_id=tok.pad_token_id
        )
        model.train()
        return nll, tokens

    out_rows = []
    start = time.perf_counter()
    model = lora(R_MAX)
    losses = []
    for rnd in range(fed.rounds + 1):
        if rnd:
            steps = fed.local_steps * len(shards)  # the federation's examples per round
            train_local(model, pooled, steps=steps, seed=cfg.seed * 7 + rnd, **common)
        sums = [held_out(model, s) for s in shards]
        losses.append(sum(n for n, _ in sums) / sum(t for _, t in sums))
    model.unload()
    out_rows.append(_reference("centralised (pooled data)", losses, start))

    start = time.perf_counter()
    per_round = [[0.0, 0] for _ in range(fed.rounds + 1)]
    for pid, shard in enumerate(shards):
        model = lora(cfg.client_rank(pid))
        for rnd in range(fed.rounds + 1):
            if rnd:
                seed = cfg.seed * 100_003 + rnd * 1009 + pid
                train_local(model, shard.train, steps=fed.local_steps, seed=seed, **common)
            nll, tokens = held_out(model, shard)
            per_round[rnd][0] += nll
            per_round[rnd][1] += tokens
        model.unload()
    out_rows.append(_reference("local only", [n / t for n, t in per_round], start))
    return out_rows


def _reference(label: str, losses: list[float], start: float) -> dict:
    return {
        "label": label,
        "semantics": "reference",
        "loss": losses,
        "bytes": [0] * len(losses),
        "seconds": time.perf_counter() - start,
    }


def markdown(results: list[dict], header: str) -> str:
    rounds = len(results[0]["loss"]) - 1
    cols = " | ".join(f"round {r}" for r in range(rounds + 1))
    lines = [
        header,
        "",
        f"| method | round semantics | {cols} | Δ vs base | MB moved | seconds |",
        "|---|---|" + "---:|" * (rounds + 4),
    ]
    ranked = sorted(results, key=lambda r: r["loss"][-1])
    for r in ranked:
        losses = " | ".join(f"{x:.4f}" for x in r["loss"])
        lines.append(
            f"| {r['label']} | {r['semantics']} | {losses} | {r['loss'][-1] - r['loss'][0]:+.4f} "
            f"| {r['bytes'][-1] / 1e6:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    for r in results:
        style = "--" if r["semantics"] == "reference" else ":" if "squeeze" in r["label"] else "-"
        left.plot(range(len(r["loss"])), r["loss"], style, marker="o", ms=3, label=r["label"])
        if r["semantics"] != "reference":
            right.scatter(r["bytes"][-1] / 1e6, r["loss"][-1], s=18)
            right.annotate(r["label"], (r["bytes"][-1] / 1e6, r["loss"][-1]), fontsize=7)
    left.set(xlabel="round", ylabel="held-out loss (token-weighted)", title="held-out loss")
    right.set(
        xlabel="MB moved in all (up + down)",
        ylabel="final held-out loss",
        title="quality vs communication",
    )
    left.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[*METHODS, *EXTRA, "references"])
    parser.add_argument("--report", action="store_true", help="only write the report from --out")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--fresh", action="store_true", help="rerun rows already in --out")
    parser.add_argument("--set", nargs="+", default=[], help="extra key=value for every run")
    parser.add_argument("--tag", default="", help="result files quality-<tag>.md/png")
    args = parser.parse_args()
    WORKLOAD.extend(args.set)
    torch.set_num_threads(1)  # a shared 2-core machine: one busy core, no oversubscription
    load = os.getloadavg()[0]
    chosen = args.only or [*METHODS, "references"]
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / f"results-{os.getpid()}.json"  # one per process: workers may run in parallel
    done = {r["label"]: r for f in sorted(args.out.glob("results-*.json")) for r in _read(f)}
    for label in [] if args.report else chosen:
        finished = set(done) | ({"references"} if "local only" in done else set())
        if not args.fresh and label in finished:
            continue
        if label == "references":
            results += references(args.out)
        else:
            results.append(federated(label, args.out))
        print(f"[quality] {results[-1]['label']}: {results[-1]['loss']}", flush=True)
        cache.write_text(json.dumps(results, indent=1))
    done.update({r["label"]: r for f in sorted(args.out.glob("results-*.json")) for r in _read(f)})
    everything = list(done.values())
    header = (
        "# Aggregation quality: every method on one federated workload\n\n"
        "Command: `python bench/quality.py` (rows may come from parallel `--only` workers "
        f"and a final `--report`; this one started at load average {load:.1f}; one torch thread "
        "per process; seconds per row below). Workload: recipes/quickstart.yaml "
        f"(SmolLM2-135M, WordNet, 4 clients of ranks 4/8/16/32, domain non-IID) with these "
        "overrides: "
        f"{WORKLOAD}. Same seed, "
        "shards, clients and ranks for every row; held-out loss is the token-weighted loss over "
        "all clients' held-out splits (fedsa: each client with its own B, i.e. personalised). "
        "MB moved: adapter arrays up and down, summed over clients and rounds. Each row is "
        "`fedllm run recipes/<recipe>.yaml` with these overrides (and the squeeze options shown)."
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{args.tag}" if args.tag else "quality"
    (RESULTS / f"{stem}.md").write_text(markdown(everything, header) + "\n")
    plot(everything, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.md")


if __name__ == "__main__":
    main()
