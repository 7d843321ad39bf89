"""The quality grid's report: tables with intervals and paired verdicts, a plot, the raw rows.

Writes <results>/<stem>.md (default bench/results/), <stem>.png, <stem>-rows.jsonl (every cell
as run) and <stem>-rows.csv (one line per cell and round). Loss is lower-better everywhere; a paired
difference is method − reference on the seeds both ran, "tie" when its 95% interval holds 0,
"same" when the whole interval is within NEGLIGIBLE nats of 0.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from _quality_clients import client_table, local_reference
from _stats import MIN_SEEDS, NEGLIGIBLE, Interval, paired, seeds, t_interval, verdict

RESULTS = Path(__file__).parent / "results"
CURVES = ("centralised", "local only", "fedit", "svd", "squeeze", "rblora", "fedsa", "fedplora")
BUSY_LOAD = 3.0  # a cell started above this shared the 2 cores with another job (alone: ~2)


def read_rows(path: Path) -> list[dict]:
    """The rows of a rows file (one JSON object a line), [] if there is none yet."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_cells(path: Path) -> dict[tuple, dict]:
    """(method, regime, seed) -> row of a quality rows file; a cell written twice is an error
    (which of the two would count is not for a dict to decide)."""
    cells: dict[tuple, dict] = {}
    lines: dict[tuple, int] = {}
    for number, r in enumerate(read_rows(path), start=1):
        cell = (r["method"], r["regime"], r["seed"])
        if cell in cells:
            raise ValueError(
                f"{path}: line {number} repeats the cell {cell} of line {lines[cell]}; "
                "keep one of the two rows"
            )
        cells[cell], lines[cell] = r, number
    return cells


def by_method(rows: list[dict], regime: str) -> dict[str, dict[int, dict]]:
    """method -> seed -> row, for one regime."""
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["regime"] == regime:
            out.setdefault(r["method"], {})[r["seed"]] = r
    return out


def finals(by_seed: dict[int, dict], key: str) -> dict[int, float]:
    """seed -> the last round's value of `key` ("personal" or "test"), where there is one."""
    return {s: r[key][-1] for s, r in by_seed.items() if r[key] and r[key][-1] is not None}


def best_round(by_seed: dict[int, dict]) -> dict[int, float]:
    """seed -> the lowest own-domain loss over rounds 1.. : early stopping by an oracle that
    reads the held-out split itself, the best a run could have stopped at (a local-only
    reference at its best round is the hardest one for federation to beat)."""
    return {s: min(r["personal"][1:]) for s, r in by_seed.items() if len(r["personal"]) > 1}


def _personal_B(by_seed: dict[int, dict]) -> bool:
    """The server's adapter is not the one clients use (fedsa: B = 0 on the server)."""
    return any("B local" in r["semantics"] for r in by_seed.values())


def interval_text(values: dict[int, float]) -> str:
    return t_interval(values.values()).text() if values else "—"


def diff_text(a: dict[int, float], b: dict[int, float]) -> str:
    """The paired difference and its verdict; '(n seeds)' when fewer seeds are shared than
    either method has (the others' intervals are wider or narrower than this one's)."""
    d = paired(a, b)
    if d is None:
        return "—"
    fewer = f" ({seeds(d.n)})" if MIN_SEEDS <= d.n < max(len(a), len(b)) else ""
    return f"{d.text(signed=True)} {verdict(d, negligible=NEGLIGIBLE)}{fewer}"


def regime_tables(
    rows: list[dict],
    regime: str,
    *,
    pairs: Sequence[tuple[str, str]],
    ranks: Mapping[int, int] | None = None,
) -> list[str]:
    """One regime: final losses, paired differences, controlled pairs, who gains at home (client
    by client, `ranks`: partition -> LoRA rank), per-round means."""
    cells = by_method(rows, regime)
    order = sorted(cells, key=lambda m: t_interval(finals(cells[m], "personal").values()).mean)
    lines = [*_finals_table(cells, order), "", *_paired_table(cells, order)]
    if shown := [(a, b) for a, b in pairs if a in cells and b in cells]:
        lines += ["", *_pairs_table(cells, shown)]
    if by_client := client_table(cells, order=order, ranks=ranks or {}):
        lines += ["", *by_client]
    return [*lines, "", *_curves_table(cells, order)]


