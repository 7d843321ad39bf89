"""The privacy defects of the security review, one test each (each failed before its fix):
δ bounds, client-level DP with pruned tiers or Wanda maps, FFA's ΔA under client-level DP, and
the noise a target ε derives when clients add their own share."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm.aggregators import Factors, get
from fedllm.privacy.accounting import noise_multiplier_for
from fedllm.privacy.client_dp import ClientLevelDP, privatize_locally
from fedllm.privacy.plan import check_shard, client_noise_multiplier, seen_noise_multiplier
from fedllm.recipe import ConfigError, build_config

BASE = {"data": {"num_clients": 4}, "lora": {"ranks": 2}}


def cfg(**sections: dict) -> object:
    return build_config({**BASE, **sections})


@pytest.mark.parametrize("n", [10, 450])
def test_sample_level_delta_must_be_well_below_one_over_n(n: int) -> None:
    c = cfg(privacy={"mode": "sample", "noise_multiplier": 1.0, "delta": 0.9 / n})
    with pytest.raises(ValueError, match=rf"privacy.delta=.* below 1/n = 1/{n}.*factor of 10"):
        check_shard(c, partition=0, n_train=n)
    ok = cfg(privacy={"mode": "sample", "noise_multiplier": 1.0, "delta": 0.1 / n})
    check_shard(ok, partition=0, n_train=n)


def test_client_level_delta_must_be_well_below_one_over_the_clients() -> None:
    privacy = {"mode": "client", "client_noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match=r"privacy.delta=0.2 must be below 1/data.num_clients"):
        cfg(privacy={**privacy, "delta": 0.2}, aggregator={"weighting": "uniform"})
    cfg(privacy={**privacy, "delta": 0.025}, aggregator={"weighting": "uniform"})


def test_client_level_dp_refuses_pruned_tiers() -> None:
    tiers = [{"name": "small", "rank": 2, "clients": 4, "pruning": 0.5}]
    with pytest.raises(ConfigError, match=r"privacy\.mode='client' with pruned clients"):
        cfg(
            lora={"ranks": None, "tiers": tiers},
            privacy={"mode": "client", "client_noise_multiplier": 1.0},
            aggregator={"weighting": "uniform"},
            pruning={"importance": "magnitude"},
        )


def test_client_level_dp_refuses_local_epochs_whose_steps_reveal_n() -> None:
    """With epochs a reply's `steps` is ceil(epochs·n/batch): the client's data size, which
    client-level DP protects, in the clear (audit h87: n = 137 sent 137 steps, n = 138 sent 138)."""
    client = {"mode": "client", "client_noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match=r"needs federation\.local_steps, not local_epochs"):
        cfg(
            privacy=client,
            aggregator={"weighting": "uniform"},
            federation={"local_steps": None, "local_epochs": 1},
        )
    cfg(privacy=client, aggregator={"weighting": "uniform"})  # fixed steps: allowed


def test_wanda_maps_are_refused_under_dp() -> None:
    tiers = [{"name": "small", "rank": 2, "clients": 4, "pruning": 0.5}]
    with pytest.raises(ConfigError, match=r"pruning\.importance='wanda'"):
        cfg(
            lora={"ranks": None, "tiers": tiers},
            privacy={"mode": "sample", "noise_multiplier": 1.0},
        )


def _ffa_round(noise_at: str) -> tuple[dict[str, Factors], dict[str, Factors]]:
    g = torch.Generator().manual_seed(0)
    A0 = torch.randn(4, 6, generator=g)
    glob = {"m": Factors(torch.zeros(5, 4), A0, 1.0)}
    moved = {"m": Factors(torch.randn(5, 4, generator=g), A0 + 5.0, 1.0)}  # A moved: hostile
    dp = ClientLevelDP(
        get("ffa"),
        clip=1.0,
        noise_multiplier=1.0,
        noise_at=noise_at,
        expected_clients=1,
        freeze_a=True,
    )
    return glob, dp.release(glob, [moved])


@pytest.mark.parametrize("noise_at", ["server", "client"])
def test_ffa_under_client_dp_releases_the_frozen_a_not_a_clients(noise_at: str) -> None:
    """A hostile client's A + 5 enters neither release: A is frozen under FFA."""
    glob, released = _ffa_round(noise_at)
    assert torch.equal(released["m"].A, glob["m"].A)


def test_the_honest_bound_counts_b_alone_when_a_is_frozen() -> None:
    """S + σ(√D + 10) with σ = zS/√M and D the entries that move: B's 5×4 under FFA, not A's."""
    dp = ClientLevelDP(
        get("ffa"),
        clip=1.0,
        noise_multiplier=2.0,
        noise_at="client",
        expected_clients=4,
        freeze_a=True,
    )
    delta = {"m": (torch.zeros(5, 4, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64))}
    assert dp.honest_bound(delta) == pytest.approx(1.0 + 1.0 * (math.sqrt(20) + 10))


def test_ffa_local_noise_leaves_a_frozen() -> None:
    g = torch.Generator().manual_seed(1)
    A0 = torch.randn(2, 3, generator=g)
    start = {"m": Factors(torch.zeros(4, 2), A0, 2.0)}
    trained = {"m": Factors(torch.randn(4, 2, generator=g), A0 + 1.0, 2.0)}
    sent, _ = privatize_locally(
        trained, start, clip=1.0, noise_multiplier=1.0, clients=4, freeze_a=True
    )
    assert torch.allclose(sent["m"].A, A0)


def test_client_noise_target_derives_z_for_what_the_server_sees() -> None:
    privacy = {"mode": "client", "target_epsilon": 4.0, "delta": 1e-3, "noise_at": "client"}
    c = cfg(privacy=privacy, aggregator={"weighting": "uniform"})
    at_server = noise_multiplier_for(
        target_epsilon=4.0, delta=1e-3, sample_rate=1.0, steps=c.federation.rounds
    )
    assert client_noise_multiplier(c) == pytest.approx(at_server * math.sqrt(4))
    assert seen_noise_multiplier(c) == pytest.approx(at_server)
