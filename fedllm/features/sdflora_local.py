"""SDFLoRA's dual module on the client (the aggregation is `fedllm.aggregators.sdflora`).

A client of rank r trains one rank-r LoRA whose first r_g components are the global module and
whose last r_l = ⌊f·r⌋ are its private local module (`split_ranks`; f = client option
`local_fraction`). At the start of a round (`start`) the global module is the received global
factors cut to r_g, the local module the one this node kept in its `context.state` (B = 0 and A
peft-initialised, seeded by the run's seed and the partition, on its first round). After training
(`post_process`, before client-level DP's clipping and noise) the local module goes back into the
node's state and the update shrinks to the global module at rank r_g: only it is screened, noised
and sent. The server sees ranks r_g, so it cuts each node's download to r_g.

The client also writes its local module into its own folder (`features.node_state.save_node_state`:
`clients/<p>/node_state/` of the run directory, or the node's `personal-dir`), never sent, and a
node whose state has none (a resumed simulation's new process) takes it back from there before
it trains or evaluates. The local module is trained without noise, so in a private run
(`privacy.mode` or SecAgg+) only a node's own `personal-dir` keeps it, never the run directory.

Refused: DP-SGD (`privacy.mode: sample`: the local module, trained without noise on the same data,
would steer the noised global gradients outside the DP-SGD accounting; client-level DP, which
clips and noises what is sent, is the sound way to noise only the global module), pruned bases,
top-k compression and `features.personal_adapter` (it would save the global module alone). The
client evaluates its own model (global + local, the `personalise` hook) on its held-out split;
the server's test set sees the global module alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict

from fedllm.aggregators.base import Factors
from fedllm.aggregators.sdflora import CLIENT_DEFAULTS, CLIENT_OPTIONS, split_ranks
from fedllm.features.base import Feature, ReplyMetrics
from fedllm.features.node_state import restore_node_state, save_node_state
from fedllm.features.personal import PersonalAdapter
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, ClientUpdate
from fedllm.model.wire import client_options
from fedllm.recipe.schema import RunConfig

STATE = "sdflora-local"  # key of this node's local module in context.state
DEFAULT_FRACTION = CLIENT_DEFAULTS["local_fraction"]


def local_fraction(options: Mapping[str, Any]) -> float:
    """The `local_fraction` client option (default 0.5), a number in [0, 1)."""
    value = options.get("local_fraction", DEFAULT_FRACTION)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"aggregator.options.local_fraction: must be in [0, 1), got {value!r}")
    return float(value)


def check_recipe(cfg: RunConfig) -> None:
    """Valid option and no combination the dual module cannot run with, naming the key."""
    local_fraction({k: v for k, v in cfg.aggregator.options.items() if k in CLIENT_OPTIONS})
    if cfg.privacy.mode == "sample":
        raise ValueError(
            "privacy.mode='sample' is not supported with aggregator.name='sdflora': the local "
            "module trains on the same data without noise and would steer the noised global "
            "gradients; use privacy.mode='client' (noise on the global module, which is all "
            "that is sent)"
        )
    pruned = any(t.pruning > 0 for t in cfg.lora.tiers or [])
    pruned |= cfg.adaptive is not None and any(q > 0 for q in cfg.adaptive.pruning)
    problems = {
        "lora.tiers/adaptive pruning": pruned,
        # the local module is kept at the rank it was made at (h98: a bandit's new rank rescaled
        # it by r/r' or started it afresh, and evaluation used the node's own rank)
        "adaptive": cfg.adaptive is not None,
        "compression.topk": cfg.compression.topk is not None,
        "features.personal_adapter": PersonalAdapter.enabled(cfg),
    }
    bad = [key for key, hit in problems.items() if hit]
    if bad:
        raise ValueError(
            f"{bad[0]}: not supported with aggregator.name='sdflora' (each client's adapter is "
            "its global module plus a private local module kept in its node state); drop it"
        )


def stored(state: RecordDict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module → (B_l, A_l) this node kept, or {} before its first round."""
    kept = state.get(STATE)
    if not isinstance(kept, ArrayRecord):
        return {}
    tensors = kept.to_torch_state_dict()
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    return {m: (tensors[f"{m}.lora_B"], tensors[f"{m}.lora_A"]) for m in modules}


