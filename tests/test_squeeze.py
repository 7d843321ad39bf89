"""squeeze: exact aggregate squeezed to a rank, optional correction, error feedback via state."""

from __future__ import annotations

import pytest
import torch

from fedllm.aggregators import Factors, get, linalg
from fedllm.aggregators import squeeze as squeeze_module
from fedllm.aggregators.squeeze import INIT_ROW_NORM


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


PLAIN = {"correction": False, "residual_rank": 0}  # the SVD squeeze without its default extras


def diagonal_round() -> list[Factors]:
    """Two clients whose mean update is diag(3, 1, 2) (weights ½, ½)."""
    one = Factors(
        t([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), t([[6.0, 0.0, 0.0], [0.0, 0.0, 4.0]]), 1.0
    )
    two = Factors(t([[0.0], [2.0], [0.0]]), t([[0.0, 1.0, 0.0]]), 1.0)
    return [one, two]


def test_default_rank_is_the_largest_client_rank() -> None:
    result = get("squeeze")(diagonal_round(), [1.0, 1.0], **PLAIN)
    assert result.global_.rank == 2 and result.state == {}
    assert torch.allclose(result.global_.delta(), torch.diag(t([[3.0, 0.0, 2.0]])[0]))


def test_matches_svd_at_the_same_rank() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = [
        Factors(torch.randn(30, r, generator=gen), torch.randn(r, 20, generator=gen), 16.0 / r)
        for r in (4, 8, 2)
    ]
    sq = get("squeeze")(updates, [1.0, 2.0, 3.0], method="exact", **PLAIN).global_
    svd = get("svd")(updates, [1.0, 2.0, 3.0], global_rank=8, method="exact").global_
    assert torch.allclose(sq.delta(), svd.delta(), atol=1e-4)


def test_error_feedback_keeps_the_tail_and_brings_it_back() -> None:
    first = get("squeeze")(diagonal_round(), [1.0, 1.0], correction=False, residual_rank=1)
    rB, rA = first.state["residual_B"], first.state["residual_A"]
    assert rB.shape == (3, 1) and rA.shape == (1, 3) and rB.dtype == torch.float64
    assert torch.allclose(rB @ rA, torch.diag(t([[0.0, 1.0, 0.0]])[0]))
    # Next round every client sends a zero update: only the carried residual remains.
    zeros = [
        Factors(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), 1.0)
    ]
    second = get("squeeze")(zeros, [1.0], state=first.state, correction=False, residual_rank=1)
    assert torch.allclose(second.global_.delta(), torch.diag(t([[0.0, 1.0, 0.0]])[0]))
    assert torch.allclose(
        second.state["residual_B"] @ second.state["residual_A"],
        torch.zeros(3, 3, dtype=torch.float64),
    )
    # Without feedback the tail is gone for good.
    assert not get("squeeze")(zeros, [1.0], **PLAIN).global_.delta().any()


def test_residual_is_capped_to_the_best_tail_approximation() -> None:
    # Mean diag(3, 1, 2) at global rank 1 leaves diag(0, 1, 2), capped to rank 1: diag(0, 0, 2).
    result = get("squeeze")(
        diagonal_round(), [1.0, 1.0], global_rank=1, correction=False, residual_rank=1
    )
    assert torch.allclose(result.global_.delta(), torch.diag(t([[3.0, 0.0, 0.0]])[0]))
    residual = result.state["residual_B"] @ result.state["residual_A"]
    assert torch.allclose(residual, torch.diag(t([[0.0, 0.0, 2.0]])[0]))


def test_correction_returns_lorafair_factors_and_their_residual() -> None:
    updates, weights = diagonal_round(), [1.0, 1.0]
    result = get("squeeze")(
        updates, weights, correction=True, lam=0.0, residual_rank=3, gauge="balanced"
    )
    fair = get("lorafair")(updates, weights, lam=0.0).global_
    assert torch.allclose(result.global_.B, fair.B) and torch.allclose(result.global_.A, fair.A)
    residual = result.state["residual_B"] @ result.state["residual_A"]
    target = torch.diag(t([[3.0, 1.0, 2.0]])[0])
    assert torch.allclose(result.global_.delta() + residual, target, atol=1e-10)


