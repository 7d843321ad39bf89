"""PreLort's prefix-nested training on the client (the aggregation is `fedllm.aggregators.prelort`).

A client of rank r trains its adapter under the truncations T = {the federation's ranks ≤ r} ∪ {r}:
the segment ends, i.e. exactly the prefixes other clients will receive. Every forward pass of a
local step draws one t ∈ T uniformly (seeded by the round's seed) and runs the adapter with only its
first t rank components (forward hooks zero lora_A's outputs past t, so the tail gets no gradient
from that pass). In expectation a step minimises (1/|T|)·Σ_t L(first t components): the nested
objective at the cost of plain training. The paper trains "under multiple rank truncations"; if it
sums every truncation in each step, this is the unbiased one-draw estimate of that sum (the
deviation, at 1/|T| of its cost). The reported training losses are those of the drawn truncations.

Client option `nested` (aggregator.options of `prelort`, sent in the round config): true (default)
or false (plain local steps: segment-wise averaging alone). Any other adapter-state aggregator takes
the same training with `features: {nested_prefix: {}}` (e.g. squeeze, whose clients restart from the
first components of the global: a prefix trained to carry the most is what that cut keeps; measured,
it lost to plain squeeze: docs/aggregators.md). Refused with DP-SGD (its per-sample gradients were
not tested under the hooks).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.hooks import RemovableHandle

from fedllm.aggregators.prelort import CLIENT_DEFAULTS, CLIENT_OPTIONS
from fedllm.features.base import Feature, ReplyMetrics, require_adapter_state
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, ClientUpdate
from fedllm.model.wire import client_options
from fedllm.recipe.schema import RunConfig

if TYPE_CHECKING:
    from fedllm.client.train import TrainResult


def nested_option(options: dict[str, Any]) -> bool:
    """The `nested` client option (default true); anything but a bool is an error naming it."""
    value = options.get("nested", CLIENT_DEFAULTS["nested"])
    if not isinstance(value, bool):
        raise ValueError(f"aggregator.options.nested: must be true or false, got {value!r}")
    return value


def truncations(cfg: RunConfig, rank: int) -> list[int]:
    """T for a client of `rank`: every rank of the recipe (clients and bandit arms) ≤ rank, and
    rank itself, sorted."""
    ranks = {cfg.client_rank(p) for p in range(cfg.data.num_clients)}
    ranks |= set(cfg.adaptive.ranks) if cfg.adaptive is not None else set()
    return sorted({r for r in ranks if r <= rank} | {rank})


class Draws:
    """The truncation of the current forward pass: one uniform draw from `choices` per pass."""

    def __init__(self, choices: Sequence[int], *, seed: int) -> None:
        if not choices or any(t < 1 for t in choices):
            raise ValueError(f"truncations must be ranks >= 1, got {list(choices)}")
        self.choices = list(choices)
        self.rng = random.Random(seed)
        self.current: int | None = None
        self.drawn: list[int] = []

    def draw(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: draw this pass's truncation from `choices` (and log it in `drawn`).
        A forward that continues from cached keys/values (`share_head`: the rows after their
        shared prompt head) keeps the head's draw: one truncation per sample (h98: the head ran
        at one and the rows at another)."""
        if kwargs.get("past_key_values") is not None and self.current is not None:
            return
        self.current = self.rng.choice(self.choices)
        self.drawn.append(self.current)

    def mask(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        """lora_A's output with the rank components from `current` on zeroed."""
        t = self.current
        if t is None or t >= output.shape[-1]:
            return None
        keep = torch.zeros(output.shape[-1], dtype=output.dtype, device=output.device)
        keep[:t] = 1
        return output * keep


def install(model: torch.nn.Module, draws: Draws) -> list[RemovableHandle]:
    """Hooks making every forward of `model` (a peft model) run at a drawn truncation."""
    name = getattr(model, "active_adapter", "default")
    handles = [model.register_forward_pre_hook(draws.draw, with_kwargs=True)]
    for layer in model.modules():
        lora_A = getattr(layer, "lora_A", None)
        if isinstance(lora_A, torch.nn.ModuleDict) and name in lora_A:
            handles.append(lora_A[name].register_forward_hook(draws.mask))
    if len(handles) == 1:
        raise ValueError("nested training found no LoRA layer in the model")
    return handles


@contextmanager
def nested(model: torch.nn.Module, choices: Sequence[int], *, seed: int) -> Iterator[Draws]:
    """Within the block every forward of `model` runs at a truncation drawn from `choices`."""
    draws = Draws(choices, seed=seed)
    handles = install(model, draws)
    try:
        yield draws
    finally:
        for h in handles:
            h.remove()


class NestedOptions(BaseModel):
    """`features.nested_prefix`: on (default) or off."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True


@register
class PreLortNested(Feature):
    """Local steps under nested rank truncations (PreLort's prefix-nested training)."""

    name = "nested_prefix"
    reply_metrics: ClassVar[ReplyMetrics] = {"prelort-truncation-mean": (float, 0.0)}
    own_adapter_shape = True
    order = 60  # its `train` only installs hooks: a feature that trains its own way wins
    Options = NestedOptions

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """Named under `features` (unless `enabled: false`), or the prelort aggregator."""
        if cls.name in cfg.features:
            return cls.parse_options(cfg).enabled
        return cfg.aggregator.name == "prelort"

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if not cls.enabled(cfg):
            return
        if cfg.aggregator.name != "prelort":
            require_adapter_state(cfg, f"features.{cls.name}")
        options = {k: v for k, v in cfg.aggregator.options.items() if k in CLIENT_OPTIONS}
        if cfg.aggregator.name == "prelort" and not nested_option(options):
            return
        if cfg.privacy.mode == "sample":
            raise ValueError(
                f"features.{cls.name} / aggregator.options.nested: nested training is not "
                "supported with privacy.mode='sample' (DP-SGD); turn it off or use "
                "privacy.mode='client'"
            )

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.handles: list[RemovableHandle] = []
        self.draws: Draws | None = None

    def train(self, model: torch.nn.Module, rnd: ClientRound, *, steps: int) -> TrainResult | None:
        """Install the truncation hooks and let the plain local steps run under them."""
        if not nested_option(client_options(rnd.config)):
            return None
        self.draws = Draws(truncations(rnd.cfg, rnd.plan.rank), seed=rnd.seed)
        self.handles = install(model, self.draws)  # removed in post_process (or with the adapter)
        return None

    def post_process(self, update: ClientUpdate, rnd: ClientRound) -> ClientUpdate:
        """Remove the truncation hooks; the update passes unchanged."""
        for h in self.handles:
            h.remove()
        self.handles = []
        return update

    def metrics(self) -> dict[str, int | float]:
        drawn = self.draws.drawn if self.draws is not None else []
        return {"prelort-truncation-mean": sum(drawn) / len(drawn)} if drawn else {}
