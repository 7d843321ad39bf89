"""The quality grid as data: the regimes, the methods (a recipe and its options), the groups, the
controlled pairs and the plan (every command, in the order that answers the most first).

`bench/quality.py` runs it; `python bench/quality.py --list` prints it with what is done and what
is left, and `python bench/quality.py --plan` runs what is left in order.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from fedllm.recipe import RunConfig, load_recipe
from fedllm.recipe.schema_data import DataConfig

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


TUNED_LR = "0.003"  # the lr check's pick for fedit (scarce, seed 0; squeeze's and ffa's: 0.01)


@dataclass(frozen=True)
class Regime:
    """A workload: overrides after COMMON, what it measures, and the methods it runs."""

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
    # The lr check (scarce, seed 0) found the federated methods under-stepped at the common
    # 0.001 (local-only is not: it over-fits its ~94 examples sooner at 0.003): the scarce regime
    # again at 0.003, with the methods whose best was 0.01 and the references at 0.001 beside
    # it, on seeds 1-3, not the seed that picked the lrs.
    "scarce-lr": Regime(
        (
            "data.max_examples=1100",
            "data.num_clients=8",
            "federation.rounds=5",
            f"federation.lr={TUNED_LR}",
        ),
        f"the scarce regime at lr {TUNED_LR} (labels with an lr set their own): each method at "
        "the lr the check picked for it",
    ),
    # recipes/quickstart.yaml's own workload (COMMON's grid settings undone but fp32 and the
    # test set): the common lr 0.001 (shipped until stop 41) was chosen on it; does a larger
    # step pay?
    "quickstart": Regime(
        (
            "data.max_examples=2000",
            "data.num_clients=4",
            "data.prompt_format=chat",
            "data.max_length=64",
            "data.held_out=0.1",
            "federation.rounds=3",
            "federation.local_steps=15",
        ),
        "the quickstart's workload: 4 clients × ~386 training examples, 3 rounds × 15 steps, "
        "chat prompts",
        methods=(
            "local only",
            "squeeze",
            "squeeze lr 0.003",
            "squeeze lr 0.01",
            "svd lr 0.003",
            "fedit lr 0.003",
        ),
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
    # since stop 46 at the shipped lr (the recipes' 0.003, where svd, the default, won
    # scarce-lr and tied on quickstart): do those results hold, and the curves flatten, at
    # 12 rounds? Local-only at its own best lr, as in scarce-lr. (Planned at 0.001 with
    # squeeze's options until then, where squeeze beats svd; no cell had run.)
    "long": Regime(
        (
            "data.max_examples=800",
            "data.num_clients=4",
            "federation.rounds=12",
            f"federation.lr={TUNED_LR}",
        ),
        f"the domain regime at 12 rounds and the shipped lr {TUNED_LR} (local-only at 0.001, "
        "its best): the default's case over a longer budget",
        # `squeeze +residual` is svd plus the residual error feedback alone (squeeze plain ==
        # svd): does the residual pay once there are more rounds to carry it (5: nothing)?
        methods=("local only lr 0.001", "fedit", "svd", "squeeze", "squeeze +residual"),
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
    """A squeeze method with these `aggregator.options` (key=value)."""
    return "squeeze", tuple(f"aggregator.options.{o}" for o in extra)


PLAIN = ("correction=false", "residual_rank=0")
BALANCED = ("gauge=balanced",)
REFERENCES = ("centralised", "local only")  # trained in this process, not federated
# the lr check's other step sizes (the grid's is 0.001), one seed in scarce
LR_CHECK = {
    "ffa": ("0.003", "0.01"),
    "fedit": ("0.003", "0.01"),
    "squeeze": ("0.003", "0.01"),
    "local only": ("0.003", "0.01"),
}
# label -> (recipe, extra overrides); recipe None: a reference trained in this process
METHODS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "centralised": (None, ()),
    "local only": (None, ()),
    "fedit": ("fedit", ()),
    "ffa": ("ffa", ()),
    # every cell runs at one lr (0.001). FFA-LoRA trains B alone against a frozen A: there it
    # moves ΔW slowest and still falls steeply in its last round; is it the method or its step
    # size? (At 0.01 it came within 0.06 nats of centralised.) Do the others, and local-only,
    # gain as much, and does squeeze's lead over FedIT hold at a larger step?
    **{
        f"{m} lr {lr}": (None if m in REFERENCES else m, (f"federation.lr={lr}",))
        for m, lrs in LR_CHECK.items()
        for lr in lrs
    },
    # the references at the common lr inside a regime that sets another (scarce-lr): their best
    "local only lr 0.001": (None, ("federation.lr=0.001",)),
    "centralised lr 0.001": (None, ("federation.lr=0.001",)),
    "hetlora": ("hetlora", ()),
    "flora": ("flora", ()),
    "flexlora": ("flexlora", ()),
    "fedsa": ("fedsa", ()),
    "rblora": ("rblora", ()),
    "lorafair": ("lorafair", ()),
    "svd": ("svd", ()),
    # the exact aggregate at squeeze's best lr: at 0.003 svd led squeeze on seeds 1 and 2
    "svd lr 0.01": ("svd", ("federation.lr=0.01",)),
    # the shipped lr (recipes: 0.003) on the shipped workload: at 0.003 in scarce-lr svd led
    # squeeze; does it on the quickstart's own data too?
    "svd lr 0.003": ("svd", ("federation.lr=0.003",)),
    "squeeze": _sq(),  # its default options: +correction +residual at the global rank, rows gauge
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
    "fedplora": ("fedplora", ()),  # one draw of modules per target module (since stop 53)
    # one draw per client for all its targets: every fedplora cell of stops 50-52
    "fedplora one-draw": ("fedplora", ("aggregator.options={module_draw: client}",)),
    # and its modules at the client's own α/rᵢ (the only form before stop 51): the lr 0.003
    # overshoot
    "fedplora client-scaling one-draw": (
        "fedplora",
        ("aggregator.options={module_scaling: client, module_draw: client}",),
    ),
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
    # the references, the plain average, svd (exact; the default since stop 45) and squeeze
    # are enough
    "control": ["centralised", "local only", "fedit", "svd", "squeeze"],
    # not "squeeze": a group name would shadow the method's label in --methods
    "variants": [m for m in METHODS if m.startswith("squeeze") and " lr " not in m],
    "features": ["fedprox", "fedavgm", "svd +fedavgm"],
    "lr check": [f"{m} lr {lr}" for m, lrs in LR_CHECK.items() for lr in lrs],  # not a sweep
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
    ("squeeze lr 0.003", "svd lr 0.003"),  # squeeze against svd (the default since stop 45)
    ("svd lr 0.003", "fedit lr 0.003"),
    ("fedit lr 0.003", "local only lr 0.003"),
    ("squeeze lr 0.01", "fedit lr 0.01"),
    ("fedit lr 0.01", "local only lr 0.01"),
    ("squeeze lr 0.01", "local only lr 0.01"),
    ("ffa lr 0.01", "fedit lr 0.01"),
    ("squeeze lr 0.003", "squeeze"),  # the lr's own effect (quickstart; scarce's seed 0)
    # scarce-lr, where `fedit`, `svd` and `squeeze` run at TUNED_LR: each at its own best lr,
    # the lr's own effect, and the room left to pooled training at its best lr
    ("squeeze", "svd"),  # what correction, residual and gauge add at one lr
    ("squeeze lr 0.01", "svd lr 0.01"),
    ("squeeze lr 0.01", "svd"),  # each at its best lr (svd's: 0.003 beat 0.01 on seed 1)
    ("svd lr 0.01", "svd"),
    ("squeeze lr 0.01", "fedit"),
    ("squeeze lr 0.01", "squeeze"),
    ("fedit lr 0.01", "fedit"),
    ("squeeze lr 0.01", "centralised lr 0.001"),
    ("squeeze", "centralised lr 0.001"),
    ("fedprox", "svd"),
    ("fedavgm", "fedit"),
    ("svd +fedavgm", "svd"),
    # LoRA-FAIR's correction over fedit's mean, against the exact aggregate with and without it
    ("lorafair", "svd"),
    ("lorafair", "squeeze"),
    ("squeeze +residual", "svd"),  # the residual alone over the exact aggregate (long)
    ("fedplora", "svd"),  # Fed-PLoRA against the default (scarce, domain, scarce-lr)
    ("fedplora one-draw", "svd"),  # its form of stops 50-52 against the default
    ("fedplora", "fedplora one-draw"),  # a draw per target module against one per client
    # its modules at α/R against α/rᵢ (scarce-lr, one draw per client)
    ("fedplora one-draw", "fedplora client-scaling one-draw"),
]

# One question asked in several regimes, pooled over their seeds (the report's "Across
# regimes"): (variant, base, regime) per regime. The shipped lr is 0.003; `scarce-lr` runs
# fedit, svd and squeeze at it, `quickstart` is the shipped workload.
POOLED = {
    f"squeeze − svd at lr {TUNED_LR}": [
        ("squeeze lr 0.003", "svd lr 0.003", "quickstart"),
        ("squeeze", "svd", "scarce-lr"),
        ("squeeze", "svd", "long"),
    ],
    f"svd − fedit at lr {TUNED_LR}": [
        ("svd lr 0.003", "fedit lr 0.003", "quickstart"),
        ("svd", "fedit", "scarce-lr"),
        ("svd", "fedit", "long"),
    ],
    f"squeeze − fedit at lr {TUNED_LR}": [
        ("squeeze lr 0.003", "fedit lr 0.003", "quickstart"),
        ("squeeze", "fedit", "scarce-lr"),
        ("squeeze", "fedit", "long"),
    ],
}


def overrides(label: str, *, regime: str, seed: int, extra: list[str]) -> list[str]:
    """Every override of one cell after its recipe (the regime's, the method's, the seed)."""
    return [*COMMON, *REGIMES[regime].overrides, *METHODS[label][1], *extra, f"seed={seed}"]


SEEDS = (0, 1, 2)  # a cell's default seeds


@dataclass(frozen=True)
class Step:
    """One command of the plan: its methods (labels or groups) × regimes × seeds, and why."""

    methods: tuple[str, ...]
    regimes: tuple[str, ...]
    why: str
    seeds: tuple[int, ...] = SEEDS

    def command(self) -> str:
        """The command that runs this step alone."""
        return shlex.join(
            ["python", "bench/quality.py", "--methods", *self.methods, "--regimes", *self.regimes]
            + (["--seeds", *map(str, self.seeds)] if self.seeds != SEEDS else [])
        )


# The whole grid, in the order that answers the most first (each step's rows were read before
# the next was chosen). The IID control runs the `control` group only, and the baselines and
# features the scarce regime, where collaboration should pay: the full cross would be ~40 more
# cells. `clientdp` asks one question: which gauge of squeeze's factors carries DP noise into ΔW
# less (docs/privacy.md).
KEY_LR = ("local only lr 0.001", "fedit", "squeeze lr 0.01", "svd", "squeeze")
PLAN = [
    # first since stop 51: at the shipped lr, where the default is decided, fedplora with its
    # modules at the rank-R LoRA's α/R (its default since stop 51), and at the client's own α/rᵢ
    # (before: seeds 1-2 ran with it, 0.25 nats behind svd on seed 1: the per-module step grew
    # R/rᵢ times on low-rank clients and the trainers' mean added it up over the modules)
    Step(
        ("fedplora one-draw", "fedplora client-scaling one-draw"),
        ("scarce-lr",),
        f"fedplora at the shipped lr {TUNED_LR}: its modules at α/R (default) and at α/rᵢ",
        (1, 2, 3),
    ),
    # stop 50: fedplora's and prelort's cells (and squeeze prefix's, in `variants`) before then
    # measured defects since fixed; their rows are in quality-rows-before-s50.jsonl (rerun here,
    # stops 51-52)
    Step(("core",), ("scarce", "domain"), "every core method, 8 and 4 clients"),
    Step(("squeeze balanced",), ("scarce",), "the default until stop 34"),
    Step(("control",), ("iid",), "the IID control: does the gap to local-only close?"),
    Step(("fedit", "squeeze", "squeeze balanced"), ("clientdp",), "the gauge under client DP"),
    Step(("squeeze", "squeeze balanced"), ("clientdp",), "the DP noise is unseeded", (3, 4)),
    Step(("lr check",), ("scarce",), "is lr 0.001 too small a step for all, or ffa's", (0,)),
    # scarce-lr in two steps (stop 38): the cells of its paired question first on every seed
    Step(
        KEY_LR,
        ("scarce-lr",),
        "fedit, svd, squeeze at their best lr and local-only at its own, on fresh seeds",
        (1, 2, 3),
    ),
    # first (stop 39): at 0.003 svd beat squeeze on all three seeds; this decides the default
    Step(
        ("svd lr 0.01",),
        ("scarce-lr",),
        "svd at squeeze's best lr: which exact aggregator leads at a tuned step",
        (1, 2, 3),
    ),
    Step(
        ("local only", "squeeze", "squeeze lr 0.003", "squeeze lr 0.01"),
        ("quickstart",),
        "the common lr 0.001 (shipped until stop 41) on the quickstart's workload, against 0.003 "
        "(shipped since) and 0.01",
    ),
    Step(
        ("centralised", "centralised lr 0.001", "fedit lr 0.01", "ffa lr 0.01"),
        ("scarce-lr",),
        "the rest of scarce-lr: centralised at both lrs, fedit and ffa at 0.01",
        (1, 2, 3),
    ),
    # squeeze (the default then) at the recipes' lr 0.003 against the exact aggregate and FedIT
    # at that lr on the shipped workload: it made svd the default (stop 45)
    Step(
        ("svd lr 0.003", "fedit lr 0.003"),
        ("quickstart",),
        "svd and fedit at the shipped lr, against squeeze (then the default) there",
        (0, 1, 2),
    ),
    # the squeeze variants' third seed first: the default's table (issue 14 item 2) before rows
    Step(("variants",), ("domain",), "what each squeeze option adds"),
    Step(("ffa", "hetlora", "flora", "lorafair", "features"), ("scarce",), "issue 14's other rows"),
    # lorafair led svd at the common lr 0.001 on scarce's seeds 0-1: at the shipped lr, where
    # svd won scarce-lr, does it still (scarce-lr's fresh seeds)?
    Step(
        ("lorafair",),
        ("scarce-lr",),
        f"lorafair at the shipped lr {TUNED_LR}: does its lead over svd at 0.001 hold",
        (1, 2, 3),
    ),
    # flexlora forms svd's aggregate densely (the d×k SVD): seed 0 reproduced svd to 1e-5 nats;
    # seeds 1-2 since stop 50, so the row has its three seeds like every other baseline
    Step(("flexlora",), ("scarce",), "svd's aggregate formed densely: a consistency check"),
    Step(
        ("svd", "squeeze", "fedit", "local only lr 0.001", "squeeze +residual"),
        ("long",),
        f"12 rounds at the shipped lr {TUNED_LR}: do the default's results hold, do the curves "
        "flatten, does the residual pay over more rounds",
    ),
    # stop 53: the paper draws a client's modules per target module, stops 50-52 drew once per
    # client (`fedplora one-draw`); the core step above reruns fedplora in scarce and domain
    Step(
        ("fedplora",),
        ("scarce-lr",),
        f"fedplora with the paper's per-target draw at the shipped lr {TUNED_LR}",
        (1, 2, 3),
    ),
]


def plan(
    methods: list[str], regimes: list[str], seeds: list[int], *, quiet: bool = False
) -> list[tuple[str, str, int]]:
    """The cells to run, seed by seed: every method in every regime, except where a regime
    lists the only methods it runs (said once per regime, unless `quiet`)."""
    allowed = {regime: REGIMES[regime].methods or tuple(METHODS) for regime in regimes}
    for regime, labels in allowed.items():
        if (skipped := [m for m in methods if m not in labels]) and not quiet:
            only, left = ", ".join(labels), ", ".join(skipped)
            print(f"[quality] {regime} runs only {only}; skipped {left}")
    return [(m, g, s) for s in seeds for g in regimes for m in methods if m in allowed[g]]


def regime_config(regime: str) -> RunConfig:
    """A regime's recipe (fedit's: every method's recipe shares the workload and its ranks)."""
    return load_recipe(recipe_path("fedit"), overrides("fedit", regime=regime, seed=0, extra=[]))


def client_ranks(regime: str) -> dict[int, int]:
    """Partition -> LoRA rank in `regime` (every method's recipe cycles ranks 4/8/16/32)."""
    cfg = regime_config(regime)
    return {p: cfg.client_rank(p) for p in range(cfg.data.num_clients)}


def reference(label: str) -> str | None:
    """The reference a label trains in this process ('local only lr 0.01' is local-only at
    another lr), None for a federation."""
    if METHODS[label][0] is not None:
        return None
    return next(r for r in REFERENCES if label == r or label.startswith(f"{r} lr "))


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


def plan_cells(steps: list[Step], *, quiet: bool = False) -> list[tuple[str, str, int]]:
    """Every cell of `steps`, in order, each once."""
    cells: dict[tuple[str, str, int], None] = {}
    for step in steps:
        chosen = plan(expand(list(step.methods)), list(step.regimes), list(step.seeds), quiet=quiet)
        cells |= dict.fromkeys(chosen)
    return list(cells)
