"""Aggregation of heterogeneous-rank LoRA factors: pure tensor methods behind a name registry."""

from . import fedit, ffa, hetlora, lorafair, rblora, squeeze, svd  # noqa: F401  (they register)
from .base import Aggregate, AggregatorFn, Factors, available, get, register
from .linalg import factored_svd, svd_factors

__all__ = [
    "Aggregate",
    "AggregatorFn",
    "Factors",
    "available",
    "factored_svd",
    "get",
    "register",
    "svd_factors",
]
