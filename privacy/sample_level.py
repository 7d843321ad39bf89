"""Sample-level DP (`privacy.mode: sample`): clients train with Opacus DP-SGD; the server keeps
one accountant per partition (a client keeps no state between rounds) from the σ, q and steps
each reply reports, and the federation's ε is the max over partitions (their data are disjoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedllm.client.train import TrainResult
from fedllm.data.shards import raw_shard
from fedllm.features.base import Feature
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, RoundResult
from fedllm.privacy.accounting import partition_key
from fedllm.privacy.budget import Account
from fedllm.privacy.dpsgd import DPTrainResult, train_dp
from fedllm.privacy.plan import check_shards, sample_plan
from fedllm.recipe.schema import RunConfig


def train_private(
    cfg: RunConfig,
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    steps: int,
    pad_id: int,
    partition: int,
) -> DPTrainResult:
    """DP-SGD for this client's shard (raises ValueError if δ or q do not fit its size)."""
    fed = cfg.federation
    return train_dp(
        model,
        examples,
        plan=sample_plan(cfg, n_train=len(examples), partition=partition),
        steps=steps,
        pad_id=pad_id,
        optimizer=fed.optimizer,
        lr=fed.lr,
        weight_decay=fed.weight_decay,
        schedule=fed.schedule,
        warmup_steps=fed.warmup_steps,
    )


@register
class SampleLevelDP(Feature):
    """DP-SGD on every client; per-partition ε on the server."""

    name = "dp_sgd"
    privacy_mode = "sample"
    order = 5
    state_key = "privacy"

    @classmethod
    def prepare(cls, cfg: RunConfig, *, shapes: Mapping[str, tuple[int, int]]) -> None:
        check_shards(cfg)  # δ < 1/n and batch < n on every shard

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        p = cfg.privacy
        self.account = Account(
            delta=p.delta, accountant=p.accountant, budget=p.epsilon_budget, mode=p.mode
        )
        self.reported: dict[int, tuple[float, float, int]] = {}  # partition -> (σ, q, steps)
        self.dp_metrics: dict[str, int | float] = {}

    # -- client --------------------------------------------------------------------------------
    def train(self, model: torch.nn.Module, rnd: ClientRound, *, steps: int) -> TrainResult:
        """DP-SGD instead of plain steps; the reply reports σ, q and the steps it ran."""
        private = train_private(
            self.cfg,
            model,
            rnd.shard.train,
            steps=steps,
            pad_id=rnd.tokenizer.pad_token_id,
            partition=rnd.partition,
        )
        self.dp_metrics = private.metrics()
        return private.train

    def metrics(self) -> dict[str, int | float]:
        return dict(self.dp_metrics)

    # -- server --------------------------------------------------------------------------------
    def before_round(
        self, server_round: int, *, partitions: Sequence[int], sampled: int
    ) -> str | None:
        plan = {partition_key(p): self._planned(p) for p in partitions}
        return self.account.stop(server_round, plan)

    def _planned(self, pid: int) -> tuple[float, float, int]:
        if pid in self.reported:
            return self.reported[pid]
        plan = sample_plan(self.cfg, n_train=len(raw_shard(self.cfg, pid).train), partition=pid)
        return (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)

    def record(self, result: RoundResult, *, server_row: dict[str, Any]) -> None:
        """Charge every client that trained (accepted or not), then put ε into the rows."""
        ledger = self.account.ledger
        for row in result.rows:
            if row.reply is None:
                continue
            m, pid = row.reply.extra, row.reply.partition
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
            ledger.record(partition_key(pid), noise_multiplier=sigma, sample_rate=q, steps=steps)
            self.reported[pid] = (sigma, q, steps)
        for row in result.rows:
            pid = row.reply.partition if row.reply is not None else row.partition
            if pid is None:
                continue
            row.fields["epsilon"] = ledger.epsilon(partition_key(pid))
            if pid in self.reported:
                sigma, q, steps = self.reported[pid]
                row.fields.update(dp_noise_multiplier=sigma, dp_sample_rate=q, dp_steps=steps)
        self.account.annotate(server_row)

    def progress(self) -> str:
        return self.account.progress()

    def state_dict(self) -> dict[str, Any]:
        return {**self.account.state_dict(), "reported": dict(self.reported)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        self.account.load_state_dict(state)
        self.reported = dict(state["reported"])
