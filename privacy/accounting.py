"""Privacy accounting through Opacus's accountants (RDP or PRV), and the run's ledger of spent ε.

A `PrivacyLedger` keeps one Opacus accountant per key: one per data partition for sample-level
DP-SGD (clients' data are disjoint, so the federation's ε is the max over partitions), or one
"federation" key for client-level DP (one Gaussian step per round at q = 1, σ = the z the
server sees).
The server fills it from what clients report (σ, q, steps actually run), since a client keeps no
state between rounds; its `state_dict` goes into the run checkpoint and comes back on --resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
FEDERATION = "federation"


def _check(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    _check_delta(delta)


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}, got {name!r}")
    return create_accountant(mechanism=name)


def _epsilon_of(acc: IAccountant, delta: float) -> float:
    return float(acc.get_epsilon(delta=delta)) if acc.history else 0.0


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε after `steps` Poisson-sampled Gaussian steps (rate q, noise multiplier σ) at this δ."""
    _check(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    acc = _accountant(accountant)
    if steps:
        acc.history = [(float(noise_multiplier), float(sample_rate), steps)]
    return _epsilon_of(acc, delta)


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """The smallest σ (to Opacus's 0.01 ε tolerance) that keeps `steps` steps within target ε."""
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    _check(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps, delta=delta)
    if steps == 0:
        raise ValueError("steps must be >= 1 to derive a noise multiplier")
    _accountant(accountant)  # validates the name
    try:
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    except ValueError as err:  # Opacus: "The privacy budget is too low." (σ past its search cap)
        if "too low" not in str(err):
            raise
        raise ValueError(
            unreachable(
                target_epsilon,
                delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        ) from None
    return float(sigma)


def epsilon_floor(*, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest ε the accountant certifies for these steps with any noise (ε at Opacus's
    σ cap): under RDP its δ term log(1/δ)/(α−1) at the largest order; under PRV its error bound."""
    return epsilon(
        noise_multiplier=MAX_SIGMA,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=accountant,
    )


def unreachable(
    target_epsilon: float, *, delta: float, sample_rate: float, steps: int, accountant: str
) -> str:
    """Why no noise meets `target_epsilon`, with the floor (`epsilon_floor`)."""
    floor = epsilon_floor(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    why = "its δ term alone" if accountant == "rdp" else "its error bound"
    return (
        f"target ε={target_epsilon:g} is below what the {accountant!r} accountant can certify "
        f"for {steps} steps at q={sample_rate:.3g}, δ={delta:g} with any noise (≈{floor:.3g} "
        f"at σ={MAX_SIGMA:g}: {why}); raise the target ε or δ"
    )


class PrivacyLedger:
    """Spent ε per key (a partition, or the federation), each an Opacus accountant's history."""

    def __init__(self, *, delta: float, accountant: str = "rdp") -> None:
        _check_delta(delta)
        _accountant(accountant)
        self.delta = delta
        self.accountant = accountant
        self._accountants: dict[str, IAccountant] = {}

    def record(self, key: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add `steps` steps of the sampled Gaussian (σ, q) to `key`'s history."""
        _check(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=self.delta,
        )
        acc = self._accountants.setdefault(key, _accountant(self.accountant))
        for _ in range(steps):
            acc.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    def keys(self) -> list[str]:
        """The keys the ledger holds (one accountant each), sorted."""
        return sorted(self._accountants)

    def steps(self, key: str) -> int:
        """Steps recorded for `key` so far (0 for a key never charged)."""
        acc = self._accountants.get(key)
        return sum(s for _, _, s in acc.history) if acc else 0

    def epsilon(self, key: str | None = None) -> float:
        """ε spent by `key`, or the max over all keys (0 when nothing was recorded)."""
        if key is not None:
            acc = self._accountants.get(key)
            return _epsilon_of(acc, self.delta) if acc else 0.0
        return max((self.epsilon(k) for k in self._accountants), default=0.0)

    def epsilon_if(
        self, planned: Mapping[str, tuple[float, float, int]] | Iterable[tuple[str, tuple]]
    ) -> float:
        """The max ε over all keys if each key in `planned` also ran (σ, q, steps) more steps."""
        plan = dict(planned.items() if isinstance(planned, Mapping) else planned)
        worst = max((self.epsilon(k) for k in self._accountants if k not in plan), default=0.0)
        for key, (sigma, q, steps) in plan.items():
            acc = _accountant(self.accountant)
            old = self._accountants.get(key)
            acc.history = list(old.history) if old else []
            # merged as step() would, so PRV sees the history a real round would leave
            if acc.history and acc.history[-1][:2] == (float(sigma), float(q)):
                acc.history[-1] = (float(sigma), float(q), acc.history[-1][2] + int(steps))
            else:
                acc.history.append((float(sigma), float(q), int(steps)))
            worst = max(worst, _epsilon_of(acc, self.delta))
        return worst

    def state_dict(self) -> dict:
        """Plain data (Opacus accountant state per key) for the run checkpoint."""
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "accountants": {k: dict(a.state_dict()) for k, a in self._accountants.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a checkpointed ledger; refuses one made with another accountant or δ."""
        if state["accountant"] != self.accountant or not math.isclose(state["delta"], self.delta):
            raise ValueError(
                f"checkpointed privacy ledger used accountant {state['accountant']!r} at δ="
                f"{state['delta']}; this recipe uses {self.accountant!r} at δ={self.delta} "
                "(privacy.accountant / privacy.delta must not change on --resume)"
            )
        self._accountants = {}
        for key, acc_state in state["accountants"].items():
            acc = _accountant(self.accountant)
            acc.load_state_dict(acc_state)
            self._accountants[key] = acc


def partition_key(partition: int) -> str:
    """The ledger key of a partition's ε: 'partition-<p>'."""
    return f"partition-{int(partition)}"
