"""bench/_quality_clients.py: each client's own-domain loss against local-only, by hand."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
try:
    import _quality_clients as C
finally:
    sys.path.pop(0)


def _cells(method_clients: dict[str, list[dict[int, float]]]) -> dict[str, dict[int, dict]]:
    """method -> seed -> a row holding only its per-client losses (keys as JSON keeps them)."""
    return {
        m: {seed: {"clients": {str(p): x for p, x in c.items()}} for seed, c in enumerate(seeds)}
        for m, seeds in method_clients.items()
    }


def test_each_client_is_paired_with_its_local_only_loss_over_the_seeds() -> None:
    cells = _cells(
        {
            "local only": [{0: 3.0, 1: 2.0}, {0: 3.2, 1: 2.1}, {0: 2.9, 1: 2.2}],
            # client 0: −0.10, −0.12, −0.08 -> mean −0.100, interval ± 4.303·0.02/√3 = ± 0.050:
            # a gain. client 1: +0.05, −0.05, +0.03: mean +0.010, holds 0: neither.
            "fedit": [{0: 2.90, 1: 2.05}, {0: 3.08, 1: 2.05}, {0: 2.82, 1: 2.23}],
            # client 0 on two seeds only: +0.20, +0.22 -> +0.210, under MIN_SEEDS: no verdict
            "squeeze": [{0: 3.20, 1: 2.0}, {0: 3.42, 1: 2.1}, {1: 2.2}],
        }
    )
    lines = C.client_table(cells, order=["squeeze", "local only", "fedit"], ranks={0: 4, 1: 8})
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| method | seeds | c0 (r4) | c1 (r8) | gains / losses |"
    assert table[2] == "| local only (loss) | 3 | 3.0333 | 2.1000 | |"
    assert table[3] == "| squeeze | 3 | +0.210 | +0.000 | 0 / 0 |"  # client 1: all zero, n = 3
    assert table[4] == "| fedit | 3 | -0.100* | +0.010 | 1 / 0 |"
    assert len(table) == 5  # local-only has no difference row of its own


def test_a_missing_client_or_reference_is_shown_not_guessed() -> None:
    cells = _cells({"local only": [{0: 3.0, 1: 2.0}], "fedit": [{0: 2.9}]})
    lines = C.client_table(cells, order=["fedit"], ranks={})
    assert "| method | seeds | c0 | c1 | gains / losses |" in lines  # no ranks known: no rank label
    assert "| fedit | 1 | -0.100 | — | n/a |" in lines  # one seed: no interval, no count
    assert (
        C.client_table(_cells({"fedit": [{0: 2.9}]}), order=["fedit"], ranks={}) == []
    )  # clientdp


def test_a_regime_at_a_tuned_lr_pairs_with_its_one_local_only_at_another_lr() -> None:
    cells = _cells({"local only lr 0.001": [{0: 3.0}], "fedit": [{0: 2.9}]})
    assert C.local_reference(cells) == "local only lr 0.001"
    lines = C.client_table(cells, order=["fedit", "local only lr 0.001"], ranks={})
    assert "| local only lr 0.001 (loss) | 1 | 3.0000 | |" in lines
    assert "| fedit | 1 | -0.100 | n/a |" in lines
    # 'local only' wins over any other lr; two other lrs and no plain one: no reference
    both = _cells({"local only": [{0: 3.0}], "local only lr 0.01": [{0: 3.5}]})
    assert C.local_reference(both) == "local only"
    two = _cells({"local only lr 0.003": [{0: 3.0}], "local only lr 0.01": [{0: 3.5}]})
    assert C.local_reference(two) is None


def test_a_difference_within_round_off_counts_as_neither_gain_nor_loss() -> None:
    # client 0: −0.0004, −0.0005, −0.0003: an interval that excludes 0 but lies within the
    # 0.001 nats of round-off (the main tables' "same"): no star, no gain
    cells = _cells(
        {
            "local only": [{0: 3.0}, {0: 3.1}, {0: 3.2}],
            "svd": [{0: 2.9996}, {0: 3.0995}, {0: 3.1997}],
        }
    )
    assert "| svd | 3 | -0.000 | 0 / 0 |" in C.client_table(cells, order=["svd"], ranks={})
