"""Fed-PLoRA (Zhang, Hu & Xu, ICLR 2026, arXiv 2602.16936): one-rank modules, Select-N-Fold.

The global adapter of rank R is read as R parallel one-rank modules (column j of B with row j of
A; ΔW = Σⱼ BⱼAⱼ, the same matrix as the LoRA B@A). Each round client i of rank rᵢ ≤ R selects rᵢ
modules in every target module (adapted weight), drawn independently per target as the paper
does (`draw`, seeded per client, round and target; `module_draw: client`, one draw shared by
every target, is the form of stops 50–52), folds the other R − rᵢ into its frozen base
(W₀ + Σ_{j∉Sᵢ} BⱼAⱼ: it starts from the global model exactly, no initialisation noise), trains
the selected ones as an ordinary rank-rᵢ LoRA and sends them with their indices. The server puts
them back at their indices (`expand`) and averages each module over the clients that trained it,
as the paper does (its aggregation-noise bound divides by the number of clients that selected
module j): module j is (Σ_{i∈Tⱼ}pᵢsᵢBⱼ⁽ⁱ⁾)(Σ_{i∈Tⱼ}pᵢAⱼ⁽ⁱ⁾) with p renormalised over its
trainers Tⱼ; a module nobody trained stays the global one. `trainers_mean` writes that as
inputs to this module-wise mean over every client (a non-trainer's module j := the trainers'
mean), so the aggregator stays one weighted sum.

Against the FedAvg of the trainers' whole one-rank modules, module j errs by
−Σ_{i<k∈Tⱼ} pᵢpₖ(Bⱼ⁽ⁱ⁾−Bⱼ⁽ᵏ⁾)(Aⱼ⁽ⁱ⁾−Aⱼ⁽ᵏ⁾) (sᵢ folded into B, p over Tⱼ): second order in
what the clients changed, where zero-padded averaging (FedIT, HetLoRA) errs at first order.
Against the FedAvg of every client's whole model it takes a 1/P(Tⱼ) times larger step on module
j (a non-trainer's copy of the global module does not dilute it; the grid's cells before stop 50
averaged over every client, see docs/aggregators.md). The client side (selection, fold, indices) is
`fedllm.features.fedplora_fold`; R is the largest client rank (the strategy's global rank), so
`aggregator.global_rank` is refused.

A client trains its rᵢ modules at the rank-R LoRA's scaling α/R (`module_scaling: global`, since
stop 51), as parts of that LoRA: each module's step does not depend on how many a client
selected. Before, it trained them as a rank-rᵢ LoRA at α/rᵢ (`module_scaling: client`): with
Adam an R/rᵢ times larger step per module on a low-rank client, which the trainers' mean adds up
over the modules (at lr 0.003 the global overshot: docs/aggregators.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, RoundSpec, normalized_weights, reject_options
from .registry import register

# read by the clients only (fedllm.features.fedplora_fold): option -> its default there
CLIENT_DEFAULTS: dict[str, Any] = {"module_scaling": "global", "module_draw": "target"}
CLIENT_OPTIONS = tuple(CLIENT_DEFAULTS)
MODULE_SCALINGS = ("global", "client")
MODULE_DRAWS = ("target", "client")  # one draw per target module (the paper's) / per client


@register(
    "fedplora", rounds=RoundSpec(client_options=CLIENT_OPTIONS, client_defaults=CLIENT_DEFAULTS)
)
def fedplora(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **options: Any,
) -> Aggregate:
    """Module-wise weighted mean of R one-rank modules: (Σpᵢsᵢ·Bᵢ, Σpᵢ·Aᵢ), scaling 1.

    Every update must already be at the global rank R (the fedplora_fold feature's release:
    `expand` puts the client's trained modules at their indices, `trainers_mean` the other
    clients' mean elsewhere, so this mean is each module's over its trainers); a different rank
    or `global_rank` raises.
    """
    reject_options("fedplora", options)
    p = normalized_weights(updates, weights)
    ranks = sorted({u.rank for u in updates})
    if len(ranks) != 1:
        raise ValueError(
            f"fedplora needs every update at the global rank R (expanded by the fedplora_fold "
            f"feature's release), got ranks {ranks}"
        )
    if global_rank is not None and global_rank != ranks[0]:
        raise ValueError(
            f"fedplora keeps R = {ranks[0]} one-rank modules; aggregator.global_rank "
            f"{global_rank} would drop or invent modules (leave it unset)"
        )
    d, k = updates[0].shape
    B = torch.zeros(d, ranks[0], dtype=torch.float64, device=updates[0].B.device)
    A = torch.zeros(ranks[0], k, dtype=torch.float64, device=updates[0].B.device)
    for pi, u in zip(p, updates, strict=True):
        B.add_(u.B, alpha=pi * u.scaling)
        A.add_(u.A, alpha=pi)
    dtype = updates[0].B.dtype
    return Aggregate(Factors(B.to(dtype), A.to(dtype), 1.0))


def check_module_scaling(value: Any) -> str:
    """`aggregator.options.module_scaling`, one of MODULE_SCALINGS; ValueError naming it if not."""
    return _check_option("module_scaling", value, MODULE_SCALINGS)


def check_module_draw(value: Any) -> str:
    """`aggregator.options.module_draw`, one of MODULE_DRAWS; ValueError naming it if not."""
    return _check_option("module_draw", value, MODULE_DRAWS)


def _check_option(key: str, value: Any, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"aggregator.options.{key}: must be one of {list(valid)}, got {value!r}")
    return value


def module_alpha(alpha: float, *, rank: int, global_rank: int, module_scaling: str) -> float:
    """The lora_alpha a client of `rank` trains its modules at: "global" α·rᵢ/R, so each module
    keeps the rank-R LoRA's scaling α/R whatever rᵢ (the modules are that LoRA's parts); "client"
    α, the client's own α/rᵢ: an R/rᵢ times larger step per module on a low-rank client."""
    global_scaling = check_module_scaling(module_scaling) == "global"
    return alpha * rank / global_rank if global_scaling else alpha


