"""Every leakage measure of a run, view by view, each view's work batched across clients.

Items are built and tokenized once (canaries with their references, matched members and
non-members, extraction prefixes) and scored once per view: the base view's scores are the
control and, reused, the reference model of every other view's calibrated score. The base and
global views score all clients in one pass; a client's own view scores only that client's data.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedllm.data import tokenize_all
from fedllm.data.canary import is_canary
from fedllm.data.shards import RawShard
from fedllm.eval.extraction import grouped_extraction_rates
from fedllm.eval.generate import end_token_ids
from fedllm.eval.leakage import CanarySet, canary_exposures, canary_set, score_groups
from fedllm.eval.membership import matched_sample, subsample
from fedllm.eval.mia import against_base, membership_scores, run_attacks
from fedllm.eval.settings import EvalSettings
from fedllm.eval.views import BASE, GLOBAL, Views, client_view

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fedllm.recipe import RunConfig


@dataclass(frozen=True)
class ClientData:
    """One client's leakage inputs, tokenized once for every view."""

    pid: int
    items: dict[str, list[dict]]  # "members" (matched to the non-members), "non_members"
    texts: dict[str, list[str]]  # their responses (for the zlib score)
    ids: dict[str, list[str]]  # their example ids (runs on the same examples compare paired)
    extract: dict[str, list[dict]]  # the subsets extraction decodes from
    canaries: CanarySet | None
    sample: dict  # what was drawn and how well it matches (for the report)


def prepare_client(
    cfg: RunConfig, settings: EvalSettings, shard: RawShard, tokenizer: PreTrainedTokenizerBase
) -> ClientData:
    """Matched members/non-members, extraction subsets and canary items of one client."""
    fmt = {"prompt_format": cfg.data.prompt_format, "max_length": cfg.data.max_length}
    pid = shard.partition_id
    pool = [e for e in shard.train if not is_canary(e)]
    held = shard.held_out
    chosen = subsample(range(len(held)), limit=settings.mia_non_members, seed=pid)
    non = [held[j] for j in chosen]
    pool_items = tokenize_all(pool, tokenizer, **fmt)
    non_items = tokenize_all(non, tokenizer, **fmt)
    match = matched_sample(
        [str(e.get("label", "")) for e in pool],
        [_scored_tokens(x) for x in pool_items],
        [str(e.get("label", "")) for e in non],
        [_scored_tokens(x) for x in non_items],
        per_non_member=settings.mia_members_per_non_member,
        seed=cfg.seed + pid,
    )
    m_items = [pool_items[i] for i in match.members]
    n_items = [non_items[j] for j in match.non_members]
    canaries = None
    if shard.canaries and cfg.data.canaries is not None:
        canaries = canary_set(
            shard.canaries,
            tokenizer=tokenizer,
            prompt_format=cfg.data.prompt_format,
            digits=cfg.data.canaries.digits,
            references=settings.references or cfg.data.canaries.references,
            seed=cfg.seed,
        )
    limit = settings.max_examples
    return ClientData(
        pid=pid,
        items={"members": m_items, "non_members": n_items},
        texts={
            "members": [pool[i]["response"] for i in match.members],
            "non_members": [non[j]["response"] for j in match.non_members],
        },
        ids={
            "members": [str(pool[i].get("id", "")) for i in match.members],
            "non_members": [str(non[j].get("id", "")) for j in match.non_members],
        },
        extract={
            part: [its[i] for i in subsample(range(len(its)), limit=limit, seed=pid)]
            for part, its in (("members", m_items), ("non_members", n_items))
        },
        canaries=canaries,
        sample={
            "held_out": len(held),
            "training": len(pool),
            "members": len(m_items),
            "non_members": len(n_items),
            "dropped_non_members": match.dropped,
            "member_tokens_mean": _mean([_scored_tokens(x) for x in m_items]),
            "non_member_tokens_mean": _mean([_scored_tokens(x) for x in n_items]),
        },
    )


