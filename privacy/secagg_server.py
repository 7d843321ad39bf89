"""SecAgg+ on the server: one training round of Flower's SecAgg+ workflow around a `LoraStrategy`.

`SecureRound` sends `configure_train`'s messages as FitIns and gets only the unmasked weighted
mean, which it checks and hands to the recipe's aggregator as one pseudo-client.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.common import parameters_to_ndarrays as to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedllm.aggregators.base import Factors
from fedllm.features.base import allowed_metrics
from fedllm.features.types import ClientRow, RoundResult, TrainReply
from fedllm.privacy.secagg_common import (
    CLIPPED,
    KEY,
    MIN_SUM,
    MODES,
    MODULUS,
    weight_ratio,
    workflow_max_weight,
)
from fedllm.server.replies import check_claims, malformed_row, refuse_shared_partitions

if TYPE_CHECKING:
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from fedllm.server.strategy import LoraStrategy

log = logging.getLogger("fedllm.secagg")


class SecureRound(Strategy):
    """The legacy Strategy the SecAgg+ workflow drives, wrapped around a `LoraStrategy`."""

    def __init__(self, lora: LoraStrategy, grid: Grid) -> None:
        self.lora, self.grid = lora, grid
        self.mode = MODES[lora.cfg.aggregator.name]
        self.uniform = lora.cfg.aggregator.weighting == "uniform"
        self.limit = workflow_max_weight(lora.cfg)  # the largest weight a mod may quantise by
        self.sampled = 0
        self.rows: list[ClientRow] = []
        self.failure: str | None = None  # why the unmasked mean was refused, if it was
        self.aggregator_error: str | None = None  # the aggregator raised on a checked mean
        self.applied = False  # whether the unmasked mean became the new global

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """`LoraStrategy.configure_train`'s messages (cut global + config) as FitIns."""
        lora, out = self.lora, []
        for msg in lora.configure_train(
            server_round, lora.global_record(), ConfigRecord(), self.grid
        ):
            record = msg.content["global"]
            config = {
                **dict(msg.content["config"]),
                "secagg-keys": "\n".join(record.keys()),
                "secagg-mode": self.mode,
                "secagg-width": lora.max_rank,
                "secagg-uniform": lora.cfg.aggregator.weighting == "uniform",
            }
            arrays = [record[k].numpy() for k in record.keys()]
            proxy = GridClientProxy(msg.metadata.dst_node_id, self.grid, run_id=0)
            out.append((proxy, FitIns(ndarrays_to_parameters(arrays), config)))
        self.sampled = len(out)
        return out

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Every FitRes carries the same unmasked weighted mean; the individual vectors are gone."""
        if not results:
            return None, {}
        shared = results[0][1].parameters
        assert all(res.parameters is shared for _, res in results), "not a SecAgg+ aggregate"
        replies, refused = self.read_replies(server_round, results)
        self.rows = [
            ClientRow(server_round, node, "ok", r, r.partition, fields=row_fields(r))
            for node, r in replies.items()
        ]
        if refused:  # its vector is in the masked sum: the mean cannot be used without it
            self.failure = f"{KEY}: {len(refused)} masked replies were refused; round refused"
            log.warning("round %d: %s; the global adapter is unchanged", server_round, self.failure)
            self.refuse()
            self.rows += refused
            return None, {}
        clipped = sum(row.fields["secagg_clipped_entries"] for row in self.rows)
        if clipped:
            log.warning(
                "round %d: %s: clients report %d entries clipped to ±clipping_range",
                server_round,
                KEY,
                clipped,
            )
        ranks = sum(r.rank for r in replies.values())
        weights = [res.num_examples for _, res in results]  # what each mod weighted by
        if self.apply(server_round, to_ndarrays(shared), total_rank=ranks, weights=weights):
            for node, reply in replies.items():  # a refused round teaches the server nothing
                self.lora.remember(node, reply)
        return None, {}

    def read_replies(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[dict[int, TrainReply], list[ClientRow]]:
        """The readable replies by node, and a rejected row for each other one: metrics that do
        not parse, a partition or weight the recipe or the node's earlier claims rule out
        (`fedllm.server.replies.check_claims`), a partition two nodes claim. A malformed reply never
        ends the round."""
        lora, parsed, rows = self.lora, {}, []
        for proxy, res in results:
            node = proxy.node_id
            try:
                reply = parse_reply(allowed_metrics(res.metrics, lora.features))
                check_claims(reply, cfg=lora.cfg, held=lora.node_partitions.get(node))
                check_weight(res.num_examples, reply, uniform=self.uniform, limit=self.limit)
                if reply.rank > lora.max_rank:  # no screen sees the vector: the next download
                    # was padded to the claim (10**13 failed the allocation)
                    raise ValueError(
                        f"rank {reply.rank} above the recipe's largest, {lora.max_rank}"
                    )
            except (KeyError, TypeError, ValueError) as err:
                known, may_hold = lora.node_partitions.get(node), lora.may_train([node])
                rows.append(
                    malformed_row(server_round, node=node, err=err, known=known, may_hold=may_hold)
                )
                continue
            parsed[node] = (reply, {})
        refuse_shared_partitions(server_round, parsed=parsed, rows=rows)
        return {node: reply for node, (reply, _) in parsed.items()}, rows

    def bound(self, weights: Sequence[float] | None = None) -> float:
        """The largest |entry| a mean of clipped client entries can have; beyond: a wrapped sum."""
        # the mean is Σ clip(rᵢxᵢ) / Σ rᵢ, rᵢ = wᵢ/max_weight as the mods quantised it, so each
        # |entry| ≤ n·clipping_range / Σ rᵢ; without the weights: clipping_range × max_weight
        sa, mw = self.lora.cfg.privacy.secure_aggregation, workflow_max_weight(self.lora.cfg)
        if not weights:
            return sa.clipping_range * mw
        total = sum(
            weight_ratio(w, max_weight=mw, quantization_range=sa.quantization_range)
            for w in weights
        )
        return len(weights) * sa.clipping_range / total if total > 0 else float("inf")

    def apply(
        self,
        server_round: int,
        mean: list[np.ndarray],
        *,
        total_rank: int,
        weights: Sequence[float] | None = None,
    ) -> bool:
        """The mean as one weight-1 pseudo-client through the aggregator; False if refused."""
        # refused (not finite, or beyond what clipped entries give): the previous global stays,
        # every row fails with the reason (their replies kept, so DP-SGD is still charged)
        self.failure = mean_problem(mean, self.bound(weights))
        if self.failure is not None:
            log.warning("round %d: %s; the global adapter is unchanged", server_round, self.failure)
            return self.refuse()
        try:
            new_global, new_state = self.aggregate(server_round, mean=mean, total_rank=total_rank)
            problem = self.lora.commit(server_round, new_global=new_global, new_state=new_state)
        except Exception as err:  # a checked mean the aggregator cannot take: the round, not run
            log.warning("round %d: the aggregator failed on the mean", server_round, exc_info=True)
            self.aggregator_error = f"{type(err).__name__}: {err}"  # three rounds running end it
            problem = f"aggregate refused ({self.aggregator_error}): the global is unchanged"
        if problem is not None:
            self.failure = f"{KEY}: {problem}"
            return self.refuse()
        self.applied = True
        return True

    def aggregate(
        self, server_round: int, *, mean: list[np.ndarray], total_rank: int
    ) -> tuple[dict[str, Factors], dict[str, Any]]:
        """The new global and aggregator state: the mean as one weight-1 pseudo-client."""
        lora, agg = self.lora, self.lora.cfg.aggregator
        arrays = iter(torch.from_numpy(a).double() for a in mean)
        new_global, new_state = {}, {}
        for module in sorted(lora.shapes):
            d, k = lora.shapes[module]
            rank = agg.global_rank
            if self.mode == "ffa":  # A is the server's own frozen A₀, at the padded width
                B = next(arrays)
                A0 = lora.global_[module].truncate(B.shape[1]).A.double()
                pseudo = Factors(B, A0, 1.0)
            elif self.mode == "fedit":
                pseudo = Factors(next(arrays), next(arrays), 1.0)
            else:  # dense ΔW, numerically full rank once quantised: capped at Σrᵢ (or as told)
                pseudo = Factors(next(arrays), torch.eye(k, dtype=torch.float64), 1.0)
                rank = rank or min(total_rank, d, k)
            result = lora.aggregate_fn(
                [pseudo],
                [1.0],
                global_rank=rank,
                state=lora.agg_state.get(module),
                seed=lora.cfg.seed + server_round,
                **agg.options,
            )
            g = result.global_
            new_global[module] = Factors(g.B.float(), g.A.float(), g.scaling)
            new_state[module] = result.state
        return new_global, new_state

    def refuse(self) -> bool:
        """Every row of a refused round fails with `self.failure`; False."""
        self.rows = [
            dataclasses.replace(row, status="failed", reason=self.failure) for row in self.rows
        ]
        return False

    # the round loop evaluates itself (LoraStrategy.configure_evaluate)
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def parse_reply(metrics: Mapping[str, Any]) -> TrainReply:
    """A SecAgg+ reply's metrics, validated (its losses and time never leave a client)."""
    return TrainReply.parse(dict(metrics))


