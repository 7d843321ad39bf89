"""The (rank, pruning) bandit: converges to the best arm of a known environment; checkpoints."""

import random

import pytest

from fedllm.constrained.bandit import Arm, ArmBandit, efficiency

ARMS = [Arm(r, p) for r in (2, 8) for p in (0.0, 0.5)]
# known mean efficiencies: the rank-2, pruning-0.5 arm is best on this "device"
MEANS = {Arm(2, 0.0): 0.5, Arm(2, 0.5): 0.8, Arm(8, 0.0): 0.3, Arm(8, 0.5): 0.45}


def play(bandit: ArmBandit, rounds: int, *, seed: int = 0) -> dict[Arm, int]:
    rng = random.Random(seed)
    picks = dict.fromkeys(ARMS, 0)
    for _ in range(rounds):
        arm = bandit.select("dev")
        picks[arm] += 1
        bandit.update("dev", arm, reward=max(0.0, rng.gauss(MEANS[arm], 0.1)))
    return picks


@pytest.mark.parametrize("algorithm,exploration", [("ucb", 0.5), ("exp3", 0.1)])
def test_bandit_converges_to_the_best_arm(algorithm: str, exploration: float) -> None:
    bandit = ArmBandit(ARMS, algorithm=algorithm, exploration=exploration, seed=1)
    picks = play(bandit, 400)
    assert bandit.best("dev") == Arm(2, 0.5)
    assert picks[Arm(2, 0.5)] > 0.5 * 400, picks
    late = play(bandit, 100, seed=5)
    assert late[Arm(2, 0.5)] >= 70, late


def test_ucb_plays_every_arm_once_first() -> None:
    bandit = ArmBandit(ARMS)
    seen = []
    for _ in ARMS:
        arm = bandit.select("x")
        seen.append(arm)
        bandit.update("x", arm, reward=0.1)
    assert seen == ARMS


def test_state_round_trip_continues_identically() -> None:
    a = ArmBandit(ARMS, algorithm="exp3", exploration=0.2, seed=3)
    play(a, 30)
    b = ArmBandit(ARMS, algorithm="exp3", exploration=0.2, seed=3)
    b.load_state_dict(a.state_dict())
    assert [a.select("dev") for _ in range(1)] == [b.select("dev")]
    assert play(a, 20, seed=9) == play(b, 20, seed=9)
    other = ArmBandit(ARMS[:2])
    with pytest.raises(ValueError, match=r"arms .* differ"):
        other.load_state_dict(a.state_dict())


def test_efficiency_is_relative_gain_per_second() -> None:
    assert efficiency(4.0, 3.0, seconds=5.0) == pytest.approx(0.25 / 5.0)
    assert efficiency(4.0, 3.0, seconds=5.0, time_weight=0.0) == pytest.approx(0.25)
    assert efficiency(3.0, 4.0, seconds=5.0) == 0.0  # got worse: no reward
    assert efficiency(float("nan"), 1.0, seconds=1.0) == 0.0


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least one arm"):
        ArmBandit([])
    bandit = ArmBandit(ARMS)
    with pytest.raises(ValueError, match="client c: arm"):
        bandit.update("c", Arm(3, 0.1), reward=0.5)
    with pytest.raises(ValueError, match="client c: reward"):
        bandit.update("c", ARMS[0], reward=-1.0)


def test_one_clients_rewards_never_rescale_another_clients() -> None:
    """Each client's rewards are normalised by its own best: a client reporting a huge (or
    hostile) reward leaves the others' UCB indices as they were."""
    arms = [Arm(2, 0.0), Arm(4, 0.0)]
    alone, beside = ArmBandit(arms, seed=0), ArmBandit(arms, seed=0)
    for bandit in (alone, beside):
        bandit.update("a", arms[0], reward=1.0)
        bandit.update("a", arms[1], reward=3.0)
    beside.update("b", arms[0], reward=1e9)
    assert beside.scales == {"a": 3.0, "b": 1e9}
    for _ in range(5):  # the same choices for "a", with or without "b"
        pick = alone.select("a")
        assert beside.select("a") == pick
        alone.update("a", pick, reward=2.0)
        beside.update("a", pick, reward=2.0)
    old = {**beside.state_dict(), "scale": 5.0}  # a checkpoint of one shared scale
    del old["scales"]
    again = ArmBandit(arms, seed=0)
    again.load_state_dict(old)
    assert again.scales == {"a": 5.0, "b": 5.0}
