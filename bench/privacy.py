"""Utility against ε for sample-level DP-SGD, with and without FFA, and DP-SGD's step overhead.

    python bench/privacy.py [--recipe recipes/tiny.yaml] [--full] [--out DIR] [key=value ...]
    python bench/privacy.py --recipe recipes/quickstart.yaml --full  # ~80 min

Each cell is a whole federation through the real ServerApp loop and ClientApp on
`fedllm.deploy.local_grid` (Flower serialisation, no Ray start-up). By default it is reduced to fit
a
shared 2-core CPU: the tiny recipe, 2 rounds of 5 local steps, 400 examples (the reduction is
written into the results); --full runs the recipe as written.
ε ∈ {1, 3, 8} sets privacy.target_epsilon (each client derives its σ for its own q
over the planned rounds × steps); ∞ is the same run without DP. "FFA" is aggregator ffa (A frozen),
the other column the recipe's default aggregator on adapter state (svd).
The overhead is DP-SGD (Opacus hooks, Poisson sampling at q = batch/n, clipping, noise) against
plain steps of `train_local` on the same model and shard, same number of steps, in this process.
Writes results/privacy.md (results/privacy-<recipe>.md with --full).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "privacy.md"
REDUCED = [
    "federation.rounds=2",
    "federation.local_steps=5",
    "data.max_examples=400",
    "federation.lr=0.01",
]
EPSILONS = [1.0, 3.0, 8.0, None]
DELTA = 1e-4


def utility(
    recipe: str, extra: list[str], out: Path, *, eps: float | None, agg: str
) -> tuple[float, float, float | None]:
    """(final held-out loss, base loss, ε spent) of one federation."""
    from fedllm.deploy.local_grid import run_local
    from fedllm.launch import absolute_paths, prepare
    from fedllm.recipe import load_recipe

    name = f"{agg}-{'inf' if eps is None else f'{eps:g}'}"
    dp = [] if eps is None else ["privacy.mode=sample", f"privacy.target_epsilon={eps}"]
    dp += [f"privacy.delta={DELTA}"] if eps is not None else []
    cfg = absolute_paths(
        load_recipe(
            recipe,
            [*extra, f"output_dir={out}", f"name={name}", f"aggregator.name={agg}", *dp],
        )
    )
    run_dir = cfg.run_dir
    if not (run_dir / "final_eval.json").is_file():  # reuse a finished cell of an earlier --out
        prepare(cfg)
        run_dir, _ = run_local(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    server = {r["round"]: r for r in rows if r["kind"] == "server"}
    last = max(server)
    return server[last]["held_out_loss"], server[0]["held_out_loss"], server[last].get("epsilon")


def overhead(recipe: str, extra: list[str], out: Path, *, steps: int = 12) -> dict:
    """Seconds per step: plain `train_local` vs DP-SGD, same model/shard/steps, interleaved."""
    from fedllm.client.train import train_local
    from fedllm.data.shards import load_shard
    from fedllm.model.adapters import attach_lora
    from fedllm.model.base import cached_base_model
    from fedllm.privacy.dpsgd import train_dp
    from fedllm.privacy.plan import sample_plan
    from fedllm.recipe import load_recipe

    dp = ["privacy.mode=sample", f"privacy.delta={DELTA}", "privacy.noise_multiplier=1"]
    cfg = load_recipe(recipe, [*extra, f"output_dir={out}", *dp])
    base, tok = cached_base_model(cfg)
    shard = load_shard(cfg, 0, tokenizer=tok)
    plan = sample_plan(cfg, n_train=len(shard.train))
    rank = cfg.client_rank(0)
    kw = {"steps": steps, "pad_id": tok.pad_token_id, "lr": cfg.federation.lr}
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    examples: dict[str, int] = {"plain": 0, "dp": 0}
    for trial in range(2):  # interleaved, so load from other users hits both alike
        for kind in ("plain", "dp"):
            model = attach_lora(
                base,
                rank=rank,
                alpha=cfg.lora.alpha,
                dropout=0.0,
                target_modules=cfg.lora.target_modules,
            )
            t0 = time.perf_counter()
            if kind == "plain":
                r = train_local(model, shard.train, batch_size=cfg.federation.batch_size, **kw)
            else:
                r = train_dp(model, shard.train, plan=plan, seed=trial, **kw).train
            times[kind].append((time.perf_counter() - t0) / steps)
            examples[kind] += r.examples
            model.unload()
    return {
        "plain": min(times["plain"]),
        "dp": min(times["dp"]),
        "ratio": min(times["dp"]) / min(times["plain"]),
        "batch_plain": examples["plain"] / (2 * steps),
        "batch_dp": examples["dp"] / (2 * steps),
        "model": cfg.model.name,
        "steps": steps,
        "rank": rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(Path(__file__).parents[1] / "recipes/tiny.yaml"))
    parser.add_argument("--full", action="store_true", help="run the recipe as written, unreduced")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-privacy-"))
    extra = [*([] if args.full else REDUCED), *args.overrides]
    results = RESULTS.with_name(f"privacy-{Path(args.recipe).stem}.md") if args.full else RESULTS
    t0 = time.perf_counter()
    table = {}
    for agg in ("ffa", "svd"):
        for eps in EPSILONS:
            table[(agg, eps)] = utility(args.recipe, extra, out, eps=eps, agg=agg)
            print(f"[bench] {agg} ε={eps}: {table[(agg, eps)]}", flush=True)
    ov = overhead(args.recipe, extra, out)
    base_loss = table[("ffa", None)][1]
    command = f" --recipe {args.recipe} --full" if args.full else ""
    lines = [
        "# Privacy: utility against ε, and DP-SGD step overhead",
        "",
        f"Recipe `{Path(args.recipe).name}`"
        + (f" with {' '.join(extra)}" if extra else " as written")
        + "; sample-level DP-SGD with privacy.target_epsilon "
        f"= ε at δ = {DELTA:g}, per-example clip C = 1, RDP accountant. Held-out loss of the final "
        f"global adapter (token-weighted over clients; base model: {base_loss:.4f}). "
        f"Wall time {time.perf_counter() - t0:.0f} s. "
        f"Run: `python bench/privacy.py{command}`.",
        "",
        "| ε (target) | held-out loss, FFA (A frozen) | ε spent | held-out loss, svd | ε spent |",
        "|---|---:|---:|---:|---:|",
    ]
    for eps in EPSILONS:
        f, s = table[("ffa", eps)], table[("svd", eps)]
        spent = [("—" if x[2] is None else f"{x[2]:.2f}") for x in (f, s)]
        label = "∞ (no DP)" if eps is None else f"{eps:g}"
        lines.append(f"| {label} | {f[0]:.4f} | {spent[0]} | {s[0]:.4f} | {spent[1]} |")
    lines += [
        "",
        f"DP-SGD step overhead on `{ov['model']}` (rank {ov['rank']}, {ov['steps']} steps, best "
        f"of 2 interleaved trials): plain {ov['plain'] * 1000:.0f} ms/step (batch "
        f"{ov['batch_plain']:.1f}), DP-SGD {ov['dp'] * 1000:.0f} ms/step (mean Poisson batch "
        f"{ov['batch_dp']:.1f}): **{ov['ratio']:.2f}×** the plain step.",
        "",
    ]
    results.parent.mkdir(exist_ok=True)
    results.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