def check_weight(weight: Any, reply: TrainReply, *, uniform: bool, limit: float) -> None:
    """The weight a client's mod quantised by (FitRes.num_examples, which the server's bound on
    the mean reads) must be the clear claim the server checked: 1, or its num-examples, at most
    `limit` (`max_weight`: an honest client refuses to send more; h103: the server did not)."""
    claimed = 1 if uniform else reply.num_examples
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight != claimed:
        raise ValueError(f"SecAgg+ weight {weight!r} is not the claimed weight {claimed}")
    if weight > limit:
        raise ValueError(
            f"SecAgg+ weight {weight} above privacy.secure_aggregation.max_weight={limit:g}"
        )


def row_fields(reply: TrainReply) -> dict[str, Any]:
    """The SecAgg+ columns of a client's row: the protocol and its clipped-entry count."""
    clipped = reply.extra.get(CLIPPED, 0)
    ok = isinstance(clipped, int | float) and not isinstance(clipped, bool) and clipped >= 0
    return {"secure_aggregation": "secagg+", "secagg_clipped_entries": int(clipped) if ok else 0}


def mean_problem(mean: Sequence[np.ndarray], bound: float) -> str | None:
    """Why an unmasked mean cannot be a mean of clipped finite client entries (None: it can)."""
    # a client that quantised a NaN (or sent integers outside [0, Q]) wraps the masked sum
    # modulo 2**32: the mean comes out finite but far outside ±bound (e.g. +2040 with bound 8)
    entries = sum(a.size for a in mean)
    nonfinite = sum(int(a.size - np.count_nonzero(np.isfinite(a))) for a in mean)
    if nonfinite:
        return (
            f"{KEY}: the unmasked mean has {nonfinite} non-finite entries of {entries}; "
            "round refused"
        )
    top = max((float(np.abs(a).max()) for a in mean if a.size), default=0.0)
    if top > bound * (1 + 1e-9):
        outside = sum(int(np.count_nonzero(np.abs(a) > bound)) for a in mean)
        return (
            f"{KEY}: the unmasked mean reaches {top:.6g}, outside ±{bound:.6g} (what clipped "
            f"client entries can give) at {outside} of {entries} entries: a client sent "
            "non-finite or out-of-range values, or the masked sum overflowed; round refused"
        )
    return None


class Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, except that a client lost before its key shares went out is
    forgotten.

    Flower 1.41 keeps such a client among the sampled ones, so the unmask stage asks the others
    for its key shares, which they never received, and the round halts. No other client masked
    against it (pairwise masks are made only with the clients whose shares arrived), so removing
    it from the sampled set and the neighbour lists after each of the first two stages is all
    the protocol needs; a client lost later is recovered by Flower's own unmasking.
    """

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup stage, then forget the clients lost in it (once it picked neighbours)."""
        ok = super().setup_stage(grid, context, state)
        return self._forget_lost(state) if state.nid_to_neighbours else ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's key-sharing stage, then forget the clients whose shares never went out; False
        below the reconstruction threshold."""
        super().share_keys_stage(grid, context, state)
        return self._forget_lost(state)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        """Halt before unmasking a sum of fewer than 3 updates (Flower needs only the
        threshold); each client refuses it too (`secagg_client.check_stage`)."""
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        if len(state.active_node_ids) < MIN_SUM:
            log.warning(
                "%s: only %d clients sent masked vectors; not unmasking a sum of fewer than 3",
                KEY,
                len(state.active_node_ids),
            )
            return False
        return True

    def _forget_lost(self, state: WorkflowState) -> bool:
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {
            nid: neighbours & state.sampled_node_ids
            for nid, neighbours in state.nid_to_neighbours.items()
            if nid in state.sampled_node_ids
        }
        return self._check_threshold(state)


def train_round(lora: LoraStrategy, *, grid: Grid, server_round: int) -> RoundResult:
    """One SecAgg+ training round: a row per client that took part (metrics only)."""
    sa = lora.cfg.privacy.secure_aggregation
    workflow = Workflow(
        num_shares=sa.num_shares,
        reconstruction_threshold=sa.reconstruction_threshold,
        max_weight=workflow_max_weight(lora.cfg),
        clipping_range=sa.clipping_range,
        quantization_range=sa.quantization_range,
        modulus_range=MODULUS,
        timeout=lora.cfg.federation.round_timeout,
    )
    adapter = SecureRound(lora, grid)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(Context(0, 0, {}, state, {}), strategy=adapter)
    try:
        workflow(grid, context)
    except Exception as err:  # a protocol reply the workflow cannot use: the round, not the run
        if not adapter.applied:
            return protocol_failure(adapter, server_round=server_round, err=err)
        log.warning(
            "round %d: %s failed after its mean was applied", server_round, KEY, exc_info=True
        )
    rows = adapter.rows
    if not rows:  # the protocol halted (too few clients left) or none replied
        reason = (
            "SecAgg+ halted: fewer clients left than the protocol needs (its reconstruction "
            "threshold, and 3 to unmask a sum)"
        )
        rows = [ClientRow(server_round, -1, "failed", reason=reason)]
    # the server cannot know the clients' losses (they stay on the clients): train_loss is None
    return RoundResult(
        adapter.sampled,
        rows,
        None,
        replies=len(adapter.rows),
        aggregator_error=adapter.aggregator_error,
    )


def protocol_failure(adapter: SecureRound, *, server_round: int, err: Exception) -> RoundResult:
    """The round refused for a protocol message the workflow could not use (a missing key, a
    short list, an array of the wrong shape, an unknown node id): logged, the global unchanged."""
    log.warning("round %d: %s: the protocol failed", server_round, KEY, exc_info=True)
    reason = (
        f"{KEY}: a protocol message could not be used ({type(err).__name__}: {err}); "
        "round refused, the global adapter is unchanged"
    )
    rows = [dataclasses.replace(r, status="failed", reason=reason) for r in adapter.rows]
    rows = rows or [ClientRow(server_round, -1, "failed", reason=reason)]
    return RoundResult(adapter.sampled, rows, None, replies=len(adapter.rows))
