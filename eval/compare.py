"""`fedllm compare RUN ...`: one Markdown table and side-by-side plots (quality vs leakage).

Reads each run's eval/report.json (run `fedllm eval RUN` first); nothing is re-evaluated.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedllm.eval.report import fmt, interval_cell, tpr_cell
from fedllm.eval.roc import CONFIDENCE, RESAMPLES, paired_auc_difference
from fedllm.recipe import load_yaml


def note_md(rows: list[dict]) -> str:
    """What the table's leakage columns are; the intervals' confidence is the reports' own."""
    levels = sorted({r["mia_confidence"] for r in rows if r.get("mia_confidence") is not None})
    said = "/".join(f"{c:.0%}" for c in levels) + " " if levels else ""
    return (
        f"MIA AUC: the best of the five scores, pooled over clients, with its {said}bootstrap "
        "interval when the report has one. Picking the best of five inflates it a little, the "
        "base model's too: compare a view with the base control, not with 0.5. TPR@FPR<1%: "
        "that score's true-positive rate below 1% false positives, with its interval (* when "
        "fewer than 101 non-members make it the TPR at zero false positives). Exposure: "
        "skew-normal bits, mean over the canaries with that repeat count. Extraction: exact "
        "suffixes over attempted members, pooled over the clients (a client with no decodable "
        "member adds nothing)."
    )


def load_report(run: Path) -> dict:
    """A run's eval/report.json (or a report.json named directly), checked to be a fedllm eval
    report."""
    if not run.exists():  # "run `fedllm eval` first" would send the user to another error
        raise FileNotFoundError(
            f"{run} does not exist; pass run folders `fedllm eval` has evaluated (or their "
            "eval/report.json)"
        )
    path = run / "eval" / "report.json" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `fedllm eval {run}` first")
    try:
        report = json.loads(path.read_text())
    except ValueError as err:  # a damaged or half-copied file: name it
        raise ValueError(f"{path} is not valid JSON ({err}); run `fedllm eval` again") from None
    missing = [k for k in ("run", "quality", "leakage") if k not in report]
    if missing:
        raise ValueError(f"{path} is not a fedllm eval report: no {missing}")
    return report


def summarize(report: dict, *, privacy: str = "?") -> dict:
    """The headline numbers of one report (None where the report has no such measurement)."""
    q = report["quality"]
    g = q.get("global", {}).get("global", {})
    base = q.get("base", {}).get("global", {})
    leak = report["leakage"]
    row: dict = {
        "run": report["run"],
        "privacy": privacy,
        "base_loss": base.get("held_out", {}).get("loss"),
        "loss": g.get("held_out", {}).get("loss"),
        "perplexity": g.get("held_out", {}).get("perplexity"),
        "define_rouge_l": g.get("define", {}).get("rouge_l"),
        "choose_acc": g.get("choose", {}).get("accuracy"),
        "choose_acc_interval": _accuracy_interval(g.get("choose", {})),
        "domain_acc": g.get("domain", {}).get("accuracy"),
    }
    interval = interval_settings(report)
    row["mia_confidence"] = None if interval is None else interval["confidence"]
    for view in ("base", "global", "client"):
        pooled = leak["mia"].get(view, {}).get("pooled", {})
        best = max(pooled.items(), key=lambda kv: kv[1]["auc"], default=(None, {}))
        row[f"mia_auc_{view}"] = best[1].get("auc")
        row[f"mia_auc_{view}_interval"] = best[1].get("auc_interval")
        row[f"mia_auc_{view}_score"] = best[0]
        row[f"mia_loss_auc_{view}"] = pooled.get("loss", {}).get("auc")
        row[f"mia_tpr_{view}"] = best[1].get("tpr@fpr<0.01")  # the best-AUC score's, as above
        if view == "base":
            continue
        by_k: dict[int, list[float]] = defaultdict(list)
        for r in leak["exposure"]:
            if r["view"] == view:
                by_k[r["repeats"]].append(r["exposure_skewnormal"])
        row[f"exposure_{view}"] = {k: float(np.mean(v)) for k, v in sorted(by_k.items())}
        row[f"extraction_{view}"] = pooled_extraction(leak["extraction"].get(view, {}))
    return row


