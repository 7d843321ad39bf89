"""Server-side screening of client updates before aggregation.

A reply with NaN/Inf, a module the global adapter does not have (or lacks one), a wrong shape, a
rank above the allowed one, an update beyond float32's range, or an update norm far outside the
others is rejected with a reason; the round aggregates the rest. Inputs are never modified.

The float32 bound is absolute, so it holds with one or two clients, where there is no median to
compare with: a module's ΔW = s·B·A must have ‖ΔW‖_F ≤ the largest float32 (then every entry of
it, and of any weighted mean of such updates, is a float32), and every entry of s·B (the factor
the aggregators fold the scaling into: their global is at scaling 1) and of A must be at most
`FACTOR_MAX` = 1e15, so that no float32 product of two factors overflows however lopsided they
are. Real updates are over ten orders of magnitude below both. A finite update under the
bounds can still be far too large: only the relative screening (three clients or more) refuses
that.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping

import torch

from fedllm.aggregators.base import Factors

FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # ≈ 3.4e38
# the largest entry of s·B or of A: a product of two such entries, summed over a module's
# dimensions, stays a float32 (real factors are below 1e3; h105: B = 0 with A ≈ 1e37 passed the
# norm bound and overflowed a randomized SVD's float32 products, raising every round)
FACTOR_MAX = 1e15


def update_norm(f: Factors) -> float:
    """‖s·B·A‖_F from the factors alone: s²·trace((BᵀB)(AAᵀ)), never forming d×k."""
    b, a = f.B.double(), f.A.double()
    gram = (b.T @ b) * (a @ a.T)
    return float(abs(f.scaling) * gram.sum().clamp_min(0).sqrt())


def check_update(
    update: Mapping[str, Factors],
    *,
    shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
) -> str | None:
    """The reason this client's update is malformed, or None if it is well-formed."""
    missing = sorted(set(shapes) - set(update))
    extra = sorted(set(update) - set(shapes))
    if missing:
        return f"missing modules {missing[:3]}{' …' if len(missing) > 3 else ''}"
    if extra:
        return f"unknown modules {extra[:3]}{' …' if len(extra) > 3 else ''}"
    for module, f in update.items():
        if f.shape != tuple(shapes[module]):
            return f"{module}: update shape {f.shape}, expected {tuple(shapes[module])}"
        if f.rank > max_rank:
            return f"{module}: rank {f.rank} above the allowed {max_rank}"
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
            return f"{module}: NaN or Inf in the factors"
        if (why := float32_overflow(f)) is not None:
            return f"{module}: {why}"
    return None


def float32_overflow(f: Factors) -> str | None:
    """Why this (finite) update does not fit float32 once scaled, or None: ‖s·B·A‖_F above the
    largest float32, or an entry of s·B or A above `FACTOR_MAX`, so that the aggregators' float32
    products of factors cannot overflow (computed in float64, so nothing overflows here)."""
    folded = abs(f.scaling) * float(f.B.double().abs().max()) if f.B.numel() else 0.0
    if folded > FACTOR_MAX:
        return f"s·B reaches {folded:.3g}, beyond the factors' bound {FACTOR_MAX:g}"
    entry = float(f.A.double().abs().max()) if f.A.numel() else 0.0
    if entry > FACTOR_MAX:
        return f"A reaches {entry:.3g}, beyond the factors' bound {FACTOR_MAX:g}"
    norm = update_norm(f)
    if norm > FLOAT32_MAX:
        return f"update norm ‖s·B·A‖ = {norm:.3g}, beyond float32 (max {FLOAT32_MAX:.3g})"
    return None


def screen(
    updates: Mapping[str, Mapping[str, Factors]],
    *,
    shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    max_norm_ratio: float = 100.0,
    quote_median: bool = True,
) -> tuple[list[str], dict[str, str]]:
    """Split clients into accepted ones and rejected ones (client -> reason).

    Norm outliers: a client whose total update norm ‖s·B·A‖, or whose factors' norms ‖s·B‖ or
    ‖A‖/√r, exceed `max_norm_ratio` times the median of the well-formed clients' (needs at least
    three clients to have a median worth trusting). The factors are screened apart because a
    factor-wise aggregator averages them apart: B·c with A/c is an honest ΔW and a ruinous mean.
    The median is another client's norm: a private run's reasons leave it out (`quote_median`).
    """
    rejected: dict[str, str] = {}
    measures: dict[str, dict[str, float]] = {"update norm": {}, "‖s·B‖": {}, "‖A‖/√r": {}}
    for client, update in updates.items():
        reason = check_update(update, shapes=shapes, max_rank=max_rank)
        if reason is not None:
            rejected[client] = reason
            continue
        measures["update norm"][client] = _total(update_norm(f) for f in update.values())
        measures["‖s·B‖"][client] = _total(abs(f.scaling) * _fro(f.B) for f in update.values())
        # A's rows start at one norm (a fresh init, or the global's rows), so ‖A‖ grows as √r:
        # per rank, an honest rank-64 client is not an outlier among rank-4 ones
        measures["‖A‖/√r"][client] = _total(
            _fro(f.A) / max(f.rank, 1) ** 0.5 for f in update.values()
        )
    for what, norms in measures.items():  # ΔW, then each factor: a factor-wise mean (fedit)
        if len(norms) < 3:  # takes B·c and A/c apart, though their product is an honest ΔW
            break
        median = statistics.median(norms.values())
        for client, norm in norms.items():
            if client not in rejected and median > 0 and norm > max_norm_ratio * median:
                of = f"the median {median:.3g}" if quote_median else "the round's median"
                rejected[client] = f"{what} {norm:.3g} is over {max_norm_ratio:g}× {of}"
    accepted = [c for c in updates if c not in rejected]
    return accepted, rejected


def _fro(t: torch.Tensor) -> float:
    return float(t.double().norm()) if t.numel() else 0.0


def _total(norms: Iterable[float]) -> float:
    """The norm of the concatenation, from each part's norm."""
    return sum(n * n for n in norms) ** 0.5


def aggregate_problem(
    global_: Mapping[str, Factors],
    state: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
) -> str | None:
    """Why an aggregate must not become the global adapter, or None: NaN or Inf in its factors
    or in the aggregator's state for the next round, or a module's ΔW beyond float32's range
    (screening bounds each update, but a factor-wise aggregator's intermediates may still
    overflow: no bound on two factors bounds what they are folded into)."""
    for module, f in sorted(global_.items()):
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
            return f"{module}: NaN or Inf in the aggregate"
        if (norm := update_norm(f)) > FLOAT32_MAX:
            return f"{module}: aggregate norm ‖s·B·A‖ = {norm:.3g}, beyond float32"
    for module, tensors in sorted((state or {}).items()):
        for key, t in sorted((tensors or {}).items()):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.isfinite().all():
                return f"{module}: NaN or Inf in the aggregator's state {key!r}"
    return None
