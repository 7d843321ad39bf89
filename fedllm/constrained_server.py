"""The server side of constrained clients, kept out of the (thin) strategy.

Per node it remembers the kept-index map the node reported, what it was sent this round (so top-k
deltas can be rebuilt), and, with `adaptive:` in the recipe, a bandit choosing its (rank, pruning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord, RecordDict

from fedllm.aggregators import Factors, round_spec
from fedllm.bandit import Arm, ArmBandit, efficiency
from fedllm.compress import decode_factors, decode_update, encode_factors
from fedllm.config import RunConfig
from fedllm.prune_map import (
    Kept,
    check_kept,
    coverage_weighted,
    expand,
    fit_start,
    kept_from_record,
    restrict,
)


class ConstrainedClients:
    """Pruning maps, compression and the (rank, pruning) bandit, per node."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        spec = round_spec(cfg.aggregator.name)
        # merge (flora) and local-B (fedsa) rounds travel through fedllm.rounds instead; the
        # recipe schema refuses pruning, compression and the bandit with them
        self.active = not (spec.merge or spec.local_B)
        ad = cfg.adaptive
        self.bandit = (
            ArmBandit(
                [Arm(r, p) for r in ad.ranks for p in ad.pruning],
                algorithm=ad.algorithm,
                exploration=ad.exploration,
                seed=cfg.seed,
            )
            if ad is not None
            else None
        )
        self.kept: dict[int, tuple[float, dict[str, Kept]]] = {}  # node -> (ratio, map)
        self.arms: dict[int, Arm] = {}  # this round's arm per node (bandit only)
        self.sent: dict[int, dict[str, Factors]] = {}  # this round's download, decoded
        self.received: dict[int, tuple[dict[str, Factors], dict[str, Kept]]] = {}

    def max_rank(self) -> int:
        """The largest rank the bandit may assign (0 without a bandit)."""
        return max(self.cfg.adaptive.ranks) if self.cfg.adaptive is not None else 0

    def download(
        self, node: int, global_: Mapping[str, Factors], *, rank: int | None
    ) -> tuple[ArrayRecord, dict[str, int | float]]:
        """The global factors for `node` (cut to its kept ids and rank when known) + config keys."""
        extra: dict[str, int | float] = {}
        ratio = None
        if self.bandit is not None:
            arm = self.bandit.select(str(node))
            self.arms[node] = arm
            rank, ratio = arm.rank, arm.pruning
            extra = {"rank": arm.rank, "pruning": arm.pruning}
        known = self.kept.get(node)
        kept = known[1] if known is not None and (ratio is None or known[0] == ratio) else {}
        factors = dict(global_)
        if rank is not None:
            factors = fit_start(
                {m: restrict(f, kept.get(m)) for m, f in global_.items()},
                {},
                rank=rank,
                scaling=self.cfg.client_scaling(rank),
            )
        record = encode_factors(factors, dtype=self.cfg.compression.dtype)
        scaling = next(iter(factors.values())).scaling
        self.sent[node] = decode_factors(record, scaling=scaling, dtype=self.cfg.compression.dtype)
        return record, extra

    def receive(
        self,
        node: int,
        content: RecordDict,
        *,
        rank: int,
        pruning: float,
        shapes: Mapping[str, tuple[int, int]],
    ) -> dict[str, Factors]:
        """A reply's (content's) factors at full shape (zeros at pruned ids), for screening.

        Raises ValueError naming the client and the value when the kept map does not fit.
        """
        who = f"client (node {node})"
        kept = kept_from_record(content.get("kept"), who=who)
        scaling = self.cfg.client_scaling(rank)
        start = None
        if self.cfg.compression.topk is not None:
            if node not in self.sent:
                raise ValueError(f"{who}: sent a top-k update but was sent no factors this round")
            start = fit_start(self.sent[node], kept, rank=rank, scaling=scaling)
        factors = decode_update(
            content["update"],
            start or {},
            scaling=scaling,
            dtype=self.cfg.compression.dtype,
            topk=self.cfg.compression.topk,
        )
        check_kept(factors, kept, shapes, who=who)
        self.received[node] = (factors, kept)
        self.kept[node] = (pruning, kept)
        return {
            m: expand(f, kept.get(m), shapes[m]) if m in shapes else f for m, f in factors.items()
        }

    def observe(self, node: int, metrics: Mapping) -> None:
        """Feed the bandit this node's round: loss gain per second on the arm it ran."""
        if self.bandit is None or node not in self.arms:
            return
        reward = efficiency(
            float(metrics["train-loss-first"]),
            float(metrics["train-loss-last"]),
            float(metrics["train-seconds"]),
            time_weight=self.cfg.adaptive.time_weight,
        )
        self.bandit.update(str(node), self.arms[node], reward)

    def aggregation_inputs(
        self,
        nodes: Sequence[str],
        weights: Sequence[float],
        shapes: Mapping[str, tuple[int, int]],
    ) -> dict[str, dict[str, Factors]]:
        """Accepted nodes' factors at full shape, rescaled per coordinate by coverage."""
        got = [self.received[int(n)] for n in nodes]
        full = coverage_weighted([g[0] for g in got], [g[1] for g in got], weights, shapes)
        self.sent, self.received = {}, {}
        return dict(zip(nodes, full, strict=True))

    def state_dict(self) -> dict:
        return {
            "kept": {
                n: (r, {m: (k.out, k.in_) for m, k in km.items()})
                for n, (r, km) in self.kept.items()
            },
            "bandit": self.bandit.state_dict() if self.bandit is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.kept = {
            n: (r, {m: Kept(o, i) for m, (o, i) in km.items()})
            for n, (r, km) in state["kept"].items()
        }
        if self.bandit is not None and state.get("bandit") is not None:
            self.bandit.load_state_dict(state["bandit"])