def pooled_extraction(clients: dict) -> float | None:
    """Exact-suffix rate of all clients' members together: Σ extracted / Σ attempted (None when
    no client had a decodable member; such a client's rate is NaN and must not spread)."""
    attempted = extracted = 0
    for e in clients.values():
        n = e["members"].get("examples") or 0
        if n:
            attempted += n
            extracted += round(e["members"]["exact"] * n)
    return extracted / attempted if attempted else None


def interval_settings(report: dict) -> dict | None:
    """The resamples, confidence and seed of the report's MIA intervals, as its eval ran them
    (None: it ran with --bootstrap 0, no intervals). The seed is the one its intervals record,
    0 when none does (the eval's default)."""
    settings = report.get("settings") or {}
    recorded = next(
        (
            s["interval"]
            for block in report["leakage"]["mia"].values()
            for s in block.get("pooled", {}).values()
            if "interval" in s
        ),
        {},
    )
    resamples = settings.get("bootstrap", recorded.get("resamples", RESAMPLES))
    if not resamples:
        return None
    return {
        "resamples": resamples,
        "confidence": settings.get("confidence", recorded.get("confidence", CONFIDENCE)),
        "seed": recorded.get("seed", 0),
    }


def paired_differences(report: dict, reference: dict, *, score: str = "loss") -> dict:
    """Per view: `score`'s AUC in `report` minus in `reference`, paired on the same examples.

    Both reports must hold the pooled per-example scores of the very same members and
    non-members (same recipe data and eval sizes); views where they do not are left out. The
    interval takes `report`'s settings (resamples, confidence, seed; none under --bootstrap 0)
    and resamples matched sets whole where the reports record them.
    """
    interval = interval_settings(report)
    out = {}
    for view in ("global", "client"):
        a = report["leakage"]["mia"].get(view, {}).get("scores")
        b = reference["leakage"]["mia"].get(view, {}).get("scores")
        if not a or not b or score not in a["members"] or score not in b["members"]:
            continue
        if any(a[part]["ids"] != b[part]["ids"] for part in ("members", "non_members")):
            continue
        sets_a, sets_b = a["members"].get("set"), b["members"].get("set")  # older: none
        if sets_a is not None and sets_b is not None and sets_a != sets_b:
            continue  # the same examples matched otherwise: not the same design
        sets = sets_a if sets_a is not None else sets_b  # matched sets are resampled whole
        diff = paired_auc_difference(
            a["members"][score],
            a["non_members"][score],
            base_members=b["members"][score],
            base_non_members=b["non_members"][score],
            **(interval or {"resamples": 0}),
            member_strata=a["members"]["client"],
            non_member_strata=a["non_members"]["client"],
            member_sets=sets,
        )
        out[view] = {**diff, "confidence": None if interval is None else interval["confidence"]}
    return out


def paired_table_md(reports: list[dict], *, score: str = "loss") -> str:
    """Each later run against the first, paired on the same examples ('' when none pair up)."""
    if len(reports) < 2:
        return ""
    first = reports[0]["run"]
    lines, confidences = [], set()
    for rep in reports[1:]:
        diff = paired_differences(rep, reports[0], score=score)
        cells = [
            interval_cell(diff[v]["difference"], diff[v]["interval"]) if v in diff else "—"
            for v in ("global", "client")
        ]
        confidences |= {d["confidence"] for d in diff.values()}
        if diff:
            lines.append(f"| {rep['run']} | {cells[0]} | {cells[1]} |")
    if not lines:
        return ""
    return "\n".join(
        [
            f"Paired against `{first}` on the same members and non-members ({score.upper()} "
            f"score; {paired_interval_phrase(confidences)}):",
            "",
            f"| run | Δ AUC global (run − {first}) | Δ AUC client |",
            "|---|---|---|",
            *lines,
        ]
    )


def paired_interval_phrase(confidences: set[float | None]) -> str:
    """How the paired table's intervals were made, at the confidences its runs' settings give
    (None: a run evaluated with --bootstrap 0, whose difference has no interval)."""
    levels = "/".join(f"{c:.0%}" for c in sorted(c for c in confidences if c is not None))
    parts = []
    if levels:
        parts.append(
            f"the difference's {levels} interval resamples examples (matched sets where the "
            "reports record them) jointly, so what both runs share about an example cancels"
        )
    if None in confidences:
        parts.append("no interval where the eval ran with --bootstrap 0")
    return "; ".join(parts)


