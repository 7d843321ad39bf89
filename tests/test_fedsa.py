"""fedsa: A averaged per row over its owners, B never aggregated (it stays on the clients)."""

from __future__ import annotations

import torch

from fedllm.aggregators import Factors, get, round_spec


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


ONE = Factors(t([[7.0], [7.0], [7.0]]), t([[1.0, 2.0]]), 16.0)  # rank 1
TWO = Factors(t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), t([[3.0, 4.0], [5.0, 6.0]]), 8.0)  # rank 2


def test_round_semantics_keeps_b_local() -> None:
    spec = round_spec("fedsa")
    assert spec.local_B and not spec.merge and not spec.freeze_A


def test_hand_computed_rank_balanced_mean_of_a() -> None:
    g = get("fedsa")([ONE, TWO], [1.0, 3.0]).global_
    # Row 0: ¼·[1, 2] + ¾·[3, 4] = [2.5, 3.5]; row 1 only client two has: [5, 6].
    assert torch.allclose(g.A, t([[2.5, 3.5], [5.0, 6.0]]))
    assert g.B.shape == (3, 2) and not g.B.any()  # the server holds no B


def test_b_does_not_influence_the_result() -> None:
    other = Factors(-TWO.B, TWO.A, TWO.scaling)
    a = get("fedsa")([ONE, TWO], [1.0, 3.0]).global_
    b = get("fedsa")([ONE, other], [1.0, 3.0]).global_
    assert torch.equal(a.A, b.A)


def test_each_client_gets_its_slice_of_a() -> None:
    g = get("fedsa")([ONE, TWO], [1.0, 3.0]).global_
    mine = g.truncate(1, 16.0)
    assert torch.allclose(mine.A, t([[2.5, 3.5]])) and mine.B.shape == (3, 1)
    padded = get("fedsa")([ONE, TWO], [1.0, 3.0], global_rank=3).global_
    assert padded.A.shape == (3, 2) and not padded.A[2].any()
