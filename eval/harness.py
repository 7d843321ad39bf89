"""`fedllm eval`: task quality and leakage of a finished run, written as report.json/.md + plots.

Data come from the recipe, rebuilt deterministically per client (train = members, held-out =
non-members, canaries as inserted). Views: base, global (released adapter) and each client's own
last accepted update ("local" in quality tables, the honest-but-curious server in leakage).
Quality tasks come from the registry (fedllm.eval.registry); none is named here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fedllm.data.canary import is_canary
from fedllm.data.sample import sample_examples
from fedllm.data.shards import raw_shard
from fedllm.eval import leakage
from fedllm.eval.mia import run_attacks
from fedllm.eval.registry import select_tasks
from fedllm.eval.task import EvalTask, TaskSetup
from fedllm.eval.views import BASE, GLOBAL, Views, client_view, find_client_adapters
from fedllm.recipe import RunConfig, load_recipe


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate: examples per client and task, batch size, generation lengths."""

    max_examples: int = 64
    batch_size: int = 16
    max_new_tokens: int = 32
    references: int | None = None
    prefix_tokens: int = 2
    suffix_tokens: int = 16
    tasks: tuple[str, ...] | None = None  # None: every available task
    leakage: bool = True


def resolve_inputs(
    target: Path, recipe: Path | None
) -> tuple[RunConfig, Path, dict[int, Path], Path]:
    """(config, global adapter, client adapters, output folder) for a run dir or adapter folder."""
    if (target / "adapter_config.json").is_file():
        if recipe is None:
            raise ValueError(f"{target} is an adapter folder: pass --recipe RECIPE.yaml with it")
        return load_recipe(recipe), target, {}, target / "eval"
    recipe = recipe or target / "recipe.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(
            f"{target} is neither a run directory (with recipe.yaml and final_adapter/) nor a "
            "PEFT adapter folder (with adapter_config.json)"
        )
    adapter = target / "final_adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter: did the run finish?")
    return load_recipe(recipe), adapter, find_client_adapters(target), target / "eval"


def evaluate_run(
    target: str | Path,
    *,
    recipe: str | Path | None = None,
    out_dir: str | Path | None = None,
    settings: EvalSettings = EvalSettings(),
    say: Callable[[str], None] = lambda text: print(f"[eval] {text}", flush=True),
) -> dict:
    """Evaluate and write report.json, report.md and PNG plots; returns the report."""
    from fedllm.eval.report import write_report

    t0 = time.perf_counter()
    tasks = select_tasks(settings.tasks)
    settings = replace(settings, tasks=tuple(tasks))
    cfg, adapter, clients, default_out = resolve_inputs(
        Path(target), Path(recipe) if recipe else None
    )
    out = Path(out_dir) if out_dir else default_out
    quant = None if cfg.model.quantization == "none" else cfg.model.quantization
    say(f"loading base + global adapter + {len(clients)} client adapters ({adapter})")
    views = Views(adapter, client_adapters=clients, dtype=cfg.model.dtype, quantization=quant)
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
        "settings": asdict(settings),
        "views": views.names,
        "tasks": {name: cls.describe() for name, cls in tasks.items()},
        "quality": {},
        "leakage": {"exposure": [], "mia": {}, "extraction": {}},
    }
    n = cfg.data.num_clients
    for pid in range(n):
        shard = raw_shard(cfg, pid)
        held = sample_examples(shard.held_out, max_examples=settings.max_examples, seed=pid)
        members = [e for e in shard.train if not is_canary(e)]
        members = sample_examples(members, max_examples=max(len(held), 1), seed=pid)
        local = client_view(pid) if client_view(pid) in views.names else None
        say(f"client {pid}/{n}: {len(members)} members, {len(held)} held-out examples")
        built = {name: cls.build(held, setup) for name, cls in tasks.items()}
        for view in [BASE, GLOBAL] + ([local] if local else []):
            key = "local" if view == local else view
            result = _quality(views, view, built, batch_size=settings.batch_size)
            report["quality"].setdefault(key, {"clients": {}})["clients"][str(pid)] = result
            brief = ", ".join(f"{name} {tasks[name].headline(r)}" for name, r in result.items())
            say(f"client {pid} quality [{key}]: {brief}")
        if settings.leakage:
            _leakage(
                views,
                report,
                cfg=cfg,
                settings=settings,
                pid=pid,
                shard=shard,
                members=members,
                held=held,
                local=local,
                say=say,
            )
    for block in report["quality"].values():
        block["global"] = _combine(tasks, list(block["clients"].values()))
    if settings.leakage:
        for block in report["leakage"]["mia"].values():
            block["pooled"] = run_attacks(
                _concat(block.pop("_members")), _concat(block.pop("_non_members"))
            )
    report["seconds"] = time.perf_counter() - t0
    write_report(report, out)
    say(f"done in {report['seconds']:.0f}s: {out / 'report.md'}")
    return report


