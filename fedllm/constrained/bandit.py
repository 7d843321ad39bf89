"""Online choice of each client's (LoRA rank, pruning ratio) by a multi-armed bandit (as FedSpine).

No prior knowledge of the devices: every client has its own learner over the same arms, and learns
from what its rounds cost and bought. The reward of a round is its training efficiency

    relative loss gain / seconds^time_weight,    gain = max(0, (ℓ_first − ℓ_last) / ℓ_first)

normalised by the largest efficiency observed so far (so rewards lie in [0, 1] without knowing any
device's speed). `ucb` is UCB1 on those normalised means; `exp3` is EXP3 (robust when devices
change speed over time). Draws are seeded by (seed, client, play count): replays are identical.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Algorithm = Literal["ucb", "exp3"]


@dataclass(frozen=True)
class Arm:
    """One configuration a client can run: LoRA rank and pruning ratio of its base."""

    rank: int
    pruning: float


def efficiency(
    loss_first: float, loss_last: float, seconds: float, *, time_weight: float = 1.0
) -> float:
    """Relative loss improvement of a round per (seconds ** time_weight); never negative."""
    if not all(math.isfinite(x) for x in (loss_first, loss_last, seconds)):
        return 0.0
    gain = max(0.0, (loss_first - loss_last) / max(abs(loss_first), 1e-12))
    return gain / max(seconds, 1e-6) ** time_weight


class ArmBandit:
    """Independent per-client bandits over shared arms; state is plain data for checkpoints."""

    def __init__(
        self,
        arms: Sequence[Arm],
        *,
        algorithm: Algorithm = "ucb",
        exploration: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not arms:
            raise ValueError("the bandit needs at least one arm")
        if algorithm not in ("ucb", "exp3"):
            raise ValueError(f"bandit algorithm {algorithm!r}; valid: 'ucb', 'exp3'")
        if algorithm == "exp3" and not 0 < exploration <= 1:
            raise ValueError(f"exp3 exploration (gamma) must be in (0, 1], got {exploration}")
        self.arms = list(arms)
        self.algorithm = algorithm
        self.exploration = exploration
        self.seed = seed
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, list[float]] = {}  # raw rewards (UCB)
        self.log_weights: dict[str, list[float]] = {}  # EXP3
        self.scale = 0.0  # the largest raw reward seen, for normalisation

    def _init(self, client: str) -> None:
        k = len(self.arms)
        self.counts.setdefault(client, [0] * k)
        self.sums.setdefault(client, [0.0] * k)
        self.log_weights.setdefault(client, [0.0] * k)

    def probabilities(self, client: str) -> list[float]:
        """EXP3's sampling distribution for `client`."""
        self._init(client)
        lw = self.log_weights[client]
        top = max(lw)
        w = [math.exp(x - top) for x in lw]
        k, g = len(w), self.exploration
        return [(1 - g) * x / sum(w) + g / k for x in w]

    def select(self, client: str) -> Arm:
        """The arm `client` should run next."""
        self._init(client)
        counts = self.counts[client]
        if self.algorithm == "exp3":
            rng = random.Random(f"{self.seed}-{client}-{sum(counts)}")
            return self.arms[rng.choices(range(len(self.arms)), self.probabilities(client))[0]]
        for i, n in enumerate(counts):
            if n == 0:
                return self.arms[i]  # play every arm once first
        t, scale = sum(counts), self.scale or 1.0
        index = [
            self.sums[client][i] / n / scale + self.exploration * math.sqrt(2 * math.log(t) / n)
            for i, n in enumerate(counts)
        ]
        return self.arms[max(range(len(index)), key=index.__getitem__)]

    def update(self, client: str, arm: Arm, reward: float) -> None:
        """Record the raw reward `client` obtained with `arm`."""
        if arm not in self.arms:
            raise ValueError(f"client {client}: arm {arm} is not one of {self.arms}")
        if not math.isfinite(reward) or reward < 0:
            raise ValueError(f"client {client}: reward must be finite and >= 0, got {reward}")
        self._init(client)
        i = self.arms.index(arm)
        if self.algorithm == "exp3":
            p = self.probabilities(client)[i]
        self.scale = max(self.scale, reward)
        self.counts[client][i] += 1
        self.sums[client][i] += reward
        if self.algorithm == "exp3":
            x = reward / self.scale if self.scale > 0 else 0.0
            self.log_weights[client][i] += self.exploration * (x / p) / len(self.arms)

    def best(self, client: str) -> Arm:
        """The arm with the highest mean reward so far (most played on ties)."""
        self._init(client)
        n, s = self.counts[client], self.sums[client]
        return self.arms[max(range(len(n)), key=lambda i: (s[i] / n[i] if n[i] else -1, n[i]))]

    def state_dict(self) -> dict:
        return {
            "arms": [(a.rank, a.pruning) for a in self.arms],
            "counts": self.counts,
            "sums": self.sums,
            "log_weights": self.log_weights,
            "scale": self.scale,
        }

    def load_state_dict(self, state: dict) -> None:
        arms = [Arm(int(r), float(p)) for r, p in state["arms"]]
        if arms != self.arms:
            raise ValueError(
                f"checkpointed bandit arms {arms} differ from the recipe's {self.arms}"
            )
        self.counts = {c: list(v) for c, v in state["counts"].items()}
        self.sums = {c: list(v) for c, v in state["sums"].items()}
        self.log_weights = {c: list(v) for c, v in state["log_weights"].items()}
        self.scale = float(state["scale"])
