"""Aggregation of heterogeneous-rank LoRA factors: pure tensor methods behind a name registry."""

from . import (  # noqa: F401  (they register)
    fedit,
    fedsa,
    ffa,
    flexlora,
    flora,
    hetlora,
    lorafair,
    rblora,
    squeeze,
    svd,
)
from .base import (
    Aggregate,
    AggregatorFn,
    Factors,
    RoundSpec,
    available,
    get,
    register,
    round_spec,
)
from .linalg import factored_svd, svd_factors

__all__ = [
    "Aggregate",
    "AggregatorFn",
    "Factors",
    "RoundSpec",
    "available",
    "factored_svd",
    "get",
    "register",
    "round_spec",
    "svd_factors",
]
