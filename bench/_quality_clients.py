"""Who gains at home: the quality grid's own-domain loss client by client, against local-only.

A regime's own-domain number is a token-weighted mean over clients; a hospital deciding whether
to join asks about its own split. This table gives each client's held-out loss under local-only
training and, for each method, the paired difference from it over the seeds both ran, with the
count of clients whose 95% interval lies below 0 (gains) or above it (losses).
"""

from __future__ import annotations

from collections.abc import Mapping

from _stats import MIN_SEEDS, NEGLIGIBLE, paired, t_interval, verdict

REFERENCE = "local only"


def local_reference(cells: Mapping[str, object]) -> str | None:
    """The regime's local-only label: 'local only', else its one local-only at another lr (a
    regime at a tuned lr runs local-only at its own best, `local only lr 0.001`), else None."""
    if REFERENCE in cells:
        return REFERENCE
    others = [m for m in cells if m.startswith(f"{REFERENCE} lr ")]
    return others[0] if len(others) == 1 else None


def per_client(by_seed: Mapping[int, dict]) -> dict[int, dict[int, float]]:
    """partition -> seed -> that client's final own-domain loss (rows keep it as 'clients')."""
    out: dict[int, dict[int, float]] = {}
    for seed, row in by_seed.items():
        for partition, loss in row.get("clients", {}).items():
            out.setdefault(int(partition), {})[seed] = loss
    return out


def client_table(
    cells: Mapping[str, Mapping[int, dict]], *, order: list[str], ranks: Mapping[int, int]
) -> list[str]:
    """Markdown lines: local-only's loss per client, then each method − local-only per client
    (`*`: the paired interval excludes 0) and its gains / losses count; [] without local-only."""
    reference = local_reference(cells)
    if reference is None:
        return []
    local = per_client(cells[reference])
    clients = sorted(local)
    head = [f"c{p} (r{ranks[p]})" if p in ranks else f"c{p}" for p in clients]
    lines = [
        f"Own-domain held-out loss per client (client, LoRA rank): {reference}'s, then each "
        f"method − {reference} on the same seeds (mean; `*`: the paired 95% interval excludes 0 "
        f"and is not wholly within {NEGLIGIBLE} nats of it). Gains / losses: the clients starred "
        "below / above 0; a method paired on one seed has no interval and no count (`n/a`).",
        "",
        "| method | seeds | " + " | ".join(head) + " | gains / losses |",
        "|---|---:|" + "---:|" * (len(clients) + 1),
        f"| {reference} (loss) | {len(cells[reference])} | "
        + " | ".join(f"{t_interval(local[p].values()).mean:.4f}" for p in clients)
        + " | |",
    ]
    for method in [m for m in order if m != reference]:
        mine = per_client(cells[method])
        texts, said = [], []
        for p in clients:
            d = paired(mine.get(p, {}), local[p])
            if d is None:
                texts.append("—")
                continue
            said.append(verdict(d, negligible=NEGLIGIBLE))  # better / worse: excludes 0
            texts.append(f"{d.mean:+.3f}" + ("*" if said[-1] in ("better", "worse") else ""))
        seeds = len(set(cells[method]) & set(cells[reference]))
        count = "n/a" if seeds < MIN_SEEDS else f"{said.count('better')} / {said.count('worse')}"
        lines.append(f"| {method} | {seeds} | " + " | ".join(texts) + f" | {count} |")
    return lines
