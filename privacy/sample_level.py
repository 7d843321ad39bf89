"""Sample-level DP (`privacy.mode: sample`): clients train with Opacus DP-SGD; the server keeps
one accountant per partition (a client keeps no state between rounds) from the σ, q and steps
each reply reports, and the federation's ε is the max over partitions (their data are disjoint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import RecordDict

from fedllm.aggregators.base import Factors
from fedllm.client.schedule import schedule_span
from fedllm.client.train import TrainResult
from fedllm.data.shards import ProcessCache, raw_shard
from fedllm.features.base import Feature
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, RoundResult, TrainReply
from fedllm.privacy.accounting import partition_key
from fedllm.privacy.budget import PUBLIC_KEYS, Account
from fedllm.privacy.dpsgd import DPTrainResult, train_dp
from fedllm.privacy.plan import SamplePlan, check_shards, sample_plan
from fedllm.recipe.schema import RunConfig

MAX_SHARD = 10**9  # the most examples a reply's q may imply when data.max_examples is unset


def train_private(
    cfg: RunConfig,
    model: torch.nn.Module,
    *,
    examples: Sequence[dict],
    steps: int | None = None,
    pad_id: int,
    partition: int,
    server_round: int = 1,
) -> DPTrainResult:
    """DP-SGD for this client's shard (raises ValueError if δ or q do not fit its size), with
    the recipe's schedule at `server_round` and its precision; `steps` defaults to the plan's
    (Poisson batches: E·n/b of them per E epochs), what the accountant charges."""
    fed = cfg.federation
    plan = sample_plan(cfg, n_train=len(examples), partition=partition)
    steps = plan.steps_per_round if steps is None else steps
    offset, span = schedule_span(
        scope=fed.schedule_scope, server_round=server_round, rounds=fed.rounds, steps=steps
    )
    return train_dp(
        model,
        examples,
        plan=plan,
        steps=steps,
        pad_id=pad_id,
        optimizer=fed.optimizer,
        lr=fed.lr,
        weight_decay=fed.weight_decay,
        schedule=fed.schedule,
        warmup_steps=fed.warmup_steps,
        schedule_offset=offset,
        schedule_steps=span,
        precision=fed.precision,
    )


@register
class SampleLevelDP(Feature):
    """DP-SGD on every client; per-partition ε on the server."""

    name = "dp_sgd"
    privacy_mode = "sample"
    replaces_trainer = True
    order = 5
    state_key = "privacy"

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Refuse the local-step knobs DP-SGD cannot honour."""
        if not cls.enabled(cfg):
            return
        fed = cfg.federation
        if fed.gradient_accumulation_steps != 1:
            raise ValueError(
                f"federation.gradient_accumulation_steps={fed.gradient_accumulation_steps} does "
                "not apply to privacy.mode='sample': a DP-SGD step is one Poisson batch of "
                "expected size federation.batch_size (the accountant's q); set it to 1 and "
                "raise federation.batch_size instead"
            )
        if fed.gradient_checkpointing:
            raise ValueError(
                "federation.gradient_checkpointing cannot be combined with privacy.mode='sample': "
                "Opacus's per-example gradient hooks get no gradients through recomputed layers; "
                "set federation.gradient_checkpointing=false"
            )

    @classmethod
    def prepare(cls, cfg: RunConfig, *, shapes: Mapping[str, tuple[int, int]]) -> None:
        check_shards(cfg)  # δ < 1/n and batch < n on every shard

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.account = Account.for_recipe(cfg)
        self.reported: dict[int, tuple[float, float, int]] = {}  # partition -> (σ, q, steps)
        self.shards = ProcessCache()  # server: the recipe's split once, for every partition's plan
        self.dp_metrics: dict[str, int | float] = {}
        self.plans: dict[int, SamplePlan] = {}  # shard size -> its plan (a target σ is a search)

    # -- client --------------------------------------------------------------------------------
    def train(self, model: torch.nn.Module, rnd: ClientRound, *, steps: int) -> TrainResult:
        """DP-SGD instead of plain steps; the reply reports σ, q and the steps it ran: its
        plan's, which `steps` (the plain loader's epochs) equals under `local_steps`."""
        private = train_private(
            self.cfg,
            model,
            examples=rnd.shard.train,
            pad_id=rnd.tokenizer.pad_token_id,
            partition=rnd.partition,
            server_round=rnd.server_round,
        )
        self.dp_metrics = private.metrics()
        return private.train

    def metrics(self) -> dict[str, int | float]:
        return dict(self.dp_metrics)

    def reply_keys(self) -> frozenset[str] | None:
        """DP-SGD covers the update; its accounting numbers are public. Losses, clipping
        statistics and (with uniform weights) the shard size stay on the client."""
        keys = PUBLIC_KEYS | {
            "dp-noise-multiplier",
            "dp-sample-rate",
            "dp-steps",
            "dp-max-grad-norm",
        }
        return keys | ({"num-examples"} if self.cfg.aggregator.weighting == "examples" else set())

    # -- server --------------------------------------------------------------------------------
    def before_round(
        self, server_round: int, *, partitions: Sequence[int], sampled: int
    ) -> str | None:
        """Stop when the partitions that may train would pass `privacy.epsilon_budget` at their
        plans; the charge is kept as pending (`lost_round`)."""
        plan = {partition_key(p): self._planned(p) for p in partitions}
        return self.account.stop(server_round, plan)

    def lost_round(self, server_round: int, *, partitions: Sequence[int], sampled: int) -> None:
        """Charge every partition that may have trained in the lost round at its plan (the one
        made before its clients trained, saved with the pending checkpoint)."""
        if self.account.charge_pending():
            return
        for pid in partitions:  # a checkpoint from before the plan was kept
            self._charge_at_plan(pid)

    def _charge_at_plan(self, pid: int) -> None:
        """Charge `pid` one round at its plan (its last reported numbers, else the recipe's)."""
        sigma, q, steps = self._planned(pid)
        self.account.ledger.record(
            partition_key(pid), noise_multiplier=sigma, sample_rate=q, steps=steps
        )

    def _planned(self, pid: int) -> tuple[float, float, int]:
        if pid in self.reported:
            return self.reported[pid]
        n_train = len(raw_shard(self.cfg, pid, cache=self.shards).train)
        plan = self._plan_for(n_train, pid)  # memoised: a target σ is a search, every round
        return (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)

    def receive(
        self,
        node: int,
        content: RecordDict,
        *,
        factors: dict[str, Factors],
        reply: TrainReply,
        shapes: Mapping[str, tuple[int, int]],
    ) -> dict[str, Factors]:
        """Refuse a reply whose DP-SGD numbers are missing or out of what the recipe allows."""
        self.dp_numbers(reply)
        return factors

    def dp_numbers(self, reply: TrainReply) -> tuple[float, float, int]:
        """(σ, q, steps) a reply reports, checked against the recipe: they must be the plan of
        some shard size n the recipe allows (q = batch/n, σ and C the recipe's or the ones its
        target ε gives at that q), with no more steps than that plan runs in a round."""
        m = reply.extra
        if not {"dp-noise-multiplier", "dp-sample-rate", "dp-steps"} <= set(m):
            raise ValueError("no DP-SGD metrics in a privacy.mode='sample' run (recipe mismatch?)")
        sigma, q, steps = m["dp-noise-multiplier"], m["dp-sample-rate"], m["dp-steps"]
        clip = m.get("dp-max-grad-norm", self.cfg.privacy.max_grad_norm)
        numbers = (sigma, q, steps, clip)
        finite = all(isinstance(x, int | float) and math.isfinite(x) for x in numbers)
        if not finite or not 0 < q <= 1:
            raise ValueError(f"DP-SGD metrics out of range: σ={sigma!r}, q={q!r}, steps={steps!r}")
        n_train, cap = self.cfg.federation.batch_size / q, self.cfg.data.max_examples
        if not n_train <= (cap or MAX_SHARD):  # inf for a subnormal q
            limit = f"data.max_examples={cap}" if cap else f"{MAX_SHARD:g} (no data.max_examples)"
            raise ValueError(f"dp-sample-rate {q!r} implies {n_train:g} examples, above {limit}")
        plan = self._plan_for(round(n_train), reply.partition)
        if not math.isclose(q, plan.sample_rate, rel_tol=1e-9):
            raise ValueError(
                f"dp-sample-rate {q!r} is not batch/n for a whole shard size n "
                f"(federation.batch_size={self.cfg.federation.batch_size})"
            )
        if not math.isclose(sigma, plan.noise_multiplier, rel_tol=1e-3):
            raise ValueError(
                f"dp-noise-multiplier {sigma!r} is not the recipe's σ at q={q:g} "
                f"({plan.noise_multiplier:.4g})"
            )
        if clip != plan.max_grad_norm:
            raise ValueError(
                f"dp-max-grad-norm {clip!r} is not the recipe's privacy.max_grad_norm "
                f"({plan.max_grad_norm:g})"
            )
        if not 0 <= steps <= plan.steps_per_round:
            raise ValueError(f"dp-steps {steps!r} outside [0, {plan.steps_per_round}] at q={q:g}")
        return float(sigma), float(q), int(steps)

    def _plan_for(self, n_train: int, partition: int) -> SamplePlan:
        """The recipe's plan for a shard of `n_train` examples (ValueError if the recipe cannot
        train one: δ ≥ 0.1/n, batch ≥ n, or more than data.max_examples); one per n."""
        cap = self.cfg.data.max_examples
        if cap is not None and n_train > cap:
            raise ValueError(f"dp-sample-rate implies {n_train} examples, above data.max_examples")
        if n_train not in self.plans:
            self.plans[n_train] = sample_plan(self.cfg, n_train=n_train, partition=partition)
        return self.plans[n_train]

    def record(self, result: RoundResult, *, server_row: dict[str, Any]) -> None:
        """Charge every client that trained (accepted or not), then put ε into the rows."""
        ledger, charged = self.account.ledger, set()
        for row in result.rows:
            if row.reply is None:
                continue
            pid = row.reply.partition
            try:
                sigma, q, steps = self.dp_numbers(row.reply)
            except ValueError:  # a rejected reply: charge what the recipe plans for it
                sigma, q, steps = self._planned(pid)
            ledger.record(partition_key(pid), noise_multiplier=sigma, sample_rate=q, steps=steps)
            self.reported[pid] = (sigma, q, steps)
            charged.add(pid)
        for row in result.rows:  # an unreadable reply reached the server too: its node's
            for pid in sorted(set(row.may_hold) - charged):  # partitions at their plan
                self._charge_at_plan(pid)
                charged.add(pid)
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
