"""The (rank, pruning, precision) bandit (`adaptive:`): the server picks each client's arm every
round and learns from the loss gain per second it bought (`fedllm.constrained.bandit`, as
FedSpine; a 4-/8-bit base among the arms is ours: it fits a small device's memory without
pruning, whose training transfers poorly to the full base, docs/constrained.md).

Whose loss gain (`adaptive.reward`): the client's own first and last training losses (`client`,
the default: no server data needed), or the server's (`server`): the test-set loss of the
global adapter cut to the arm's rank (where the client started; a pruned client, zeros at the
ids it pruned, as its reply has them) against that of the client's reply, both on the server's
unpruned base. A client's losses on a pruned base measure what its
adapter does there, and training on a pruned base transfers poorly to the full one
(docs/constrained.md); the server's score sees that, at one small evaluation per arm rank
played, one per reply and one more per pruned reply each round, on `reward_examples` of
`data.test_set`.

An arm that bought nothing teaches too: a client that missed the round's deadline or failed
scores 0 on the arm it was given, and an arm that does not fit a client's memory
(`fedllm.constrained.devices`) is never offered to that client again. A miss in a round whose
arm changed the client's base (its pruning or precision: the base is reloaded or re-pruned inside
the round) is not scored: the client replays the arm once, warm, and that round is. Otherwise
UCB's bonus cycles a slow device through its arms, each change costing it the deadline
(docs/constrained.md, stop 26: the slow device met 0 of 24).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flwr.app import RecordDict

from fedllm.aggregators.base import Factors
from fedllm.constrained.bandit import Arm, ArmBandit, efficiency
from fedllm.constrained.devices import MEMORY_REFUSAL
from fedllm.constrained.prune_map import Kept, expand, kept_from_record, restrict
from fedllm.features.base import Feature, require_adapter_state
from fedllm.features.registry import register
from fedllm.features.types import Download, RoundResult, TrainReply
from fedllm.recipe.schema import RunConfig
from fedllm.server.evaluation import TestSetEvaluator


@register
class Adaptive(Feature):
    """Per-client (rank, pruning, precision) arms: chosen at download, sent as `rank`/`pruning`/
    `quantization` config (which every client obeys, see `fedllm.client.round.base_plan`)."""

    name = "adaptive"

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On when the recipe has an `adaptive:` section."""
        return cfg.adaptive is not None

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if not cls.enabled(cfg):
            return
        require_adapter_state(cfg, "adaptive (rank, pruning)")
        if cfg.privacy.private:
            raise ValueError(
                "adaptive (rank, pruning) learns from each client's training losses and time, "
                "which a private run (privacy.mode or SecAgg+) does not send; drop adaptive"
            )
        if cfg.adaptive.reward == "server" and cfg.data.test_set is None:
            raise ValueError(
                "adaptive.reward=server scores each reply on the server's own test set, and "
                "data.test_set is not set; set it (e.g. data.test_set={fraction: 0.1}) or use "
                "adaptive.reward=client"
            )

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        ad = cfg.adaptive
        self.bandit = ArmBandit(
            [Arm(r, p, q) for r in ad.ranks for p in ad.pruning for q in ad.quantization],
            algorithm=ad.algorithm,
            exploration=ad.exploration,
            seed=cfg.seed,
        )
        self.arms: dict[int, Arm] = {}  # this round's arm per node
        self.bases: dict[int, tuple[float, str]] = {}  # per node: the base its last arm loaded
        self.replays: dict[int, Arm] = {}  # per node: an arm to run again, warm, next round
        # reward=server: built at the server's first score (clients build this feature too,
        # on every message, and never score), on the server's own cache (its base, its data)
        self.scorer: TestSetEvaluator | None = None
        self.cache: Any = None
        # reward=server, this round only: the global, the score of its cut per rank, the replies
        self.global_: dict[str, Factors] = {}
        self.start_loss: dict[int, float] = {}
        self.replies: dict[int, tuple[dict[str, Factors], dict[str, Kept]]] = {}

    # -- server --------------------------------------------------------------------------------
    def on_server(self, *, cache: Any) -> None:
        """Score on the run's cache: the base the server already holds, not a second copy."""
        self.cache = cache

    def assign(self, node: int, down: Download) -> Download:
        """This round's arm for `node`, chosen before any feature shapes its download (a pruned
        base cuts the factors to the kept ids of the ratio chosen here)."""
        arm = self.replays.pop(node, None) or self.bandit.select(str(node))
        self.arms[node] = arm
        self.global_ = down.factors  # the same for every node of a round
        arm_config = {"rank": arm.rank, "pruning": arm.pruning, "quantization": arm.quantization}
        config = {**down.config, **arm_config}
        return dataclasses.replace(down, rank=arm.rank, config=config)

    def receive(
        self,
        node: int,
        content: RecordDict,
        *,
        factors: dict[str, Factors],
        reply: TrainReply,
        shapes: Mapping[str, tuple[int, int]],
    ) -> dict[str, Factors]:
        """reward=server: keep the reply's factors at the global shapes (a pruned base's
        feature, order 40, has put them back at full shape, and checked the kept-index map
        kept here with them) to score once it is accepted."""
        if self.cfg.adaptive.reward == "server":
            # only a pruned arm's map, which the pruned base's feature checked before this hook;
            # an unpruned arm's reply is whole: a map sent anyway is not read (h103)
            arm = self.arms.get(node)
            pruned = arm is not None and arm.pruning > 0
            kept = kept_from_record(content.get("kept"), who=f"node {node}") if pruned else {}
            self.replies[node] = (factors, kept)
        return factors

    def accepted(self, node: int, reply: TrainReply) -> None:
        """Feed the bandit this node's round: loss gain per second on the arm it ran."""
        arm = self.arms.get(node)
        if arm is None or reply.train_seconds is None:
            return
        if self.cfg.adaptive.reward == "client":
            first, last = reply.train_loss_first, reply.train_loss_last
        else:
            factors, kept = self.replies[node]
            first, last = self.start_score(arm.rank, kept), self.score(factors)
        if first is None or last is None:
            return
        reward = efficiency(
            first, last, seconds=reply.train_seconds, time_weight=self.cfg.adaptive.time_weight
        )
        self.bandit.update(str(node), arm, reward=reward)

    def renumber(self, ids: Mapping[int, int]) -> None:
        """What the bandit learned of a node, to its new id (its loaded base and a warm replay
        belonged to the old process: a new id starts cold)."""
        for old, new in ids.items():
            self.bandit.rename(str(old), str(new))

    def start_score(self, rank: int, kept: Mapping[str, Kept] | None = None) -> float:
        """The server's test-set loss of a client's start: this round's global cut to `rank`
        and, for a pruned client, to the ids it `kept` (zeros elsewhere, as its reply comes
        back), so an adapter that trained nothing scores no gain. Unpruned: once per rank."""
        if not kept and rank in self.start_loss:
            return self.start_loss[rank]
        scaling = self.cfg.client_scaling(rank)
        start = {m: f.truncate(rank, scaling) for m, f in self.global_.items()}
        if kept:  # one evaluation per pruned reply
            return self.score(
                {
                    m: expand(restrict(f, kept.get(m)), kept.get(m), shape=f.shape)
                    for m, f in start.items()
                }
            )
        self.start_loss[rank] = self.score(start)
        return self.start_loss[rank]

    def score(self, factors: Mapping[str, Factors]) -> float:
        """The server's test-set loss of `factors` on `reward_examples` of data.test_set."""
        if self.scorer is None:
            n = self.cfg.adaptive.reward_examples
            self.scorer = TestSetEvaluator(self.cfg, cache=self.cache, max_examples=n)
        return self.scorer.evaluate(factors)[0]

    def record(self, result: RoundResult, *, server_row: dict[str, Any]) -> None:
        """The round's other outcomes: a miss or a failure scores 0 (a miss on a changed base
        is replayed first), a memory refusal forbids the arm; every row of a node given an arm
        names it (`arm_rank`, `arm_pruning`, `arm_quantization`, `arm_new_base`)."""
        rows = {row.node: row for row in result.rows}
        for node, arm in self.arms.items():
            row = rows.get(node)
            status = "missed" if row is None else row.status
            refused = status == "failed" and MEMORY_REFUSAL in (row.reason or "")
            base = (arm.pruning, arm.quantization)
            new_base = self.bases.get(node) != base  # a node's first round loads one too
            if not refused:  # a refused plan loaded nothing: the node keeps its last base
                self.bases[node] = base
            if row is not None:
                row.fields.update(
                    arm_rank=arm.rank,
                    arm_pruning=arm.pruning,
                    arm_quantization=arm.quantization,
                    arm_new_base=new_base,
                )
            if status in ("ok", "rejected"):  # learned in `accepted`; a rejection is no signal
                continue
            if refused:
                self.bandit.forbid(str(node), arm)
            elif status == "missed" and new_base:
                self.replays[node] = arm  # the miss may be the load's: ask again, warm
            else:
                self.bandit.update(str(node), arm, reward=0.0)
        self.arms, self.start_loss, self.replies = {}, {}, {}

    def state_dict(self) -> dict[str, Any]:
        replays = {str(n): self.bandit.arms.index(a) for n, a in self.replays.items()}
        bases = {str(n): list(b) for n, b in self.bases.items()}
        return {"bandit": self.bandit.state_dict(), "bases": bases, "replays": replays}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is None or state.get("bandit") is None:
            return
        self.bandit.load_state_dict(state["bandit"])  # checks the arms are the recipe's
        # older checkpoints have neither: every node's next miss is then taken as a cold one
        self.bases = {int(n): (float(p), str(q)) for n, (p, q) in state.get("bases", {}).items()}
        arms = self.bandit.arms
        self.replays = {int(n): arms[i] for n, i in state.get("replays", {}).items()}
