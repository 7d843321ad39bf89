"""What a run leaves in its folder: the global adapter in PEFT format, each client's latest update
as the server saw it, adapter snapshots every `output.snapshot_every` rounds, the best round's
adapter (`output.best_by`), the held-out plot and the base-vs-federated table. Every adapter
folder carries a model card (`README.md`, `fedllm_adapter.json`) and names its base portably
(`fedllm.model.card`)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedllm.aggregators import Factors, round_spec
from fedllm.files import building_folder, replace_folder
from fedllm.model.card import BEST_ADAPTER, AdapterCard, make_card, read_card, write_card
from fedllm.model.card import save_adapter as save_with_card
from fedllm.model.identity import IDENTITY_MEMO, BaseIdentity, base_identity
from fedllm.recipe.schema import RunConfig
from fedllm.server.exchange import say
from fedllm.server.metrics import MetricsLog, final_table, plot_held_out, table_markdown
from fedllm.server.strategy import LoraStrategy

SNAPSHOTS = "snapshots"
LOCAL_B_NOTE = (
    "The server holds only the shared A of this aggregator (B is zero here): each client's "
    "personal adapter (`clients/<partition>/personal_adapter/`) is the model to use."
)


def run_base(cfg: RunConfig) -> BaseIdentity:
    """The base's portable identity, hashed once per run (memo in the run folder)."""
    return base_identity(cfg, memo=cfg.run_dir / IDENTITY_MEMO)


def save_adapter(
    folder: Path, factors: Mapping[str, Factors], *, cfg: RunConfig, card: AdapterCard
) -> Path:
    """A PEFT adapter folder naming the base portably, with its model card."""
    return save_with_card(
        folder,
        factors,
        card=card,
        target_modules=cfg.lora.target_modules,
        dropout=cfg.lora.dropout,
    )


def _rank(factors: Mapping[str, Factors]) -> int:
    return max(f.rank for f in factors.values())


def _server_row(rows: list[dict], server_round: int) -> dict[str, Any]:
    return next(
        (r for r in rows if r.get("kind") == "server" and r.get("round") == server_round), {}
    )


def _numbers(row: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: row[k] for k in keys if isinstance(row.get(k), int | float) and k in row}


def save_client_adapters(
    cfg: RunConfig, strategy: LoraStrategy, *, base: BaseIdentity, rows: list[dict]
) -> None:
    """Each client's latest accepted update as a PEFT adapter: what an honest-but-curious server
    holds (`client_adapters/<partition>/`, with the round of each in `index.json`)."""
    folder = cfg.run_dir / "client_adapters"
    index = {}
    for pid, (rnd, factors) in sorted(strategy.client_updates.items()):
        row = next(
            (
                r
                for r in rows
                if r.get("kind") == "client" and r.get("round") == rnd and r.get("partition") == pid
            ),
            {},
        )
        card = make_card(
            cfg,
            base,
            what="client",
            round=rnd,
            rank=_rank(factors),
            partition=pid,
            metrics=_numbers(row, ("train_loss", "train_loss_first", "train_loss_last")),
            note="What the server received from this client in that round (before aggregation).",
        )
        save_adapter(folder / str(pid), factors, cfg=cfg, card=card)
        index[str(pid)] = {"round": rnd, "rank": _rank(factors)}
    if index:
        (folder / "index.json").write_text(json.dumps(index, indent=2))


def _round_card(
    cfg: RunConfig,
    strategy: LoraStrategy,
    *,
    rows: list[dict],
    server_round: int,
    what: str,
    note: str = "",
) -> AdapterCard:
    """The card of the global adapter after `server_round`, with that round's server metrics."""
    keys = ("held_out_loss", "test_loss", "train_loss")
    metrics = _numbers(_server_row(rows, server_round), keys)
    return make_card(
        cfg,
        run_base(cfg),
        what=what,
        round=server_round,
        rank=_rank(strategy.global_),
        metrics=metrics,
        note=" ".join(filter(None, (note, resume_note(rows, server_round)))),
    )


def resume_note(rows: list[dict], server_round: int) -> str:
    """The settings resumes changed before `server_round` (metrics.jsonl's resume rows): the
    card's recipe is the last attempt's, so an adapter trained partly under others says so."""
    changes = [
        f"after round {r['round']}: "
        + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in r["changed"].items())
        for r in rows
        if r.get("kind") == "resume" and int(r.get("round", 0)) < server_round and r.get("changed")
    ]
    if not changes:
        return ""
    return f"Resumed with changed settings ({'; '.join(changes)}); the recipe is the last one's."


def snapshot(
    cfg: RunConfig, strategy: LoraStrategy, *, metrics: MetricsLog, server_round: int
) -> Path | None:
    """The global adapter after `server_round` in `snapshots/round_<r>/`, every
    `output.snapshot_every` rounds (None when this round is not one of them)."""
    every = cfg.output.snapshot_every
    if every is None or server_round % every:
        return None
    card = _round_card(
        cfg, strategy, rows=metrics.read(), server_round=server_round, what="snapshot"
    )
    return save_adapter(
        cfg.run_dir / SNAPSHOTS / f"round_{server_round}", strategy.global_, cfg=cfg, card=card
    )


