"""bench/local_tuning.py's report: pooled own-domain losses, paired over seeds, by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedllm.aggregators import Factors
from fedllm.deploy.local_grid import run_local
from fedllm.recipe import load_recipe
from fedllm.server.checkpoint import load_checkpoint

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
try:
    import local_tuning as T
finally:
    sys.path.pop(0)


def _grid_row(method: str, seed: int, own: float, clients: dict[int, float]) -> dict:
    return {
        "method": method, "regime": "domain", "seed": seed, "personal": [5.0, own],
        "test": [5.0, 4.0], "clients": {str(p): x for p, x in clients.items()},
    }  # fmt: skip


def test_report_pools_tokens_and_pairs_tuned_with_global_and_local_only() -> None:
    grid, rows = [], []
    for seed, noise in enumerate([0.0, 0.1, -0.1]):
        grid.append(_grid_row("local only", seed, 3.0 + noise, {0: 3.2 + noise, 1: 2.8 + noise}))
        grid.append(_grid_row("fedit", seed, 2.9 + noise, {0: 3.0 + noise, 1: 2.8 + noise}))
        # client 0: 10 tokens, client 1: 30; global 3.0 / 2.8 pooled (30 + 84) / 40 = 2.85;
        # tuned 2.6 / 2.7 pooled (26 + 81) / 40 = 2.675 (+ noise on both)
        clients = {
            "0": {
                "global": [10 * (3.0 + noise), 10],
                "cut": [10 * (3.1 + noise), 10],
                "tuned": [10 * (2.6 + noise), 10],
            },
            "1": {
                "global": [30 * (2.8 + noise), 30],
                "cut": [30 * (2.8 + noise), 30],
                "tuned": [30 * (2.7 + noise), 30],
            },
        }
        rows.append({"method": "fedit", "regime": "domain", "seed": seed, "clients": clients,
                     "seconds": 5.0})  # fmt: skip
    md = T.report(rows, grid_rows=grid, regimes=["domain", "scarce", "clientdp"])
    line = next(x for x in md.splitlines() if x.startswith("| fedit | "))
    # tuned − global: −0.175 on every seed; tuned − local only: 2.675 − 3.0 = −0.325
    # cut: (31 + 84) / 40 = 2.875
    assert "| 2.8500 ± 0.2484 | 2.8750 ± 0.2484 | 2.6750 ± 0.2484 | -0.1750 ± 0.0000 better" in line
    assert "| -0.3250 ± 0.0000 better | 5 |" in line
    assert "## Regime `scarce`" not in md and "clientdp" not in md  # no rows / no local-only
    tuned = next(x for x in md.splitlines() if x.startswith("| fedit +tuned | "))
    assert tuned == "| fedit +tuned | 3 | -0.600* | -0.100* | 2 / 0 |"  # vs local only per client
    plain = next(x for x in md.splitlines() if x.startswith("| fedit | 3 | -"))
    assert plain == "| fedit | 3 | -0.200* | +0.000 | 1 / 0 |"


def test_a_regime_at_a_tuned_lr_pairs_with_its_own_local_only() -> None:
    """scarce-lr runs local-only only at its own lr (`local only lr 0.001`): the tuned cells
    pair with that one, and the report names it."""
    grid, rows = [], []
    for seed, noise in zip((1, 2, 3), (0.0, 0.1, -0.1), strict=True):
        for row in (_grid_row("local only lr 0.001", seed, 3.1 + noise, {0: 3.1 + noise}),
                    _grid_row("fedit", seed, 3.0 + noise, {0: 3.0 + noise})):  # fmt: skip
            grid.append({**row, "regime": "scarce-lr"})
        clients = {"0": {k: [10 * (x + noise), 10] for k, x in
                         (("global", 3.0), ("cut", 3.0), ("tuned", 2.9))}}  # fmt: skip
        rows.append({"method": "fedit", "regime": "scarce-lr", "seed": seed, "clients": clients,
                     "seconds": 5.0})  # fmt: skip
    gentle = [{**r, "tune_lr": 0.001} for r in rows]  # the same cells tuned at another lr
    md = T.report(rows + gentle, grid_rows=grid, regimes=["scarce-lr"])
    assert "## Regime `scarce-lr` (local only: `local only lr 0.001`)" in md
    assert (
        md.count("| fedit (tuned at lr 0.001) | ") == 1
        and "| fedit (tuned at lr 0.001) +tuned |" in md
    )
    line = next(x for x in md.splitlines() if x.startswith("| fedit | "))
    assert "| -0.1000 ± 0.0000 better | -0.2000 ± 0.0000 better | 5 |" in line  # 2.9 − 3.1
    assert "| local only lr 0.001 (loss) | 3 | 3.1000 |" in md


@pytest.mark.slow  # a federation
def test_a_tuned_cell_starts_from_what_the_clients_scored_in_the_run(tmp_path: Path) -> None:
    """The global re-evaluated here scores what the run's clients reported for it (the check
    `run` makes against the grid), and tuning moves each client's loss."""
    cfg = load_recipe(
        TINY,
        [f"output_dir={tmp_path}", "name=cell", "data.num_clients=2", "data.max_examples=160",
         "lora.ranks=[2,4]", "federation.local_steps=3", "federation.rounds=1"],
    )  # fmt: skip
    run_dir, _ = run_local(cfg)
    state = load_checkpoint(run_dir)
    factors = {m: Factors(b, a, s) for m, (b, a, s) in state["strategy"]["global"].items()}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    scored = {r["partition"]: r["held_out_loss"] for r in rows if r["kind"] == "eval"}  # last
    clients = T.tune_cell(cfg, factors)
    assert sorted(clients) == [0, 1]
    for pid, c in clients.items():
        assert c["global"][0] / c["global"][1] == pytest.approx(scored[pid], abs=T.TOLERANCE)
        assert c["tuned"][1] == c["global"][1] and c["tuned"][0] != c["global"][0]
        assert c["steps"] == 3 and c["rank"] == [2, 4][pid]
        # the cut of a rank-4 global to rank 4 is the global; to rank 2 it is not
        cut = c["cut"][0] / c["cut"][1]
        assert (cut == pytest.approx(scored[pid], abs=T.TOLERANCE)) == (pid == 1)


def test_only_methods_whose_global_the_clients_use_are_tuned() -> None:
    assert T.tunable("squeeze") and T.tunable("fedit") and T.tunable("fedprox")
    # merged into the base each round, B kept on clients, a private module, no global at all
    assert not any(T.tunable(m) for m in ("flora", "fedsa", "sdflora", "local only"))