def test_state_dtype_and_validation() -> None:
    updates = [
        Factors(torch.ones(4, 2, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16), 1.0)
    ]
    result = get("squeeze")(updates, [1.0], global_rank=1, correction=False, residual_rank=2)
    assert result.global_.B.dtype == torch.bfloat16
    assert result.state["residual_B"].dtype == torch.float32
    with pytest.raises(ValueError, match="residual_A"):
        get("squeeze")(updates, [1.0], state={"residual_B": torch.zeros(4, 1)})
    with pytest.raises(ValueError, match="module"):
        bad = {"residual_B": torch.zeros(5, 1), "residual_A": torch.zeros(1, 3)}
        get("squeeze")(updates, [1.0], state=bad)


def test_defaults_are_correction_a_residual_at_the_global_rank_and_the_rows_gauge() -> None:
    # Chosen by bench/quality.py; see the module docstring.
    updates, weights = diagonal_round(), [1.0, 1.0]
    default = get("squeeze")(updates, weights)
    explicit = dict(correction=True, lam=0.01, residual_rank=2)
    rows = get("squeeze")(updates, weights, **explicit, gauge="rows", row_norm=INIT_ROW_NORM)
    balanced = get("squeeze")(updates, weights, **explicit, gauge="balanced")
    assert torch.equal(default.global_.B, rows.global_.B)
    assert torch.equal(default.global_.A, rows.global_.A)
    assert torch.allclose(default.global_.A.norm(dim=1), torch.full((2,), INIT_ROW_NORM).double())
    assert not torch.allclose(default.global_.A, balanced.global_.A)
    assert torch.allclose(default.global_.delta(), balanced.global_.delta(), atol=1e-12)
    assert default.state["residual_B"].shape == (3, 2)
    assert torch.equal(default.state["residual_A"], balanced.state["residual_A"])