# eval settings that do not move the numbers (batch size only changes the speed)
NEUTRAL_SETTINGS = {"batch_size"}


def mismatches(reports: list[dict], recipes: list[dict | None], *, labels: list[str]) -> list[str]:
    """What differs between the runs besides the training itself, each as one Markdown line: the
    eval settings and tasks, the recipes' data and model sections (keys every known recipe has;
    None: no recipe found). A gap between such runs may be that difference, not the method's."""
    facts: list[dict[str, object]] = []
    for rep in reports:
        settings = rep.get("settings") or {}
        fact: dict[str, object] = {
            f"eval {k}": v for k, v in settings.items() if k not in NEUTRAL_SETTINGS
        }
        fact["eval tasks"] = sorted(rep.get("tasks") or {})
        facts.append(fact)
    known = [recipe for recipe in recipes if recipe is not None]
    for fact, recipe in zip(facts, recipes, strict=True):
        for section in ("data", "model") if recipe is not None else ():
            shared = set.intersection(*(set(r.get(section) or {}) for r in known))
            fact |= {
                f"{section}.{k}": v for k, v in (recipe.get(section) or {}).items() if k in shared
            }
    lines = []
    for key in sorted({k for fact in facts for k in fact}):
        values: dict[str, list[str]] = defaultdict(list)
        for fact, label in zip(facts, labels, strict=True):
            if key in fact or not key.startswith(("data.", "model.")):
                values[json.dumps(fact.get(key), sort_keys=True, default=str)].append(label)
        if len(values) > 1:
            said = "; ".join(f"{v} ({', '.join(who)})" for v, who in values.items())
            lines.append(f"- `{key}`: {said}")
    missing = [label for label, recipe in zip(labels, recipes, strict=True) if recipe is None]
    if missing and len(missing) < len(recipes):
        lines.append(f"- no recipe.yaml found for {', '.join(missing)}: its data and model unknown")
    return lines


def run_folder(run: Path) -> Path:
    """The run directory RUN names: itself, or the run of a report.json in its eval/ folder."""
    return run if run.is_dir() else run.parent.parent


def labels_of(reports: list[dict], runs: list[Path]) -> list[str]:
    """Each run's name in the tables: the recipe's name, and where two share one, the shortest
    end of their run folders' paths that tells them apart (runs/seed0/tiny: seed0/tiny)."""
    names = [rep["run"] for rep in reports]
    parts = [run_folder(run).resolve().parts for run in runs]
    labels = []
    for i, name in enumerate(names):
        twins = [j for j, other in enumerate(names) if other == name]
        if len(twins) == 1:
            labels.append(name)
            continue
        k = next(
            (
                k
                for k in range(1, max(map(len, parts)) + 1)
                if len({parts[j][-k:] for j in twins}) == len(twins)
            ),
            1,  # the very same run twice: numbered below
        )
        labels.append(f"{name} ({'/'.join(parts[i][-k:])})")
    return [  # the very same run given twice: numbered
        f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)
    ]


def run_recipe_data(run: Path) -> dict | None:
    """The run's recipe.yaml as plain data (None when it has none, e.g. an adapter's eval)."""
    recipe = run_folder(run) / "recipe.yaml"
    return (load_yaml(recipe.read_text()) or {}) if recipe.is_file() else None


def run_privacy(run: Path) -> str:
    """The recipe's privacy mode ('?' without a recipe.yaml; older recipes have no section)."""
    recipe = run_recipe_data(run)
    if recipe is None:
        return "?"
    return str((recipe.get("privacy") or {}).get("mode", "none"))


def _accuracy_interval(result: dict) -> list[float] | None:
    """A multiple-choice result's 95% Wilson interval (None in a report written before it)."""
    low, high = result.get("accuracy_low"), result.get("accuracy_high")
    return None if low is None or high is None else [low, high]


