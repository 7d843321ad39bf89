"""`fedllm eval`: task quality and leakage of a finished run, written as report.json/.md + plots.

Data come from the recipe, rebuilt deterministically per client (train = members, held-out =
non-members, canaries as inserted). Views: base, global (released adapter) and each client's own
last accepted update ("local" in quality tables, the honest-but-curious server in leakage).
Quality tasks come from the registry (fedllm.eval.registry); none is named here. Leakage runs
view by view over every client at once (fedllm.eval.leakage_run). Each client's quality and each
leakage view is saved as it finishes, so an interrupted eval resumes (fedllm.eval.partial).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from fedllm.data.sample import sample_examples
from fedllm.data.shards import RawShard, raw_shard
from fedllm.eval.leakage_run import PhaseTimer, measure_leakage
from fedllm.eval.partial import Pieces, adapter_digest, code_digest
from fedllm.eval.registry import select_tasks
from fedllm.eval.settings import EvalSettings
from fedllm.eval.task import EvalTask, TaskSetup
from fedllm.eval.views import BASE, GLOBAL, Views, client_view, find_client_adapters
from fedllm.model.adapters import check_adapter_files
from fedllm.model.card import read_card
from fedllm.recipe import RunConfig, load_recipe


def trained_by(cfg: RunConfig, adapter: Path, *, recipe: Path) -> RunConfig:
    """`cfg`, if it is the recipe that trained `adapter` (its card's fingerprint; an adapter
    without a card is taken as it is); else a ValueError: another recipe's clients, data or
    canaries would be scored as if the adapter had met them."""
    card = read_card(adapter) or {}
    if (want := card.get("fingerprint")) and want != cfg.fingerprint():
        raise ValueError(
            f"--recipe {recipe} is not the recipe that trained {adapter} (fingerprint "
            f"{cfg.fingerprint()}, the adapter's card says {want}: model, lora, data, seed or "
            "privacy differ); pass the run's own recipe.yaml"
        )
    return cfg


def resolve_inputs(
    target: Path, recipe: Path | None
) -> tuple[RunConfig, Path, dict[int, Path], Path]:
    """(config, global adapter, client adapters, output folder) for a run dir or adapter folder;
    every adapter's files are checked before any model loads (`check_adapter_files`)."""
    if not target.exists():
        raise FileNotFoundError(
            f"{target} does not exist; pass a run folder `fedllm run` wrote (e.g. "
            "runs/quickstart), or a PEFT adapter folder with --recipe"
        )
    if (target / "adapter_config.json").is_file():
        return _adapter_inputs(target, recipe)
    return _run_inputs(target, recipe)


def _adapter_inputs(
    target: Path, recipe: Path | None
) -> tuple[RunConfig, Path, dict[int, Path], Path]:
    """`resolve_inputs` for a PEFT adapter folder, which needs --recipe."""
    if recipe is None:
        raise ValueError(f"{target} is an adapter folder: pass --recipe RECIPE.yaml with it")
    check_adapter_files(target)
    cfg = trained_by(load_recipe(recipe), target, recipe=recipe)
    # beside the adapter, not in it: its report lists training example ids
    return cfg, target, {}, target.parent / f"{target.name}-eval"


def _run_inputs(target: Path, recipe: Path | None) -> tuple[RunConfig, Path, dict[int, Path], Path]:
    """`resolve_inputs` for a run folder: its recipe.yaml (or --recipe), final and client
    adapters."""
    if recipe is not None and not recipe.is_file():
        raise FileNotFoundError(f"--recipe {recipe} not found")
    adapter = target / "final_adapter"
    if recipe is None and not (target / "recipe.yaml").is_file():
        if adapter.is_dir():  # a run folder copied without its recipe
            raise FileNotFoundError(
                f"{target} has no recipe.yaml; pass --recipe RECIPE.yaml, the recipe that "
                "trained this run"
            )
        raise FileNotFoundError(
            f"{target} is neither a run directory (with recipe.yaml and final_adapter/) nor a "
            "PEFT adapter folder (with adapter_config.json)"
        )
    recipe = recipe or target / "recipe.yaml"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter: did the run finish?")
    clients = find_client_adapters(target)
    for folder in [adapter, *clients.values()]:
        check_adapter_files(folder)
    cfg = trained_by(load_recipe(recipe), adapter, recipe=recipe)
    return cfg, adapter, clients, target / "eval"


