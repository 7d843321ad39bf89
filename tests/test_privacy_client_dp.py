"""fedllm.privacy.client_dp: clipping on factor deltas, noise zS/m, composition with aggregators."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm.aggregators import Factors, get, round_spec
from fedllm.privacy.client_dp import (
    ClientLevelDP,
    clip_delta,
    delta_norm,
    folded_delta,
    privatize_locally,
)


def factors(d: int, k: int, r: int, *, scaling: float, seed: int, scale: float = 1.0) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return Factors(
        torch.randn(d, r, generator=g) * scale, torch.randn(r, k, generator=g) * scale, scaling
    )


def client_dp(
    *,
    clip: float,
    z: float,
    expected: int,
    seed: int | None = None,
    aggregator: str = "fedit",
    noise_at: str = "server",
    freeze_a: bool = False,
) -> ClientLevelDP:
    """ClientLevelDP around `aggregator` (a seeded generator when `seed` is given)."""
    return ClientLevelDP(
        get(aggregator),
        clip=clip,
        noise_multiplier=z,
        noise_at=noise_at,
        expected_clients=expected,
        freeze_a=freeze_a,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )


def test_folded_delta_is_the_change_of_what_is_sent() -> None:
    """Hand-computed: ΔB = s·B − s₀·B₀[:, :r], ΔA = A − A₀[:r]."""
    ref = {"m": Factors(torch.ones(2, 3), torch.ones(3, 2), 2.0)}
    upd = {"m": Factors(torch.full((2, 2), 3.0), torch.full((2, 2), 4.0), 0.5)}
    dB, dA = folded_delta(upd, ref)["m"]
    assert torch.equal(dB, torch.full((2, 2), 0.5 * 3.0 - 2.0, dtype=torch.float64))
    assert torch.equal(dA, torch.full((2, 2), 3.0, dtype=torch.float64))
    # ‖ΔB‖² = 4·0.25, ‖ΔA‖² = 4·9
    assert delta_norm(folded_delta(upd, ref)) == pytest.approx(math.sqrt(1.0 + 36.0))


def test_clip_bounds_the_norm_over_all_modules() -> None:
    ref = {m: factors(16, 12, 4, scaling=2.0, seed=i) for i, m in enumerate("abc")}
    upd = {m: factors(16, 12, 2, scaling=4.0, seed=10 + i) for i, m in enumerate("abc")}
    delta = folded_delta(upd, ref)
    raw = delta_norm(delta)
    clipped, norm = clip_delta(delta, 0.25 * raw)
    assert norm == pytest.approx(raw)
    assert delta_norm(clipped) == pytest.approx(0.25 * raw)
    same, _ = clip_delta(delta, 2 * raw)  # already inside: unchanged
    assert delta_norm(same) == pytest.approx(raw)
    with pytest.raises(ValueError, match="clip norm must be > 0"):
        clip_delta(delta, 0.0)


def noiseless_mean(global_, updates, clip):
    """Hand-built: global (folded) + mean of clipped deltas, at the largest client rank."""
    deltas = [clip_delta(folded_delta(u, global_), clip)[0] for u in updates]
    out = {}
    for m, g in global_.items():
        r = g.rank
        B = g.scaling * g.B.double()
        A = g.A.double().clone()
        for d in deltas:
            b, a = d[m]
            B[:, : b.shape[1]] += b / len(deltas)
            A[: a.shape[0]] += a / len(deltas)
        out[m] = (B[:, :r], A[:r])
    return out


def test_server_noise_has_std_z_s_over_m_on_b_and_a() -> None:
    g = {m: factors(64, 48, 8, scaling=2.0, seed=i) for i, m in enumerate("ab")}
    ups = [
        {m: factors(64, 48, 8, scaling=2.0, seed=100 + 9 * j + i) for i, m in enumerate("ab")}
        for j in range(4)
    ]
    z, S = 1.5, 0.7
    dp = client_dp(clip=S, z=z, expected=4, seed=0)
    released = dp.release(g, ups)
    want = noiseless_mean(g, ups, S)
    noise_B = torch.cat([(released[m].B.double() - want[m][0]).flatten() for m in g])
    noise_A = torch.cat([(released[m].A.double() - want[m][1]).flatten() for m in g])
    target = z * S / 4
    assert abs(float(noise_B.std()) / target - 1) < 0.05  # 1024 entries: ~2% std error
    assert abs(float(noise_A.std()) / target - 1) < 0.05
    assert dp.last.clipped == 4 and dp.last.noise_std == pytest.approx(target)
    assert dp.take().effective_noise_multiplier == z and dp.take() is None


def test_server_noise_divides_by_the_replies_not_the_planned_clients() -> None:
    """Two replies of four planned (two clients failed): the mean of two clipped deltas has
    sensitivity S/2, so the noise is zS/2 = 1.5·0.7/2 = 0.525, not zS/4 = 0.2625."""
    g = {"m": factors(64, 48, 8, scaling=1.0, seed=0)}
    ups = [{"m": factors(64, 48, 8, scaling=1.0, seed=1 + j)} for j in range(2)]
    dp = client_dp(clip=0.7, z=1.5, expected=4, seed=0)
    released = dp.release(g, ups)
    want = noiseless_mean(g, ups, 0.7)
    noise = (released["m"].B.double() - want["m"][0]).flatten()
    assert dp.last.noise_std == pytest.approx(0.525)
    assert abs(float(noise.std()) / 0.525 - 1) < 0.05  # 512 entries


def test_mixed_ranks_average_over_all_replies_and_noise_every_component_a_client_moves() -> None:
    """A rank-1 client's ΔB [[2]] and a rank-2 client's [[4, 6]]: the mean is over both replies
    for every component, [[3, 3]] (not [[3, 6]], column 1 over its one holder). With clients of
    ranks 2 and 4 under a rank-8 global, components 0-3 get noise zS/m (column 3, which only
    the rank-4 client moves, too) and 4-7 stay the global's exactly."""
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = {"m": Factors(torch.zeros(1, 2), A, 1.0)}
    ups = [
        {"m": Factors(torch.tensor([[2.0]]), A[:1], 1.0)},
        {"m": Factors(torch.tensor([[4.0, 6.0]]), A, 1.0)},
    ]
    quiet = client_dp(clip=100.0, z=1e-9, expected=2, seed=0)
    released = quiet.release(g, ups)["m"]
    assert torch.allclose(released.B.double(), torch.tensor([[3.0, 3.0]]).double(), atol=1e-6)
    assert torch.allclose(released.A, A, atol=1e-6)  # noise zS/m = 5e-8

    g8 = {"m": factors(400, 6, 8, scaling=1.0, seed=0)}
    ups = [{"m": factors(400, 6, r, scaling=1.0, seed=10 + r)} for r in (2, 4)]
    z, S = 2.0, 1.0
    dp = client_dp(clip=S, z=z, expected=2, seed=1)
    out = dp.release(g8, ups)["m"]
    want_B = noiseless_mean(g8, ups, S)["m"][0]
    assert out.B.shape == (400, 8)
    assert torch.allclose(out.B[:, 4:], g8["m"].B[:, 4:]) and torch.allclose(
        out.A[4:], g8["m"].A[4:]
    )
    column_3 = out.B[:, 3].double() - want_B[:, 3]
    assert abs(float(column_3.std()) / (z * S / 2) - 1) < 0.15  # 400 entries: ~3.5% std error