def measure_leakage(
    views: Views,
    *,
    cfg: RunConfig,
    settings: EvalSettings,
    shards: dict[int, RawShard],
    say: Callable[[str], None],
) -> dict:
    """report["leakage"]: exposure rows, MIA per client and pooled (+ intervals), extraction."""
    tok = views.tokenizer
    timer = PhaseTimer()
    with timer("prepare"):
        data = {pid: prepare_client(cfg, settings, shard, tok) for pid, shard in shards.items()}
    for d in data.values():
        s = d.sample
        say(
            f"partition {d.pid} MIA sample: {s['members']} members matched to "
            f"{s['non_members']} of {s['held_out']} held-out ({s['dropped_non_members']} "
            "unmatched); mean tokens "
            f"{s['member_tokens_mean']:.1f} vs {s['non_member_tokens_mean']:.1f}"
        )
    out: dict = {"exposure": [], "mia": {}, "extraction": {}, "sample": {}}
    out["sample"] = {str(pid): d.sample for pid, d in data.items()}
    pad, bs = tok.pad_token_id, settings.batch_size
    attack = {"resamples": settings.bootstrap, "confidence": settings.confidence, "seed": cfg.seed}
    cut = {"prefix_tokens": settings.prefix_tokens, "suffix_tokens": settings.suffix_tokens}
    base: dict = {}
    base_scores: dict[int, tuple] = {}  # the base view's MIA scores per client (the control)
    pooled: dict[str, list] = {}
    plan = [(BASE, "base", list(data)), (GLOBAL, "global", list(data))]
    plan += [(client_view(p), "client", [p]) for p in data if client_view(p) in views.names]
    for step, (view, key, clients) in enumerate(plan, start=1):
        pids = [p for p in clients if data[p].items["members"] and data[p].items["non_members"]]
        sets = [data[p].canaries for p in clients if data[p].canaries is not None]
        t_view = time.perf_counter()
        say(
            f"leakage view {step}/{len(plan)} [{view}]: "
            f"{sum(len(s.items) for s in sets)} canary sequences, "
            f"{sum(len(data[p].items[part]) for p in pids for part in _PARTS)} MIA examples, "
            f"{sum(len(data[p].extract[part]) for p in pids for part in _PARTS)} extraction "
            "prefixes to decode"
        )
        with views.use(view) as model:
            if sets:
                with timer("exposure"):
                    rows = canary_exposures(model, _merge(sets), batch_size=bs, pad_id=pad)
                out["exposure"] += [{"view": key, **r} for r in rows]
                say(f"exposure [{key}]: " + ", ".join(_exposure_brief(r) for r in rows))
            groups = {(p, part): data[p].items[part] for p in pids for part in _PARTS}
            with timer("mia_scoring"):
                scored = score_groups(model, groups, batch_size=bs, pad_id=pad, vocab_stats=True)
            if view == BASE:
                base = scored
            with timer("extraction"):
                extraction = grouped_extraction_rates(
                    model,
                    {(p, part): data[p].extract[part] for p in pids for part in _PARTS},
                    **cut,
                    pad_id=pad,
                    end_ids=end_token_ids(tok),
                    batch_size=bs,
                )
        if not pids:
            continue
        block = out["mia"].setdefault(key, {"clients": {}})
        for p in pids:
            sm, sn = (
                membership_scores(
                    scored[(p, part)], texts=data[p].texts[part], base=base[(p, part)]
                )
                for part in _PARTS
            )
            with timer("attacks"):
                block["clients"][str(p)] = run_attacks(sm, sn, **attack)
            pooled.setdefault(key, []).append((p, sm, sn))
            if view == BASE:
                base_scores[p] = (sm, sn)
            out["extraction"].setdefault(key, {})[str(p)] = {
                "members": extraction[(p, "members")],
                "non_members": extraction[(p, "non_members")],
            }
            best = max(block["clients"][str(p)].items(), key=lambda kv: kv[1]["auc"])
            say(
                f"partition {p} MIA [{key}]: best AUC {best[1]['auc']:.3f} ({best[0]}); extraction "
                f"members {extraction[(p, 'members')]['exact']:.2f} vs held-out "
                f"{extraction[(p, 'non_members')]['exact']:.2f}"
            )
        say(f"leakage view {step}/{len(plan)} [{view}] done [{time.perf_counter() - t_view:.0f}s]")
    with timer("attacks"):
        for key, parts in pooled.items():
            out["mia"][key]["pooled"] = _pooled(parts, attack)
            out["mia"][key]["scores"] = _score_table(parts, data)
            if key != "base" and attack["resamples"]:
                base_parts = [(p, *base_scores[p]) for p, _, _ in parts]
                out["mia"][key]["vs_base"] = _pooled(parts, attack, base_parts)
    out["control"] = control_check(out["mia"].get("base", {}).get("pooled", {}))
    out["seconds"] = dict(timer.seconds)
    return out


