"""The (rank, pruning) bandit (`adaptive:`): the server picks each client's arm every round and
learns from the loss gain per second it bought (`fedllm.constrained.bandit`, as FedSpine).

An arm that bought nothing teaches too: a client that missed the round's deadline or failed
scores 0 on the arm it was given, and an arm that does not fit a client's memory
(`fedllm.constrained.devices`) is never offered to that client again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedllm.constrained.bandit import Arm, ArmBandit, efficiency
from fedllm.constrained.devices import MEMORY_REFUSAL
from fedllm.features.base import Feature, require_adapter_state
from fedllm.features.registry import register
from fedllm.features.types import Download, RoundResult, TrainReply
from fedllm.recipe.schema import RunConfig


@register
class Adaptive(Feature):
    """Per-client (rank, pruning) arms: chosen at download, sent as `rank`/`pruning` config
    (which every client obeys, see `fedllm.client.app.base_plan`)."""

    name = "adaptive"

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        return cfg.adaptive is not None

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if not cls.enabled(cfg):
            return
        require_adapter_state(cfg, "adaptive (rank, pruning)")
        if cfg.privacy.mode != "none" or cfg.privacy.secure_aggregation.enabled:
            raise ValueError(
                "adaptive (rank, pruning) learns from each client's training losses and time, "
                "which a private run (privacy.mode or SecAgg+) does not send; drop adaptive"
            )

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        ad = cfg.adaptive
        self.bandit = ArmBandit(
            [Arm(r, p) for r in ad.ranks for p in ad.pruning],
            algorithm=ad.algorithm,
            exploration=ad.exploration,
            seed=cfg.seed,
        )
        self.arms: dict[int, Arm] = {}  # this round's arm per node

    # -- server --------------------------------------------------------------------------------
    def assign(self, node: int, down: Download) -> Download:
        """This round's arm for `node`, chosen before any feature shapes its download (a pruned
        base cuts the factors to the kept ids of the ratio chosen here)."""
        arm = self.bandit.select(str(node))
        self.arms[node] = arm
        config = {**down.config, "rank": arm.rank, "pruning": arm.pruning}
        return dataclasses.replace(down, rank=arm.rank, config=config)

    def accepted(self, node: int, reply: TrainReply) -> None:
        """Feed the bandit this node's round: loss gain per second on the arm it ran."""
        r = reply
        if node not in self.arms or None in (
            r.train_loss_first,
            r.train_loss_last,
            r.train_seconds,
        ):
            return
        reward = efficiency(
            reply.train_loss_first,
            reply.train_loss_last,
            reply.train_seconds,
            time_weight=self.cfg.adaptive.time_weight,
        )
        self.bandit.update(str(node), self.arms[node], reward)

    def record(self, result: RoundResult, *, server_row: dict[str, Any]) -> None:
        """The round's other outcomes: a miss or a failure scores 0, a memory refusal forbids
        the arm; every row of a node given an arm names it (`arm_rank`, `arm_pruning`)."""
        rows = {row.node: row for row in result.rows}
        for node, arm in self.arms.items():
            row = rows.get(node)
            if row is not None:
                row.fields.update(arm_rank=arm.rank, arm_pruning=arm.pruning)
            status = "missed" if row is None else row.status
            if status in ("ok", "rejected"):  # learned in `accepted`; a rejection is no signal
                continue
            if status == "failed" and MEMORY_REFUSAL in (row.reason or ""):
                self.bandit.forbid(str(node), arm)
            else:
                self.bandit.update(str(node), arm, 0.0)
        self.arms = {}

    def state_dict(self) -> dict[str, Any]:
        return {"bandit": self.bandit.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is not None and state.get("bandit") is not None:
            self.bandit.load_state_dict(state["bandit"])