def _finals_table(cells: Mapping[str, dict], order: Sequence[str]) -> list[str]:
    """Each method's final losses (own, own at its best round, global test), traffic and time."""
    lines = [
        "| method | semantics | own-domain held-out | own at its best round | global test set "
        "| last round − the one before (own) "
        "| MB moved | s/cell | CPU s/cell | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in order:
        by_seed = cells[m]
        own, test = finals(by_seed, "personal"), finals(by_seed, "test")
        # has the curve flattened: the last round's own-domain change, paired over seeds
        before = {s: r["personal"][-2] for s, r in by_seed.items() if len(r["personal"]) > 1}
        any_row = next(iter(by_seed.values()))
        test_text = "n/a (B on clients)" if _personal_B(by_seed) else interval_text(test)
        # times of whole cells only: a resumed cell's are its last part's
        whole = [r for r in by_seed.values() if not r.get("resumed")]
        seconds = f"{sum(r['seconds'] for r in whole) / len(whole):.0f}" if whole else "—"
        if any(r["load"] > BUSY_LOAD for r in whole):
            seconds += "†"  # another job shared the cores for part of it
        cpu = [r["cpu_seconds"] for r in whole if "cpu_seconds" in r]
        cpu_text = f"{sum(cpu) / len(cpu):.0f}" if cpu else "—"
        lines.append(
            f"| {m} | {any_row['semantics']} | {interval_text(own)} "
            f"| {interval_text(best_round(by_seed))} | {test_text} "
            f"| {diff_text(own, before)} | {any_row['mb_moved']:.1f} | {seconds} "
            f"| {cpu_text} "
            f"| {', '.join(str(s) for s in sorted(by_seed))} |"
        )
    return lines


def _paired_table(cells: Mapping[str, dict], order: Sequence[str]) -> list[str]:
    """Each method against fedit and against local-only (last and best round) on the same seeds."""
    fedit, local = "fedit", local_reference(cells) or "local only"
    lines = [
        "Paired differences, method − reference on the same seeds (negative: lower loss than the "
        "reference; mean ± 95% t-interval; tie: the interval contains 0; same: the whole "
        f"interval within {NEGLIGIBLE} nats of 0). At its best round: {local} stopped, seed by "
        "seed, at the round whose own-domain loss was lowest, chosen on that held-out split "
        "itself (an oracle: the hardest local-only to beat; the methods keep their last round):",
        "",
        f"| method | own − {fedit} | own − {local} | own − {local} at its best round "
        f"| test − {fedit} | test − {local} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    own_of = {ref: finals(cells.get(ref, {}), "personal") for ref in (fedit, local)}
    test_of = {ref: finals(cells.get(ref, {}), "test") for ref in (fedit, local)}
    stopped = best_round(cells.get(local, {}))
    for m in order:
        own, test = finals(cells[m], "personal"), finals(cells[m], "test")
        no_test = _personal_B(cells[m])  # fedsa: the server's adapter is not the clients'
        out = [
            "—" if m == fedit else diff_text(own, own_of[fedit]),
            "—" if m == local else diff_text(own, own_of[local]),
            "—" if m == local else diff_text(own, stopped),
            "—" if m == fedit or no_test else diff_text(test, test_of[fedit]),
            "—" if m == local or no_test else diff_text(test, test_of[local]),
        ]
        lines.append(f"| {m} | " + " | ".join(out) + " |")
    return lines


def _pairs_table(cells: Mapping[str, dict], shown: Sequence[tuple[str, str]]) -> list[str]:
    """Controlled pairs: a variant against the base it changes one knob of."""
    lines = [
        "Controlled pairs (one knob changed, same seeds):",
        "",
        "| variant − base | own-domain | test |",
        "|---|---:|---:|",
    ]
    for a, b in shown:
        own = diff_text(finals(cells[a], "personal"), finals(cells[b], "personal"))
        test = diff_text(finals(cells[a], "test"), finals(cells[b], "test"))
        lines.append(f"| {a} − {b} | {own} | {test} |")
    return lines


def _curves_table(cells: Mapping[str, dict], order: Sequence[str]) -> list[str]:
    """Own-domain held-out loss per round, each method's mean over its seeds."""
    lines = ["Own-domain held-out loss per round (mean over seeds):", ""]
    rounds = max(len(r["personal"]) for c in cells.values() for r in c.values())
    lines += [
        "| method | " + " | ".join(f"r{i}" for i in range(rounds)) + " |",
        "|---|" + "---:|" * rounds,
    ]
    for m in order:
        means = _curve(cells[m], "personal")
        lines.append(f"| {m} | " + " | ".join(f"{x.mean:.4f}" for x in means) + " |")
    return lines


def pooled_tables(
    rows: list[dict], pooled: Mapping[str, Sequence[tuple[str, str, str]]]
) -> list[str]:
    """One question asked in several regimes: each (variant, base, regime) contributes its
    paired seeds, and the interval runs over all of them (a regime's own effect counts as seed
    noise, so the interval is if anything wide). Regimes that have not run both cells yet
    are left out of a question (the cells column names the ones in it)."""
    cells = {g: by_method(rows, g) for g in {g for q in pooled.values() for _, _, g in q}}
    lines = []
    for title, parts in pooled.items():
        parts = [(a, b, g) for a, b, g in parts if a in cells[g] and b in cells[g]]
        if not parts:
            continue
        own_a, own_b, test_a, test_b = {}, {}, {}, {}
        for a, b, g in parts:
            for key, of_a, of_b in (("personal", own_a, own_b), ("test", test_a, test_b)):
                of_a.update({(g, s): x for s, x in finals(cells[g][a], key).items()})
                of_b.update({(g, s): x for s, x in finals(cells[g][b], key).items()})
        where = "; ".join(f"{a} − {b} in `{g}`" for a, b, g in parts)
        signs = [own_a[k] < own_b[k] for k in sorted(set(own_a) & set(own_b))]
        lower = f"{sum(signs)} of {len(signs)}"
        lines.append(
            f"| {title} | {where} | {diff_text(own_a, own_b)} | {diff_text(test_a, test_b)} "
            f"| {lower} |"
        )
    if not lines:
        return []
    return [
        "",
        "## Across regimes",
        "",
        "Paired differences pooled over the regimes' seeds (one (regime, seed) pair per term):",
        "",
        "| question | cells | own-domain | test | variant lower at home |",
        "|---|---|---:|---:|---:|",
        *lines,
    ]


def _curve(by_seed: dict[int, dict], key: str) -> list[Interval]:
    """Per round, the interval over seeds (rounds every seed reached)."""
    series = [r[key] for r in by_seed.values()]
    length = min(len(s) for s in series)
    out = []
    for i in range(length):
        values = [s[i] for s in series if s[i] is not None]
        out.append(t_interval(values) if values else Interval(math.nan, math.nan, 0))
    return out


def header(
    rows: list[dict],
    *,
    stem: str,
    common: list[str],
    regimes: dict[str, str],
    regime_overrides: dict[str, list[str]],
    invocation: str,
) -> list[str]:
    """Title, how the cells were run (commands, seeds, wall time, load) and the regimes."""
    seeds = sorted({r["seed"] for r in rows})
    hours = sum(r["seconds"] for r in rows) / 3600
    resumed = sum(bool(r.get("resumed")) for r in rows)
    resumed_note = (
        f" ({resumed} cells resumed after an interruption: a resumed federation counts its last "
        "part only, a resumed reference its earlier clients too; the s/cell columns leave every "
        "resumed cell out)"
        if resumed
        else ""
    )
    loads = [r["load"] for r in rows]
    threads = sorted({r["threads"] for r in rows})
    cpus = sorted({r.get("cpu", "not recorded") for r in rows})
    fixed = {r["data_seed_fixed"] for r in rows}
    data = (
        "`data.seed=0` pins the data subset, global test set, partition and held-out splits: "
        "seeds differ only in LoRA initialisation and data order (every client trains every "
        "round: no regime samples clients)."
        if fixed == {True}
        else "The recipe has no data seed yet (proposed: `data.seed`), so `seed` also redraws the "
        "data subset, the global test set and the held-out splits (domains stay whole per "
        "client); comparisons are paired, so each difference is taken on identical data."
    )
    lines = [
        "# Aggregation quality over seeds: methods × regimes, two test sets",
        "",
        f"Written by `{invocation}` from {len(rows)} cells (each a row of `rows.jsonl` in the "
        f"run folder; copies: `{stem}-rows.jsonl`, `{stem}-rows.csv`). Seeds: "
        f"{', '.join(map(str, seeds))}. Wall time of all cells: {hours:.2f} h{resumed_note}; "
        "cells started at "
        f"load average {min(loads):.1f}–{max(loads):.1f} (2-core machine); torch threads "
        f"{threads}; CPUs: {'; '.join(cpus)}. {data}",
        "",
        "Every cell is `fedllm run recipes/<method>.yaml` (references: trained by "
        "`bench/_quality_runs.py`) with these overrides, then the regime's, the method's "
        f"options and `seed=<s>`: `{' '.join(common)}`. Each row of `rows.jsonl` holds its exact "
        "command.",
        "",
        "Own-domain held-out: token-weighted over every client's own held-out split (own domains: "
        "personalisation; fedsa clients use their own B). Global test set: 10% of every domain "
        "drawn before partitioning plus two domains no client holds (noun.food, verb.motion), "
        "evaluated by the server with the global adapter (generalisation; local-only: the mean "
        "of the clients' losses, each client's own adapter scored on the whole set; sdflora: its "
        "global module only). Own at its best round: "
        "the lowest own-domain loss of rounds 1.., seed by seed (an oracle that reads the "
        "held-out split; what `output.best_by` keeps in a run). Last round − the one before: "
        "the own-domain change the last round still made, paired over seeds (tie or same: the "
        "curve has flattened; better: still falling; worse: turned up). "
        "s/cell: wall time, including any time the grid was paused for another job on the "
        "machine; CPU s/cell: the grid process's CPU time (both cores; a pause adds none), "
        "since the cell's last resume (— : not recorded, cells before stop 28); †: a seed's "
        f"cell started at load average above {BUSY_LOAD} (another job shared the two cores: its "
        "wall time is inflated, its CPU time a little, its losses not at all).",
        "",
        "Each verdict below is one paired 95% t-interval (n − 1 degrees of freedom: 2 with three "
        "seeds), read on its own: among the dozens of comparisons per regime a few "
        "'better'/'worse' are expected by chance alone, and three seeds estimate the spread "
        "loosely. A claim in docs/aggregators.md rests on a difference that holds on both test "
        "sets or in both regimes, not on one verdict.",
        "",
        "| regime | overrides | what |",
        "|---|---|---|",
    ]
    for name in sorted({r["regime"] for r in rows}, key=list(regimes).index):
        lines.append(f"| {name} | `{' '.join(regime_overrides[name])}` | {regimes[name]} |")
    return lines


def plot(rows: list[dict], regimes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = len({r["method"] for r in rows})
    fig, axes = plt.subplots(
        3, len(regimes), figsize=(6 * len(regimes), 5 + 0.5 * methods), dpi=100, squeeze=False
    )
    for col, regime in enumerate(regimes):
        cells = by_method(rows, regime)
        # a regime of a few methods (clientdp, scarce-lr) draws them all; a full one the CURVES
        reference = local_reference(cells)
        extra = sorted(set(cells) - set(CURVES)) if len(cells) <= 10 else [reference]
        for m in dict.fromkeys(c for c in [*CURVES, *extra] if c in cells):
            curve = _curve(cells[m], "personal")
            one = len(cells[m]) < MIN_SEEDS  # no interval: dashed, hollow, said in the legend
            axes[0][col].errorbar(
                range(len(curve)),
                [x.mean for x in curve],
                yerr=None if one else [0 if math.isnan(x.half) else x.half for x in curve],
                capsize=3,
                marker="o",
                ms=3,
                ls="--" if one else "-",
                mfc="none" if one else None,
                label=f"{m} ({seeds(len(cells[m]))})" if one else m,
            )
        axes[0][col].set(title=f"{regime}: own-domain held-out loss", xlabel="round")
        axes[0][col].legend(fontsize=7)
        local = cells.get(reference, {}) if reference else {}
        for row, key, what in ((1, "personal", "own-domain"), (2, "test", "global test set")):
            if not local:  # a regime without the reference (clientdp)
                axes[row][col].set_axis_off()
                continue
            diffs = {
                m: d
                for m, c in cells.items()
                if m != reference
                and not (key == "test" and _personal_B(c))
                and (d := paired(finals(c, key), finals(local, key))) is not None
            }
            order = sorted(diffs, key=lambda m: -diffs[m].mean)
            ax = axes[row][col]
            for y, m in enumerate(order):  # under MIN_SEEDS seeds: a hollow point, no bar
                one = diffs[m].n < MIN_SEEDS
                ax.errorbar(
                    [diffs[m].mean],
                    [y],
                    xerr=None if one else [diffs[m].half],
                    fmt="o",
                    mfc="none" if one else None,
                    color="C0",
                    capsize=3,
                )
            ax.axvline(0, color="grey", lw=0.8)
            names = [f"{m} ({seeds(diffs[m].n)})" if diffs[m].n < MIN_SEEDS else m for m in order]
            ax.set_yticks(range(len(order)), names, fontsize=7)
            ax.set(
                title=f"{regime}: final {what} loss − {reference} (paired, 95%)",
                xlabel="loss difference (< 0: federation helps)",
            )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    rows: list[dict],
    *,
    stem: str,
    results: Path = RESULTS,
    regimes: dict[str, str],
    common: list[str],
    regime_overrides: dict[str, list[str]],
    pairs: Sequence[tuple[str, str]],
    invocation: str,
    client_ranks: Mapping[str, Mapping[int, int]] | None = None,
    pooled: Mapping[str, Sequence[tuple[str, str, str]]] | None = None,
) -> list[Path]:
    """Write the report files for `rows`; the paths written."""
    if not rows:
        raise SystemExit("no finished cells to report yet")
    results.mkdir(parents=True, exist_ok=True)
    present = [g for g in regimes if any(r["regime"] == g for r in rows)]
    lines = header(
        rows,
        stem=stem,
        common=common,
        regimes=regimes,
        regime_overrides=regime_overrides,
        invocation=invocation,
    )
    for regime in present:
        lines += [
            "",
            f"## Regime `{regime}`",
            "",
            *regime_tables(rows, regime, pairs=pairs, ranks=(client_ranks or {}).get(regime)),
        ]
    lines += pooled_tables(rows, pooled or {})
    lines += ["", f"![loss per round and final losses with intervals]({stem}.png)", ""]
    md, png = results / f"{stem}.md", results / f"{stem}.png"
    md.write_text("\n".join(lines))
    plot(rows, present, png)
    raw = results / f"{stem}-rows.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = results / f"{stem}-rows.csv"
    with table.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "method",
                "regime",
                "seed",
                "round",
                "own_domain_loss",
                "test_loss",
                "cell_seconds",
                "load",
            ]
        )
        for r in rows:
            for i, (own, test) in enumerate(zip(r["personal"], r["test"], strict=True)):
                out.writerow(
                    [r["method"], r["regime"], r["seed"], i, own, test, r["seconds"], r["load"]]
                )
    return [md, png, raw, table]
