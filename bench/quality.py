"""The quality benchmark as an experiment: a grid of cells (method × regime × seed) with intervals.

    python bench/quality.py --list                         # the grid, the plan, what is left
    python bench/quality.py --plan                         # run what is left of the plan
    python bench/quality.py --methods core --regimes domain --seeds 0 1 2
    python bench/quality.py --report                       # tables + plot, no runs

Each cell is `fedllm run recipes/<recipe>.yaml <regime overrides> seed=<s>` on the in-process grid
(`fedllm.deploy.local_grid`: the real ServerApp loop, LoraStrategy and ClientApp with Flower's
serialisation; no Ray start-up), or a reference trained here: centralised (one LoRA of the largest
client rank on the pooled data, the clients' steps per round) and local-only (each client alone).
A finished cell appends one line to <out>/rows.jsonl and is skipped on the next call (the grid
takes hours); an interrupted federation resumes from its last round's checkpoint, an interrupted
local-only cell from its last finished client.

`seed` changes the LoRA initialisation and data order (and client sampling, where a regime
samples clients: none here does, every client trains every round). It also changes the data
subset, the global test set and the held-out splits unless the recipe has a data seed of its own
(`data.seed`, proposed in issue 14): with it the harness pins `data.seed=0` so the partition is
the same in every seed. Comparisons are paired either way (same seed = same data for every method).

Two test sets per cell: each client's own held-out split (own domains: personalisation) and the
global test set (`data.test_set`: 10% of every domain plus two whole domains no client holds:
generalisation). `bench/_stats.py` makes the intervals; `bench/_quality_report.py` the report.

The whole grid is `PLAN` in bench/_quality_grid.py: eighteen commands, 222 distinct cells, in
the order that answers the most first. `--list` prints each with what is done and the hours left;
`--plan` runs what is left in that order (what each new session restarts). Measured on an idle
2-core AMD EPYC: a federated `domain` cell takes ~5 min (squeeze: 305–324 s), a `scarce` one 9–10
min (551–591 s), local-only and centralised about the same; `long` (12 rounds) ~2.4× a
`domain` cell; ±40%. The grid moves only while nothing else runs, so it takes many sessions;
the rows it commits add up across them.
`python bench/quality_features.py` writes the features' paired table.

Every finished cell rewrites results/quality.{md,png} and quality-rows.{jsonl,csv} from all
finished cells; a checkout without <out>/rows.jsonl starts from the committed quality-rows.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/_*.py next to this script

from fedllm.processes import drop_checkpointing_notice, hide_bitsandbytes

hide_bitsandbytes()  # as fedllm's commands do: no base here is quantised (peft would import it)

from _quality_grid import (  # noqa: E402
    COMMON,
    FIXED_DATA_SEED,
    GROUPS,
    METHODS,
    PAIRS,
    PLAN,
    POOLED,
    REGIMES,
    ROOT,
    SEEDS,
    client_ranks,
    expand,
    overrides,
    plan,
    plan_cells,
    recipe_path,
    reference,
    regime_config,
)
from _quality_report import RESULTS, read_cells, read_rows, write_report  # noqa: E402
from _quality_runs import centralised, federated, local_only, machine, run_dir  # noqa: E402

from fedllm.recipe import load_recipe  # noqa: E402


def command(label: str, *, regime: str, seed: int, extra: list[str]) -> str:
    """The shell command that reruns one cell on its own."""
    recipe = METHODS[label][0]
    if recipe is None:
        args = ["--methods", label, "--regimes", regime, "--seeds", str(seed)]
        return shlex.join(
            ["python", "bench/quality.py", *args, *(["--set", *extra] if extra else [])]
        )
    return shlex.join(
        [
            "fedllm",
            "run",
            f"recipes/{recipe}.yaml",
            *overrides(label, regime=regime, seed=seed, extra=extra),
        ]
    )


def run_cell(label: str, regime: str, seed: int, *, out: Path, extra: list[str]) -> dict:
    """One cell's row: where, how, and what it measured."""
    recipe, _ = METHODS[label]
    folder, name = run_dir(out, regime=regime, seed=seed, label=label)
    cfg = load_recipe(
        ROOT / "recipes" / f"{recipe or 'svd'}.yaml",
        [
            *overrides(label, regime=regime, seed=seed, extra=extra),
            f"output_dir={folder}",
            f"name={name}",
        ],
    )
    row = {"method": label, "regime": regime, "seed": seed, "recipe": recipe}
    row |= {
        "overrides": overrides(label, regime=regime, seed=seed, extra=extra),
        "command": command(label, regime=regime, seed=seed, extra=extra),
    }
    row |= {"data_seed_fixed": FIXED_DATA_SEED, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    row |= machine()
    kind = reference(label)
    measure = {"centralised": centralised, "local only": local_only}.get(kind, federated)
    cpu = time.process_time()  # every thread of this process; a paused grid accrues none
    row |= measure(cfg)
    row["cpu_seconds"] = time.process_time() - cpu  # since this call: a resume's part only
    row["load_end"] = machine()["load"]
    return row


DEFAULT_REGIMES = ("domain", "scarce", "iid")  # --regimes when not given


def print_grid(rows: list[dict]) -> None:
    """The regimes, groups, finished cells and each step of the plan with what is left of it
    (hours estimated from the finished cells' median wall time per client-round)."""
    for name, regime in REGIMES.items():
        print(f"regime {name}: {regime.about}\n  {' '.join(regime.overrides)}")
    for name, labels in GROUPS.items():
        print(f"group {name}: {', '.join(labels)}")
    for regime in REGIMES:
        here = [r for r in rows if r["regime"] == regime]
        seeds = {m: sorted(r["seed"] for r in here if r["method"] == m) for m in METHODS}
        cells = [f"{m} {v}" for m, v in seeds.items() if v]
        print(f"done in {regime}: {sum(map(len, seeds.values()))} cells: {', '.join(cells)}")
    done = {(r["method"], r["regime"], r["seed"]) for r in rows}
    cfgs = {g: regime_config(g) for g in REGIMES}
    size = {g: cfg.data.num_clients * cfg.federation.rounds for g, cfg in cfgs.items()}
    # a resumed cell's seconds are its last part only
    per = [r["seconds"] / size[r["regime"]] for r in rows if not r.get("resumed")]
    unit = statistics.median(per) if per else float("nan")  # s per client-round

    def hours(cells: list[tuple[str, str, int]]) -> float:
        return sum(unit * size[g] for m, g, s in cells if (m, g, s) not in done) / 3600

    print("plan (python bench/quality.py --plan runs what is left, in this order):")
    for step in PLAN:
        cells = plan_cells([step], quiet=True)
        finished = sum(cell in done for cell in cells)
        print(f"  {finished}/{len(cells)} done, ~{hours(cells):.1f} h left: {step.command()}")
        print(f"      {step.why}")
    print(f"  ~{hours(plan_cells(PLAN, quiet=True)):.1f} h left in all at the finished cells' pace")


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests parse each plan step's command with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", help="labels or groups (default: all)")
    parser.add_argument(
        "--regimes", nargs="+", choices=REGIMES, help=f"default: {' '.join(DEFAULT_REGIMES)}"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, help=f"default: {' '.join(map(str, SEEDS))}"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--set", nargs="+", default=[], help="extra key=value for every cell")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--tag", default="", help="write quality-<tag>.{md,png,...}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument("--plan", action="store_true", help="run what is left of the plan")
    parser.add_argument("--list", action="store_true", help="print the grid and the plan; exit")
    return parser


def chosen_cells(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """The cells a command line asks for: the plan's, or its methods × regimes × seeds."""
    if args.plan:
        return plan_cells(PLAN)
    methods, regimes = args.methods or ["all"], args.regimes or list(DEFAULT_REGIMES)
    return plan(expand(methods), regimes, args.seeds or list(SEEDS))


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.plan and (args.methods or args.regimes or args.seeds):
        parser.error("--plan runs the plan's own cells: drop --methods, --regimes and --seeds")
    if args.list:
        print_grid(read_rows(args.results / "quality-rows.jsonl"))  # the committed grid
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    drop_checkpointing_notice()  # peft's FutureWarning on every wrap, as `fedllm run` drops it
    cells = chosen_cells(args)
    # a method is its recipe (fedprox, fedavgm are features on a registered aggregator)
    missing = {m for m, _, _ in cells if METHODS[m][0] and not recipe_path(METHODS[m][0]).exists()}
    for m in sorted(missing):
        print(f"[quality] {m}: no recipe {recipe_path(METHODS[m][0])}; skipped")
    cells = [cell for cell in cells if cell[0] not in missing]
    rows_path = args.out / "rows.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{args.tag}" if args.tag else "quality"
    kept = args.results / f"{stem}-rows.jsonl"
    done = read_cells(rows_path)
    # the committed copy is the grid on a new checkout, and holds rows other machines added
    if adopted := {cell: r for cell, r in read_cells(kept).items() if cell not in done}:
        with rows_path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in adopted.values())
        done |= adopted
        print(f"[quality] {rows_path}: took {len(adopted)} finished cells from {kept}")

    ranks = {regime: client_ranks(regime) for regime in REGIMES}  # each regime's recipe, once

    def report() -> list[Path]:
        return write_report(
            list(done.values()),
            stem=stem,
            results=args.results,
            regimes={n: r.about for n, r in REGIMES.items()},
            common=COMMON,
            regime_overrides={n: list(r.overrides) for n, r in REGIMES.items()},
            pairs=PAIRS,
            invocation=shlex.join(["python", "bench/quality.py", *sys.argv[1:]]),
            client_ranks=ranks,
            pooled=POOLED,
        )

    for i, (label, regime, seed) in enumerate([] if args.report else cells, 1):
        wanted = overrides(label, regime=regime, seed=seed, extra=args.set)
        if (old := done.get((label, regime, seed))) is not None:
            if old["overrides"] != wanted:
                raise SystemExit(
                    f"{rows_path} holds ({label}, {regime}, seed {seed}) run with other overrides "
                    f"({old['overrides']}); use another --out, or delete that line"
                )
            continue
        print(f"[quality] cell {i}/{len(cells)}: {label} / {regime} / seed {seed}", flush=True)
        row = run_cell(label, regime, seed, out=args.out, extra=args.set)
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[(label, regime, seed)] = row
        personal, test = row["personal"][-1], row["test"][-1]
        print(
            f"[quality] {label} / {regime} / seed {seed}: own {personal:.4f}, test "
            f"{test if test is None else round(test, 4)} [{row['seconds']:.0f}s]",
            flush=True,
        )
        report()  # every finished cell reaches bench/results (committed: survives the checkout)
    print("wrote " + ", ".join(str(p) for p in report()))


if __name__ == "__main__":
    main()
