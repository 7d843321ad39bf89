"""Write an evaluation report: report.json, report.md and PNG plots (quality, exposure, MIA)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.eval.mia import SCORES
from fedllm.files import building_folder

VIEW_NOTE = (
    "Views: **base** = the frozen base model (control), **global** = the released federated "
    "adapter, **local**/**client** = each client's own last accepted update (what an "
    "honest-but-curious server holds), evaluated on that client's data."
)


def fmt(x: float | None, digits: int = 3) -> str:
    """`x` to `digits` decimals, or '—' when missing (None or NaN)."""
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def tpr_cell(entry: dict) -> str:
    """A TPR@FPR cell with its interval, starred when too few non-members make that FPR moot."""
    cell = interval_cell(entry["value"], entry.get("interval"))
    return cell if entry["enough_non_members"] else f"{cell}*"


def quality_md(quality: dict, tasks: dict) -> list[str]:
    """Every metric of every task (global), then each task's headline metric per client."""
    columns = [(name, m) for name, task in tasks.items() for m in task["metrics"]]
    lines = [
        "## Task quality (all clients' held-out examples)",
        "",
        *(f"- **{name}**: {task['about']}" for name, task in tasks.items()),
        "",
        "| view | " + " | ".join(f"{name} {m['label']}" for name, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for view, block in quality.items():
        g = block.get("global", {})
        cells = [fmt(g.get(name, {}).get(m["key"]), m["digits"]) for name, m in columns]
        lines.append(f"| {view} | " + " | ".join(cells) + " |")
    clients = sorted({c for b in quality.values() for c in b["clients"]}, key=int)
    lines += [
        "",
        "Per client (each task's headline metric):",
        "",
        "| view | metric | " + " | ".join(f"client {c}" for c in clients) + " |",
        "|---|---|" + "---|" * len(clients),
    ]
    for view, block in quality.items():
        for name, task in tasks.items():
            m = task["metrics"][0]
            cells = [
                fmt(block["clients"].get(c, {}).get(name, {}).get(m["key"]), m["digits"])
                for c in clients
            ]
            lines.append(f"| {view} | {name} {m['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def exposure_md(rows: list[dict]) -> list[str]:
    """The canary-exposure section of report.md: a row per view, client and canary (or a note
    that the recipe has none)."""
    if not rows:
        return ["## Canary exposure", "", "No canaries in this recipe (data.canaries).", ""]
    lines = [
        "## Canary exposure",
        "",
        f"Rank-based exposure against n = {rows[0]['references']} sampled "
        f"references (max {rows[0]['max_rank_exposure']:.2f} bits) and the skew-normal "
        f"extrapolation (max {rows[0]['space_bits']:.1f} bits = log2 |R|).",
        "",
        "| view | client | repeats k | canary | Px (bits) | median ref Px | exposure (rank) "
        "| exposure (skew-normal) | AUC vs refs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['view']} | {r['client']} | {r['repeats']} | {r['index']} | "
            f"{fmt(r['px_bits'], 1)} | {fmt(r['reference_px_median'], 1)} | "
            f"{fmt(r['exposure'], 2)} | {fmt(r['exposure_skewnormal'], 2)} | "
            f"{fmt(r['auc_vs_references'])} |"
        )
    return [*lines, ""]


def interval_cell(value: float | None, interval: Sequence[float] | None, *, digits: int = 3) -> str:
    """'0.612 [0.561, 0.660]', or just the value when there is no interval."""
    if interval is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"


def mia_md(mia: dict, *, sample: dict | None = None, control: dict | None = None) -> list[str]:
    """Pooled attacks per view and score with intervals, the base control's verdict, the sample."""
    first = next((s for b in mia.values() for s in b["pooled"].values()), {})
    conf = first.get("interval", {})
    lines = [
        "## Membership inference (members = a client's training examples, non-members = its "
        "held-out examples; pooled over clients)",
        "",
    ]
    if conf:
        unit = (
            "whole matched sets (a non-member with its matched members) resampled within each "
            "client"
            if conf.get("resampled") == "matched sets"
            else "members and non-members resampled separately within each client"
        )
        lines += [
            f"Intervals: {conf['confidence']:.0%} percentile bootstrap, {conf['resamples']} "
            f"resamples (seed {conf['seed']}), {unit}. AUC − base: the view's AUC minus the "
            "base model's on the same examples, both from the same resamples (what training "
            "added, with the split's own tilt cancelled).",
            "",
        ]
    lines += [
        "| view | score | AUC | AUC − base (paired) | TPR@FPR<1% | TPR@FPR<0.1% | members | "
        "non-members |",
        "|---|---|---|---|---|---|---|---|",
    ]
    few: dict[str, int] = {}  # level label -> non-members it needs, where some view has fewer
    for view, block in mia.items():
        for score, s in block["pooled"].items():
            t1, t01 = s["tpr@fpr<0.01"], s["tpr@fpr<0.001"]
            for label, entry in (("1%", t1), ("0.1%", t01)):
                if not entry["enough_non_members"]:
                    few[label] = entry["needs_non_members"]
            delta = block.get("vs_base", {}).get(score)
            delta_cell = (
                "—" if delta is None else interval_cell(delta["difference"], delta["interval"])
            )
            lines.append(
                f"| {view} | {score} | {interval_cell(s['auc'], s.get('auc_interval'))} | "
                f"{delta_cell} | {tpr_cell(t1)} | {tpr_cell(t01)} | {s['members']} | "
                f"{s['non_members']} |"
            )
    if few:
        needs = ", ".join(f"{n} for {label}" for label, n in few.items())
        lines += [
            "",
            "\\* too few non-members for this FPR to mean anything: FPR < α is strict, so it "
            f"allows a false positive only with more than 1/α non-members ({needs}); below "
            "that the value is the TPR at zero false positives.",
        ]
    if control is not None and "base" in mia:
        lines += ["", *control_md(control, confidence=conf.get("confidence", 0.95))]
    if sample:
        lines += ["", *sample_md(sample)]
    return [*lines, ""]


def control_md(control: dict, *, confidence: float = 0.95) -> list[str]:
    """The base model never saw the data: its AUC interval (at `confidence`) should contain
    0.5."""
    if control["ok"] is None:
        return [
            "Control: not checked: no score has an AUC interval under the **base** model "
            "(`--bootstrap 0`); rerun with `--bootstrap 1000` to test that it contains 0.5."
        ]
    if control["ok"]:
        return [
            "Control: every score's AUC interval under the **base** model (which never saw the "
            "data) contains 0.5, so members and non-members differ only by membership as far "
            "as this sample can tell."
        ]
    names = ", ".join(
        f"{name} [{fmt(lo)}, {fmt(hi)}]" for name, (lo, hi) in control["outside"].items()
    )
    return [
        f"**⚠ Control failed**: under the base model, which never saw the data, the AUC "
        f"interval of {names} excludes 0.5. Either members and non-members differ in "
        f"something other than membership (domain, length, source) or this is the "
        f"{1 - confidence:.0%} chance a {confidence:.0%} interval leaves 0.5 out for each "
        "score (more likely with several scores); attack AUCs of the other views are only "
        "meaningful relative to this control."
    ]


def sample_md(sample: dict) -> list[str]:
    """Per client: the held-out split, what was drawn, what was left out for having no scored
    token, and how well the lengths match."""
    lines = [
        "Sample per client (members matched to non-members on domain and nearest length):",
        "",
        "| client | held-out | non-members | members | unmatched | no scored token "
        "(non-members / members) | mean tokens members / non-members |",
        "|---|---|---|---|---|---|---|",
    ]
    unscored = {"non": 0, "members": 0}
    for pid, s in sample.items():
        un, um = s.get("unscored_non_members", 0), s.get("unscored_members", 0)
        unscored["non"] += un
        unscored["members"] += um
        lines.append(
            f"| {pid} | {s['held_out']} | {s['non_members']} | {s['members']} | "
            f"{s['dropped_non_members']} | {un} / {um} | {fmt(s['member_tokens_mean'], 1)} / "
            f"{fmt(s['non_member_tokens_mean'], 1)} |"
        )
    if unscored["non"] or unscored["members"]:
        lines += [
            "",
            f"**Note**: {_count(unscored['non'], 'non-member')} and "
            f"{_count(unscored['members'], 'member')} have no scored token, so every score of "
            "theirs would be NaN. They are left out of the "
            "attacks: a non-member with its matched members, a member on its own.",
        ]
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def extraction_md(extraction: dict) -> list[str]:
    """The verbatim-extraction section: exact match and ROUGE-L on members vs held-out examples,
    per view and client."""
    lines = [
        "## Verbatim extraction (greedy suffix from prompt + first response tokens)",
        "",
        "| view | client | members exact | held-out exact | members ROUGE-L | held-out ROUGE-L |",
        "|---|---|---|---|---|---|",
    ]
    for view, clients in extraction.items():
        for pid, e in clients.items():
            m, n = e["members"], e["non_members"]
            lines.append(
                f"| {view} | {pid} | {fmt(m['exact'])} | {fmt(n['exact'])} | "
                f"{fmt(m['rouge_l'])} | {fmt(n['rouge_l'])} |"
            )
    return [*lines, ""]


def plot_quality(quality: dict, tasks: dict, *, path: Path) -> None:
    """One panel per task: its headline metric per client, one bar per view."""
    import matplotlib.pyplot as plt

    clients = sorted({c for b in quality.values() for c in b["clients"]}, key=int)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), dpi=120, squeeze=False)
    width = 0.8 / max(len(quality), 1)
    for ax, (name, task) in zip(axes[0], tasks.items(), strict=True):
        m = task["metrics"][0]
        for i, (view, block) in enumerate(quality.items()):
            ys = [block["clients"].get(c, {}).get(name, {}).get(m["key"], np.nan) for c in clients]
            ax.bar(np.arange(len(clients)) + i * width, ys, width, label=view)
        ax.set_xticks(np.arange(len(clients)) + width * (len(quality) - 1) / 2)
        ax.set_xticklabels([f"client {c}" for c in clients])
        ax.set_title(f"{name}: {m['label']}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_exposure(rows: list[dict], path: Path) -> None:
    """Two panels into `path`: mean skew-normal exposure (bits) and AUC vs references, by
    canary repeats, a line per view."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    panels = (
        ("exposure_skewnormal", "exposure (bits, skew-normal)"),
        ("auc_vs_references", "AUC of the secret vs references"),
    )
    for ax, (field, label) in zip(axes, panels, strict=True):
        by_view: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            by_view[r["view"]][r["repeats"]].append(r[field])
        for view, ks in by_view.items():
            xs = sorted(ks)
            ax.plot(xs, [np.mean(ks[k]) for k in xs], marker="o", label=view)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("canary repeats k")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(rows[0]["max_rank_exposure"], ls=":", color="grey", label="log2(n + 1)")
    axes[1].axhline(0.5, ls=":", color="grey")
    axes[1].set_ylim(0, 1.02)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_mia(mia: dict, path: Path) -> None:
    """Pooled MIA ROC AUC per score, a bar per view with its interval, into `path`."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    width = 0.8 / max(len(mia), 1)
    for i, (view, block) in enumerate(mia.items()):
        ys = np.array([block["pooled"].get(s, {}).get("auc", np.nan) for s in SCORES])
        spans = [block["pooled"].get(s, {}).get("auc_interval", [np.nan] * 2) for s in SCORES]
        yerr = np.abs(np.array(spans).T - ys)  # 2 x scores; NaN (no interval) draws no bar
        ax.bar(np.arange(len(SCORES)) + i * width, ys, width, yerr=yerr, capsize=2, label=view)
    ax.axhline(0.5, ls=":", color="grey")
    ax.set_xticks(np.arange(len(SCORES)) + width * (len(mia) - 1) / 2)
    ax.set_xticklabels(SCORES)
    conf = next(
        (a["interval"] for b in mia.values() for a in b["pooled"].values() if "interval" in a), {}
    )
    interval = f", {conf['confidence']:.0%} interval" if conf else ""
    ax.set_ylabel(f"ROC AUC (pooled{interval})")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def timings_brief(timings: dict) -> str:
    """'load 3, quality 40, leakage: prepare 1, exposure 12, ...' (nested phases after a colon)."""
    parts = []
    for name, value in timings.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {v:.0f}" for k, v in value.items())
            parts.append(f"{name}: {inner}")
        else:
            parts.append(f"{name} {value:.0f}")
    return "; ".join(parts)


def finite(value: Any) -> Any:
    """`value` with NaN and ±inf floats as None: report.json is standard JSON (NaN is not)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def write_report(report: dict, out: Path) -> Path:
    """report.json, report.md and the plots, built in a folder beside `out` and swapped in: an
    interrupted eval leaves the previous report whole, never files of two runs mixed (a
    `compare` reads report.json)."""
    with building_folder(out) as tmp:
        _write_files(report, tmp)
    return out


def _write_files(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    text = json.dumps(finite(report), indent=2, default=float, allow_nan=False)
    (out / "report.json").write_text(text)
    lines = [f"# Evaluation of run `{report['run']}`", "", VIEW_NOTE, ""]
    lines += quality_md(report["quality"], report["tasks"])
    if report["tasks"]:
        plot_quality(report["quality"], report["tasks"], path=out / "quality.png")
        lines += ["![each task's headline metric per client](quality.png)", ""]
    leak = report["leakage"]
    lines += exposure_md(leak["exposure"])
    if leak["exposure"]:
        plot_exposure(leak["exposure"], out / "exposure.png")
        lines += ["![exposure vs repeats](exposure.png)", ""]
    if leak["mia"]:
        lines += mia_md(leak["mia"], sample=leak.get("sample"), control=leak.get("control"))
        plot_mia(leak["mia"], out / "mia.png")
        lines += ["![MIA AUC by score](mia.png)", ""]
    if leak["extraction"]:
        lines += extraction_md(leak["extraction"])
    lines.append(f"Evaluated in {report['seconds']:.0f} s with settings `{report['settings']}`.")
    if report.get("timings"):
        lines += ["", "Where the time went (s): " + timings_brief(report["timings"]) + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