def _quality(views: Views, view: str, built: dict[str, EvalTask], *, batch_size: int) -> dict:
    """Every task's metrics under one view (tasks are built once per client, not per view)."""
    with views.use(view) as model:
        return {name: task.evaluate(model, batch_size=batch_size) for name, task in built.items()}


def _leakage(views: Views, report: dict, *, cfg, settings, pid, shard, members, held, local, say):
    tok, fmt, ml, bs = (
        views.tokenizer,
        cfg.data.prompt_format,
        cfg.data.max_length,
        settings.batch_size,
    )
    attack_views = [BASE, GLOBAL] + ([local] if local else [])
    canaries = cfg.data.canaries
    if shard.canaries and canaries is not None:
        refs = settings.references or canaries.references
        for view in attack_views:
            with views.use(view) as model:
                rows = leakage.canary_exposures(
                    model,
                    shard.canaries,
                    tokenizer=tok,
                    prompt_format=fmt,
                    digits=canaries.digits,
                    references=refs,
                    batch_size=bs,
                    seed=cfg.seed,
                )
            key = "client" if view == local else view
            report["leakage"]["exposure"] += [{"view": key, **r} for r in rows]
            say(
                f"client {pid} exposure [{key}]: "
                + ", ".join(
                    f"k={r['repeats']}: {r['exposure']:.1f}/{r['exposure_skewnormal']:.1f}"
                    for r in rows
                )
            )
    if not members or not held:
        return
    with views.use(BASE) as model:
        base_m = leakage.base_scores(
            model, members, tokenizer=tok, prompt_format=fmt, max_length=ml, batch_size=bs
        )
        base_n = leakage.base_scores(
            model, held, tokenizer=tok, prompt_format=fmt, max_length=ml, batch_size=bs
        )
    for view in attack_views:
        key = "client" if view == local else view
        with views.use(view) as model:
            common = {"tokenizer": tok, "prompt_format": fmt, "max_length": ml, "batch_size": bs}
            sm = leakage.score_membership(model, members, base_scored=base_m, **common)
            sn = leakage.score_membership(model, held, base_scored=base_n, **common)
            cut = {"prefix_tokens": settings.prefix_tokens, "suffix_tokens": settings.suffix_tokens}
            ext = {
                "members": leakage.extraction(model, members, **common, **cut),
                "non_members": leakage.extraction(model, held, **common, **cut),
            }
        block = report["leakage"]["mia"].setdefault(
            key, {"clients": {}, "_members": [], "_non_members": []}
        )
        block["clients"][str(pid)] = run_attacks(sm, sn)
        block["_members"].append(sm)
        block["_non_members"].append(sn)
        report["leakage"]["extraction"].setdefault(key, {})[str(pid)] = ext
        best = max(block["clients"][str(pid)].items(), key=lambda kv: kv[1]["auc"])
        say(
            f"client {pid} MIA [{key}]: best AUC {best[1]['auc']:.3f} ({best[0]}); extraction "
            f"members {ext['members']['exact']:.2f} vs held-out {ext['non_members']['exact']:.2f}"
        )


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _combine(tasks: dict[str, type[EvalTask]], per_client: list[dict]) -> dict:
    """Global numbers: each task merges its per-client results (see EvalTask.combine)."""
    out: dict = {}
    for name, cls in tasks.items():
        combined = cls.combine([c[name] for c in per_client if name in c])
        if combined:
            out[name] = combined
    return out
