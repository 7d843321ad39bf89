"""`fedllm eval`: task quality and leakage of a finished run, written as report.json/.md + plots.

Data come from the recipe, rebuilt deterministically per client (train = members, held-out =
non-members, canaries as inserted). Views: base, global (released adapter) and each client's own
last accepted update ("local" in quality tables, the honest-but-curious server in leakage).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedllm.config import RunConfig, load_recipe
from fedllm.data.canary import is_canary
from fedllm.data.sample import sample_examples
from fedllm.eval import leakage
from fedllm.eval.mia import run_attacks
from fedllm.eval.task_choose import ChooseDefinition
from fedllm.eval.task_define import DefineWords
from fedllm.eval.task_domain import WordDomain
from fedllm.eval.task_heldout import HeldOutLoss
from fedllm.eval.views import BASE, GLOBAL, Views, client_view, find_client_adapters
from fedllm.shards import raw_shard


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate: examples per client and task, batch size, generation lengths."""

    max_examples: int = 64
    batch_size: int = 16
    max_new_tokens: int = 32
    references: int | None = None
    prefix_tokens: int = 2
    suffix_tokens: int = 16
    tasks: tuple[str, ...] = ("held_out", "define", "domain", "choose")
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
    cfg, adapter, clients, default_out = resolve_inputs(
        Path(target), Path(recipe) if recipe else None
    )
    out = Path(out_dir) if out_dir else default_out
    quant = None if cfg.model.quantization == "none" else cfg.model.quantization
    say(f"loading base + global adapter + {len(clients)} client adapters ({adapter})")
    views = Views(adapter, client_adapters=clients, dtype=cfg.model.dtype, quantization=quant)
    report: dict = {
        "run": cfg.name,
        "target": str(Path(target).resolve()),
        "settings": asdict(settings),
        "views": views.names,
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
        quality_views = [BASE, GLOBAL] + ([local] if local else [])
        for view in quality_views:
            key = "local" if view == local else view
            result = _quality(views, view, held, cfg=cfg, settings=settings)
            report["quality"].setdefault(key, {"clients": {}})["clients"][str(pid)] = result
            say(f"client {pid} quality [{key}]: {_brief(result)}")
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
        block["global"] = _combine(list(block["clients"].values()))
    if settings.leakage:
        for block in report["leakage"]["mia"].values():
            block["pooled"] = run_attacks(
                _concat(block.pop("_members")), _concat(block.pop("_non_members"))
            )
    report["seconds"] = time.perf_counter() - t0
    write_report(report, out)
    say(f"done in {report['seconds']:.0f}s: {out / 'report.md'}")
    return report


def _quality(views: Views, view: str, held: list[dict], *, cfg: RunConfig, settings) -> dict:
    tok, fmt = views.tokenizer, cfg.data.prompt_format
    result: dict = {}
    with views.use(view) as model:
        if "held_out" in settings.tasks:
            task = HeldOutLoss(held, tok, prompt_format=fmt, max_length=cfg.data.max_length)
            result["held_out"] = task.evaluate(model, batch_size=settings.batch_size)
        if "define" in settings.tasks:
            define = DefineWords(
                held, tok, prompt_format=fmt, max_new_tokens=settings.max_new_tokens
            )
            result["define"] = define.evaluate(model, batch_size=settings.batch_size)
        for name, task in (
            ("domain", WordDomain(held, seed=cfg.seed)),
            ("choose", ChooseDefinition(held, seed=cfg.seed)),
        ):
            if name in settings.tasks:
                result[name] = task.evaluate(
                    model, tokenizer=tok, prompt_format=fmt, batch_size=settings.batch_size
                )
    return result


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


def _combine(per_client: list[dict]) -> dict:
    """Global numbers: token-weighted loss, example-weighted everything else."""
    out: dict = {}
    if all("held_out" in c for c in per_client):
        nll = sum(c["held_out"]["nll_sum"] for c in per_client)
        tokens = sum(c["held_out"]["tokens"] for c in per_client)
        if tokens:
            out["held_out"] = {
                "loss": nll / tokens,
                "perplexity": float(np.exp(nll / tokens)),
                "tokens": tokens,
            }
    for task, metrics in (
        ("define", ("exact_match", "rouge_l")),
        ("domain", ("accuracy", "chance")),
        ("choose", ("accuracy", "chance")),
    ):
        rows = [c[task] for c in per_client if task in c and c[task]["examples"]]
        total = sum(r["examples"] for r in rows)
        if total:
            out[task] = {m: sum(r[m] * r["examples"] for r in rows) / total for m in metrics}
            out[task]["examples"] = total
    return out


def _brief(result: dict) -> str:
    parts = []
    if "held_out" in result:
        parts.append(f"loss {result['held_out'].get('loss', float('nan')):.3f}")
    if "define" in result:
        parts.append(f"define ROUGE-L {result['define']['rouge_l']:.3f}")
    for name in ("domain", "choose"):
        if name in result:
            parts.append(f"{name} acc {result[name]['accuracy']:.2f}")
    return ", ".join(parts)
