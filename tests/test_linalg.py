"""factored_svd: exactness, optimality (Eckart–Young), randomized accuracy, determinism, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm.aggregators import factored_svd, linalg, svd_factors
from fedllm.aggregators.linalg import choose_method, sketch_dtype, stack

FACTORED = ["exact", "rsvd", "dense", "auto"]


def clients(
    d: int, k: int, ranks: list[int], *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=dtype) for r in ranks]
    As = [torch.randn(r, k, generator=g, dtype=dtype) for r in ranks]
    return Bs, As


def dense(Bs: list[torch.Tensor], As: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    return sum(wi * B.double() @ A.double() for wi, B, A in zip(w, Bs, As, strict=True))


def test_diagonal_case_by_hand() -> None:
    # 1·[e1 e3][3e1ᵀ; 2e3ᵀ] + 0.5·(2e2)(e2ᵀ) = diag(3, 1, 2): σ = 3, 2, 1 on e1, e3, e2.
    Bs = [torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0], [2.0], [0.0]])]
    As = [torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]]), torch.tensor([[0.0, 1.0, 0.0]])]
    r3, r2 = math.sqrt(3.0), math.sqrt(2.0)
    for method in FACTORED:
        B, A = factored_svd(Bs, As, weights=[1.0, 0.5], rank=2, method=method)
        assert torch.allclose(B.abs(), torch.tensor([[r3, 0.0], [0.0, 0.0], [0.0, r2]]), atol=1e-6)
        assert torch.allclose(A.abs(), torch.tensor([[r3, 0.0, 0.0], [0.0, 0.0, r2]]), atol=1e-6)
        assert torch.allclose(B @ A, torch.diag(torch.tensor([3.0, 0.0, 2.0])), atol=1e-6)


@pytest.mark.parametrize("method", FACTORED)
def test_exact_when_rank_covers_the_stacked_rank(method: str) -> None:
    Bs, As = clients(30, 20, [2, 3, 4])
    w = [0.5, -1.2, 2.0]
    B, A = factored_svd(Bs, As, weights=w, rank=9, method=method)
    assert B.shape == (30, 9) and A.shape == (9, 20)
    assert torch.allclose(B @ A, dense(Bs, As, w), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["exact", "dense"])
@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("shape", [(40, 25), (10, 40), (40, 9)])  # R=12 ≤ d,k; R > d; R > k
def test_truncation_error_is_the_optimal_tail(
    method: str, rank: int, shape: tuple[int, int]
) -> None:
    Bs, As = clients(*shape, [1, 4, 7], seed=1)
    w = [0.2, 0.3, 0.5]
    M = dense(Bs, As, w)
    sigma = torch.linalg.svdvals(M)
    B, A = factored_svd(Bs, As, weights=w, rank=rank, method=method)
    error = torch.linalg.matrix_norm(M - B @ A)
    assert error.item() == pytest.approx(sigma[rank:].norm().item(), rel=1e-10)
    # Σ split evenly: ‖B[:, j]‖ = ‖A[j]‖ = √σⱼ, in decreasing order.
    root = sigma[:rank].sqrt()
    assert torch.allclose(B.norm(dim=0), root, rtol=1e-10)
    assert torch.allclose(A.norm(dim=1), root, rtol=1e-10)


def decaying(
    d: int, k: int, n_clients: int, r: int, decay: float
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Clients whose sum has singular values decay**j, the directions shuffled across clients."""
    sigma = decay ** torch.arange(n_clients * r, dtype=torch.float64)
    Bs, As = with_spectrum(d, k, n_clients, sigma)
    return Bs, As, sigma


