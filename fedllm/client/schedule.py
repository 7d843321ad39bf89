"""How many local steps a round takes, the learning-rate schedule (per round or across the
federation) and the optimizer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedllm.recipe.schema_federation import FederationConfig


def num_local_steps(
    n_examples: int,
    *,
    batch_size: int,
    local_steps: int | None,
    local_epochs: float | None,
    accumulation: int = 1,
) -> int:
    """Local steps for a round: given directly, or from epochs over this client's shard in
    expected batches, ceil(E·n / (batch·accumulation)): DP-SGD's Poisson batches, whose mean is
    `batch_size` (the plain loader's epoch is `epoch_steps`)."""
    if local_steps is not None:
        return local_steps
    assert local_epochs is not None
    return max(1, math.ceil(local_epochs * n_examples / (batch_size * accumulation)))


def epoch_steps(
    n_examples: int, *, batch_size: int, local_epochs: float, accumulation: int = 1
) -> int:
    """Steps of `local_epochs` passes of the plain loader: an epoch is ceil(n / batch) batches,
    the last one short, so whole epochs see every example equally often (with `accumulation`,
    the last step may run up to accumulation − 1 batches into the next pass)."""
    batches = math.ceil(local_epochs * math.ceil(n_examples / batch_size) - 1e-9)
    return max(1, math.ceil(batches / accumulation))


def round_steps(fed: FederationConfig, n_examples: int) -> int:
    """A client's plain local steps per round on `n_examples` training examples under the
    recipe's `federation` section (steps, or epochs of the shuffled loader)."""
    if fed.local_steps is not None:
        return fed.local_steps
    assert fed.local_epochs is not None
    return epoch_steps(
        n_examples,
        batch_size=fed.batch_size,
        local_epochs=fed.local_epochs,
        accumulation=fed.gradient_accumulation_steps,
    )


def schedule_span(*, scope: str, server_round: int, rounds: int, steps: int) -> tuple[int, int]:
    """(steps already scheduled before this round, steps the schedule spans).

    scope "round" restarts the schedule every round; "federation" spans every planned round,
    so round r starts at step (r-1)·steps of rounds·steps (warm-up once, decay across rounds).
    """
    if scope == "round":
        return 0, steps
    if scope != "federation":
        raise ValueError(f"schedule scope {scope!r}; valid: 'federation', 'round'")
    if not 1 <= server_round <= rounds:
        raise ValueError(f"server round {server_round} outside the planned rounds 1..{rounds}")
    return (server_round - 1) * steps, rounds * steps


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at global step `step` (0-based) of a `total_steps` schedule:
    linear warm-up (step+1)/(warmup+1), then constant, linear or cosine decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule {schedule!r}; valid: 'constant', 'linear', 'cosine'")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    offset: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, linear or cosine decay after a linear warm-up; this call's step k is the
    schedule's step `offset` + k."""
    lr_factor(0, schedule=schedule, warmup_steps=0, total_steps=1)  # unknown names fail here

    def factor(step: int) -> float:
        return lr_factor(
            offset + step, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(
    params: list[torch.nn.Parameter], *, optimizer: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over `params`."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
