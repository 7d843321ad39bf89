"""FedProx (Li et al., MLSys 2020): a proximal term that keeps local training near the global.

Each local step's loss gets μ/2·Σ_modules(‖B − B₀‖² + ‖A − A₀‖²) over the live LoRA factors of
the active adapter, where (B₀, A₀) are the factors the client starts the round from (the global
cut to its rank, snapshotted when `regularizers` is called, right before local training). Under
FFA's frozen A the A term stays zero. The term is on the factors, not on ΔW = s·B·A: it is the
paper's ‖w − wᵗ‖² over the trainable parameters, which here are the LoRA factors.

Recipe: `features: {fedprox: {mu: 0.01}}`. μ > 0 (default 0.01, the middle of the paper's grid
{0.001, 0.01, 0.1, 1}); larger μ means smaller client drift and slower local progress.
Refused with DP-SGD (`privacy.mode: sample`: its trainer takes no regulariser) and with
aggregators that merge each round into the base (flora: every round starts a fresh adapter, so
the global factors a proximal term would pull towards do not exist).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedllm.aggregators import round_spec
from fedllm.features.base import Feature, Regularizer
from fedllm.features.registry import register
from fedllm.features.types import ClientRound
from fedllm.model.adapters import live_lora

if TYPE_CHECKING:
    from fedllm.recipe.schema import RunConfig

Pair = tuple[torch.Tensor, torch.Tensor]  # (B d×r, A r×k) of one adapted module


class FedProxOptions(BaseModel):
    """`features.fedprox`: the proximal weight μ."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mu: float = Field(0.01, gt=0, allow_inf_nan=False, description="proximal weight μ > 0")


def snapshot(pairs: Mapping[str, Pair]) -> dict[str, Pair]:
    """Detached copies of the factors: the fixed point the proximal term pulls towards."""
    return {m: (B.detach().clone(), A.detach().clone()) for m, (B, A) in pairs.items()}


def proximal_penalty(
    live: Mapping[str, Pair], start: Mapping[str, Pair], *, mu: float
) -> torch.Tensor:
    """μ/2·Σ_modules(‖B − B₀‖²_F + ‖A − A₀‖²_F), a differentiable float32 (or wider) scalar."""
    if live.keys() != start.keys():
        raise ValueError(f"live and start modules differ: {sorted(live)} vs {sorted(start)}")
    total: torch.Tensor | None = None
    for module, (B, A) in live.items():
        B0, A0 = start[module]
        term = _squared(B - B0) + _squared(A - A0)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no LoRA factors to regularise")
    return 0.5 * mu * total


def _squared(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 factors: sum in float32
    return (x * x).sum()


@register
class FedProx(Feature):
    """The FedProx proximal term on the client's LoRA factors."""

    name = "fedprox"
    Options = FedProxOptions

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Refuse DP-SGD (no regulariser in its trainer) and merge-each-round aggregators."""
        if not cls.enabled(cfg):
            return
        if cfg.privacy.mode == "sample":
            raise ValueError(
                "features.fedprox cannot be combined with privacy.mode='sample' (DP-SGD's "
                "trainer takes no regulariser); drop one of them"
            )
        if round_spec(cfg.aggregator.name).merge:
            raise ValueError(
                f"features.fedprox needs an aggregator whose clients start from the global "
                f"factors; aggregator.name={cfg.aggregator.name!r} merges each round into the "
                "base and starts a fresh adapter, so there is nothing to stay close to"
            )

    def regularizers(self, model: torch.nn.Module, rnd: ClientRound) -> list[Regularizer]:
        """One term: μ/2·‖θ − θ₀‖² with θ₀ the adapter's factors now (the round's start)."""
        live = live_lora(model)
        if not live:
            raise ValueError("features.fedprox: the model has no LoRA adapter to regularise")
        start = snapshot(live)
        mu = self.options.mu
        return [lambda: proximal_penalty(live, start, mu=mu)]