class PhaseTimer:
    """Wall seconds per named phase, summed over its calls (the report's time breakdown)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


_PARTS = ("members", "non_members")


def control_check(pooled: dict) -> dict:
    """Whether every score's AUC interval under the base model contains 0.5 (it should)."""
    outside = {
        name: s["auc_interval"]
        for name, s in pooled.items()
        if "auc_interval" in s and not s["auc_interval"][0] <= 0.5 <= s["auc_interval"][1]
    }
    return {"ok": not outside, "outside": outside}


def _pooled(parts: list, attack: dict, base_parts: list | None = None) -> dict:
    """Attacks on every client's scores together, resampled within each client; with
    `base_parts`, each score's AUC difference from the base model's on the same examples."""
    sm, sn, strata_m, strata_n = _concat(parts)
    if base_parts is None:
        return run_attacks(sm, sn, **attack, member_strata=strata_m, non_member_strata=strata_n)
    bm, bn, _, _ = _concat(base_parts)
    return against_base(
        sm, sn, bm, bn, **attack, member_strata=strata_m, non_member_strata=strata_n
    )


def _concat(parts: list) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """(member scores, non-member scores, their client ids) over [(client, members, non)]."""
    sm = {k: np.concatenate([m[k] for _, m, _ in parts]) for k in parts[0][1]}
    sn = {k: np.concatenate([n[k] for _, _, n in parts]) for k in parts[0][2]}
    first = next(iter(parts[0][1]))
    strata_m = np.concatenate([np.full(len(m[first]), p) for p, m, _ in parts])
    strata_n = np.concatenate([np.full(len(n[first]), p) for p, _, n in parts])
    return sm, sn, strata_m, strata_n


def _score_table(parts: list, data: dict[int, ClientData]) -> dict:
    """Every pooled example's id, client and scores, so that runs can be compared paired."""
    table: dict = {}
    for k, part in enumerate(_PARTS):
        rows: dict[str, list] = {"ids": [], "client": []}
        for p, *groups in parts:
            rows["ids"] += data[p].ids[part]
            rows["client"] += [p] * len(data[p].ids[part])
            for name, values in groups[k].items():
                rows.setdefault(name, []).extend(float(v) for v in values)
        table[part] = rows
    return table


def _merge(sets: list[CanarySet]) -> CanarySet:
    if len({(s.references, s.digits) for s in sets}) != 1:
        raise ValueError("canary sets to score together need the same references and digits")
    return CanarySet(
        canaries=tuple(c for s in sets for c in s.canaries),
        items=tuple(x for s in sets for x in s.items),
        references=sets[0].references,
        digits=sets[0].digits,
    )


def _exposure_brief(r: dict) -> str:
    return f"c{r['client']} k={r['repeats']}: {r['exposure']:.1f}/{r['exposure_skewnormal']:.1f}"


def _scored_tokens(item: dict) -> int:
    return sum(t != -100 for t in item["labels"])


def _mean(values: list[int]) -> float:
    return float(np.mean(values)) if values else float("nan")
