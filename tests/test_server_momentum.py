"""Server momentum (FedAvgM) in factored form: hand-computed recurrences on diagonal updates, the
dense recurrence on random factors, the rank caps, state round-trips, recipe checks, and (slow) a
federation whose global departs from the plain run's."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from fedllm.aggregators import Factors
from fedllm.features.registry import feature_class
from fedllm.features.server_momentum import ServerMomentum, momentum_step
from fedllm.recipe import ConfigError, RunConfig, load_recipe, parse_overrides

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


def recipe(*overrides: str) -> RunConfig:
    """tiny.yaml with overrides, validated by the schema only (no feature checks)."""
    tree = yaml.safe_load(TINY.read_text())
    for key, value in parse_overrides(list(overrides)).items():
        both = isinstance(value, dict) and isinstance(tree.get(key), dict)
        tree[key] = {**tree[key], **value} if both else value
    return RunConfig.model_validate(tree)


def diag(values: Sequence[float], *, rank: int | None = None, scaling: float = 1.0) -> Factors:
    """diag(values) as factors B = diag/scaling (columns beyond `rank` dropped), A = I."""
    n = len(values)
    B = torch.diag(torch.tensor(values, dtype=torch.float64)) / scaling
    A = torch.eye(n, dtype=torch.float64)
    r = n if rank is None else rank
    return Factors(B[:, :r].clone(), A[:r].clone(), scaling)


def dense(values: Sequence[float]) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float64))


def close(f: Factors, expected: torch.Tensor) -> None:
    torch.testing.assert_close(f.delta(), expected, rtol=0, atol=1e-10)


def random_factors(d: int, k: int, r: int, scaling: float, seed: int) -> Factors:
    gen = torch.Generator().manual_seed(seed)
    return Factors(
        torch.randn(d, r, generator=gen, dtype=torch.float64),
        torch.randn(r, k, generator=gen, dtype=torch.float64),
        scaling,
    )


ZERO = Factors(torch.zeros(3, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), 2.0)


def test_beta_zero_gives_back_the_aggregate() -> None:
    old = random_factors(12, 10, 3, 16 / 3, seed=1)
    new = random_factors(12, 10, 5, 16 / 5, seed=2)
    velocity = random_factors(12, 10, 4, 1.0, seed=3)  # carried, but β = 0 forgets it
    global_, v = momentum_step(old, new, velocity=velocity, beta=0.0)
    torch.testing.assert_close(global_.delta(), new.delta(), rtol=0, atol=1e-10)
    assert (global_.rank, global_.scaling, global_.B.dtype) == (5, new.scaling, torch.float64)
    assert v.rank == 5 and v.scaling == 1.0


@pytest.mark.parametrize(
    ("lr", "g1", "v2", "g2"),
    [
        # v1 = Δ1 = diag(4,2,0); g1 = g0 + η·v1; Δ2 = agg2 − g1; v2 = ½·v1 + Δ2; g2 = g1 + η·v2
        (1.0, [4, 2, 0], [4, -1, 2], [8, 1, 2]),  # Δ2 = (2,−2,2)
        (0.5, [2, 1, 0], [6, 0, 2], [5, 1, 1]),  # Δ2 = (4,−1,2)
    ],
)
def test_two_steps_follow_the_hand_computed_recurrence(
    lr: float, g1: list[float], v2: list[float], g2: list[float]
) -> None:
    agg1, agg2 = diag([4, 2, 0], scaling=4.0), diag([6, 0, 2], scaling=0.5)
    first, v1 = momentum_step(ZERO, agg1, velocity=None, beta=0.5, lr=lr)
    close(first, dense(g1))
    close(v1, dense([4, 2, 0]))
    second, v = momentum_step(first, agg2, velocity=v1, beta=0.5, lr=lr)
    close(v, dense(v2))
    close(second, dense(g2))
    assert second.scaling == agg2.scaling and second.rank == 3


def test_matches_the_dense_recurrence_over_several_rounds() -> None:
    beta, lr = 0.7, 0.8
    global_ = random_factors(5, 4, 4, 0.5, seed=0)  # rank 4 ≥ min(d, k): nothing is truncated
    g, v_dense = global_.delta(), torch.zeros(5, 4, dtype=torch.float64)
    velocity = None
    for rnd in range(1, 4):
        agg = random_factors(5, 4, 4, 4.0, seed=rnd)
        v_dense = beta * v_dense + (agg.delta() - g)
        g = g + lr * v_dense
        global_, velocity = momentum_step(
            global_, agg, velocity=velocity, beta=beta, lr=lr, seed=rnd
        )
        torch.testing.assert_close(velocity.delta(), v_dense, rtol=0, atol=1e-10)
        torch.testing.assert_close(global_.delta(), g, rtol=0, atol=1e-10)


def test_velocity_cap_keeps_its_best_approximation_for_the_next_round() -> None:
    agg1, agg2 = diag([4, 2, 0]), diag([6, 0, 2])
    first, v1 = momentum_step(ZERO, agg1, velocity=None, beta=0.5, rank=1)
    close(first, dense([4, 2, 0]))  # the global uses the whole step
    assert v1.rank == 1
    close(v1, dense([4, 0, 0]))  # what is carried: the best rank-1 part of diag(4, 2, 0)
    second, v2 = momentum_step(first, agg2, velocity=v1, beta=0.5, rank=1)
    close(second, dense([8, 0, 2]))  # g1 + ½·diag(4,0,0) + diag(2,−2,2)
    close(v2, dense([4, 0, 0]))  # best rank-1 part of diag(4, −2, 2)


def test_global_comes_back_at_the_aggregate_rank_svd_ordered() -> None:
    first = diag([4, 2, 0])
    agg2 = diag([6, 0, 2], rank=3)
    agg2 = Factors(agg2.B[:, [0, 2]], agg2.A[[0, 2]], 1.0)  # the same update at rank 2
    second, v2 = momentum_step(first, agg2, velocity=diag([4, 2, 0]), beta=0.5)
    assert second.rank == 2 and v2.rank == 2
    close(second, dense([8, 0, 2]))  # best rank-2 part of diag(8, 1, 2)
    close(v2, dense([4, 0, 2]))  # best rank-2 part of diag(4, −1, 2)
    close(second.truncate(1), dense([8, 0, 0]))  # a client's cut is its best approximation


def test_float32_factors_stay_float32_and_inputs_are_not_mutated() -> None:
    old = random_factors(12, 10, 3, 2.0, seed=4)
    new = random_factors(12, 10, 6, 2.0, seed=5)
    velocity = random_factors(12, 10, 6, 1.0, seed=6)
    old, new, velocity = (
        Factors(f.B.float(), f.A.float(), f.scaling) for f in (old, new, velocity)
    )
    before = [t.clone() for f in (old, new, velocity) for t in (f.B, f.A)]
    global_, v = momentum_step(old, new, velocity=velocity, beta=0.9, lr=0.5, rank=4, method="rsvd")
    after = [t for f in (old, new, velocity) for t in (f.B, f.A)]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    assert global_.B.dtype == global_.A.dtype == v.B.dtype == torch.float32
    assert (global_.rank, v.rank) == (6, 4)


def test_bad_arguments_are_refused() -> None:
    for kwargs, named in (
        ({"beta": 1.0}, r"beta must be in \[0, 1\), got 1.0"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\), got -0.1"),
        ({"beta": 0.5, "lr": 0.0}, r"lr must be > 0, got 0.0"),
        ({"beta": 0.5, "rank": 0}, r"rank must be an int >= 1, got 0"),
    ):
        with pytest.raises(ValueError, match=named):
            momentum_step(ZERO, diag([1, 2, 3]), velocity=None, **kwargs)
    with pytest.raises(ValueError, match="but the new global is"):
        momentum_step(diag([1, 2]), diag([1, 2, 3]), velocity=None, beta=0.5)


# -- the feature -----------------------------------------------------------------------------


def round_inputs(rnd: int) -> tuple[dict[str, Factors], dict[str, Factors]]:
    old = {m: random_factors(8, 6, 3, 2.0, seed=10 * rnd + i) for i, m in enumerate("qv")}
    new = {m: random_factors(8, 6, 3, 2.0, seed=10 * rnd + 5 + i) for i, m in enumerate("qv")}
    return old, new


def test_feature_steps_every_module_and_keeps_the_velocity() -> None:
    feature = ServerMomentum(recipe("features.server_momentum.beta=0.5"))
    old, new = round_inputs(1)
    kept = [t.clone() for f in (*old.values(), *new.values()) for t in (f.B, f.A)]
    out = feature.after_aggregate(old, new, server_round=1)
    assert sorted(out) == ["q", "v"] and sorted(feature.velocity) == ["q", "v"]
    for m in "qv":
        expected, _ = momentum_step(old[m], new[m], velocity=None, beta=0.5, seed=1)
        torch.testing.assert_close(out[m].delta(), expected.delta())
    now = [t for f in (*old.values(), *new.values()) for t in (f.B, f.A)]
    assert all(torch.equal(x, y) for x, y in zip(kept, now, strict=True))  # inputs untouched
    with pytest.raises(ValueError, match="no old global"):
        feature.after_aggregate({"q": old["q"]}, new, server_round=2)


def test_state_round_trips_through_torch_save() -> None:
    cfg = recipe("features.server_momentum.beta=0.5", "features.server_momentum.rank=2")
    running = ServerMomentum(cfg)
    running.after_aggregate(*round_inputs(1), server_round=1)
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # tensors and plain containers only
    assert {v["B"].shape[1] for v in state["velocity"].values()} == {2}
    resumed = ServerMomentum(cfg)
    resumed.load_state_dict(state)
    old, new = round_inputs(2)
    a = running.after_aggregate(old, new, server_round=2)
    b = resumed.after_aggregate(old, new, server_round=2)
    assert all(torch.equal(a[m].B, b[m].B) and torch.equal(a[m].A, b[m].A) for m in "qv")
    fresh = ServerMomentum(cfg)
    fresh.load_state_dict(None)
    assert fresh.velocity == {} and fresh.state_dict() == {"velocity": {}}


# -- recipe ----------------------------------------------------------------------------------


def test_options_defaults_and_validation() -> None:
    opts = ServerMomentum(recipe("features.server_momentum={}")).options
    assert (opts.beta, opts.rank, opts.server_lr) == (0.9, None, 1.0)
    for bad in ("beta=1.0", "beta=-0.1", "rank=0", "server_lr=0", "momentum=0.9"):
        key = bad.split("=")[0]
        with pytest.raises(ValidationError, match=rf"(?s)\b{key}\b.*input_value"):
            ServerMomentum(recipe(f"features.server_momentum.{bad}"))


@pytest.mark.parametrize("name", ["flora", "fedsa", "ffa"])
def test_refuses_aggregators_without_adapter_state(name: str) -> None:
    cfg = recipe("features.server_momentum.beta=0.9", f"aggregator.name={name}")
    with pytest.raises(ValueError, match=rf"features\.server_momentum.*'{name}'"):
        ServerMomentum.check(cfg)
    ServerMomentum.check(recipe(f"aggregator.name={name}"))  # off: no refusal


@pytest.mark.parametrize("name", ["svd", "fedit", "squeeze", "hetlora", "lorafair"])
def test_accepts_adapter_state_aggregators(name: str) -> None:
    ServerMomentum.check(recipe("features.server_momentum.beta=0.9", f"aggregator.name={name}"))


def test_recipe_loading_runs_the_checks() -> None:
    assert feature_class("server_momentum") is ServerMomentum
    with pytest.raises(ConfigError, match=r"features\.server_momentum\.beta"):
        load_recipe(TINY, ["features.server_momentum.beta=1"])
    with pytest.raises(ConfigError, match=r"features\.server_momentum"):
        load_recipe(TINY, ["features.server_momentum.beta=0.9", "aggregator.name=flora"])


# -- end to end ------------------------------------------------------------------------------


def run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict[str, Any], list[float]]:
    """A 3-round tiny federation: its checkpoint and global held-out loss per round (0-3)."""
    from fedllm.deploy.local_grid import run_local
    from fedllm.server.checkpoint import load_checkpoint
    from fedllm.server.metrics import MetricsLog

    cfg = load_recipe(
        TINY,
        [
            f"output_dir={tmp_path}",
            f"name={name}",
            "data.num_clients=2",
            "data.max_examples=160",
            "lora.ranks=[2,4]",
            "federation.rounds=3",
            "federation.local_steps=3",
            *overrides,
        ],
    )
    run_dir, _ = run_local(cfg)
    rows = MetricsLog(run_dir).read()
    assert sum(r["kind"] == "client" and r["status"] == "ok" for r in rows) == 6
    losses = [r["held_out_loss"] for r in rows if r["kind"] == "server"]
    return load_checkpoint(run_dir), losses


@pytest.mark.slow
def test_momentum_changes_the_global_and_is_checkpointed(tmp_path: Path) -> None:
    plain, plain_loss = run(tmp_path, "plain")
    momentum, momentum_loss = run(tmp_path, "momentum", "features.server_momentum.beta=0.9")
    # round 1 starts from zero velocity: v = Δ, so the global is the plain aggregate; then not
    assert momentum_loss[1] == pytest.approx(plain_loss[1], abs=1e-6)
    assert all(abs(momentum_loss[r] - plain_loss[r]) > 1e-4 for r in (2, 3))
    deltas = [
        {m: s * (b.double() @ a.double()) for m, (b, a, s) in c["strategy"]["global"].items()}
        for c in (plain, momentum)
    ]
    gap = sum(torch.linalg.matrix_norm(deltas[0][m] - deltas[1][m]) for m in deltas[0])
    size = sum(torch.linalg.matrix_norm(d) for d in deltas[0].values())
    assert gap > 0.05 * size, (gap, size)  # momentum's global departs from the plain run's
    velocity = momentum["server_momentum"]["velocity"]
    assert sorted(velocity) == sorted(deltas[0]) and all(v["B"].any() for v in velocity.values())


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:  # a shared 2-core machine: avoid oversubscription
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
