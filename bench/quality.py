"""The quality benchmark as an experiment: a grid of cells (method × regime × seed) with intervals.

    python bench/quality.py --list                                   # methods, groups, regimes
    python bench/quality.py --methods core --regimes domain --seeds 0 1 2
    python bench/quality.py --report                                 # tables + plot, no runs

Each cell is `fedllm run recipes/<recipe>.yaml <regime overrides> seed=<s>` on the in-process grid
(`fedllm.deploy.local_grid`: the real ServerApp loop, LoraStrategy and ClientApp with Flower's
serialisation; no Ray start-up), or a reference trained here: centralised (one LoRA of the largest
client rank on the pooled data, the clients' steps per round) and local-only (each client alone).
A finished cell appends one line to <out>/rows.jsonl and is skipped on the next call (the grid
takes hours); an interrupted federation resumes from its last round's checkpoint, an interrupted
local-only cell from its last finished client.

`seed` changes the LoRA initialisation, client sampling and data order. It also changes the data
subset, the global test set and the held-out splits unless the recipe has a data seed of its own
(`data.seed`, proposed in issue 14): with it the harness pins `data.seed=0` so the partition is
the same in every seed. Comparisons are paired either way (same seed = same data for every method).

Two test sets per cell: each client's own held-out split (own domains: personalisation) and the
global test set (`data.test_set`: 10% of every domain plus two whole domains no client holds:
generalisation). `bench/_stats.py` makes the intervals; `bench/_quality_report.py` the report.

The whole grid, in the order that answers the most first. Estimates for one worker on an idle
2-core machine: ~2.2 s per local step of SmolLM2-135M at batch 8 × 48 tokens, so cells of ~8 min
in domain/iid, ~14 in scarce, ~18 in long; ±40%; flora merges every round. Measured on a 2-core
AMD EPYC (stop 24, fp32): centralised scarce 23 min, local-only scarce 19 min (its 2,697 s
minus a 26-min pause); a federated scarce cell 12 min (rblora, stop 26, uncontended: 729 s).
The grid moves only while nothing else runs, so it takes many sessions; the rows it commits add
up across them:

    python bench/quality.py --methods core --regimes scarce domain           # 60 cells, ~11 h
    python bench/quality.py --methods "squeeze balanced" --regimes scarce     # 3: the old default
    python bench/quality.py --methods control --regimes iid                   # 15 cells, ~2 h
    python bench/quality.py --methods fedit squeeze "squeeze balanced" --regimes clientdp  # 9
    python bench/quality.py --methods squeeze "squeeze balanced" --regimes clientdp \
        --seeds 3 4                                             # 4 more: the DP noise is unseeded
    python bench/quality.py --methods "lr check" --regimes scarce --seeds 0  # 4: lr 0.003, 0.01
    python bench/quality.py --methods baselines features --regimes scarce     # 24 cells, ~5 h
    python bench/quality.py --methods variants --regimes domain               # 27 cells, ~3.5 h
    python bench/quality.py --methods "squeeze plain" "squeeze +residual" "squeeze rows" \
        "squeeze +residual rows" squeeze "squeeze balanced" fedit "local only" \
        --regimes long                                                        # 24 cells, ~7 h
    python bench/quality_features.py                          # the features' paired table

(The IID control runs the `control` group only, and the baselines and features run in the
scarce regime, where collaboration should pay: the full cross would be ~40 more cells. The
`clientdp` regime asks one question: which gauge of squeeze's factors carries DP noise into ΔW
less; docs/privacy.md.)

Every finished cell rewrites results/quality.{md,png} and quality-rows.{jsonl,csv} from all
finished cells; a checkout without <out>/rows.jsonl starts from the committed quality-rows.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/_*.py next to this script

from fedllm.processes import hide_bitsandbytes

hide_bitsandbytes()  # as fedllm's commands do: no base here is quantised (peft would import it)

from _quality_report import RESULTS, write_report  # noqa: E402
from _quality_runs import centralised, federated, local_only, machine, run_dir  # noqa: E402

from fedllm.recipe import load_recipe  # noqa: E402
from fedllm.recipe.schema_data import DataConfig  # noqa: E402

ROOT = Path(__file__).parents[1]
FIXED_DATA_SEED = "seed" in DataConfig.model_fields  # data.seed: the partition fixed over seeds

# Every regime starts from recipes/<method>.yaml (the quickstart workload: SmolLM2-135M, WordNet,
# ranks cycling 4/8/16/32, LoRA on q_proj/v_proj) with these overrides.
COMMON = [
    "data.prompt_format=plain",
    "data.max_length=48",
    "data.held_out=0.2",
    "data.test_set={fraction: 0.1, labels: [noun.food, verb.motion]}",
    "federation.local_steps=8",
    "federation.batch_size=8",
    "federation.lr=0.001",
    # pinned: "auto" is bf16 on CPUs with native bf16 and fp32 elsewhere, and the grid spans
    # sessions on different machines; fp32 keeps every cell's numbers comparable
    "federation.precision=fp32",
    *(["data.seed=0"] if FIXED_DATA_SEED else []),
]


@dataclass(frozen=True)
class Regime:
    overrides: tuple[str, ...]
    about: str
    methods: tuple[str, ...] | None = None  # the only labels it runs (None: any)


REGIMES = {
    "domain": Regime(
        ("data.max_examples=800", "data.num_clients=4", "federation.rounds=5"),
        "4 clients, each holding whole WordNet domains (non-IID), ~136 training examples each",
    ),
    "scarce": Regime(
        ("data.max_examples=1100", "data.num_clients=8", "federation.rounds=5"),
        "8 clients × ~94 training examples, whole domains each: where collaboration should pay",
    ),
    "iid": Regime(
        (
            "data.max_examples=800",
            "data.num_clients=4",
            "data.partitioner=iid",
            "federation.rounds=5",
        ),
        "the domain regime's data shuffled evenly over 4 clients (control)",
    ),
    "long": Regime(
        ("data.max_examples=800", "data.num_clients=4", "federation.rounds=12"),
        "the domain regime at 12 rounds: error feedback and gauge at a longer budget",
    ),
    # Client-level DP at the noise a large federation's mean carries: σ = zS/m per entry, here
    # 0.01·2/4 = 0.005, which is a 400-client round at z = 1 (4 clients cannot give a useful ε:
    # this regime measures how noise in the factors reaches ΔW, i.e. the gauge; its ε is not a
    # privacy claim). Uniform weights, as client-level DP requires. The noise comes from OS
    # entropy (privacy/client_dp.py), so a seed does not repeat it: pairing removes less here.
    "clientdp": Regime(
        (
            "data.max_examples=800",
            "data.num_clients=4",
            "federation.rounds=5",
            "privacy.mode=client",
            "privacy.client_clip=2",
            "privacy.client_noise_multiplier=0.01",
            "aggregator.weighting=uniform",
        ),
        "the domain regime under client-level DP, S = 2, σ = 0.005 per entry of the mean "
        "(a 400-client round's at z = 1): how factor noise reaches ΔW in each gauge",
        # the references train without DP, and client-level DP refuses fedsa, flora, fedplora
        methods=("fedit", "squeeze", "squeeze balanced"),
    ),
}


def _sq(*extra: str) -> tuple[str, tuple[str, ...]]:
    return "squeeze", tuple(f"aggregator.options.{o}" for o in extra)


PLAIN = ("correction=false", "residual_rank=0")
BALANCED = ("gauge=balanced",)
# label -> (recipe, extra overrides); recipe None: a reference trained in this process
METHODS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "centralised": (None, ()),
    "local only": (None, ()),
    "fedit": ("fedit", ()),
    "ffa": ("ffa", ()),
    # every cell runs at one lr (0.001). FFA-LoRA trains B alone against a frozen A: there it
    # moves ΔW slowest and still falls steeply in its last round; is it the method or its step
    # size? And does squeeze's lead over FedIT hold at a larger step?
    "ffa lr 0.003": ("ffa", ("federation.lr=0.003",)),
    "ffa lr 0.01": ("ffa", ("federation.lr=0.01",)),
    "fedit lr 0.003": ("fedit", ("federation.lr=0.003",)),
    "squeeze lr 0.003": ("squeeze", ("federation.lr=0.003",)),
    "hetlora": ("hetlora", ()),
    "flora": ("flora", ()),
    "flexlora": ("flexlora", ()),
    "fedsa": ("fedsa", ()),
    "rblora": ("rblora", ()),
    "lorafair": ("lorafair", ()),
    "svd": ("svd", ()),
    "squeeze": _sq(),  # the default: +correction +residual at the global rank, rows gauge
    # the default until stop 34 (rows won in domain: bench/results/quality.md)
    "squeeze balanced": _sq(*BALANCED),
    "squeeze plain": _sq(*PLAIN, *BALANCED),  # == svd at rank max rᵢ
    "squeeze +correction": _sq("correction=true", "residual_rank=0", *BALANCED),
    "squeeze +residual": _sq("correction=false", *BALANCED),
    "squeeze rows": _sq(*PLAIN, "gauge=rows"),  # A rows at a fresh init's norm (1/√3)
    "squeeze +residual rows": _sq("correction=false", "gauge=rows"),
    # LoRA-Squeeze in-tuning: clients train at 2r, squeeze to r after half their steps (run
    # against the balanced default, so it stays there)
    "squeeze intune": ("squeeze", ("features.squeeze_intune={}", *_sq(*BALANCED)[1])),
    # PreLort's nested-prefix training under squeeze: the prefix a client's rank cut keeps is
    # trained to carry the most
    "squeeze prefix": ("squeeze", ("features.nested_prefix={}",)),
    "fedplora": ("fedplora", ()),
    "prelort": ("prelort", ()),
    "sdflora": ("sdflora", ()),
    "fedprox": ("fedprox", ()),  # svd + μ = 0.01
    "fedavgm": ("fedavgm", ()),  # fedit + server momentum β = 0.9
    "svd +fedavgm": ("svd", ("features.server_momentum.beta=0.9",)),
}
GROUPS = {
    "core": [
        "centralised",
        "local only",
        "fedit",
        "svd",
        "squeeze",
        "rblora",
        "fedsa",
        "fedplora",
        "prelort",
        "sdflora",
    ],
    "baselines": ["ffa", "hetlora", "flora", "flexlora", "lorafair"],
    # the IID regime is a control (does the gap to local-only close without domain skew?):
    # the references, the plain average and the exact and default aggregators are enough
    "control": ["centralised", "local only", "fedit", "svd", "squeeze"],
    # not "squeeze": a group name would shadow the method's label in --methods
    "variants": [m for m in METHODS if m.startswith("squeeze") and " lr " not in m],
    "features": ["fedprox", "fedavgm", "svd +fedavgm"],
    "lr check": [m for m in METHODS if " lr " in m],  # one seed: a check, not a sweep
}
GROUPS["all"] = list(METHODS)
# Controlled pairs (one knob changed, same seeds) reported beside the comparisons to fedit and
# local-only: (variant, its base).
PAIRS = [
    ("squeeze +correction", "squeeze plain"),
    ("squeeze +residual", "squeeze plain"),
    ("squeeze balanced", "squeeze +correction"),
    ("squeeze rows", "squeeze plain"),
    ("squeeze plain", "svd"),  # the same method (RSVD = exact SVD): a consistency check
    ("flexlora", "svd"),  # the same aggregate, formed densely: another
    ("squeeze +residual rows", "squeeze +residual"),
    ("squeeze", "squeeze balanced"),
    ("squeeze intune", "squeeze balanced"),
    ("squeeze prefix", "squeeze"),
    ("ffa lr 0.003", "ffa"),
    ("ffa lr 0.01", "ffa"),
    ("squeeze lr 0.003", "fedit lr 0.003"),
    ("fedprox", "svd"),
    ("fedavgm", "fedit"),
    ("svd +fedavgm", "svd"),
]


def overrides(label: str, regime: str, seed: int, extra: list[str]) -> list[str]:
    """Every override of one cell after its recipe (the regime's, the method's, the seed)."""
    return [*COMMON, *REGIMES[regime].overrides, *METHODS[label][1], *extra, f"seed={seed}"]


def command(label: str, regime: str, seed: int, extra: list[str]) -> str:
    """The shell command that reruns one cell on its own."""
    recipe = METHODS[label][0]
    if recipe is None:
        args = ["--methods", label, "--regimes", regime, "--seeds", str(seed)]
        return shlex.join(
            ["python", "bench/quality.py", *args, *(["--set", *extra] if extra else [])]
        )
    return shlex.join(
        ["fedllm", "run", f"recipes/{recipe}.yaml", *overrides(label, regime, seed, extra)]
    )


def run_cell(label: str, regime: str, seed: int, *, out: Path, extra: list[str]) -> dict:
    """One cell's row: where, how, and what it measured."""
    recipe, _ = METHODS[label]
    folder, name = run_dir(out, regime, seed, label)
    cfg = load_recipe(
        ROOT / "recipes" / f"{recipe or 'svd'}.yaml",
        [*overrides(label, regime, seed, extra), f"output_dir={folder}", f"name={name}"],
    )
    row = {"method": label, "regime": regime, "seed": seed, "recipe": recipe}
    row |= {
        "overrides": overrides(label, regime, seed, extra),
        "command": command(label, regime, seed, extra),
    }
    row |= {"data_seed_fixed": FIXED_DATA_SEED, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    row |= machine()
    measure = {"centralised": centralised, "local only": local_only}.get(label, federated)
    cpu = time.process_time()  # every thread of this process; a paused grid accrues none
    row |= measure(cfg)
    row["cpu_seconds"] = time.process_time() - cpu  # since this call: a resume's part only
    row["load_end"] = machine()["load"]
    return row


def plan(methods: list[str], regimes: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """The cells to run, seed by seed: every method in every regime, except where a regime
    lists the only methods it runs (said once per regime)."""
    allowed = {regime: REGIMES[regime].methods or tuple(METHODS) for regime in regimes}
    for regime, labels in allowed.items():
        if skipped := [m for m in methods if m not in labels]:
            only, left = ", ".join(labels), ", ".join(skipped)
            print(f"[quality] {regime} runs only {only}; skipped {left}")
    return [(m, g, s) for s in seeds for g in regimes for m in methods if m in allowed[g]]


def client_ranks(regime: str) -> dict[int, int]:
    """Partition -> LoRA rank in `regime` (every method's recipe cycles ranks 4/8/16/32)."""
    cfg = load_recipe(recipe_path("fedit"), overrides("fedit", regime, 0, []))
    return {p: cfg.client_rank(p) for p in range(cfg.data.num_clients)}


def recipe_path(recipe: str) -> Path:
    """Where a method's recipe lives."""
    return ROOT / "recipes" / f"{recipe}.yaml"


def expand(names: list[str]) -> list[str]:
    """Labels and group names -> labels, in grid order, without duplicates."""
    chosen = {m for n in names for m in GROUPS.get(n, [n])}
    unknown = sorted(chosen - set(METHODS))
    if unknown:
        raise SystemExit(
            f"--methods: unknown {unknown}; valid: groups {sorted(GROUPS)} "
            f"or labels {list(METHODS)}"
        )
    return [m for m in METHODS if m in chosen]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["all"], help="labels or groups")
    parser.add_argument(
        "--regimes", nargs="+", default=["domain", "scarce", "iid"], choices=REGIMES
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--set", nargs="+", default=[], help="extra key=value for every cell")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--tag", default="", help="write quality-<tag>.{md,png,...}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument("--list", action="store_true", help="print the grid's names and exit")
    args = parser.parse_args()
    if args.list:
        for name, regime in REGIMES.items():
            print(f"regime {name}: {regime.about}\n  {' '.join(regime.overrides)}")
        for name, labels in GROUPS.items():
            print(f"group {name}: {', '.join(labels)}")
        done = read_rows(args.results / "quality-rows.jsonl")  # the committed grid
        for regime in REGIMES:
            here = [r for r in done if r["regime"] == regime]
            seeds = {m: sorted(r["seed"] for r in here if r["method"] == m) for m in METHODS}
            cells = [f"{m} {v}" for m, v in seeds.items() if v]
            print(f"done in {regime}: {sum(map(len, seeds.values()))} cells: {', '.join(cells)}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = expand(args.methods)
    # a method is its recipe (fedprox, fedavgm are features on a registered aggregator)
    missing = [m for m in methods if METHODS[m][0] and not recipe_path(METHODS[m][0]).exists()]
    for m in missing:
        print(f"[quality] {m}: no recipe {recipe_path(METHODS[m][0])}; skipped")
    rows_path = args.out / "rows.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{args.tag}" if args.tag else "quality"
    kept = args.results / f"{stem}-rows.jsonl"
    if not rows_path.exists() and kept.exists():  # a new checkout: the committed copy is the grid
        rows_path.write_text(kept.read_text())
        print(f"[quality] {rows_path}: started from the {len(read_rows(kept))} cells in {kept}")
    done = {(r["method"], r["regime"], r["seed"]): r for r in read_rows(rows_path)}

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
            client_ranks={regime: client_ranks(regime) for regime in REGIMES},
        )

    cells = plan([m for m in methods if m not in missing], args.regimes, args.seeds)
    for i, (label, regime, seed) in enumerate([] if args.report else cells, 1):
        wanted = overrides(label, regime, seed, args.set)
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
