"""Truncated SVD of a weighted sum of low-rank products Σ wᵢ·Bᵢ@Aᵢ, computed from the factors.

Only the "dense" baseline forms the d×k matrix; "exact" and "rsvd" touch thin factors only
(see design/aggregation.md). "exact" and "dense" work in float64. "rsvd" runs its big products (the
sketch and the projections, linear in d·Σrᵢ) in float32 unless an input is float64 (`precision`),
and its small core SVD in float64; triplets come back in float64, factors in the inputs' dtype.
By default ("mixed") its range finding runs in bf16 where the device multiplies bf16 natively:
only the last half-step and the projection need float32 (see `_rsvd`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, get_args

import torch

SvdMethod = Literal["auto", "exact", "rsvd", "dense"]
METHODS = get_args(SvdMethod)
PRECISIONS = ("auto", "mixed", "float32", "float64")


def factored_svd(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    rank: int,
    method: str = "auto",
    oversample: int = 16,
    power_iters: int = 2,
    seed: int = 0,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (B d×rank, A rank×k) of Σ weights[i]·Bs[i]@As[i], weights as given.

    Singular values are split evenly (B = L·Σ^½, A = Σ^½·Rᵀ) in decreasing order, so the first r
    columns/rows are the best rank-r approximation; unattainable rank is zero-padded.
    """
    L, S, R = svd_factors(
        Bs,
        As,
        weights=weights,
        rank=rank,
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        seed=seed,
        precision=precision,
    )
    B, A = split_triplets((L, S, R), rank=rank)
    dtype = Bs[0].dtype
    return B.to(dtype), A.to(dtype)


def numerical_rank(S: torch.Tensor, dtype: torch.dtype) -> int:
    """How many of the decreasing singular values `S` of a sum of factors held in `dtype` are
    above S₁·ε (at least 1). The directions that are exactly zero (a zero factor, a repeated
    update, a pruned round's fill) come out of every method at ≤ 1e-8·S₁ (≤ 2e-13 for zero
    inputs, rsvd with or without bf16, up to 4096×11008); numpy's S₁·max(d, k)·ε would also cut
    real components of wide modules (h102: 12 of 60 at 4096×11008, 0.27% of ΔW), and more once
    a screened-in update at 100× the median norm raises S₁."""
    if S.numel() == 0:
        return 0
    return max(1, int((S > S[0].item() * torch.finfo(dtype).eps).sum()))


def split_triplets(
    triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (L·Σ^½, Σ^½·Rᵀ) of L·diag(S)·Rᵀ, `triplets` = (L, S, R) as `svd_factors`
    returns them, zero-padded to `rank` (≥ len(S)) components."""
    L, S, R = triplets
    m = S.shape[0]
    if rank < m:
        raise ValueError(f"cannot fit {m} triplets into rank {rank}")
    root = S.sqrt()
    B = L.new_zeros(L.shape[0], rank)
    A = L.new_zeros(rank, R.shape[0])
    B[:, :m] = L * root
    A[:m] = root[:, None] * R.T
    return B, A


def svd_factors(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    rank: int,
    method: str = "auto",
    oversample: int = 16,
    power_iters: int = 2,
    seed: int = 0,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triplets (L d×m, S m, R k×m; float64) of Σ wᵢBᵢAᵢ ≈ L·diag(S)·Rᵀ.

    m = min(rank, Σrᵢ, d, k), S is decreasing. Triplets past the numerical rank may be arbitrary
    directions with (near-)zero singular values. `precision` is the dtype of rsvd's big products:
    "auto" is float64 if any input is float64, else "mixed" (float32, with the range finding in
    bf16 where the device has it natively: `sketch_dtypes`). Oversample 16:
    at 8, rsvd's error on the benchmark's 100-client 4096² modules was 1.012–1.014× the optimal
    truncation error; at 16 it is ≈ 1.007× (≤ 1.0071 over 6 draws) for ~2 % more time.
    """
    _check(
        Bs,
        As,
        weights=weights,
        rank=rank,
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        precision=precision,
    )
    d, k = Bs[0].shape[0], As[0].shape[1]
    total = sum(B.shape[1] for B in Bs)
    m = min(rank, total, d, k)
    if m == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=Bs[0].device)
        return empty.new_zeros(d, 0), empty, empty.new_zeros(k, 0)
    chosen = (
        choose_method(total, d=d, k=k, rank=rank, oversample=oversample)
        if method == "auto"
        else method
    )
    if chosen == "rsvd":
        dtype, fast = sketch_dtypes(Bs, As, precision=precision)
        width = min(rank + oversample, d, k)
        L, S, Rt = _rsvd(
            Bs,
            As,
            weights=weights,
            width=width,
            power_iters=power_iters,
            seed=seed,
            dtype=dtype,
            fast=fast,
        )
        return L[:, :m], S[:m], Rt[:m].T
    U, V = stack(Bs, As, weights=weights)
    if chosen == "dense":
        L, S, Rt = torch.linalg.svd(U @ V, full_matrices=False)
    else:
        L, S, Rt = _exact(U, V)
    return L[:, :m], S[:m], Rt[:m].T