def test_default_noise_is_not_reproducible() -> None:
    """Noise nobody can re-derive from the recipe: without a generator, two calls differ."""
    from fedllm.privacy.client_dp import os_generator

    assert os_generator().initial_seed() != os_generator().initial_seed()
    received = {"m": factors(8, 6, 2, scaling=1.0, seed=0)}
    update = {"m": factors(8, 6, 2, scaling=1.0, seed=1)}
    knobs = {"clip": 1.0, "noise_multiplier": 1.0, "clients": 4, "freeze_a": False}
    first, _ = privatize_locally(update, received, **knobs)
    second, _ = privatize_locally(update, received, **knobs)
    assert not torch.equal(first["m"].B, second["m"].B)


def test_frozen_a_gets_no_noise() -> None:
    g = {"m": factors(32, 24, 4, scaling=1.0, seed=0)}
    ups = []
    for j in range(3):  # FFA clients: A is the shared slice, only B moved
        B = torch.randn(32, 4, generator=torch.Generator().manual_seed(j))
        ups.append({"m": Factors(B, g["m"].A.clone(), 1.0)})
    dp = client_dp(clip=1.0, z=1.0, expected=3, aggregator="ffa", freeze_a=True)
    new_global, _ = dp(g, ups)
    assert torch.equal(new_global["m"].A, g["m"].A), "A must be exactly the shared A (no noise)"
    assert not torch.allclose(new_global["m"].B, noiseless_mean(g, ups, 1.0)["m"][0].float())