def evaluate_run(
    target: str | Path,
    *,
    recipe: str | Path | None = None,
    out_dir: str | Path | None = None,
    settings: EvalSettings = EvalSettings(),  # noqa: B008 (frozen: safe to share)
    extra_tasks: Mapping[str, type[EvalTask]] | None = None,
    say: Callable[[str], None] = lambda text: print(f"[eval] {text}", flush=True),
) -> dict:
    """Evaluate and write report.json, report.md and PNG plots; returns the report.
    `extra_tasks` run beside the selected ones (e.g. `--mc-file`'s, built by the caller)."""
    from fedllm.eval.report import write_report

    t0 = time.perf_counter()
    tasks = _all_tasks(settings.tasks, extra_tasks or {})
    settings = replace(settings, tasks=tuple(tasks))
    cfg, adapter, clients, default_out = resolve_inputs(
        Path(target), Path(recipe) if recipe else None
    )
    out = Path(out_dir) if out_dir else default_out
    if cfg.privacy.private and not out_dir:  # docs/security.md: reader of the run directory
        say(
            f"this is a private run: the report in {out} (per-client scores, sample texts, "
            "member ids) is outside its guarantee; pass --out elsewhere to keep it apart"
        )
    views = _load_views(cfg, adapter, clients, precision=settings.precision, say=say)
    setup = TaskSetup(
        tokenizer=views.tokenizer,
        prompt_format=cfg.data.prompt_format,
        max_length=cfg.data.max_length,
        max_new_tokens=settings.max_new_tokens,
        seed=cfg.seed,
    )
    report: dict = {
        "run": cfg.name,
        "target": str(Path(target).resolve()),
        # what the examples were drawn with: the same recipe and seed ask the same items
        "recipe": {"fingerprint": cfg.fingerprint(), "seed": cfg.seed},
        "settings": {**asdict(settings), "compute": views.compute},
        "views": views.names,
        "tasks": {name: cls.describe() for name, cls in tasks.items()},
        "quality": {},
        "leakage": {"exposure": [], "mia": {}, "extraction": {}},
    }
    report["timings"] = {"load": time.perf_counter() - t0}
    key = _resume_key(cfg, report, adapters=[adapter, *clients.values()], tasks=tasks)
    pieces = Pieces.beside(out, key, say=say)
    t_quality, timer = time.perf_counter(), PhaseTimer()
    shards = {pid: raw_shard(cfg, pid) for pid in range(cfg.data.num_clients)}
    report["quality"] = _quality(
        views,
        shards,
        tasks=tasks,
        setup=setup,
        settings=settings,
        pieces=pieces,
        timer=timer,
        say=say,
    )
    report["timings"]["quality"] = time.perf_counter() - t_quality
    report["timings"]["quality tasks"] = dict(timer.seconds)
    if settings.leakage:
        report["leakage"] = measure_leakage(
            views, cfg=cfg, settings=settings, shards=shards, say=say, pieces=pieces
        )
        report["timings"]["leakage"] = report["leakage"].pop("seconds")
    report["seconds"] = time.perf_counter() - t0
    write_report(report, out)
    pieces.remove()
    say(f"done in {report['seconds']:.0f}s: {out / 'report.md'}")
    return report


def _all_tasks(
    names: Sequence[str], extra: Mapping[str, type[EvalTask]]
) -> dict[str, type[EvalTask]]:
    """The registered tasks `names` selects, then the caller's extra ones (no name in both)."""
    tasks = select_tasks(names)
    if clash := sorted(set(tasks) & set(extra)):
        raise ValueError(f"eval task {clash[0]!r} is both a registered task and an extra one")
    return {**tasks, **extra}


