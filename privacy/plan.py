"""What a DP recipe means for each client: sampling rate, steps, noise; checked before training.

Sample-level (DP-SGD): a client with n training examples samples each one with q = batch/n per
step (Poisson) and runs the recipe's local steps every round it takes part in; with a target ε,
its σ is the one that keeps rounds × local steps within it at its own q (a client taking part in
fewer rounds spends less). Client-level (DP-FedAvg): one Gaussian step per round at q = 1 (the
sampled clients are public, so no amplification by sampling), σ = the z the server sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedllm.client.schedule import num_local_steps
from fedllm.privacy.accounting import epsilon_floor, noise_multiplier_for, unreachable
from fedllm.recipe import ConfigError, RunConfig

DELTA_FACTOR = 0.1  # δ ≤ 0.1/n: "well below" 1/n, for the shard size n (or the client count)


@dataclass(frozen=True)
class SamplePlan:
    """One client's DP-SGD settings for every round."""

    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    max_grad_norm: float


def check_shard(cfg: RunConfig, *, partition: int, n_train: int) -> None:
    """Raise ValueError (naming the keys) if this shard cannot be trained with sample-level DP."""
    if cfg.privacy.mode != "sample":
        return
    delta, batch = cfg.privacy.delta, cfg.federation.batch_size
    if delta > DELTA_FACTOR / n_train:
        raise ValueError(
            f"privacy.delta={delta:g} must be below 1/n = 1/{n_train} for client {partition}'s "
            f"shard of {n_train} training examples, by a factor of {1 / DELTA_FACTOR:g} or more "
            f"(privacy.delta <= {DELTA_FACTOR / n_train:.1e}): δ is the chance the guarantee "
            "fails outright, and near 1/n a mechanism that publishes one whole example would pass"
        )
    if batch >= n_train:
        raise ValueError(
            f"federation.batch_size={batch} must be below client {partition}'s {n_train} "
            "training examples for Poisson sampling (q = batch/n < 1)"
        )


def sample_plan(cfg: RunConfig, *, n_train: int, partition: int = 0) -> SamplePlan:
    """The DP-SGD settings of a client holding `n_train` training examples."""
    check_shard(cfg, partition=partition, n_train=n_train)
    p, fed = cfg.privacy, cfg.federation
    q = fed.batch_size / n_train
    steps = num_local_steps(
        n_train,
        batch_size=fed.batch_size,
        local_steps=fed.local_steps,
        local_epochs=fed.local_epochs,
    )
    sigma = p.noise_multiplier
    if sigma is None:
        assert p.target_epsilon is not None
        sigma = noise_multiplier_for(
            target_epsilon=p.target_epsilon,
            delta=p.delta,
            sample_rate=q,
            steps=steps * fed.rounds,
            accountant=p.accountant,
        )
    return SamplePlan(q, steps, sigma, p.max_grad_norm)


def noise_planned_for(cfg: RunConfig) -> dict[str, int | None]:
    """The settings a target ε's noise was derived from ({} when σ is given): a resume that
    changes one would spend the earlier rounds at one plan's noise and the rest at another's,
    past the target when the run grows (`Account` refuses it)."""
    p, fed = cfg.privacy, cfg.federation
    if p.target_epsilon is None or p.mode not in ("sample", "client"):
        return {}
    keys = ("rounds",) if p.mode == "client" else ("rounds", "local_steps", "local_epochs")
    keys += ("batch_size",) if p.mode == "sample" else ()
    return {f"federation.{key}": getattr(fed, key) for key in keys}


def planned_clients(cfg: RunConfig) -> int:
    """m: clients sampled per round."""
    return cfg.federation.clients_per_round or cfg.data.num_clients


def client_noise_multiplier(cfg: RunConfig) -> float:
    """z of client-level DP: given, or derived so that the noise the server sees meets the target.

    Clients are sampled from a public seed, so a round is accounted without amplification (q = 1).
    With noise_at=client each update the server sees carries only its own share, zS/√m: the
    derived z is √m times the z that would meet the target at the server.
    """
    p = cfg.privacy
    if p.client_noise_multiplier is not None:
        return p.client_noise_multiplier
    assert p.target_epsilon is not None
    z = noise_multiplier_for(
        target_epsilon=p.target_epsilon,
        delta=p.delta,
        sample_rate=1.0,
        steps=cfg.federation.rounds,
        accountant=p.accountant,
    )
    return z * math.sqrt(planned_clients(cfg)) if p.noise_at == "client" else z


def seen_noise_multiplier(cfg: RunConfig) -> float:
    """The noise multiplier of what the server sees of one client's update in a round: z with
    the noise added at the server, z/√m with each client adding its own share."""
    z = client_noise_multiplier(cfg)
    return z / math.sqrt(planned_clients(cfg)) if cfg.privacy.noise_at == "client" else z


def client_level_round(cfg: RunConfig) -> tuple[float, float, int]:
    """(σ, q, steps) that one client-level DP round charges, in the server's ledger
    (`ClientLevel`) and a node's own (`node_guard`): one Gaussian step at q = 1 (who takes part is
    public, so no amplification by sampling) with the noise multiplier the server sees of one
    update (`seen_noise_multiplier`: z at the server, z/√m with each client adding its share)."""
    return seen_noise_multiplier(cfg), 1.0, 1


def check_reachable(cfg: RunConfig, target: float, *, n_train: int, partition: int) -> None:
    """ValueError naming privacy.target_epsilon if no noise meets it on a shard of `n_train`
    (ε at Opacus's σ cap compared with the target: one accountant call, not a σ search)."""
    fed, p = cfg.federation, cfg.privacy
    local = num_local_steps(
        n_train,
        batch_size=fed.batch_size,
        local_steps=fed.local_steps,
        local_epochs=fed.local_epochs,
    )
    kw = dict(
        delta=p.delta,
        sample_rate=fed.batch_size / n_train,
        steps=local * fed.rounds,
        accountant=p.accountant,
    )
    if epsilon_floor(**kw) >= target:
        why = unreachable(target, **kw)
        raise ValueError(f"privacy.target_epsilon (client {partition}): {why}")


def check_shards(cfg: RunConfig) -> None:
    """Every client's shard (as the recipe splits its data) against the DP settings, and the
    noise a target ε needs at its size, as a ConfigError before any training; a deployed node
    checks its own data again at its start."""
    if cfg.privacy.mode != "sample":
        return
    from fedllm.data.shards import ProcessCache, raw_shard

    cache = ProcessCache()  # the split once for every client
    planned: set[int] = set()  # shard sizes whose σ is found (a target ε is a search)
    try:
        for pid in range(cfg.data.num_clients):
            n_train = len(raw_shard(cfg, pid, cache=cache).train)
            check_shard(cfg, partition=pid, n_train=n_train)
            if n_train not in planned and (target := cfg.privacy.target_epsilon) is not None:
                check_reachable(cfg, target, n_train=n_train, partition=pid)
                planned.add(n_train)
    except ValueError as err:
        raise ConfigError(str(err)) from None