def table_md(rows: list[dict]) -> str:
    """The `summarize` rows as one Markdown table: quality, MIA AUC with intervals, exposure per
    repeat count k, extraction."""
    ks = sorted({k for r in rows for k in r["exposure_global"]})
    head = [
        "run",
        "privacy",
        "held-out loss (base → global)",
        "define ROUGE-L",
        "choose acc",
        "MIA AUC global",
        "MIA AUC client",
        "MIA AUC base (control)",
        "TPR@FPR<1% global / client / base",
        *[f"exposure k={k} (global/client)" for k in ks],
        "extraction (global)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["run"],
            r["privacy"],
            f"{fmt(r['base_loss'])} → {fmt(r['loss'])}",
            fmt(r["define_rouge_l"]),
            interval_cell(r["choose_acc"], r.get("choose_acc_interval"), digits=2),
            interval_cell(r["mia_auc_global"], r.get("mia_auc_global_interval")),
            interval_cell(r["mia_auc_client"], r.get("mia_auc_client_interval")),
            interval_cell(r.get("mia_auc_base"), r.get("mia_auc_base_interval")),
            " / ".join(
                "—" if r.get(f"mia_tpr_{v}") is None else tpr_cell(r[f"mia_tpr_{v}"])
                for v in ("global", "client", "base")
            ),
            *[
                f"{fmt(r['exposure_global'].get(k), 1)} / {fmt(r['exposure_client'].get(k), 1)}"
                for k in ks
            ],
            fmt(r["extraction_global"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_compare(rows: list[dict], path: Path) -> None:
    """Two panels into `path`: held-out loss against best MIA AUC (global ●, client ○), and
    canary exposure (bits) by repeats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for i, r in enumerate(rows):  # solid: the released global adapter; hollow/dashed: client view
        color = f"C{i}"
        if r["mia_auc_global"] is not None and r["loss"] is not None:
            ax1.scatter(r["mia_auc_global"], r["loss"], s=40, color=color)
            ax1.annotate(r["run"], (r["mia_auc_global"], r["loss"]), fontsize=8)
            if r["mia_auc_client"] is not None:
                ax1.scatter(r["mia_auc_client"], r["loss"], s=40, facecolors="none", color=color)
        for view, style in (("global", "-"), ("client", "--")):
            ks = sorted(r[f"exposure_{view}"])
            if ks:
                ys = [r[f"exposure_{view}"][k] for k in ks]
                ax2.plot(ks, ys, style, marker="o", color=color, label=f"{r['run']} ({view})")
    ax1.axvline(0.5, ls=":", color="grey")
    ax1.set_xlabel("best MIA ROC AUC: global ●, one client's adapter ○ (leakage →)")
    ax1.set_ylabel("held-out loss, global adapter (← better)")
    ax1.set_title("quality vs membership leakage")
    ax1.grid(alpha=0.3)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("canary repeats k")
    ax2.set_ylabel("exposure (bits, skew-normal)")
    ax2.set_title("canary exposure")
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare_runs(runs: list[Path], *, out_dir: Path) -> Path:
    """Write compare.md, compare.json and compare.png for `runs` into `out_dir`."""
    if not runs:
        raise ValueError("compare needs at least one run directory")
    reports = [load_report(r) for r in runs]
    labels = labels_of(reports, runs)
    reports = [{**rep, "run": label} for rep, label in zip(reports, labels, strict=True)]
    rows = [summarize(rep, privacy=run_privacy(r)) for rep, r in zip(reports, runs, strict=True)]
    paired = paired_table_md(reports)
    differ = mismatches(reports, [run_recipe_data(r) for r in runs], labels=labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=2, default=float))
    plot_compare(rows, out_dir / "compare.png")
    warning = (
        "**Not like for like.** These runs differ in more than their training, so part of any "
        "gap below may be this:\n\n" + "\n".join(differ) + "\n\n"
        if differ
        else ""
    )
    text = (
        "# Runs compared\n\n"
        + warning
        + table_md(rows)
        + "\n\n"
        + note_md(rows)
        + (f"\n\n{paired}" if paired else "")
        + "\n\n![quality vs leakage](compare.png)\n"
    )
    (out_dir / "compare.md").write_text(text)
    return out_dir