def _load_views(
    cfg: RunConfig,
    adapter: Path,
    clients: Mapping[int, Path],
    *,
    precision: str,
    say: Callable[[str], None],
) -> Views:
    """The base with the global adapter and every client's, loaded as the recipe trained them."""
    say(f"loading base + global adapter + {len(clients)} client adapters ({adapter})")
    views = Views(
        adapter,
        client_adapters=clients,
        dtype=cfg.model.dtype,
        quantization=None if cfg.model.quantization == "none" else cfg.model.quantization,
        precision=precision,
        attention=cfg.model.attention,
        max_length=cfg.data.max_length,
    )
    say(f"eval forwards in {views.compute} (precision {precision})")
    return views


def _quality(
    views: Views,
    shards: Mapping[int, RawShard],
    *,
    tasks: Mapping[str, type[EvalTask]],
    setup: TaskSetup,
    settings: EvalSettings,
    pieces: Pieces,
    timer: PhaseTimer,
    say: Callable[[str], None],
) -> dict:
    """report["quality"]: view -> {"clients": partition -> task -> metrics, "global": combined},
    each client's held-out sample scored by every task (a client an interrupted eval finished is
    taken from `pieces`)."""
    quality: dict = {}
    n = len(shards)
    for pid, shard in shards.items():
        result = pieces.get(f"quality-{pid}")
        if result is not None:
            say(f"client {pid + 1}/{n} (partition {pid}): quality from the interrupted eval")
        else:
            held = sample_examples(shard.held_out, max_examples=settings.max_examples, seed=pid)
            say(f"client {pid + 1}/{n} (partition {pid}): {len(held)} held-out examples")
            built = {name: cls.build(held, setup) for name, cls in tasks.items()}
            first = pid == min(shards)  # shared views score a task of shared items only here
            result = _client_quality(
                views, pid, built=built, first=first, settings=settings, timer=timer, say=say
            )
            result = pieces.put(f"quality-{pid}", result)
        for key, per_task in result.items():
            quality.setdefault(key, {"clients": {}})["clients"][str(pid)] = per_task
    for block in quality.values():
        block["global"] = _combine(tasks, list(block["clients"].values()))
    return quality


def _resume_key(
    cfg: RunConfig, report: dict, *, adapters: list[Path], tasks: Mapping[str, type[EvalTask]]
) -> dict:
    """What every finished piece depends on: an interrupted eval's pieces are reused only when
    all of it is the same (`fedllm.eval.partial`)."""
    return {
        "recipe": cfg.fingerprint(),
        "settings": report["settings"],
        "tasks": report["tasks"],
        "task inputs": {name: cls.inputs_digest for name, cls in tasks.items()},
        "adapters": adapter_digest(adapters),
        "code": code_digest(tasks.values()),
    }


def _client_quality(
    views: Views,
    pid: int,
    *,
    built: dict[str, EvalTask],
    first: bool,
    settings: EvalSettings,
    timer: PhaseTimer,
    say: Callable[[str], None],
) -> dict:
    """One client's tasks under the base, global and (when saved) its own adapter's view; a task
    of the same items for every client (`per_client` False) under a shared view only if `first`."""
    local = client_view(pid) if client_view(pid) in views.names else None
    result = {}
    for view in [BASE, GLOBAL] + ([local] if local else []):
        key = "local" if view == local else view
        with views.use(view) as model:
            for name, task in built.items():
                if not (first or task.per_client or view == local):
                    continue  # the first client's score is every client's
                with timer(name):
                    result.setdefault(key, {})[name] = task.evaluate(
                        model, batch_size=settings.batch_size
                    )
        if scored := result.get(key):
            brief = ", ".join(f"{k} {built[k].headline(r)}" for k, r in scored.items())
            say(f"partition {pid} quality [{key}]: {brief}")
    return result


def _combine(tasks: dict[str, type[EvalTask]], per_client: list[dict]) -> dict:
    """Global numbers: each task merges its per-client results (see EvalTask.combine)."""
    out: dict = {}
    for name, cls in tasks.items():
        combined = cls.combine([c[name] for c in per_client if name in c])
        if combined:
            out[name] = combined
    return out