def test_local_noise_is_z_s_over_sqrt_m_per_client() -> None:
    received = {m: factors(64, 48, 8, scaling=2.0, seed=i) for i, m in enumerate("ab")}
    update = {m: factors(64, 48, 8, scaling=2.0, seed=5 + i) for i, m in enumerate("ab")}
    z, S, m = 2.0, 0.5, 4
    sent, norm = privatize_locally(
        update,
        received,
        clip=S,
        noise_multiplier=z,
        clients=m,
        freeze_a=False,
        generator=torch.Generator().manual_seed(2),
    )
    clipped, _ = clip_delta(folded_delta(update, received), S)
    noise = torch.cat(  # on B and on A (not frozen here)
        [
            (d[i] - c[i]).flatten()
            for d, c in zip(folded_delta(sent, received).values(), clipped.values(), strict=True)
            for i in (0, 1)
        ]
    )
    assert norm > S
    assert abs(float(noise.std()) / (z * S / math.sqrt(m)) - 1) < 0.05
    assert all(f.scaling == 2.0 and f.rank == 8 for f in sent.values())


def test_local_noise_is_accounted_at_what_the_server_sees_of_one_update() -> None:
    """With noise added by each client, the server sees every update with only its own share
    of the noise, zS/√m: the round is accounted at z/√m, whatever the ranks."""
    g = {"m": factors(16, 8, 8, scaling=1.0, seed=0)}
    ups = [{"m": factors(16, 8, r, scaling=1.0, seed=r)} for r in (2, 4, 8, 8)]
    dp = client_dp(clip=1.0, z=2.0, expected=4, noise_at="client")
    dp.release(g, ups)
    assert dp.last.effective_noise_multiplier == pytest.approx(2.0 / math.sqrt(4))


@pytest.mark.parametrize("name", ["fedit", "ffa", "svd", "hetlora"])
def test_wraps_registered_aggregators_as_post_processing(name: str) -> None:
    assert not (round_spec(name).merge or round_spec(name).local_B)  # adapter-state methods
    shared_A = factors(32, 24, 8, scaling=2.0, seed=0).A
    g = {"m": Factors(torch.zeros(32, 8), shared_A, 2.0)}
    ups = [
        {
            "m": Factors(
                torch.randn(32, r, generator=torch.Generator().manual_seed(r)),
                shared_A[:r].clone(),
                16.0 / r,
            )
        }
        for r in (2, 4, 8)
    ]
    dp = client_dp(clip=0.5, z=1.0, expected=3, seed=4, aggregator=name, freeze_a=True)
    released = dp.release(g, ups)
    dp.generator.manual_seed(4)
    new_global, _ = dp(g, ups)
    assert new_global["m"].shape == (32, 24)
    # exact post-processing: each aggregator of the one released update (weight 1) is that
    # update, so nothing of the clients' own updates reaches the global
    torch.testing.assert_close(new_global["m"].delta(), released["m"].delta(), rtol=1e-4, atol=1e-5)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="noise_at"):
        ClientLevelDP(
            get("fedit"),
            clip=1,
            noise_multiplier=1,
            noise_at="edge",
            expected_clients=2,
            freeze_a=False,
        )
    with pytest.raises(ValueError, match="clip > 0"):
        client_dp(clip=0, z=1, expected=2)


def test_a_hostile_update_under_client_noise_is_cut_to_an_honest_norm() -> None:
    """noise_at=client: the server cannot clip to S (the noise is in the update), but an update
    longer than S + σ(√D + 10) is no client's own clipped-and-noised one: it is cut to that
    bound, so one hostile client moves the release no further than an honest one could."""
    g = {"m": factors(64, 48, 8, scaling=1.0, seed=0)}
    z, S, m = 1.0, 0.5, 3
    gen = torch.Generator().manual_seed(7)
    honest = [
        privatize_locally(
            {"m": factors(64, 48, 8, scaling=1.0, seed=10 + i)},
            g,
            clip=S,
            noise_multiplier=z,
            clients=m,
            freeze_a=False,
            generator=gen,
        )[0]
        for i in range(m - 1)
    ]
    hostile = {"m": Factors(g["m"].B + 1e4, g["m"].A.clone(), 1.0)}
    dp = client_dp(clip=S, z=z, expected=m, noise_at="client")
    bound = dp.honest_bound(folded_delta(hostile, g))
    d = 64 * 8 + 8 * 48
    assert bound == pytest.approx(S + z * S / math.sqrt(m) * (math.sqrt(d) + 10))
    assert all(delta_norm(folded_delta(h, g)) < bound for h in honest), "honest ones pass"
    with_hostile = dp.release(g, [*honest, hostile])
    assert dp.last.norms[-1] > 1e4, "the round still reports the norm it was sent"
    without = dp.release(g, [*honest, honest[0]])
    moved = math.sqrt(
        sum(
            float(x.square().sum())
            for x in (
                with_hostile["m"].B.double() - without["m"].B.double(),
                with_hostile["m"].A.double() - without["m"].A.double(),
            )
        )
    )
    assert moved <= 2 * bound / m + 1e-9  # its delta and the one it replaced, each ≤ bound