def best_metric(cfg: RunConfig) -> str | None:
    """The metric `output.best_by` selects on (auto resolved), None when off or when the
    server's adapter is not the clients' model (fedsa: B stays on the clients)."""
    by = cfg.output.best_by
    if by == "none" or round_spec(cfg.aggregator.name).local_B:
        return None
    if by == "auto":
        return "held_out_loss" if cfg.federation.evaluate_clients != "none" else "test_loss"
    return by


def _scored(rows: list[dict], key: str | None) -> dict[int, float]:
    """Trained round -> its server row's `key`, where it has a finite one; a held-out loss only
    where every client of the panel replied usably (none dropped, failed or late: fewer clients
    score another mix of domains)."""
    return {
        r["round"]: r[key]
        for r in rows
        if key and r.get("kind") == "server" and r.get("round", 0) >= 1
        and isinstance(r.get(key), int | float) and math.isfinite(r[key])
        and not (key == "held_out_loss" and (r.get("eval_dropped") or r.get("eval_failed")))
    }  # fmt: skip


PREVIOUS_BEST = "best_adapter.prev"  # the best before best_adapter/'s round: a resume's fallback


def _kept(folder: Path) -> tuple[str, int, float] | None:
    """(metric, round, value) of the best adapter in `folder`, None if there is none."""
    card = read_card(folder)
    key = (card or {}).get("selected_by")
    if card is None or key is None or not isinstance(card["metrics"].get(key), int | float):
        return None
    return key, card["round"], card["metrics"][key]


def _valid(kept: tuple[str, int, float] | None, key: str | None, *, server_round: int) -> bool:
    """Whether a kept best still counts after `server_round`: chosen by `key`, not later."""
    return kept is not None and kept[0] == key and kept[1] <= server_round


def _settle(cfg: RunConfig, key: str | None, *, server_round: int) -> tuple[str, int, float] | None:
    """The kept best after `server_round`, best_adapter/ mended first. One chosen by another
    metric (`output.best_by` changed on a resume) or from a later round (a resume from the
    fallback checkpoint reruns it) is removed; then the best before it (best_adapter.prev/)
    takes its place if that one still counts (also after a crash between the two's swap)."""
    folder, previous = cfg.run_dir / BEST_ADAPTER, cfg.run_dir / PREVIOUS_BEST
    kept, why = _kept(folder), None
    if folder.exists() and not _valid(kept, key, server_round=server_round):
        if kept is not None and kept[0] == key:
            why = f"it holds round {kept[1]}, which runs again"
        else:
            why = (
                f"chosen by {kept[0] if kept else 'no metric'}, output.best_by now {key or 'none'}"
            )
        shutil.rmtree(folder)
        kept = None
    if why is not None:
        say(f"{folder} removed ({why})")
    before = _kept(previous)
    if previous.exists() and (before or (None,))[0] != key:
        shutil.rmtree(previous)  # chosen by another metric: never this one's best
    if kept is None and previous.exists() and _valid(before, key, server_round=server_round):
        replace_folder(previous, folder)
        say(f"{folder}: round {before[1]} again, the best of the rounds up to {server_round}")
        return before
    if why is not None:
        say("a round below every earlier one is kept from here")
    return kept


def keep_best(
    cfg: RunConfig, strategy: LoraStrategy, *, metrics: MetricsLog, server_round: int
) -> Path | None:
    """The global adapter after `server_round` in best_adapter/ when this round's metric
    (`best_metric`) is below the kept one's (a tie keeps the earlier round); None otherwise.

    The kept card is the state (`_settle` mends it on a resume). The new best is built beside
    and swapped in whole; the one it replaces becomes best_adapter.prev/."""
    key, folder = best_metric(cfg), cfg.run_dir / BEST_ADAPTER
    if key is None and not folder.exists():
        return None
    kept = _settle(cfg, key, server_round=server_round)
    rows = metrics.read()
    if key == VOTE:
        value = _vote(rows, server_round=server_round, kept_round=None if kept is None else kept[1])
        if value is None:
            return None
        note = (
            f"The round most clients scored lowest on their own held-out splits, round against "
            f"kept round, up to round {server_round}; {key} is the share that preferred it."
        )
    else:
        scored = _scored(rows, key)
        if server_round not in scored:
            return None
        earlier = (v for rnd, v in scored.items() if rnd < server_round)
        bar = kept[2] if kept is not None else min(earlier, default=math.inf)
        if not scored[server_round] < bar:  # a tie keeps the earlier round
            return None
        value = scored[server_round]
        note = f"The round with the lowest {key} of the run's rounds up to {server_round}."
    card = _round_card(cfg, strategy, rows=rows, server_round=server_round, what="best", note=note)
    card = dataclasses.replace(card, selected_by=key, metrics={**card.metrics, key: value})
    if folder.exists():  # the best it replaces, copied first: a resume from the fallback
        with building_folder(cfg.run_dir / PREVIOUS_BEST) as copy:  # checkpoint's best
            shutil.copytree(folder, copy, dirs_exist_ok=True)
    with building_folder(folder) as fresh:  # best_adapter/ whole at every moment
        save_adapter(fresh, strategy.global_, cfg=cfg, card=card)
    return folder


