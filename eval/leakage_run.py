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
from typing import TYPE_CHECKING

import numpy as np

from fedllm.data.shards import RawShard
from fedllm.eval.extraction import grouped_extraction_rates
from fedllm.eval.generate import end_token_ids
from fedllm.eval.leakage import CanarySet, canary_exposures, score_groups
from fedllm.eval.leakage_data import ClientData, prepare_client
from fedllm.eval.mia import against_base, membership_scores, run_attacks
from fedllm.eval.partial import Pieces
from fedllm.eval.settings import EvalSettings
from fedllm.eval.views import BASE, GLOBAL, Views, client_view

if TYPE_CHECKING:
    from fedllm.recipe import RunConfig


def measure_leakage(
    views: Views,
    *,
    cfg: RunConfig,
    settings: EvalSettings,
    shards: dict[int, RawShard],
    say: Callable[[str], None],
    pieces: Pieces,
) -> dict:
    """report["leakage"]: exposure rows, MIA per client and pooled (+ intervals), extraction.

    Each view's measures are one piece (`_view_piece`): a view an interrupted eval finished is
    taken from `pieces`, and each view finished here is saved there as it ends.
    """
    timer = PhaseTimer()
    with timer("prepare"):
        data = {
            pid: prepare_client(cfg, settings, shard=shard, tokenizer=views.tokenizer)
            for pid, shard in shards.items()
        }
    for d in data.values():
        say(f"partition {d.pid} MIA sample: {_sample_line(d.sample)}")
    out: dict = {"exposure": [], "mia": {}, "extraction": {}, "sample": {}}
    out["sample"] = {str(pid): d.sample for pid, d in data.items()}
    attack = {"resamples": settings.bootstrap, "confidence": settings.confidence, "seed": cfg.seed}
    base_nll: dict[str, list[float]] = {}  # the base view's losses: every view's reference
    pooled: dict[str, list] = {}
    plan = [(BASE, "base", list(data)), (GLOBAL, "global", list(data))]
    plan += [(client_view(p), "client", [p]) for p in data if client_view(p) in views.names]
    for step, (view, key, clients) in enumerate(plan, start=1):
        name, where = f"leakage-{step}", f"leakage view {step}/{len(plan)} [{view}]"
        piece = pieces.get(name)
        if piece is not None:
            say(f"{where}: taken from the interrupted eval")
        else:
            t_view = time.perf_counter()
            piece = _view_piece(
                views,
                view,
                key=key,
                clients=[data[p] for p in clients],
                settings=settings,
                attack=attack,
                base_nll=base_nll,
                timer=timer,
                say=lambda text, where=where: say(f"{where}: {text}"),
            )
            piece = pieces.put(name, piece)  # as a resumed eval reads it: the same numbers
            say(f"{where} done [{time.perf_counter() - t_view:.0f}s]")
        out["exposure"] += piece["exposure"]
        base_nll.update(piece["base_nll"])
        if piece["clients"]:
            out["mia"].setdefault(key, {"clients": {}})["clients"].update(piece["clients"])
            out["extraction"].setdefault(key, {}).update(piece["extraction"])
            pooled.setdefault(key, []).extend(
                (p, _arrays(sm), _arrays(sn)) for p, sm, sn in piece["parts"]
            )
    base_scores = {p: (sm, sn) for p, sm, sn in pooled.get("base", [])}
    sets = {p: d.sets for p, d in data.items()}
    with timer("attacks"):
        for key, parts in pooled.items():
            out["mia"][key]["pooled"] = _pooled(parts, attack, sets=sets)
            out["mia"][key]["scores"] = _score_table(parts, data)
            if key != "base" and attack["resamples"]:
                base_parts = [(p, *base_scores[p]) for p, _, _ in parts]
                out["mia"][key]["vs_base"] = _pooled(
                    parts, attack, base_parts=base_parts, sets=sets
                )
    out["control"] = control_check(out["mia"].get("base", {}).get("pooled", {}))
    out["seconds"] = dict(timer.seconds)
    return out


def _sample_line(s: dict) -> str:
    """One client's MIA sample in a line: matched members and non-members, their mean lengths,
    and what was left out for having no scored token."""
    line = (
        f"{s['members']} members matched to {s['non_members']} of {s['held_out']} held-out "
        f"({s['dropped_non_members']} unmatched); mean tokens {s['member_tokens_mean']:.1f} vs "
        f"{s['non_member_tokens_mean']:.1f}"
    )
    if s["unscored_non_members"] + s["unscored_members"]:
        line += (
            f"; left out with no scored token: {s['unscored_non_members']} non-members "
            f"(with their matched sets), {s['unscored_members']} members"
        )
    return line