def sketch_dtype(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], *, precision: str
) -> torch.dtype:
    """The dtype of rsvd's accurate products: float32, or float64 when asked or when an input is.

    Float32, bf16 and fp16 factors hold no more than float32 carries, and the result goes back to
    their dtype; float64 inputs ask for float64. Float32 cannot resolve a tail below ~ε₃₂·‖ΣwBA‖:
    `precision="float64"` is the way to the optimum there (tests/test_linalg.py shows both).
    """
    if precision == "float64" or (
        precision == "auto" and any(x.dtype == torch.float64 for x in [*Bs, *As])
    ):
        return torch.float64
    return torch.float32


def sketch_dtypes(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], *, precision: str
) -> tuple[torch.dtype, torch.dtype | None]:
    """(`sketch_dtype`, the range finding's dtype: bf16 under "mixed" where native, else None)."""
    dtype = sketch_dtype(Bs, As, precision=precision)
    mixed = precision == "mixed" or (precision == "auto" and dtype == torch.float32)
    return dtype, torch.bfloat16 if mixed and native_bf16(Bs[0].device) else None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively (CUDA with bf16, a CPU with AVX512-BF16/AMX):
    elsewhere bf16 products are emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def stack(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], *, weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ wᵢBᵢAᵢ = U@V with U = [w₁B₁|…] (d×R) and V = [A₁;…] (R×k), in float64 (FLoRA stacking)."""
    return _stacked(Bs, As, dtype=torch.float64, weights=[float(w) for w in weights])


def choose_method(total_rank: int, *, d: int, k: int, rank: int, oversample: int) -> str:
    """The "auto" rule: "exact" while R ≤ 4ℓ (ℓ = rank+oversample) or min(d, k) ≤ 2ℓ, else "rsvd".

    Exact costs ~2(d+k)R² + O(R³), rsvd ~(2q+2)(d+k)Rℓ. At d=k=4096 (one core's CPU time) the
    float32 sketch (ℓ = 80) already wins at R = 248, taking 0.6× exact's time: below 4ℓ exactness
    is still worth at most ~2× the time, so the rule keeps it there.
    """
    sketch = rank + oversample
    if total_rank <= 4 * sketch or min(d, k) <= 2 * sketch:
        return "exact"
    return "rsvd"


def _exact(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of U@V via thin QRs of U and Vᵀ and an SVD of the small core R_U R_Vᵀ.

    When R exceeds d (or k), only that side is orthogonalised and the rotated product (d×k, smaller
    than the stacked factor) is decomposed: QR of the R-wide side would cost O(kR²) for nothing.
    """
    d, R = U.shape
    k = V.shape[1]
    if R <= min(d, k):
        Qu, Ru = torch.linalg.qr(U)
        Qv, Rv = torch.linalg.qr(V.T)
        X, S, Yt = torch.linalg.svd(Ru @ Rv.T, full_matrices=False)
        return Qu @ X, S, Yt @ Qv.T
    if d <= k:
        Qu, Ru = torch.linalg.qr(U)
        X, S, Wt = torch.linalg.svd(Ru @ V, full_matrices=False)
        return Qu @ X, S, Wt
    Qv, Rv = torch.linalg.qr(V.T)
    L, S, Yt = torch.linalg.svd(U @ Rv.T, full_matrices=False)
    return L, S, Yt @ Qv.T


def _rsvd(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    width: int,
    power_iters: int,
    seed: int,
    dtype: torch.dtype,
    fast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko–Martinsson–Tropp randomized SVD of x ↦ U·diag(w)·(V x), never forming U@V.

    U = [B₁|…] and V = [A₁;…] are stacked once in `dtype` without the weights; w (one entry per
    stacked column) scales the thin R×width products instead, which saves a pass over U. Each
    product with U or V is one GEMM in `dtype`. The tall d×width and k×width blocks are
    orthonormalised by Householder QR in `dtype` too: it is backward stable, so it keeps what the
    products computed (float64 QR measured no better). Only the width×width core goes to float64.
    Ω is drawn in float32 whatever `dtype`, so the two precisions start from the same sketch.

    With `fast` (bf16), the range finding up to the last power iteration's Z runs on bf16 copies
    of U and V (≈ 3× float32's GEMM speed on an AVX512-BF16 core). Its rounding only perturbs the
    subspace, a second-order effect on the error; the last half-step Q = orth(M Z) and the
    projection QᵀM run in `dtype`, which also removes what bf16 could not resolve where M is
    nearly low-rank (measured: docs/aggregators.md, bench/results/aggregate*.md).
    """
    U, V, w = _stack_unweighted(Bs, As, weights=weights, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(V.shape[1], width, generator=generator, dtype=torch.float32)
    low = fast or dtype  # the range finding's dtype; the last half-step's is `dtype`
    Ul, Vl, wl = (U, V, w) if low == dtype else (U.to(low), V.to(low), w.to(low))

    def half_step(X: torch.Tensor, last: bool) -> torch.Tensor:  # orth(M·X)
        if last:
            return _orth(U @ ((V @ X.to(dtype)) * w))
        return _orth(Ul @ ((Vl @ X.to(low)) * wl), low)

    Q = half_step(omega.to(V.device), power_iters == 0)
    for i in range(power_iters):
        Z = _orth(Vl.T @ ((Ul.T @ Q) * wl), dtype)
        Q = half_step(Z, i == power_iters - 1)
    Qw, Rw = torch.linalg.qr(V.T @ ((U.T @ Q) * w))  # (U diag(w) V)ᵀ Q = Qw Rw, k×width
    X, S, Yt = torch.linalg.svd(Rw.double().T)  # Qᵀ U diag(w) V = (X S Yᵀ) Qwᵀ
    # Rotating the `dtype` bases is a `dtype` product too: float64 here would add only cost.
    return (Q @ X.to(dtype)).double(), S, (Yt.to(dtype) @ Qw.T).double()


def _stack_unweighted(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U = [B₁|…] (d×R), V = [A₁;…] (R×k) in `dtype`, and w (R×1): wᵢ repeated rᵢ times."""
    U, V = _stacked(Bs, As, dtype=dtype, weights=None)
    ranks = torch.tensor([B.shape[1] for B in Bs], device=U.device)
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=U.device)
    return U, V, w.repeat_interleave(ranks)[:, None]


PARALLEL_STACK = 1 << 22  # elements of U and V above which V is filled on a second thread


def _stacked(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype,
    weights: list[float] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[w₁B₁|…] (d×R; unweighted if `weights` is None) and [A₁;…] (R×k), written in place.

    Filling fresh memory is mostly page faults and runs on one core, so for large stacks V is
    filled by a helper thread while this one fills U (the copies release the GIL).
    """
    ranks = [B.shape[1] for B in Bs]
    device = Bs[0].device
    U = torch.empty(Bs[0].shape[0], sum(ranks), dtype=dtype, device=device)
    V = torch.empty(sum(ranks), As[0].shape[1], dtype=dtype, device=device)
    bounds = list(itertools.accumulate(ranks, initial=0))

    def fill_u() -> None:
        for i, B in enumerate(Bs):
            block = U[:, bounds[i] : bounds[i + 1]].copy_(B)  # no per-client temporaries
            if weights is not None:
                block.mul_(weights[i])

    def fill_v() -> None:
        for i, A in enumerate(As):
            V[bounds[i] : bounds[i + 1]].copy_(A)

    if U.numel() + V.numel() < PARALLEL_STACK:
        fill_u()
        fill_v()
        return U, V
    with ThreadPoolExecutor(max_workers=1) as helper:
        pending = helper.submit(fill_v)
        fill_u()
        pending.result()
    return U, V


def _orth(Y: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An orthonormal basis of Y's columns (QR in at least float32), in `dtype` (Y's if None)."""
    Q = torch.linalg.qr(Y if Y.dtype in (torch.float32, torch.float64) else Y.float()).Q
    return Q.to(dtype or Y.dtype)


def _check(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    rank: int,
    method: str,
    oversample: int,
    power_iters: int,
    precision: str,
) -> None:
    if not (len(Bs) == len(As) == len(weights)) or len(Bs) == 0:
        raise ValueError(
            f"need matching non-empty Bs, As, weights; got {len(Bs)}, {len(As)}, {len(weights)}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    if not all(math.isfinite(float(w)) for w in weights):
        raise ValueError(f"weights must be finite, got {list(weights)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(
            f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}"
        )
    d, k = Bs[0].shape[0], As[0].shape[-1]
    for i, (B, A) in enumerate(zip(Bs, As, strict=True)):
        fits = B.ndim == 2 and A.ndim == 2 and B.shape[1] == A.shape[0]
        if not fits or (B.shape[0], A.shape[1]) != (d, k):
            raise ValueError(
                f"client {i}: B {tuple(B.shape)} and A {tuple(A.shape)} do not form a {d}×{k} "
                "product of matching rank"
            )
