"""Online choice of each client's (LoRA rank, pruning ratio, base precision) by a multi-armed
bandit (as FedSpine, whose arms are rank and pruning; quantization is ours).

No prior knowledge of the devices: every client has its own learner over the same arms, and learns
from what its rounds cost and bought. The reward of a round is its training efficiency

    relative loss gain / seconds^time_weight,    gain = clamp((ℓ_first − ℓ_last) / ℓ_first, 0, 1)

normalised by the largest efficiency that client has obtained so far (so rewards lie in [0, 1]
without knowing any device's speed, and one client's numbers, honest or not, never rescale
another's). A gain above 1 needs a negative last loss, which no cross-entropy has; seconds
count from 1 µs, and a reward is at most `MAX_REWARD`: whatever finite losses and time a client
reports, its reward and the bandit's sums stay finite. `ucb` is UCB1 on those normalised means;
`exp3` is EXP3 (robust when devices change speed over time). Draws are seeded by (seed, client,
play count): replays are identical. A round that bought nothing (a missed deadline) is a reward
of 0; an arm a client cannot run at all (it does not fit its memory) is `forbid`den for that
client and never offered to it again.
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
    """One configuration a client can run: LoRA rank, pruning ratio and precision of its base."""

    rank: int
    pruning: float
    quantization: str = "none"  # "none", "4bit" or "8bit" (bitsandbytes)


MIN_SECONDS = 1e-6  # a round's time counts from 1 µs (a reported 0 divides by this)
MAX_REWARD = 1e100  # above any real reward (gain ≤ 1, ≥ 1 µs at time_weight ≤ 16); finite sums


def efficiency(
    loss_first: float, loss_last: float, *, seconds: float, time_weight: float = 1.0
) -> float:
    """Relative loss improvement of a round (at most 1) per (seconds ** time_weight): in
    [0, MAX_REWARD] for any finite input, never raises (a hostile client's numbers included);
    0 for a non-finite one."""
    if not all(math.isfinite(x) for x in (loss_first, loss_last, seconds, time_weight)):
        return 0.0
    gain = min(1.0, (loss_first - loss_last) / max(abs(loss_first), 1e-12))
    if gain <= 0:  # the loss did not improve
        return 0.0
    base = max(seconds, MIN_SECONDS)
    try:
        rate = gain / base**time_weight
    except OverflowError:  # base > 1: a denominator beyond the float range
        return 0.0
    except ZeroDivisionError:  # base < 1: a denominator that underflowed to 0
        return MAX_REWARD
    return min(rate, MAX_REWARD)


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
        self.forbidden: dict[str, list[int]] = {}  # arm indices a client cannot run
        self.scales: dict[str, float] = {}  # each client's largest raw reward, to normalise

    def _init(self, client: str) -> None:
        k = len(self.arms)
        self.counts.setdefault(client, [0] * k)
        self.sums.setdefault(client, [0.0] * k)
        self.log_weights.setdefault(client, [0.0] * k)

    def allowed(self, client: str) -> list[int]:
        """Indices of the arms `client` may be offered (every arm if it can run none)."""
        banned = set(self.forbidden.get(client, ()))
        return [i for i in range(len(self.arms)) if i not in banned] or list(range(len(self.arms)))

    def forbid(self, client: str, arm: Arm) -> None:
        """Never offer `arm` to `client` again (it cannot run it, e.g. out of memory)."""
        i = self._index(client, arm)
        if i not in self.forbidden.setdefault(client, []):
            self.forbidden[client].append(i)

    def probabilities(self, client: str) -> list[float]:
        """EXP3's sampling distribution for `client` (0 on forbidden arms)."""
        self._init(client)
        ok = self.allowed(client)
        lw = self.log_weights[client]
        top = max(lw[i] for i in ok)
        w = [math.exp(lw[i] - top) if i in ok else 0.0 for i in range(len(lw))]
        k, g, total = len(ok), self.exploration, sum(w)
        return [(1 - g) * x / total + g / k if i in ok else 0.0 for i, x in enumerate(w)]

    def select(self, client: str) -> Arm:
        """The arm `client` should run next."""
        self._init(client)
        counts = self.counts[client]
        if self.algorithm == "exp3":
            rng = random.Random(f"{self.seed}-{client}-{sum(counts)}")
            return self.arms[rng.choices(range(len(self.arms)), self.probabilities(client))[0]]
        ok = self.allowed(client)
        for i in ok:
            if counts[i] == 0:
                return self.arms[i]  # play every arm once first
        t, scale = sum(counts), self.scales.get(client) or 1.0
        index = {
            i: self.sums[client][i] / counts[i] / scale
            + self.exploration * math.sqrt(2 * math.log(t) / counts[i])
            for i in ok
        }
        return self.arms[max(ok, key=index.__getitem__)]

    def _index(self, client: str, arm: Arm) -> int:
        if arm not in self.arms:
            raise ValueError(f"client {client}: arm {arm} is not one of {self.arms}")
        self._init(client)
        return self.arms.index(arm)

    def update(self, client: str, arm: Arm, *, reward: float) -> None:
        """Record the raw reward `client` obtained with `arm`."""
        i = self._index(client, arm)
        if not math.isfinite(reward) or reward < 0:
            raise ValueError(f"client {client}: reward must be finite and >= 0, got {reward}")
        if self.algorithm == "exp3":
            p = self.probabilities(client)[i]
        scale = self.scales[client] = max(self.scales.get(client, 0.0), reward)
        self.counts[client][i] += 1
        self.sums[client][i] += reward
        if self.algorithm == "exp3" and p > 0:  # p = 0: an arm forbidden since it was offered
            x = reward / scale if scale > 0 else 0.0
            k = len(self.allowed(client))
            self.log_weights[client][i] += self.exploration * (x / p) / k

    def best(self, client: str) -> Arm:
        """The arm with the highest mean reward so far (most played on ties), of those allowed."""
        self._init(client)
        n, s = self.counts[client], self.sums[client]
        ok = self.allowed(client)
        return self.arms[max(ok, key=lambda i: (s[i] / n[i] if n[i] else -1, n[i]))]

    def rename(self, old: str, new: str) -> None:
        """Give `old`'s counts, rewards and forbidden arms to `new` (a client's new name)."""
        for table in (self.counts, self.sums, self.log_weights, self.forbidden, self.scales):
            if old in table and new not in table:
                table[new] = table.pop(old)

    def state_dict(self) -> dict:
        """The arms and each client's counts and rewards, for the checkpoint."""
        return {
            "arms": [(a.rank, a.pruning, a.quantization) for a in self.arms],
            "counts": self.counts,
            "sums": self.sums,
            "log_weights": self.log_weights,
            "forbidden": self.forbidden,
            "scales": dict(self.scales),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict`'s output; a checkpoint with other arms is refused."""
        arms = [Arm(int(r), float(p), *q) for r, p, *q in state["arms"]]  # older: no precision
        if arms != self.arms:
            raise ValueError(
                f"checkpointed bandit arms {arms} differ from the recipe's {self.arms}"
            )
        self.counts = {c: list(v) for c, v in state["counts"].items()}
        self.sums = {c: list(v) for c, v in state["sums"].items()}
        self.log_weights = {c: list(v) for c, v in state["log_weights"].items()}
        self.forbidden = {c: list(v) for c, v in state.get("forbidden", {}).items()}
        if "scales" in state:
            self.scales = {c: float(v) for c, v in state["scales"].items()}
        else:  # a checkpoint of one scale shared by every client
            self.scales = {c: float(state["scale"]) for c in self.counts}
