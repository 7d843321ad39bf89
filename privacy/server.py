"""The server's side of DP: account every round, put ε into the metrics, stop before the budget.

Sample-level: each client reports σ, q and the DP-SGD steps it actually ran; the ledger keeps one
accountant per partition (a client keeps no state between rounds) and the federation's ε is the
max over partitions, as their data are disjoint. Client-level: one sampled-Gaussian step per
round with q = sampled/N and the release's effective z. The ledger is saved with each checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from flwr.app import Message

from fedllm.config import RunConfig
from fedllm.privacy.accounting import FEDERATION, PrivacyLedger, partition_key
from fedllm.privacy.client_dp import ClientLevelDP, Release
from fedllm.privacy.plan import client_noise_multiplier, planned_clients, sample_plan

log = logging.getLogger("fedllm.server")


def make_client_dp(cfg: RunConfig, aggregate_fn, *, freeze_a: bool) -> ClientLevelDP | None:
    """The DP-FedAvg wrapper of the recipe's aggregator (None unless privacy.mode=client)."""
    p = cfg.privacy
    if p.mode != "client":
        return None
    return ClientLevelDP(
        aggregate_fn,
        clip=p.client_clip,
        noise_multiplier=client_noise_multiplier(cfg),
        noise_at=p.noise_at,
        expected_clients=planned_clients(cfg),
        freeze_a=freeze_a,
    )


class ServerPrivacy:
    """Ledger, per-round ε rows and the budget check for one run (inactive when mode=none)."""

    def __init__(self, cfg: RunConfig, *, client_dp: ClientLevelDP | None = None) -> None:
        self.cfg = cfg
        self.client_dp = client_dp
        self.release: Release | None = None  # this round's client-level release
        self.mode = cfg.privacy.mode
        self.ledger = PrivacyLedger(delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
        self.reported: dict[int, tuple[float, float, int]] = {}  # partition -> last (σ, q, steps)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def state_dict(self) -> dict:
        return {"ledger": self.ledger.state_dict(), "reported": dict(self.reported)}

    def load_state_dict(self, state: Mapping | None) -> None:
        if not self.enabled:
            return
        if state is None:
            raise ValueError(
                "the checkpoint has no privacy ledger (the run began without DP); resuming with "
                f"privacy.mode={self.mode!r} would not count the rounds already run"
            )
        self.ledger.load_state_dict(state["ledger"])
        self.reported = dict(state["reported"])

    # -- accounting ------------------------------------------------------------------------------
    def record_round(self, replies: Iterable[Message], *, sampled: int) -> None:
        """Charge the round: every client that replied (sample), or the release (client)."""
        self.release = release = self.client_dp.take() if self.client_dp else None
        if self.mode == "sample":
            for msg in replies:
                if msg.has_error():
                    continue
                m = msg.content["metrics"]
                pid = int(m["partition-id"])
                if "dp-steps" not in m:
                    raise RuntimeError(
                        f"partition {pid} replied without DP-SGD metrics in a privacy.mode="
                        "'sample' run: it did not train privately (recipe mismatch?)"
                    )
                sigma, q, steps = (
                    float(m["dp-noise-multiplier"]),
                    float(m["dp-sample-rate"]),
                    int(m["dp-steps"]),
                )
                self.ledger.record(
                    partition_key(pid), noise_multiplier=sigma, sample_rate=q, steps=steps
                )
                self.reported[pid] = (sigma, q, steps)
        elif self.mode == "client" and release is not None:
            self.ledger.record(
                FEDERATION,
                noise_multiplier=release.effective_noise_multiplier,
                sample_rate=sampled / self.cfg.data.num_clients,
                steps=1,
            )

    def annotate(self, client_rows: list[dict], server_row: dict) -> None:
        """Add ε spent so far to the round's client rows and server row (in place: our rows)."""
        if not self.enabled:
            return
        release = self.release
        for row in client_rows:
            pid = row.get("partition")
            if self.mode == "sample" and pid is not None:
                row["epsilon"] = self.ledger.epsilon(partition_key(pid))
                if pid in self.reported:
                    sigma, q, steps = self.reported[pid]
                    row.update(dp_noise_multiplier=sigma, dp_sample_rate=q, dp_steps=steps)
            elif self.mode == "client":
                row["epsilon"] = self.ledger.epsilon(FEDERATION)
        server_row["epsilon"] = self.ledger.epsilon()
        server_row["delta"] = self.cfg.privacy.delta
        if release is not None:
            norms = sorted(release.norms)
            server_row.update(
                dp_clients=release.clients,
                dp_clipped=release.clipped,
                dp_noise_std=release.noise_std,
                dp_noise_multiplier=release.effective_noise_multiplier,
                dp_update_norm_median=norms[len(norms) // 2],
            )

    def progress(self) -> str:
        """The ε part of the round's progress line."""
        if not self.enabled:
            return ""
        return f"; ε={self.ledger.epsilon():.3f} (δ={self.cfg.privacy.delta:g})"

    # -- budget ----------------------------------------------------------------------------------
    def epsilon_after(self, *, partitions: Iterable[int], sampled: int) -> float:
        """ε if the next round trains these partitions (sample) / samples this many (client)."""
        if self.mode == "client":
            q = sampled / self.cfg.data.num_clients
            z = client_noise_multiplier(self.cfg)
            return self.ledger.epsilon_if({FEDERATION: (z, q, 1)})
        plan = {partition_key(p): self._planned(p) for p in partitions}
        return self.ledger.epsilon_if(plan)

    def _planned(self, pid: int) -> tuple[float, float, int]:
        if pid in self.reported:
            return self.reported[pid]
        from fedllm.shards import raw_shard

        n = len(raw_shard(self.cfg, pid).train)
        plan = sample_plan(self.cfg, n_train=n, partition=pid)
        return (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)

    def next_partitions(self, strategy, rnd: int, grid) -> tuple[list[int], int]:
        """(partitions that may train in round `rnd`, clients sampled): nodes not seen yet may
        hold any partition not seen yet."""
        nodes = strategy._sample(rnd, grid)
        known = strategy.node_partitions
        parts = {known[n] for n in nodes if n in known}
        if any(n not in known for n in nodes):
            parts |= set(range(self.cfg.data.num_clients)) - set(known.values())
        return sorted(parts), len(nodes)

    def budget_stop(self, strategy, rnd: int, grid) -> str | None:
        """Why round `rnd` must not run (it would cross privacy.epsilon_budget), or None."""
        budget = self.cfg.privacy.epsilon_budget
        if not self.enabled or budget is None:
            return None
        partitions, sampled = self.next_partitions(strategy, rnd, grid)
        after = self.epsilon_after(partitions=partitions, sampled=sampled)
        if after <= budget:
            return None
        return (
            f"privacy budget: round {rnd} would bring ε to {after:.3f} > "
            f"privacy.epsilon_budget={budget:g} (spent so far {self.ledger.epsilon():.3f}); "
            f"stopping after round {rnd - 1}"
        )
