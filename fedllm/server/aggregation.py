"""One round's aggregate: the recipe's method module by module, then the features'
post-processing; an aggregate that is not finite (or beyond float32), before or after, is
refused whole so that it never becomes the global adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedllm.aggregators.base import Aggregate, AggregatorFn, Factors
from fedllm.aggregators.per_module import map_modules
from fedllm.aggregators.screen import aggregate_problem
from fedllm.features.base import Feature


def aggregate_modules(
    aggregate_fn: AggregatorFn,
    inputs: Sequence[Mapping[str, Factors]],
    *,
    weights: list[float],
    modules: Sequence[str],
    global_rank: int | None,
    states: Mapping[str, dict[str, torch.Tensor]],
    seed: int,
    options: Mapping[str, Any],
) -> tuple[dict[str, Factors], dict[str, dict[str, torch.Tensor]]]:
    """(new global, new aggregator state): `aggregate_fn` on each module's updates (modules are
    independent, so `map_modules` may run them side by side)."""

    def one(module: str) -> Aggregate:
        return aggregate_fn(
            [u[module] for u in inputs],
            weights,
            global_rank=global_rank,
            state=states.get(module),
            seed=seed,
            **options,
        )

    results = map_modules(one, list(modules))
    return {m: r.global_ for m, r in results.items()}, {m: r.state for m, r in results.items()}


def post_processes(feature: Feature) -> bool:
    """Whether `feature` changes the aggregate (overrides `Feature.after_aggregate`)."""
    return type(feature).after_aggregate is not Feature.after_aggregate


def post_process(
    features: Sequence[Feature],
    *,
    global_: Mapping[str, Factors],
    new_global: dict[str, Factors],
    new_state: Mapping[str, Mapping[str, torch.Tensor] | None],
    server_round: int,
) -> tuple[dict[str, Factors], str | None]:
    """(the aggregate after every feature's `after_aggregate`, None), or (_, why it is refused):
    NaN or Inf or beyond float32 in the aggregate or the aggregator's state, or after the
    post-processing, whose features' state (e.g. server momentum's velocity) is then restored."""
    if (problem := aggregate_problem(new_global, new_state)) is not None:
        return new_global, problem
    post = [f for f in features if post_processes(f)]
    before = [f.state_dict() for f in post]
    for f in features:
        new_global = f.after_aggregate(global_, new_global, server_round=server_round)
    if (problem := aggregate_problem(new_global)) is not None:
        for f, state in zip(post, before, strict=True):
            f.load_state_dict(state)
        return new_global, problem + " after the features' after_aggregate"
    return new_global, None