def _view_piece(
    views: Views,
    view: str,
    *,
    key: str,
    clients: list[ClientData],
    settings: EvalSettings,
    attack: dict,
    base_nll: dict[str, list[float]],
    timer: PhaseTimer,
    say: Callable[[str], None],
) -> dict:
    """One view's measures as plain data: exposure rows, each client's attacks, extraction
    rates and scores (pooled later), and under the base view each example's loss."""
    tok = views.tokenizer
    pad, bs = tok.pad_token_id, settings.batch_size
    cut = {"prefix_tokens": settings.prefix_tokens, "suffix_tokens": settings.suffix_tokens}
    ready = [d for d in clients if d.items["members"] and d.items["non_members"]]
    sets = [d.canaries for d in clients if d.canaries is not None]
    say(
        f"{sum(len(s.items) for s in sets)} canary sequences, "
        f"{sum(len(d.items[part]) for d in ready for part in _PARTS)} MIA examples, "
        f"{sum(len(d.extract[part]) for d in ready for part in _PARTS)} extraction prefixes "
        "to decode"
    )
    piece: dict = {"exposure": [], "clients": {}, "extraction": {}, "parts": [], "base_nll": {}}
    with views.use(view) as model:
        if sets:
            with timer("exposure"):
                rows = canary_exposures(model, _merge(sets), batch_size=bs, pad_id=pad)
            piece["exposure"] = [{"view": key, **r} for r in rows]
            say("exposure " + ", ".join(_exposure_brief(r) for r in rows))
        groups = {(d.pid, part): d.items[part] for d in ready for part in _PARTS}
        with timer("mia_scoring"):
            scored = score_groups(model, groups, batch_size=bs, pad_id=pad, vocab_stats=True)
        with timer("extraction"):
            extraction = grouped_extraction_rates(
                model,
                {(d.pid, part): d.extract[part] for d in ready for part in _PARTS},
                **cut,
                pad_id=pad,
                end_ids=end_token_ids(tok),
                batch_size=bs,
            )
    if view == BASE:
        piece["base_nll"] = {
            _slot(p, part): [s.mean_nll for s in scored[(p, part)]] for p, part in scored
        }
        base_nll = piece["base_nll"]  # the base model is its own reference (score 0)
    for d in ready:
        p = d.pid
        sm, sn = (
            membership_scores(
                scored[(p, part)], texts=d.texts[part], base_nll=base_nll[_slot(p, part)]
            )
            for part in _PARTS
        )
        with timer("attacks"):
            attacks = piece["clients"][str(p)] = run_attacks(sm, sn, **attack, member_sets=d.sets)
        piece["parts"].append([p, _lists(sm), _lists(sn)])
        piece["extraction"][str(p)] = {part: extraction[(p, part)] for part in _PARTS}
        best = max(attacks.items(), key=lambda kv: kv[1]["auc"])
        say(
            f"partition {p} MIA best AUC {best[1]['auc']:.3f} ({best[0]}); extraction members "
            f"{extraction[(p, 'members')]['exact']:.2f} vs held-out "
            f"{extraction[(p, 'non_members')]['exact']:.2f}"
        )
    return piece


def _slot(partition: int, part: str) -> str:
    return f"{partition}/{part}"


def _lists(scores: dict[str, np.ndarray]) -> dict[str, list[float]]:
    return {name: [float(v) for v in values] for name, values in scores.items()}


def _arrays(scores: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {name: np.asarray(values, dtype=np.float64) for name, values in scores.items()}


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
    """Whether every score's AUC interval under the base model contains 0.5 (it should).
    `ok` is None when no score has an interval (`--bootstrap 0`): nothing was checked."""
    checked = [name for name, s in pooled.items() if "auc_interval" in s]
    outside = {
        name: pooled[name]["auc_interval"]
        for name in checked
        if not pooled[name]["auc_interval"][0] <= 0.5 <= pooled[name]["auc_interval"][1]
    }
    return {"ok": (not outside) if checked else None, "outside": outside}


def _pooled(
    parts: list, attack: dict, *, base_parts: list | None = None, sets: dict[int, list[int]]
) -> dict:
    """Attacks on every client's scores together, matched sets resampled within each client;
    with `base_parts`, each score's AUC difference from the base model's on the same examples."""
    sm, sn, strata_m, strata_n = _concat(parts)
    design = {
        "member_strata": strata_m,
        "non_member_strata": strata_n,
        "member_sets": pooled_sets([sets[p] for p, _, _ in parts], _sizes(parts)),
    }
    if base_parts is None:
        return run_attacks(sm, sn, **attack, **design)
    bm, bn, _, _ = _concat(base_parts)
    return against_base(sm, sn, base_members=bm, base_non_members=bn, **attack, **design)


def pooled_sets(client_sets: list[list[int]], non_members: list[int]) -> np.ndarray:
    """Each pooled member's matched set as an index into the pooled non-members: a client's own
    set indices shifted by the non-members of the clients before it (`non_members`, in order)."""
    at = np.concatenate([[0], np.cumsum(non_members)[:-1]]).astype(np.int64)
    shifted = [np.asarray(s, dtype=np.int64) + a for s, a in zip(client_sets, at, strict=True)]
    return np.concatenate(shifted)


def _sizes(parts: list) -> list[int]:
    """Each part's number of non-members."""
    return [len(next(iter(n.values()))) for _, _, n in parts]


def _concat(parts: list) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """(member scores, non-member scores, their client ids) over [(client, members, non)]."""
    sm = {k: np.concatenate([m[k] for _, m, _ in parts]) for k in parts[0][1]}
    sn = {k: np.concatenate([n[k] for _, _, n in parts]) for k in parts[0][2]}
    first = next(iter(parts[0][1]))
    strata_m = np.concatenate([np.full(len(m[first]), p) for p, m, _ in parts])
    strata_n = np.concatenate([np.full(len(n[first]), p) for p, _, n in parts])
    return sm, sn, strata_m, strata_n


def _score_table(parts: list, data: dict[int, ClientData]) -> dict:
    """Every pooled example's id, client and scores, and each member's matched set (an index
    into the pooled non-members), so that runs can be compared paired."""
    table: dict = {}
    for k, part in enumerate(_PARTS):
        rows: dict[str, list] = {"ids": [], "client": []}
        for p, *groups in parts:
            rows["ids"] += data[p].ids[part]
            rows["client"] += [p] * len(data[p].ids[part])
            for name, values in groups[k].items():
                rows.setdefault(name, []).extend(float(v) for v in values)
        table[part] = rows
    sets = pooled_sets([data[p].sets for p, _, _ in parts], _sizes(parts))
    table["members"]["set"] = [int(j) for j in sets]
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