def select(global_rank: int, rank: int, *, seed: int) -> list[int]:
    """The `rank` module indices (sorted) a client trains this round: a seeded draw without
    replacement from range(global_rank); all of them when rank ≥ global_rank."""
    if rank < 1 or global_rank < 1:
        raise ValueError(f"ranks must be >= 1, got rank {rank} of global rank {global_rank}")
    if rank >= global_rank:
        return list(range(global_rank))
    order = torch.randperm(global_rank, generator=torch.Generator().manual_seed(seed))
    return sorted(int(j) for j in order[:rank])


def target_seed(seed: int, target: str) -> int:
    """The seed of one target module's draw (`target`: the adapted weight's name) in a client's
    round (`seed`): a hash of both, the same on client and server, independent across targets."""
    return _hashed(f"{seed}/{target}", bits=63)


def draw(
    targets: Iterable[str], *, global_rank: int, rank: int, seed: int, per_target: bool = True
) -> dict[str, list[int]]:
    """Each target module's `rank` selected one-rank module indices in a client's round (`seed`):
    drawn independently per target (the paper: "performed independently for each target
    module"), or with `per_target` False one draw shared by every target (`module_draw: client`)."""
    return {
        t: select(global_rank, rank, seed=target_seed(seed, t) if per_target else seed)
        for t in targets
    }


def draw_digest(selected: Mapping[str, Sequence[int]]) -> int:
    """A checksum of a client's draws in a round (target -> indices) in [0, 2⁵²), exact as a
    float too: the reply metric by which the server checks that the client trained the modules
    it places the reply at."""
    text = ";".join(f"{t}:{','.join(map(str, selected[t]))}" for t in sorted(selected))
    return _hashed(text, bits=52)


