"""Device tiers (`lora.tiers`): each tier's clients prune their base and load it quantized, and
evaluate on the whole base at the precision they load it (evaluation is not pruned).

The tier's rank is the recipe's (`RunConfig.client_rank`); this feature adds the tier's pruning
ratio and quantization to the client's plan. The pruning itself is `fedllm.constrained.pruned`.
"""

from __future__ import annotations

import dataclasses

from fedllm.features.base import Feature
from fedllm.features.registry import register
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.recipe.schema import RunConfig
from fedllm.recipe.schema_model import TierConfig


def tier_of(cfg: RunConfig, partition: int) -> TierConfig | None:
    """The recipe tier holding `partition`, if the recipe has tiers."""
    start = 0
    for tier in cfg.lora.tiers or []:
        if partition < start + tier.clients:
            return tier
        start += tier.clients
    return None


def tier_precision(cfg: RunConfig, tier: TierConfig) -> str | None:
    """The tier's base precision, else the recipe's ('4bit', '8bit', None: full)."""
    quant = tier.quantization or cfg.model.quantization
    return None if quant == "none" else quant


@register
class Tiers(Feature):
    """A tier's pruning ratio and quantization in its clients' plans."""

    name = "tiers"
    order = 10

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On when the recipe has `lora.tiers`."""
        return cfg.lora.tiers is not None

    def plan(self, plan: ClientPlan, rnd: ClientRound) -> ClientPlan:
        """The tier's pruning ratio and quantization, except where this round's config already sets
        them (an adaptive arm)."""
        tier = tier_of(self.cfg, plan.partition)
        if tier is None:
            return plan
        pruning = plan.pruning if "pruning" in rnd.config else tier.pruning  # the server's first
        if "quantization" in rnd.config:
            return dataclasses.replace(plan, pruning=pruning)
        return dataclasses.replace(
            plan, pruning=pruning, quantization=tier_precision(self.cfg, tier)
        )

    def eval_precision(self, quantization: str | None, rnd: ClientRound) -> str | None:
        """The precision of the base the tier's client loads to train, so it evaluates on the
        base it holds: its tier's (a 4-bit device never loads the recipe's full-precision
        base, nor reloads its own each round); full for a pruned tier (it loads the base at
        full precision to prune it, quantizing after); the recipe's under a bandit, which sets
        each round's precision itself (h103)."""
        tier = tier_of(self.cfg, rnd.partition)
        if tier is None or self.cfg.adaptive is not None:
            return quantization
        return None if tier.pruning > 0 else tier_precision(self.cfg, tier)