def with_spectrum(
    d: int, k: int, n_clients: int, sigma: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Clients (equal ranks) whose sum has singular values `sigma`, directions shuffled."""
    g = torch.Generator().manual_seed(7)
    R = sigma.numel()
    left = torch.linalg.qr(torch.randn(d, R, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(k, R, generator=g, dtype=torch.float64)).Q
    cols = torch.randperm(R, generator=g).reshape(n_clients, -1)
    Bs = [(left[:, c] * sigma[c]).to(dtype) for c in cols]
    As = [right[:, c].T.to(dtype) for c in cols]
    return Bs, As


def test_rsvd_error_within_one_percent_of_optimal() -> None:
    Bs, As, sigma = decaying(300, 200, 10, 16, 0.9)
    rank = 10
    assert choose_method(160, d=300, k=200, rank=rank, oversample=8) == "rsvd"
    B, A = factored_svd(Bs, As, weights=[1.0] * 10, rank=rank, method="rsvd", power_iters=2, seed=3)
    error = torch.linalg.matrix_norm(dense(Bs, As, [1.0] * 10) - B @ A).item()
    optimal = sigma[rank:].norm().item()
    assert optimal < error < 1.01 * optimal


def test_rsvd_power_iterations_help() -> None:
    Bs, As, _ = decaying(300, 200, 10, 16, 0.97)
    M = dense(Bs, As, [1.0] * 10)
    errors = []
    for q in (0, 2):
        B, A = factored_svd(
            Bs, As, weights=[1.0] * 10, rank=10, method="rsvd", oversample=2, power_iters=q
        )
        errors.append(torch.linalg.matrix_norm(M - B @ A).item())
    assert errors[1] < errors[0]


# The float32 sketch's accuracy guard. Spectra (R = 12 clients × 16 = 192, target rank 16, default
# oversample and power iterations): fast decay 0.5ʲ (σ₁/σ_ℓ ≈ 10⁷: the sketch is ill-conditioned,
# the tail ~10⁻⁵ is still far above float32's ε·‖M‖), harmonic 1/j (the benchmark's shape), and a
# nearly flat 0.995ʲ (no gap at the cut: the case power iterations struggle with).
SPECTRA = {
    "fast-decay": 0.5 ** torch.arange(192, dtype=torch.float64),
    "harmonic": 1.0 / torch.arange(1, 193, dtype=torch.float64),
    "flat": 0.995 ** torch.arange(192, dtype=torch.float64),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_float32_rsvd_within_one_percent_of_optimal(spectrum: str, seed: int) -> None:
    Bs, As = with_spectrum(400, 300, 12, SPECTRA[spectrum], dtype=torch.float32)
    w = [0.5 + 0.1 * i for i in range(12)]
    M = dense(Bs, As, w)  # float64 from the float32 factors: the optimum they define
    optimal = torch.linalg.svdvals(M)[16:].norm().item()
    assert sketch_dtype(Bs, As, precision="auto") == torch.float32
    fast = svd_factors(Bs, As, weights=w, rank=16, method="rsvd", seed=seed, precision="float32")
    slow = svd_factors(Bs, As, weights=w, rank=16, method="rsvd", seed=seed, precision="float64")
    errors = [torch.linalg.matrix_norm(M - (L * S) @ R.T).item() for L, S, R in (fast, slow)]
    assert optimal <= errors[0] <= 1.01 * optimal
    # Both precisions start from the same Ω and match to float32 rounding: errors within
    # ε₃₂·‖M‖ (measured ≤ 0.1·ε₃₂·‖M‖), products within 10⁻⁵·‖M‖ and singular values within
    # 10⁻⁵·σ₁ (both measured < 10⁻⁶).
    norm = torch.linalg.matrix_norm(M).item()
    assert abs(errors[0] - errors[1]) <= torch.finfo(torch.float32).eps * norm
    products = [(L * S) @ R.T for L, S, R in (fast, slow)]
    assert torch.linalg.matrix_norm(products[0] - products[1]).item() <= 1e-5 * norm
    assert torch.allclose(fast[1], slow[1], rtol=0, atol=1e-5 * slow[1][0].item())
    # The default ("mixed": range finding in bf16 where native, the last half-step and the
    # projection in float32) stays within 1.01× too, its error within 0.2% of the optimum of
    # float64's (measured ≤ 0.15%, on the fast-decay spectrum; ≤ 0.001% on the others).
    L, S, R = svd_factors(Bs, As, weights=w, rank=16, method="rsvd", seed=seed)
    mixed = torch.linalg.matrix_norm(M - (L * S) @ R.T).item()
    assert optimal <= mixed <= 1.01 * optimal
    assert abs(mixed - errors[1]) <= 2e-3 * optimal


def test_float32_floor_where_the_tail_is_below_float32() -> None:
    # Decay 0.2ʲ at rank 12: the optimal tail (~4·10⁻⁹·σ₁) is below float32 rounding, so the
    # float32 sketch reaches only ~ε₃₂·‖M‖; precision="float64" still reaches the optimum.
    Bs, As = with_spectrum(200, 150, 6, 0.2 ** torch.arange(48, dtype=torch.float64))
    Bs, As = [B.float() for B in Bs], [A.float() for A in As]
    w = [1.0] * 6
    M = dense(Bs, As, w)
    optimal = torch.linalg.svdvals(M)[12:].norm().item()
    norm = torch.linalg.matrix_norm(M).item()
    eps = torch.finfo(torch.float32).eps
    errors = []
    for precision in ("float32", "mixed", "float64"):
        L, S, R = svd_factors(Bs, As, weights=w, rank=12, method="rsvd", precision=precision)
        errors.append(torch.linalg.matrix_norm(M - (L * S) @ R.T).item())
    # float32 and mixed (its float32 last half-step undoes bf16's rounding) reach the same floor
    assert all(optimal <= e <= optimal + 10 * eps * norm for e in errors[:2])
    assert errors[0] > 1.01 * optimal  # the floor is real: this is why float64 stays an option
    assert errors[2] <= 1.01 * optimal


def test_float32_rsvd_weights_signs_and_dtypes() -> None:
    # Full rank (rank ≥ Σrᵢ): the sketch covers the range, so only float32 rounding remains.
    Bs, As = clients(30, 20, [2, 3, 4], dtype=torch.float32)
    Bs[1] = Bs[1].to(torch.bfloat16)  # mixed input dtypes stay on the float32 path
    w = [0.5, -1.2, 0.0]
    L, S, R = svd_factors(Bs, As, weights=w, rank=9, method="rsvd")
    assert L.dtype == S.dtype == R.dtype == torch.float64
    M = dense(Bs, As, w)
    assert torch.allclose((L * S) @ R.T, M, rtol=0, atol=1e-5 * M.abs().max().item())
    assert torch.allclose(L.T @ L, torch.eye(9, dtype=torch.float64), atol=1e-5)


def test_stacking_on_a_helper_thread_matches_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    Bs, As = clients(40, 30, [2, 5, 3], dtype=torch.float32)
    w = [0.5, -2.0, 1.5]
    serial = stack(Bs, As, weights=w), svd_factors(Bs, As, weights=w, rank=4, method="rsvd")
    monkeypatch.setattr(linalg, "PARALLEL_STACK", 0)  # every stack now fills V on a helper thread
    threaded = stack(Bs, As, weights=w), svd_factors(Bs, As, weights=w, rank=4, method="rsvd")
    assert all(torch.equal(a, b) for a, b in zip(serial[0], threaded[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(serial[1], threaded[1], strict=True))
    U, V = threaded[0]
    assert torch.allclose(U @ V, dense(Bs, As, w), atol=1e-5)


def test_precision_rule() -> None:
    f32, f64, bf16 = (
        torch.zeros(2, 1, dtype=t) for t in (torch.float32, torch.float64, torch.bfloat16)
    )
    assert sketch_dtype([f32, bf16], [f32.T, bf16.T], precision="auto") == torch.float32
    assert sketch_dtype([f32, f64], [f32.T, f32.T], precision="auto") == torch.float64
    assert sketch_dtype([f64], [f64.T], precision="float32") == torch.float32
    assert sketch_dtype([f32], [f32.T], precision="float64") == torch.float64


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_rule(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16 range finding under "auto"/"mixed" for float32 work, only where bf16 is native
    monkeypatch.setattr(linalg, "native_bf16", lambda device: native)
    f32, f64 = torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.float64)
    fast = torch.bfloat16 if native else None
    assert linalg.sketch_dtypes([f32], [f32.T], precision="auto") == (torch.float32, fast)
    assert linalg.sketch_dtypes([f32], [f32.T], precision="mixed") == (torch.float32, fast)
    assert linalg.sketch_dtypes([f32], [f32.T], precision="float32") == (torch.float32, None)
    assert linalg.sketch_dtypes([f64], [f64.T], precision="auto") == (torch.float64, None)


def test_mixed_without_native_bf16_is_the_float32_path(monkeypatch: pytest.MonkeyPatch) -> None:
    Bs, As = with_spectrum(120, 90, 6, 0.9 ** torch.arange(48, dtype=torch.float64))
    Bs, As, w = [B.float() for B in Bs], [A.float() for A in As], [1.0] * 6
    monkeypatch.setattr(linalg, "native_bf16", lambda device: False)
    mixed = svd_factors(Bs, As, weights=w, rank=8, method="rsvd", precision="mixed")
    plain = svd_factors(Bs, As, weights=w, rank=8, method="rsvd", precision="float32")
    assert all(torch.equal(a, b) for a, b in zip(mixed, plain, strict=True))


def test_deterministic_for_a_seed() -> None:
    Bs, As, _ = decaying(120, 90, 6, 8, 0.9)
    w = [1.0] * 6
    first = factored_svd(Bs, As, weights=w, rank=5, method="rsvd", seed=11)
    again = factored_svd(Bs, As, weights=w, rank=5, method="rsvd", seed=11)
    other = factored_svd(Bs, As, weights=w, rank=5, method="rsvd", seed=12)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", FACTORED)
def test_dtype_is_preserved(dtype: torch.dtype, method: str) -> None:
    Bs, As = clients(16, 12, [2, 3], dtype=dtype)
    B, A = factored_svd(Bs, As, weights=[0.5, 0.5], rank=5, method=method)
    assert B.dtype == dtype and A.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    M = dense(Bs, As, [0.5, 0.5])
    assert torch.allclose((B.double() @ A.double()), M, rtol=0, atol=tol * M.abs().max().item())


@pytest.mark.parametrize("method", FACTORED)
def test_rank_above_attainable_is_zero_padded(method: str) -> None:
    Bs, As = clients(6, 5, [1, 1])
    B, A = factored_svd(Bs, As, weights=[1.0, 1.0], rank=4, method=method)
    assert B.shape == (6, 4) and A.shape == (4, 5)
    assert not B[:, 2:].any() and not A[2:].any()
    assert torch.allclose(B @ A, dense(Bs, As, [1.0, 1.0]), atol=1e-12)
    # Capped by min(d, k) as well: a 3×2 sum of two rank-2 products.
    Bs, As = clients(3, 2, [2, 2])
    B, A = factored_svd(Bs, As, weights=[1.0, 1.0], rank=5, method=method)
    assert B.shape == (3, 5) and A.shape == (5, 2) and not B[:, 2:].any()
    assert torch.allclose(B @ A, dense(Bs, As, [1.0, 1.0]), atol=1e-12)


def test_rank_zero_and_triplets() -> None:
    Bs, As = clients(6, 5, [2, 1])
    B, A = factored_svd(Bs, As, weights=[1.0, 1.0], rank=0)
    assert B.shape == (6, 0) and A.shape == (0, 5)
    L, S, R = svd_factors(Bs, As, weights=[1.0, 1.0], rank=10, method="exact")
    assert L.shape == (6, 3) and S.shape == (3,) and R.shape == (5, 3)
    assert torch.all(S[:-1] >= S[1:])
    assert torch.allclose(L.T @ L, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(L * S @ R.T, dense(Bs, As, [1.0, 1.0]), atol=1e-12)


def test_inputs_are_not_mutated() -> None:
    Bs, As = clients(10, 8, [2, 3])
    copies = [x.clone() for x in Bs + As]
    for method in FACTORED:
        factored_svd(Bs, As, weights=[0.3, 0.7], rank=2, method=method)
    assert all(torch.equal(x, c) for x, c in zip(Bs + As, copies, strict=True))


def test_auto_rule() -> None:
    assert choose_method(64, d=4096, k=4096, rank=8, oversample=8) == "exact"  # R = 4ℓ
    assert choose_method(65, d=4096, k=4096, rank=8, oversample=8) == "rsvd"
    assert (
        choose_method(1000, d=30, k=4096, rank=8, oversample=8) == "exact"
    )  # min(d, k) ≤ 2ℓ: no sketch saving


def test_rejects_bad_input() -> None:
    Bs, As = clients(6, 5, [2, 1])
    with pytest.raises(ValueError, match="client 1"):
        factored_svd(Bs, [As[0], torch.zeros(2, 5)], weights=[1.0, 1.0], rank=2)
    with pytest.raises(ValueError, match="method"):
        factored_svd(Bs, As, weights=[1.0, 1.0], rank=2, method="qr")
    with pytest.raises(ValueError, match="matching"):
        factored_svd(Bs, As, weights=[1.0], rank=2)
    with pytest.raises(ValueError, match="finite"):
        factored_svd(Bs, As, weights=[1.0, math.nan], rank=2)
    with pytest.raises(ValueError, match=r"precision 'half'.*float32"):
        factored_svd(Bs, As, weights=[1.0, 1.0], rank=2, precision="half")