def _hashed(text: str, *, bits: int) -> int:
    """`text`'s sha256 as an int in [0, 2^bits): the same in every process, unlike hash()."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 2**bits


def split(global_: Factors, selected: Sequence[int]) -> tuple[Factors, Factors | None]:
    """(the selected modules, in order, as a rank-|selected| adapter; the others as the delta
    folded into the base, None if there are none), both at the global scaling."""
    chosen = list(selected)
    rest = [j for j in range(global_.rank) if j not in set(chosen)]
    trained = Factors(global_.B[:, chosen], global_.A[chosen], global_.scaling)
    folded = Factors(global_.B[:, rest], global_.A[rest], global_.scaling) if rest else None
    return trained, folded


def check_selection(selected: Sequence[int], *, rank: int, global_rank: int) -> list[int]:
    """`selected` as distinct ints in [0, global_rank), one per trained rank; ValueError if not."""
    if isinstance(selected, int | float | str) or not all(
        isinstance(j, int | float) and float(j) == int(j) for j in selected
    ):
        raise ValueError(f"module indices must be a list of integers, got {selected!r}")
    out = [int(j) for j in selected]
    if len(out) != rank or len(set(out)) != rank:
        raise ValueError(f"{len(out)} module indices {out} for rank {rank} (need {rank} distinct)")
    if any(not 0 <= j < global_rank for j in out):
        raise ValueError(f"module indices {out} outside [0, {global_rank})")
    return out


def expand(update: Factors, selected: Sequence[int], *, global_: Factors) -> Factors:
    """A client's rank-rᵢ update as R modules (scaling 1): its sᵢ·Bᵢ and Aᵢ at `selected`, the
    global modules (scaled) everywhere else; ΔW of the result = client i's whole PLoRA."""
    chosen = check_selection(selected, rank=update.rank, global_rank=global_.rank)
    if update.shape != global_.shape:
        raise ValueError(f"update is {update.shape} but the global module is {global_.shape}")
    B = (global_.B * global_.scaling).to(update.B.dtype).clone()
    A = global_.A.to(update.A.dtype).clone()
    B[:, chosen] = update.B * update.scaling
    A[chosen] = update.A
    return Factors(B, A, 1.0)


def trainers_mean(
    expanded: Sequence[Factors], selected: Sequence[Sequence[int]], weights: Sequence[float]
) -> list[Factors]:
    """`expanded` (each client's R modules, scaling 1) with every module a client did not train
    replaced by the weighted mean of the clients that did (`selected`: each client's indices), so
    that a weighted mean over every client is the mean over each module's trainers; a module
    nobody trained (or trained at weight 0) keeps what the clients hold, the global module."""
    if not len(expanded) == len(selected) == len(weights):
        raise ValueError(
            f"{len(expanded)} updates, {len(selected)} selections, {len(weights)} weights"
        )
    R = expanded[0].rank
    chose = torch.zeros(len(expanded), R, dtype=torch.bool)
    for i, chosen in enumerate(selected):
        chose[i, list(chosen)] = True
    owners = chose * torch.tensor([float(w) for w in weights], dtype=torch.float64)[:, None]
    total = owners.sum(dim=0)
    B = torch.stack([u.B.double() for u in expanded])  # clients × d × R
    A = torch.stack([u.A.double() for u in expanded])  # clients × R × k
    trained = total > 0
    share = owners / torch.where(trained, total, 1.0)  # each trainer's weight within module j
    mean_B = torch.einsum("cj,cdj->dj", share, B)
    mean_A = torch.einsum("cj,cjk->jk", share, A)
    out = []
    for i, u in enumerate(expanded):
        fill = trained & ~chose[i]  # modules others trained and client i did not
        b, a = u.B.clone(), u.A.clone()
        b[:, fill] = mean_B[:, fill].to(b.dtype)
        a[fill] = mean_A[fill].to(a.dtype)
        out.append(Factors(b, a, u.scaling))
    return out