def keep(state: RecordDict, local: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Store this node's local modules in its persistent state."""
    arrays = {}
    for m, (B, A) in local.items():
        arrays[f"{m}.lora_B"] = B.detach().float().cpu().contiguous()
        arrays[f"{m}.lora_A"] = A.detach().float().cpu().contiguous()
    state[STATE] = ArrayRecord(arrays)


def fresh_local(
    shape: tuple[int, int], rank: int, *, gen: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """(B_l = 0, A_l kaiming-uniform as peft initialises lora_A) for a d×k module."""
    d, k = shape
    bound = 1.0 / math.sqrt(k)
    return torch.zeros(d, rank), (torch.rand(rank, k, generator=gen) * 2 - 1) * bound


def with_local(
    received: Mapping[str, Factors],
    local: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    ranks: tuple[int, int],
    scaling: float,
    seed: int,
) -> dict[str, Factors]:
    """[global cut to r_g | local] per module at the client's scaling; a missing or misshapen local
    module starts fresh (seeded)."""
    rg, rl = ranks
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Factors] = {}
    for m in sorted(received):
        g = received[m].truncate(rg, scaling)
        if rl == 0:
            out[m] = g
            continue
        B_l, A_l = local.get(m, (None, None))
        if (
            B_l is None
            or tuple(B_l.shape) != (g.shape[0], rl)
            or tuple(A_l.shape) != (rl, g.shape[1])
        ):
            B_l, A_l = fresh_local(g.shape, rl, gen=gen)
        B = torch.cat([g.B, B_l.to(g.B.dtype)], dim=1)
        out[m] = Factors(B, torch.cat([g.A, A_l.to(g.A.dtype)]), scaling)
    return out


def split_update(
    factors: Mapping[str, Factors], *, global_rank: int, global_scaling: float
) -> tuple[dict[str, Factors], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(the global modules at rank r_g and their own scaling α/r_g, ΔW unchanged; the local
    modules' raw (B_l, A_l), kept at the adapter's scaling)."""
    shared = {m: f.truncate(global_rank, global_scaling) for m, f in factors.items()}
    local = {m: (f.B[:, global_rank:], f.A[global_rank:]) for m, f in factors.items()}
    return shared, local


@register
class SDFLoRALocal(Feature):
    """The private local module beside the shared global one; only the global one is sent."""

    name = "sdflora_local"
    reply_metrics: ClassVar[ReplyMetrics] = {"sdflora-local-rank": (int, 0)}
    own_adapter_shape = True
    order = 20  # splits the update before client-level DP (25) clips and noises what is sent

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On with `aggregator.name: sdflora`."""
        return cfg.aggregator.name == "sdflora"

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cls.enabled(cfg):
            check_recipe(cfg)

    def start(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """The adapter this client trains: the global module and its local one (`personalise`)."""
        self.ranks = split_ranks(rnd.plan.rank, local_fraction(client_options(rnd.config)))
        return self.personalise(factors, rnd)

    def personalise(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """The client's own model, global module + its local module (B_l = 0 before its first
        round), at its rank: what SDFLoRA personalises with; the server's test set sees the
        global module alone."""
        rank = rnd.plan.rank
        ranks = split_ranks(rank, local_fraction(client_options(rnd.config)))
        if ranks[1]:  # a resumed node (empty state) takes back the module it wrote
            restore_node_state(rnd, STATE, uncovered=self.cfg.privacy.private)
        seed = self.cfg.seed * 1_000_003 + rnd.partition
        scaling = self.cfg.client_scaling(rank)
        return with_local(factors, stored(rnd.state), ranks=ranks, scaling=scaling, seed=seed)

    def post_process(self, update: ClientUpdate, rnd: ClientRound) -> ClientUpdate:
        """Only the global module goes on (at rank r_g, its own scaling); the local one stays in the
        node's state and own folder."""
        rg, rl = self.ranks
        if rl == 0:
            return update
        scaling = self.cfg.client_scaling(rg)
        shared, local = split_update(update.factors, global_rank=rg, global_scaling=scaling)
        keep(rnd.state, local)
        save_node_state(rnd, STATE, uncovered=self.cfg.privacy.private)
        start, _ = split_update(update.start, global_rank=rg, global_scaling=scaling)
        return ClientUpdate(shared, start, rg)

    def metrics(self) -> dict[str, int | float]:
        return {"sdflora-local-rank": self.ranks[1]} if hasattr(self, "ranks") else {}