def test_rows_gauge_keeps_BA_and_puts_A_rows_at_the_asked_norm() -> None:
    # Mean diag(3, 1, 2) at rank 2: balanced B = U√S, A = √S Vᵀ has A rows of norm √3 and √2;
    # the rows gauge at 1/√3 gives A rows e₁/√3, e₃/√3 and B columns 3√3·e₁, 2√3·e₃ (signs free).
    balanced = get("squeeze")(diagonal_round(), [1.0, 1.0], gauge="balanced", **PLAIN).global_
    rows = get("squeeze")(diagonal_round(), [1.0, 1.0], **PLAIN).global_  # the default gauge
    assert torch.allclose(balanced.A.norm(dim=1), t([[3**0.5, 2**0.5]])[0])
    assert torch.allclose(rows.A.abs(), t([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) / 3**0.5)
    assert torch.allclose(rows.B.abs(), t([[3.0, 0.0], [0.0, 0.0], [0.0, 2.0]]) * 3**0.5)
    assert torch.allclose(rows.delta(), torch.diag(t([[3.0, 0.0, 2.0]])[0]))
    # Each client's cut (first rⱼ components) is unchanged too: D is diagonal.
    assert torch.allclose(rows.truncate(1, 0.5).delta(), balanced.truncate(1, 0.5).delta())
    custom = get("squeeze")(diagonal_round(), [1.0, 1.0], gauge="rows", row_norm=2.0, **PLAIN)
    assert torch.allclose(custom.global_.A.norm(dim=1), t([[2.0, 2.0]])[0])


def test_rows_gauge_with_correction_and_zero_rows() -> None:
    updates, weights = diagonal_round(), [1.0, 1.0]
    plain = get("squeeze")(updates, weights, global_rank=4, residual_rank=0, gauge="balanced")
    rows = get("squeeze")(
        updates, weights, global_rank=4, residual_rank=0, gauge="rows", row_norm=0.5
    )
    assert torch.allclose(rows.global_.delta(), plain.global_.delta(), atol=1e-12)
    # Ā has rows 0, 1 (both clients' A rows) and zero padding beyond: padding stays zero.
    assert torch.allclose(rows.global_.A.norm(dim=1), t([[0.5, 0.5, 0.0, 0.0]])[0])
    assert not rows.global_.B[:, 2:].any()


def test_init_row_norm_is_peft_initial_A_row_norm() -> None:
    A = torch.empty(64, 2048)
    torch.nn.init.kaiming_uniform_(A, a=5**0.5, generator=torch.Generator().manual_seed(0))
    assert A.norm(dim=1).mean().item() == pytest.approx(INIT_ROW_NORM, rel=0.01)


def test_gauge_options_are_checked() -> None:
    with pytest.raises(ValueError, match="gauge must be one of \\['balanced', 'rows'\\]"):
        get("squeeze")(diagonal_round(), [1.0, 1.0], gauge="init")
    with pytest.raises(ValueError, match="row_norm"):
        get("squeeze")(diagonal_round(), [1.0, 1.0], gauge="rows", row_norm=0.0)


def random_round(dtype: torch.dtype) -> list[Factors]:
    """Five clients (ranks 2–12) on a 60×50 module, α = 16."""
    gen = torch.Generator().manual_seed(3)
    return [
        Factors(
            torch.randn(60, r, generator=gen).to(dtype),
            torch.randn(r, 50, generator=gen).to(dtype) / 7,
            16.0 / r,
        )
        for r in (2, 4, 8, 12, 6)
    ]


@pytest.mark.parametrize("correction", [False, True])
def test_sketch_precision_follows_the_clients(
    correction: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float32 clients sketch in float32 ("mixed": bf16 range finding where native, off here so
    # the comparison is float32's) even though the correction term is float64; float64 clients
    # in float64. Both give the same aggregate and residual to float32 rounding.
    monkeypatch.setattr(linalg, "native_bf16", lambda device: False)
    seen: list[str] = []
    real = squeeze_module.svd_factors

    def spy(*args: object, precision: str, **kwargs: object) -> object:
        seen.append(precision)
        return real(*args, precision=precision, **kwargs)

    monkeypatch.setattr(squeeze_module, "svd_factors", spy)
    options = {"method": "rsvd", "global_rank": 4, "residual_rank": 4, "correction": correction}
    weights = [1.0, 2.0, 3.0, 1.0, 2.0]
    low = get("squeeze")(random_round(torch.float32), weights, **options)
    assert seen == ["mixed"]
    high = get("squeeze")(random_round(torch.float64), weights, **options)
    assert seen == ["mixed", "float64"]
    assert low.global_.B.dtype == torch.float32 and low.state["residual_B"].dtype == torch.float32
    for a, b in [
        (low.global_.delta(), high.global_.delta()),
        (
            low.state["residual_B"].double() @ low.state["residual_A"].double(),
            high.state["residual_B"] @ high.state["residual_A"],
        ),
    ]:
        assert torch.linalg.matrix_norm(a - b) <= 1e-5 * torch.linalg.matrix_norm(b)


def test_one_update_is_returned_as_it_is_with_correction_and_no_residual() -> None:
    """Client-level DP hands squeeze one update (the noised factor mean): LoRA-FAIR's correction
    of a one-client mean is zero and nothing is missed, so the balanced gauge returns the update's
    own factors (at scaling 1) and the residual kept is zero; rows only re-gauges them."""
    torch.manual_seed(3)
    u = Factors(torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), 0.5)
    out = get("squeeze")([u], [1.0], gauge="balanced")
    assert torch.allclose(out.global_.B, 0.5 * u.B) and torch.allclose(out.global_.A, u.A)
    residual = out.state["residual_B"] @ out.state["residual_A"]
    assert residual.abs().max() < 1e-10
    rows = get("squeeze")([u], [1.0]).global_
    assert torch.allclose(rows.B @ rows.A, 0.5 * u.B @ u.A)
    assert torch.allclose(rows.A.norm(dim=1), torch.full((3,), INIT_ROW_NORM, dtype=torch.float64))
