"""LoRA factors, aggregation results, round semantics and the helpers methods share.

Every method is a pure function of one module's client factors (`AggregatorFn`); it never
mutates its inputs. The registry that finds methods by name is `registry.py`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import torch
from pydantic import Field

# Types for a method's keyword options: `registry.check_options` checks a recipe's values against
# a method's annotations when the recipe loads, before any client trains (a `Literal[...]` lists
# the allowed words); an option without annotation is checked against its default's type only.
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


@dataclass(frozen=True)
class Factors:
    """One LoRA update ΔW = scaling·B@A; B (d×r) and A (r×k) are laid out as peft's lora_B/A."""

    B: torch.Tensor
    A: torch.Tensor
    scaling: float

    def __post_init__(self) -> None:
        B, A = self.B, self.A
        if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
            raise TypeError(f"B and A must be tensors, got {type(B).__name__}, {type(A).__name__}")
        if B.ndim != 2 or A.ndim != 2:
            raise ValueError(f"B and A must be 2-D, got B {tuple(B.shape)} and A {tuple(A.shape)}")
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"rank mismatch: B {tuple(B.shape)} has {B.shape[1]} columns "
                f"but A {tuple(A.shape)} has {A.shape[0]} rows"
            )
        if not (B.is_floating_point() and A.is_floating_point()) or B.dtype != A.dtype:
            raise ValueError(f"B and A must share one floating dtype, got {B.dtype} and {A.dtype}")
        _check_scaling(self.scaling)

    @property
    def rank(self) -> int:
        """The LoRA rank r (columns of B, rows of A)."""
        return self.B.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape (d, k) of the update ΔW."""
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """The dense d×k update scaling·B@A in float64: for tests and the dense baseline only."""
        return self.scaling * (self.B.double() @ self.A.double())

    def pad(self, rank: int) -> Factors:
        """Zero-pad to `rank` (≥ self.rank) columns of B and rows of A; ΔW is unchanged."""
        _check_rank(rank)
        if rank < self.rank:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}; use truncate")
        extra = rank - self.rank
        B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], extra)], dim=1)
        A = torch.cat([self.A, self.A.new_zeros(extra, self.A.shape[1])], dim=0)
        return Factors(B, A, self.scaling)

    def truncate(self, rank: int, scaling: float | None = None) -> Factors:
        """Keep the first `rank` components under a new scaling (default: the same).

        B is rescaled by self.scaling/scaling so the kept part's ΔW is unchanged; rank > self.rank
        zero-pads. On SVD-ordered factors this is the best rank-`rank` approximation.
        """
        _check_rank(rank)
        scaling = self.scaling if scaling is None else _check_scaling(scaling)
        kept = min(rank, self.rank)
        head = Factors(self.B[:, :kept] * (self.scaling / scaling), self.A[:kept], scaling)
        return head.pad(rank)


@dataclass(frozen=True)
class Aggregate:
    """The server's result for one module: global factors, plus state for the next round."""

    global_: Factors
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class AggregatorFn(Protocol):
    """Signature shared by every registered method (one adapted module per call)."""

    def __call__(
        self,
        updates: Sequence[Factors],
        weights: Sequence[float],
        *,
        global_rank: int | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        **options: Any,
    ) -> Aggregate: ...


@dataclass(frozen=True)
class RoundSpec:
    """How a method's global state travels each round; the Flower strategy and client read it.

    Default (all False) is adapter state: clients start from the global factors cut to their rank
    and send back their whole adapter.
    """

    merge: bool = False  # global_ is a delta merged into the base; clients start a fresh LoRA
    freeze_A: bool = False  # clients train B only; A stays as the server sent it (shared seed)
    local_B: bool = False  # clients keep B across rounds and exchange A only
    # aggregator.options read by clients (sent in the round config), never by the aggregation
    client_options: tuple[str, ...] = ()
    # the value a client applies to each client option the recipe leaves unset (what a run's
    # settings record shows; an option missing here reads None there)
    client_defaults: Mapping[str, Any] = field(default_factory=dict, compare=False)


ADAPTER_STATE = RoundSpec()


def normalized_weights(updates: Sequence[Factors], weights: Sequence[float]) -> list[float]:
    """Check one round's updates agree on (d, k) and return the weights scaled to sum to 1."""
    if len(updates) == 0:
        raise ValueError("no updates to aggregate")
    if len(weights) != len(updates):
        raise ValueError(f"got {len(updates)} updates but {len(weights)} weights")
    shapes = {u.shape for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"updates disagree on the module shape (d, k): {sorted(shapes)}")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {values}")
    return [w / total for w in values]


def padded_mean(
    updates: Sequence[Factors], p: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σpᵢsᵢ·pad(Bᵢ), Σpᵢ·pad(Aᵢ)) in float64, padded to the largest rank; p used as given."""
    width = max(u.rank for u in updates)
    (d, k), device = updates[0].shape, updates[0].B.device
    B = torch.zeros(d, width, dtype=torch.float64, device=device)
    A = torch.zeros(width, k, dtype=torch.float64, device=device)
    for pi, u in zip(p, updates, strict=True):
        B[:, : u.rank].add_(u.B, alpha=pi * u.scaling)  # accumulates into our own buffers only
        A[: u.rank].add_(u.A, alpha=pi)
    return B, A


def reject_options(method: str, options: Mapping[str, Any]) -> None:
    """Raise TypeError naming options a method does not take (so a typo is not silently ignored)."""
    if options:
        raise TypeError(f"aggregator {method!r} got unexpected options: {sorted(options)}")


def carried_factors(
    state: Mapping[str, torch.Tensor] | None,
    shape: tuple[int, int],
    *,
    keys: tuple[str, str],
    method: str,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (B d×c, A c×k) pair a stateful method carries across rounds under `keys`, checked
    against the module `shape`; None if `state` is empty (the first round)."""
    if not state:
        return None
    if set(state) != set(keys):
        raise ValueError(f"{method} state needs exactly keys {keys}, got {sorted(state)}")
    B, A = state[keys[0]], state[keys[1]]
    Factors(B, A, 1.0)  # validates 2-D, matching rank and dtype
    if (B.shape[0], A.shape[1]) != shape:
        raise ValueError(f"{what} is {B.shape[0]}×{A.shape[1]} but the module is {shape}")
    return B, A


def _check_scaling(scaling: float) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise ValueError(f"scaling must be a real number, got {scaling!r}")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be finite and > 0, got {scaling!r}")
    return scaling


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
