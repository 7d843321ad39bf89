"""Client-level DP (DP-FedAvg, McMahan et al. 2018) around any registered aggregator.

The update's norm is taken on what a client sends, in factor space: per module,
ΔB = s·B − s₀·B₀[:, :r] and ΔA = A − A₀[:r], where (B₀, A₀, s₀) are the global factors it
received cut to its rank r, and each scaling s = α/r is folded into B (so clients of different
ranks share one coordinate system, the one FedIT/FFA average in); the norm is √Σ(‖ΔB‖² + ‖ΔA‖²)
over all modules. We chose factors over ‖sBA − s₀B₀A₀‖ because the noise must go where the
release is linear: the mean of clipped factor deltas has sensitivity S/m, a product does not.

Per round: each delta is clipped to norm S, the m deltas are averaged uniformly, and the mean gets
N(0, (zS/m)²) on every coordinate a client can move, at the server (`noise_at: server`) or as
N(0, (zS)²/m) added by each client to its own clipped update (`noise_at: client`; the mean then
carries the same noise, but the server sees each update alone, protected by z/√m only: the round
is accounted at z/√m, and a target ε derives z = √m times the server-side z). With A frozen
(FFA) every ΔA is forced to 0 (a client that moved A would otherwise put it in the release
unnoised) and A gets no noise: noise enters B only, instead of the
((B+ξ_B)(A+ξ_A) = BA + ξ_B·A + B·ξ_A + ξ_B·ξ_A) of
noising both. The noisy global is then handed to the wrapped aggregator as a single update, which
post-processes it (truncation, SVD, ...): any aggregator keeps the guarantee, as post-processing
cannot weaken DP. The price: the aggregator sees a FedIT-style factor mean, exact only with A
frozen (FFA), which is why FFA is the recommended pairing.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedllm.aggregators import AggregatorFn, Factors

Delta = dict[str, tuple[torch.Tensor, torch.Tensor]]


def folded_delta(update: Mapping[str, Factors], reference: Mapping[str, Factors]) -> Delta:
    """Per module (ΔB, ΔA) of `update` against `reference` cut to its rank, scalings folded in."""
    out: Delta = {}
    for module, u in update.items():
        ref = reference[module].truncate(u.rank)
        dB = u.scaling * u.B.double() - ref.scaling * ref.B.double()
        out[module] = (dB, u.A.double() - ref.A.double())
    return out


def delta_norm(delta: Delta) -> float:
    """√Σ‖ΔB‖² + ‖ΔA‖² over all modules."""
    return math.sqrt(sum(float(dB.square().sum() + dA.square().sum()) for dB, dA in delta.values()))


def clip_delta(delta: Delta, clip: float) -> tuple[Delta, float]:
    """`delta` scaled to norm ≤ `clip`; also returns its norm before clipping."""
    if not clip > 0:
        raise ValueError(f"client clip norm must be > 0, got {clip}")
    norm = delta_norm(delta)
    c = min(1.0, clip / norm) if norm > 0 else 1.0
    return {m: (dB * c, dA * c) for m, (dB, dA) in delta.items()}, norm


def add_noise(delta: Delta, *, std: float, freeze_a: bool, generator: torch.Generator) -> Delta:
    """N(0, std²) on every entry of ΔB, and of ΔA unless A is frozen."""
    out: Delta = {}
    for m in sorted(delta):
        dB, dA = delta[m]
        dB = dB + std * torch.randn(dB.shape, generator=generator, dtype=dB.dtype)
        if not freeze_a:
            dA = dA + std * torch.randn(dA.shape, generator=generator, dtype=dA.dtype)
        out[m] = (dB, dA)
    return out


def apply_delta(
    reference: Mapping[str, Factors], delta: Delta, *, scaling: float | None = None
) -> dict[str, Factors]:
    """reference (cut/padded to each delta's rank, folded) + delta, at `scaling` (default 1)."""
    out: dict[str, Factors] = {}
    for module, (dB, dA) in delta.items():
        rank = dB.shape[1]
        ref = reference[module].truncate(rank)
        s = 1.0 if scaling is None else scaling
        B = (ref.scaling * ref.B.double() + dB) / s
        out[module] = Factors(B.float(), (ref.A.double() + dA).float(), s)
    return out


def os_generator() -> torch.Generator:
    """A generator seeded from OS entropy (noise nobody can re-derive from the recipe)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def privatize_locally(
    update: Mapping[str, Factors],
    received: Mapping[str, Factors],
    *,
    clip: float,
    noise_multiplier: float,
    clients: int,
    freeze_a: bool,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Factors], float]:
    """noise_at=client: clip this delta to S, add N(0, (zS)²/m); (factors to send, raw norm)."""
    delta = folded_delta(update, received)
    if freeze_a:  # A is frozen: only B moves
        delta = {k: (dB, torch.zeros_like(dA)) for k, (dB, dA) in delta.items()}
    clipped, norm = clip_delta(delta, clip)
    std = noise_multiplier * clip / math.sqrt(clients)
    noisy = add_noise(clipped, std=std, freeze_a=freeze_a, generator=generator or os_generator())
    scaling = next(iter(update.values())).scaling
    return apply_delta(received, noisy, scaling=scaling), norm


@dataclass
class Release:
    """What one round's client-level DP did (for metrics)."""

    clients: int
    norms: list[float] = field(default_factory=list)
    clipped: int = 0
    noise_std: float = 0.0
    effective_noise_multiplier: float = 0.0


class ClientLevelDP:
    """Clip, average and noise client updates, then let the wrapped aggregator post-process."""

    def __init__(
        self,
        aggregate_fn: AggregatorFn,
        *,
        clip: float,
        noise_multiplier: float,
        noise_at: str,
        expected_clients: int,
        freeze_a: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        if noise_at not in ("server", "client"):
            raise ValueError(f"noise_at must be 'server' or 'client', got {noise_at!r}")
        if not (clip > 0 and noise_multiplier > 0 and expected_clients >= 1):
            raise ValueError("need clip > 0, noise_multiplier > 0 and expected_clients >= 1")
        self.aggregate_fn = aggregate_fn
        self.clip, self.z, self.noise_at = clip, noise_multiplier, noise_at
        self.expected_clients, self.freeze_a = expected_clients, freeze_a
        self.generator = generator or os_generator()
        self.last: Release | None = None

    def take(self) -> Release | None:
        """The last round's release info, cleared (so a round without a release reports none)."""
        last, self.last = self.last, None
        return last

    def release(
        self, global_: Mapping[str, Factors], updates: Sequence[Mapping[str, Factors]]
    ) -> dict[str, Factors]:
        """The DP global: global + mean of clipped deltas + N(0, (zS/m)²), at scaling 1."""
        if not updates:
            raise ValueError("no updates to release")
        m = len(updates)
        deltas, norms = [], []
        for u in updates:
            delta = folded_delta(u, global_)
            if self.freeze_a:  # A is frozen: a client's ΔA would enter the release unnoised
                delta = {k: (dB, torch.zeros_like(dA)) for k, (dB, dA) in delta.items()}
            if self.noise_at == "server":
                delta, norm = clip_delta(delta, self.clip)
            else:  # clipped and noised by the client; its norm includes that noise, and a
                norm = delta_norm(delta)  # hostile client's larger one is cut to an honest bound
                delta, _ = clip_delta(delta, self.honest_bound(delta))
            deltas.append(delta)
            norms.append(norm)
        width = max(
            max(f.rank for f in global_.values()), *(u.rank for d in updates for u in d.values())
        )
        mean: Delta = {}
        for module, g in global_.items():
            d, k = g.shape
            dB = torch.zeros(d, width, dtype=torch.float64)
            dA = torch.zeros(width, k, dtype=torch.float64)
            for delta in deltas:
                b, a = delta[module]
                dB[:, : b.shape[1]] += b / m
                dA[: a.shape[0]] += a / m
            mean[module] = (dB, dA)
        if self.noise_at == "server":
            std = self.z * self.clip / m
            mean = self._noise_touched(mean, updates, std=std)
            z_eff = self.z
        else:  # the server saw each update with only its own share of the noise, zS/√m
            std = self.z * self.clip / math.sqrt(self.expected_clients * m)
            z_eff = self.z / math.sqrt(self.expected_clients)
        self.last = Release(m, norms, sum(n > self.clip for n in norms), std, z_eff)
        return apply_delta(global_, mean)

    def honest_bound(self, delta: Delta) -> float:
        """The norm a client's own clipped (S) and noised (σ = zS/√M per entry, D entries) delta
        stays under: S + σ(√D + 10), beyond which a Gaussian's norm goes with probability below
        e⁻⁵⁰. Cutting a longer delta to it is post-processing of what the server saw: no privacy
        cost, and a hostile client's influence is bounded as an honest one's is."""
        d = sum(dB.numel() + (0 if self.freeze_a else dA.numel()) for dB, dA in delta.values())
        sigma = self.z * self.clip / math.sqrt(self.expected_clients)
        return self.clip + sigma * (math.sqrt(d) + 10)

    def _noise_touched(self, mean: Delta, updates: Sequence[Mapping[str, Factors]], *, std: float):
        """Noise on the first r_max components (those clients can move); the rest is public."""
        r = max(u.rank for d in updates for u in d.values())
        noisy = add_noise(
            {m: (dB[:, :r], dA[:r]) for m, (dB, dA) in mean.items()},
            std=std,
            freeze_a=self.freeze_a,
            generator=self.generator,
        )
        out: Delta = {}
        for m, (dB, dA) in mean.items():
            nB, nA = noisy[m]
            out[m] = (torch.cat([nB, dB[:, r:]], dim=1), torch.cat([nA, dA[r:]], dim=0))
        return out

    def __call__(
        self,
        global_: Mapping[str, Factors],
        updates: Sequence[Mapping[str, Factors]],
        *,
        global_rank: int | None = None,
        states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Factors], dict[str, dict[str, torch.Tensor]]]:
        """The wrapped aggregator applied module by module to the DP release (one update)."""
        released = self.release(global_, updates)
        new_global, new_states = {}, {}
        for module in sorted(released):
            result = self.aggregate_fn(
                [released[module]],
                [1.0],
                global_rank=global_rank,
                state=(states or {}).get(module),
                seed=seed,
                **dict(options or {}),
            )
            new_global[module], new_states[module] = result.global_, result.state
        return new_global, new_states
