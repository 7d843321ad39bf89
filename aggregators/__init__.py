"""Aggregation of heterogeneous-rank LoRA factors: pure tensor methods behind a name registry.

A method is one module of this folder with `@register("name")` (or an installed package with a
`fedllm.aggregators` entry point): the first lookup (`get`, `available`, `round_spec`) imports
them all through `discover`, so there is no list to edit here.
"""

from .base import (
    Aggregate,
    AggregatorFn,
    Factors,
    NonNegativeFloat,
    PositiveFloat,
    RoundSpec,
    normalized_weights,
)
from .linalg import factored_svd, svd_factors
from .registry import (
    available,
    check_options,
    discover,
    get,
    register,
    resolved_options,
    round_spec,
)

__all__ = [
    "Aggregate",
    "AggregatorFn",
    "Factors",
    "NonNegativeFloat",
    "PositiveFloat",
    "RoundSpec",
    "available",
    "check_options",
    "discover",
    "factored_svd",
    "get",
    "normalized_weights",
    "register",
    "resolved_options",
    "round_spec",
    "svd_factors",
]
