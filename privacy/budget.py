"""The run's privacy account, shared by the DP mechanisms: the ledger, the budget stop, the ε
reported in metrics and progress. Saved with each checkpoint (an Opacus accountant per key)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedllm.privacy.accounting import PrivacyLedger
from fedllm.privacy.plan import noise_planned_for
from fedllm.recipe.schema import RunConfig

# what any private reply may carry: who it is, its rank and steps, what it moved (no loss, no data
# size, no timing, nothing computed from the data)
PUBLIC_KEYS = frozenset(
    {"partition-id", "rank", "scaling", "pruning", "steps", "bytes-sent", "bytes-received"}
)


def _charges(plan: Mapping[str, Any]) -> dict[str, tuple[float, float, int]]:
    """key -> (σ, q, steps) as plain numbers (a plan, or the lists a checkpoint holds)."""
    return {key: (float(s), float(q), int(n)) for key, (s, q, n) in plan.items()}


class Account:
    """A ledger of spent ε for one run, and the check that a planned round stays in budget."""

    def __init__(
        self,
        *,
        delta: float,
        accountant: str,
        budget: float | None,
        mode: str,
        planned_for: Mapping[str, Any] | None = None,
    ) -> None:
        self.delta, self.budget, self.mode = delta, budget, mode
        # the settings a target ε's noise was planned for (`plan.noise_planned_for`)
        self.planned_for = dict(planned_for or {})
        self.ledger = PrivacyLedger(delta=delta, accountant=accountant)
        # the charge of the round about to run, as planned before its clients were asked: saved
        # with the pending checkpoint, so a resume charges exactly it (not the resumed recipe's)
        self.pending: dict[str, tuple[float, float, int]] = {}

    @classmethod
    def for_recipe(cls, cfg: RunConfig) -> Account:
        """The account of a DP run of `cfg`: its δ, accountant, budget, mode and the settings a
        target ε's noise is planned for (what both DP mechanisms keep)."""
        p = cfg.privacy
        return cls(
            delta=p.delta,
            accountant=p.accountant,
            budget=p.epsilon_budget,
            mode=p.mode,
            planned_for=noise_planned_for(cfg),
        )

    def stop(self, server_round: int, plan: Mapping[str, tuple[float, float, int]]) -> str | None:
        """Why round `server_round` (charging `plan`: key -> (σ, q, steps)) must not run; the
        plan is kept as the pending charge (`charge_pending`)."""
        self.pending = _charges(plan)
        if self.budget is None:
            return None
        after = self.ledger.epsilon_if(plan)
        if after <= self.budget:
            return None
        return (
            f"privacy budget: round {server_round} would bring ε to {after:.3f} > "
            f"privacy.epsilon_budget={self.budget:g} (spent so far {self.ledger.epsilon():.3f}); "
            f"stopping after round {server_round - 1}"
        )

    def annotate(self, server_row: dict[str, Any]) -> None:
        """Put the ε spent so far (the max over keys) and δ into the round's server row."""
        server_row["epsilon"] = self.ledger.epsilon()
        server_row["delta"] = self.delta

    def progress(self) -> str:
        """'; ε=… (δ=…)': the ε spent so far, for the round's progress line."""
        return f"; ε={self.ledger.epsilon():.3f} (δ={self.delta:g})"

    def charge_pending(self) -> bool:
        """Charge the round planned last (a round lost to a crash, on --resume) exactly as it was
        planned: the noise its clients trained with, whatever the resumed recipe now derives.
        False if the checkpoint holds no plan (one written before fedllm kept it)."""
        for key, (sigma, q, steps) in self.pending.items():
            self.ledger.record(key, noise_multiplier=sigma, sample_rate=q, steps=steps)
        return bool(self.pending)

    def state_dict(self) -> dict[str, Any]:
        """The ledger and the charges not yet booked, for the checkpoint (the accountant resumes
        with the run)."""
        pending = {key: list(charge) for key, charge in self.pending.items()}
        return {
            "ledger": self.ledger.state_dict(),
            "pending": pending,
            "planned_for": dict(self.planned_for),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Resume the ledger from a checkpoint; a checkpoint without one cannot resume a DP run."""
        if state is None:
            raise ValueError(
                "the checkpoint has no privacy ledger (the run began without DP); resuming with "
                f"privacy.mode={self.mode!r} would not count the rounds already run"
            )
        saved = state.get("planned_for") or {}  # {} in a checkpoint from before it was kept
        if changed := sorted(k for k in saved if saved[k] != self.planned_for.get(k)):
            was = ", ".join(f"{k}={saved[k]}" for k in changed)
            now = ", ".join(f"{k}={self.planned_for.get(k)}" for k in changed)
            raise ValueError(
                f"privacy.target_epsilon: the checkpoint's rounds ran at the noise planned for "
                f"{was}; resuming with {now} would spend the rest at another plan's noise, so the "
                "run's ε would no longer be the target (more rounds go past it). Resume with "
                f"{was}, or start a new run (a new name=)"
            )
        self.ledger.load_state_dict(state["ledger"])
        self.pending = _charges(state.get("pending") or {})
