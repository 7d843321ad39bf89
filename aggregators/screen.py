"""Server-side screening of client updates before aggregation.

A reply with NaN/Inf, a module the global adapter does not have (or lacks one), a wrong shape, a
rank above the allowed one, or an update norm far outside the others is rejected with a reason;
the round aggregates the rest. Inputs are never modified.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import torch

from fedllm.aggregators.base import Factors


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
    return None


def screen(
    updates: Mapping[str, Mapping[str, Factors]],
    *,
    shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    max_norm_ratio: float = 100.0,
) -> tuple[list[str], dict[str, str]]:
    """Split clients into accepted ones and rejected ones (client -> reason).

    Norm outliers: a client whose total update norm exceeds `max_norm_ratio` times the median of
    the well-formed clients' norms (needs at least three clients to have a median worth trusting).
    """
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for client, update in updates.items():
        reason = check_update(update, shapes=shapes, max_rank=max_rank)
        if reason is not None:
            rejected[client] = reason
        else:
            norms[client] = sum(update_norm(f) ** 2 for f in update.values()) ** 0.5
    if len(norms) >= 3:
        median = statistics.median(norms.values())
        for client, norm in norms.items():
            if median > 0 and norm > max_norm_ratio * median:
                rejected[client] = (
                    f"update norm {norm:.3g} is over {max_norm_ratio:g}× the median {median:.3g}"
                )
    accepted = [c for c in updates if c not in rejected]
    return accepted, rejected