VOTE = "held_out_vote"


def _vote(rows: list[dict], *, server_round: int, kept_round: int | None) -> float | None:
    """`output.best_by: held_out_vote`: the share of the clients that evaluated both
    `server_round` and the kept round whose own held-out loss is lower in `server_round`, when
    that is a strict majority of at least 2 (None otherwise, and for a round fewer than 2
    clients scored: the kept round stays). Each client
    compares its own split across rounds, so the clients' domains never mix. Without a kept
    round (the first trained round, or after a resume removed it) the round must win that vote
    against every earlier trained round (the smallest share is returned)."""
    if server_round < 1:
        return None  # round 0 is the base model
    losses: dict[int, dict[int, float]] = {}
    for r in rows:  # eval rows are written only for clients with held-out tokens
        if r.get("kind") == "eval" and isinstance(r.get("held_out_loss"), int | float):
            losses.setdefault(r["round"], {})[r["partition"]] = r["held_out_loss"]
    mine = losses.get(server_round, {})
    if len(mine) < 2:  # a round at least 2 clients scored, or every later vote would stall
        return None
    if kept_round is not None:
        rivals = [kept_round]
    else:  # a round fewer than 2 clients scored can never be kept: no rival (h99: every later
        # round then needed 2 shared clients with it, and the vote stalled for the run)
        rivals = [r for r in losses if 1 <= r < server_round and len(losses[r]) >= 2]
    shares = []
    for rival in rivals:
        theirs = losses[rival] if rival in losses else {}
        both = [p for p in mine if p in theirs and math.isfinite(mine[p] + theirs[p])]
        wins = sum(mine[p] < theirs[p] for p in both)
        if len(both) < 2 or 2 * wins <= len(both):
            return None
        shares.append(wins / len(both))
    return min(shares, default=1.0)


def best_line(cfg: RunConfig, rows: list[dict]) -> str:
    """Which round best_adapter/ holds, against the last round, for the run's last words."""
    key = best_metric(cfg)
    kept = _kept(cfg.run_dir / BEST_ADAPTER)
    if kept is not None and key == VOTE:  # a share of votes: say the rounds' held-out losses
        scored = {
            r["round"]: r["held_out_loss"]
            for r in rows
            if r.get("kind") == "server" and r.get("round", 0) >= 1
            and isinstance(r.get("held_out_loss"), int | float)
        }  # fmt: skip
        if kept[1] not in scored:
            return ""
        kept = ("held_out_loss (by vote)", kept[1], scored[kept[1]])
    else:
        scored = _scored(rows, key)
    if kept is None or not scored:
        return ""
    key, best, value = kept
    last = max((r["round"] for r in rows if r.get("kind") == "server"), default=max(scored))
    if best == last:
        return f"\nbest round by {key}: the last ({value:.4f}); best_adapter/ holds it too"
    then = f"the last round's {scored[last]:.4f}" if last in scored else f"round {last} not scored"
    return f"\nbest round by {key}: {best} ({value:.4f}; {then}), in {cfg.run_dir / BEST_ADAPTER}"


def finish(cfg: RunConfig, strategy: LoraStrategy, *, metrics: MetricsLog) -> Path:
    """Save the global adapter in PEFT format with its card and the client adapters, then what
    only reports: the base-vs-federated table (also into the final adapter's card), the plot;
    close the trackers. The adapters come first: a report that fails never costs them (and a
    --resume of a finished run comes straight back here)."""
    run_dir = cfg.run_dir
    rows = metrics.read()
    last = max((r["round"] for r in rows if r.get("kind") == "server"), default=0)
    base = run_base(cfg)
    note = LOCAL_B_NOTE if round_spec(cfg.aggregator.name).local_B else ""
    card = _round_card(cfg, strategy, rows=rows, server_round=last, what="global", note=note)
    adapter = save_adapter(run_dir / "final_adapter", strategy.global_, cfg=cfg, card=card)
    save_client_adapters(cfg, strategy, base=base, rows=rows)
    table = final_table(rows, last)  # a privacy budget may have stopped the run early
    write_card(adapter, dataclasses.replace(card, table=table))
    plot_held_out(rows, run_dir / "held_out_loss.png", title=f"{cfg.name}: held-out loss")
    (run_dir / "final_eval.json").write_text(json.dumps(table, indent=2))
    md = table_markdown(table)
    (run_dir / "final_eval.md").write_text(f"# {cfg.name}: base vs federated adapter\n\n{md}\n")
    metrics.close()
    say(f"finished: adapter in {run_dir / 'final_adapter'}\n{md}{best_line(cfg, rows)}")
    return run_dir
