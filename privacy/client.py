"""The ClientApp's privacy steps: DP-SGD instead of plain local steps, local client-level noise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedllm.aggregators import Factors
from fedllm.config import RunConfig
from fedllm.privacy.client_dp import privatize_locally
from fedllm.privacy.dpsgd import DPTrainResult, train_dp
from fedllm.privacy.plan import client_noise_multiplier, planned_clients, sample_plan


def train_private(
    cfg: RunConfig,
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    steps: int,
    pad_id: int,
    partition: int,
) -> DPTrainResult:
    """DP-SGD for this client's shard (raises ValueError if δ or q do not fit its size)."""
    fed = cfg.federation
    plan = sample_plan(cfg, n_train=len(examples), partition=partition)
    return train_dp(
        model,
        examples,
        plan=plan,
        steps=steps,
        pad_id=pad_id,
        optimizer=fed.optimizer,
        lr=fed.lr,
        weight_decay=fed.weight_decay,
        schedule=fed.schedule,
        warmup_steps=fed.warmup_steps,
    )


def privatize_reply(
    cfg: RunConfig,
    factors: dict[str, Factors],
    received: Mapping[str, Factors] | None,
    *,
    freeze_a: bool,
) -> tuple[dict[str, Factors], dict[str, float]]:
    """Under client-level DP with noise_at=client: the clipped, noised factors and their metrics.

    Anything else: the factors unchanged and no metrics.
    """
    p = cfg.privacy
    if p.mode != "client" or p.noise_at != "client":
        return factors, {}
    if not received:
        raise ValueError("client-level DP needs the global factors this client started from")
    noisy, norm = privatize_locally(
        factors,
        received,
        clip=p.client_clip,
        noise_multiplier=client_noise_multiplier(cfg),
        clients=planned_clients(cfg),
        freeze_a=freeze_a,
    )
    return noisy, {"dp-update-norm": norm, "dp-clipped": float(norm > p.client_clip)}
