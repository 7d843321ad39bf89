"""Secure aggregation with Flower's SecAgg+: the server only ever sees the weighted sum.

One training round runs Flower's `SecAggPlusWorkflow` (four exchanges: setup, share keys, collect
masked vectors, unmask) around a minimal legacy `Strategy` (`SecureRound`). Its `configure_fit`
reuses `LoraStrategy.configure_train` (each node its global factors cut to its rank) in `FitIns`
form; the client's `secaggplus_mod` masks the vectors `client_reply` builds; `aggregate_fit` gets
only the unmasked weighted mean and hands it to the recipe's aggregator as one pseudo-client.
What a client sends (same shape for every rank, zero-padded to the federation's max rank r):
- ffa   (aggregator ffa):   sᵢ·pad(Bᵢ) per module; A is the shared frozen A₀ (exact);
- fedit (aggregator fedit): sᵢ·pad(Bᵢ) and pad(Aᵢ) per module (FedIT's own, biased, result);
- dense (aggregator svd):   sᵢ·BᵢAᵢ (d×k) per module, exact, then SVD to the global rank.
Guards: a client refuses to send non-finite vectors and reports how many entries quantisation
will clip; it sends only the metrics in `CLEAR_KEYS` in the clear (no losses); the server keeps
the previous global if the unmasked mean is not finite or outside what clipped entries can give;
at least 3 clients per round (with 2, each learns the other's update from the sum).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
)
from flwr.common import parameters_to_ndarrays as to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedllm.aggregators.base import Factors
from fedllm.features.base import Feature
from fedllm.features.registry import register
from fedllm.features.types import ClientRow, RoundResult, TrainReply
from fedllm.model.adapters import factors_digest, from_record
from fedllm.recipe.schema import RunConfig
from fedllm.server.exchange import say

if TYPE_CHECKING:
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from fedllm.server.strategy import LoraStrategy

MODES = {"ffa": "ffa", "fedit": "fedit", "svd": "dense"}  # aggregator -> what clients send
MODULUS = 2**32  # SecAgg+ mask range; the sum of n quantized vectors must stay below it
FITINS = "fitins.config"  # a train message in FitIns form: a SecAgg+ round
KEY = "privacy.secure_aggregation"
CLIPPED = "secagg-clipped-entries"  # reply metric: entries the mod's quantisation will clip
# The reply metrics a SecAgg+ client sends in the clear (outside the masked sum): what the server
# needs to run the protocol (who, rank, weight, traffic) and to account DP-SGD. Losses, clipping
# statistics and every other key stay on the client.
CLEAR_KEYS = frozenset(
    {
        "partition-id",
        "rank",
        "num-examples",  # the weight, already bounded by max_weight
        "steps",
        "train-seconds",
        "bytes-sent",
        "bytes-received",
        "scaling",
        "pruning",
        "dp-noise-multiplier",
        "dp-sample-rate",
        "dp-steps",
        CLIPPED,
    }
)

log = logging.getLogger("fedllm.secagg")


# -- client side --------------------------------------------------------------------------------
def mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """`secaggplus_mod` for SecAgg+ messages; every other message passes through untouched."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def vectors(update: dict[str, Factors], mode: str, width: int) -> list[np.ndarray]:
    """The padded vectors of one client, modules in sorted order (float64)."""
    out = []
    for module in sorted(update):
        f = update[module].pad(width)  # zero rows/columns beyond the client's rank
        B = (f.B.double() * f.scaling).numpy()
        if mode == "ffa":
            out.append(B)
        elif mode == "fedit":
            out += [B, f.A.double().numpy()]
        else:
            out.append(B @ f.A.double().numpy())
    return out


def vector_names(update: dict[str, Factors], mode: str) -> list[str]:
    """What each of `vectors`' arrays is (module and factor), in the same order, for messages."""
    parts = {"ffa": ["B"], "fedit": ["B", "A"]}.get(mode, ["BA"])
    return [f"{module}.{part}" for module in sorted(update) for part in parts]


def weight_ratio(weight: float, max_weight: float, quantization_range: int) -> float:
    """The factor `secaggplus_mod` multiplies a client's vectors by: wᵢ/max_weight, quantized."""
    return round(weight / max_weight * quantization_range) / quantization_range


def check_finite(vecs: Sequence[np.ndarray], names: Sequence[str]) -> None:
    """Refuse to send a NaN or ±Inf entry: quantised, it wraps the masked sum to garbage."""
    for name, v in zip(names, vecs, strict=True):
        bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        if bad:
            raise ValueError(
                f"{KEY} (fedllm.privacy.secagg): refusing to send this client's update: {bad} "
                f"non-finite (NaN/Inf) entries of {v.size} in {name}; the unmasked sum of every "
                "client would be garbage"
            )


def clipped_entries(vecs: Sequence[np.ndarray], ratio: float, clipping_range: float) -> int:
    """How many entries the mod's quantisation clips: |ratio·x| > clipping_range."""
    return sum(int(np.count_nonzero(np.abs(v * ratio) > clipping_range)) for v in vecs)


def client_reply(
    cfg: RunConfig, content: RecordDict, context: Context, train: Callable[..., RecordDict]
) -> RecordDict:
    """Train from a FitIns-form message; reply in FitRes form with the vectors to be masked."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config.pop("secagg-keys")).split("\n")
    mode, width = str(config.pop("secagg-mode")), int(config.pop("secagg-width"))
    uniform = bool(config.pop("secagg-uniform"))
    arrays = to_ndarrays(fitins.parameters)
    received = ArrayRecord(
        {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)}
    )
    out = train(cfg, RecordDict({"global": received, "config": ConfigRecord(config)}), context)
    metrics = dict(out["metrics"])
    update = from_record(out["update"], cfg.client_scaling(int(metrics["rank"])))
    vecs = vectors(update, mode, width)
    check_finite(vecs, vector_names(update, mode))
    weight = 1 if uniform else int(metrics["num-examples"])
    if weight > max_weight(cfg):  # the mod would only warn, and the masked sum overflow
        raise ValueError(f"weight {weight} exceeds privacy.secure_aggregation.max_weight")
    sa = cfg.privacy.secure_aggregation
    ratio = weight_ratio(weight, workflow_max_weight(cfg), sa.quantization_range)
    clipped = clipped_entries(vecs, ratio, sa.clipping_range)
    if clipped:
        log.warning(
            "%s: %d of %d weighted entries exceed ±clipping_range=%g and will be clipped by "
            "quantisation (the aggregate is biased; raise clipping_range)",
            KEY,
            clipped,
            sum(v.size for v in vecs),
            sa.clipping_range,
        )
    # only what the server needs leaves in the clear (the vectors are masked by the mod)
    metrics = {k: v for k, v in metrics.items() if k in CLEAR_KEYS}
    if uniform:  # the weight is 1: the shard size stays on the client
        metrics.pop("num-examples", None)
    metrics[CLIPPED] = clipped
    # what leaves this client: one int64 per entry, plus the weight (after masking, in the mod)
    metrics["bytes-sent"] = 8 * (1 + sum(v.size for v in vecs))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vecs), weight, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=True)


# -- server side --------------------------------------------------------------------------------
class SecureRound(Strategy):
    """The legacy Strategy the SecAgg+ workflow drives, wrapped around a `LoraStrategy`."""

    def __init__(self, lora: LoraStrategy, grid: Grid) -> None:
        self.lora, self.grid = lora, grid
        self.mode = MODES[lora.cfg.aggregator.name]
        self.sampled = 0
        self.rows: list[ClientRow] = []
        self.failure: str | None = None  # why the unmasked mean was refused, if it was

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
        replies = [(proxy.node_id, parse_reply(res.metrics)) for proxy, res in results]
        self.rows = [
            ClientRow(server_round, node, "ok", r, r.partition, fields=row_fields(r))
            for node, r in replies
        ]
        clipped = sum(row.fields["secagg_clipped_entries"] for row in self.rows)
        if clipped:
            log.warning(
                "round %d: %s: clients report %d entries clipped to ±clipping_range",
                server_round,
                KEY,
                clipped,
            )
        ranks = sum(r.rank for _, r in replies)
        weights = [res.num_examples for _, res in results]  # what each mod weighted by
        if self.apply(server_round, to_ndarrays(shared), total_rank=ranks, weights=weights):
            for node, reply in replies:  # a refused round teaches the server nothing
                self.lora.remember(node, reply)
        return None, {}

    def bound(self, weights: Sequence[float] | None = None) -> float:
        """The largest |entry| a mean of clipped client entries can have; beyond: a wrapped sum."""
        # the mean is Σ clip(rᵢxᵢ) / Σ rᵢ, rᵢ = wᵢ/max_weight as the mods quantised it, so each
        # |entry| ≤ n·clipping_range / Σ rᵢ; without the weights: clipping_range × max_weight
        sa, mw = self.lora.cfg.privacy.secure_aggregation, workflow_max_weight(self.lora.cfg)
        if not weights:
            return sa.clipping_range * mw
        total = sum(weight_ratio(w, mw, sa.quantization_range) for w in weights)
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
            self.rows = [
                dataclasses.replace(row, status="failed", reason=self.failure) for row in self.rows
            ]
            return False
        lora, agg = self.lora, self.lora.cfg.aggregator
        arrays = iter(torch.from_numpy(a).double() for a in mean)
        new_global, new_state = {}, {}
        for module in sorted(lora.shapes):
            d, k = lora.shapes[module]
            rank = agg.global_rank
            if self.mode == "ffa":  # A is the server's own frozen A₀
                A0 = lora.global_[module].A.double()
                pseudo = Factors(next(arrays), A0, 1.0)
            elif self.mode == "fedit":
                pseudo = Factors(next(arrays), next(arrays), 1.0)
            else:  # dense ΔW: the svd aggregator keeps Σrᵢ singular triplets unless told
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
        lora.commit(server_round, new_global, new_state)
        return True

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
        ok = super().setup_stage(grid, context, state)
        return self._forget_lost(state) if state.nid_to_neighbours else ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        super().share_keys_stage(grid, context, state)
        return self._forget_lost(state)

    def _forget_lost(self, state: WorkflowState) -> bool:
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {
            nid: neighbours & state.sampled_node_ids
            for nid, neighbours in state.nid_to_neighbours.items()
            if nid in state.sampled_node_ids
        }
        return self._check_threshold(state)


def train_round(lora: LoraStrategy, grid: Grid, server_round: int) -> RoundResult:
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
    workflow(grid, context)
    rows = adapter.rows
    if not rows:  # the protocol halted (too few clients left) or none replied
        reason = "SecAgg+ halted: fewer clients than the reconstruction threshold"
        rows = [ClientRow(server_round, -1, "failed", reason=reason)]
    # the server cannot know the clients' losses (they stay on the clients): train_loss is None
    return RoundResult(adapter.sampled, rows, None, replies=len(adapter.rows))


def max_weight(cfg: RunConfig) -> float:
    """The largest weight a client may send (its number of training examples)."""
    sa = cfg.privacy.secure_aggregation
    return float(sa.max_weight or cfg.data.max_examples or 100_000)


def workflow_max_weight(cfg: RunConfig) -> float:
    """The max_weight the workflow and mods use: 1 with uniform weights (every weight is 1)."""
    return 1.0 if cfg.aggregator.weighting == "uniform" else max_weight(cfg)


def check_recipe(cfg: RunConfig) -> None:
    """SecAgg+ needs sum-based aggregation, no per-client server step, and ≥ 3 clients a round."""
    sa = cfg.privacy.secure_aggregation
    if not sa.enabled:
        return
    key = KEY
    if cfg.aggregator.name not in MODES:
        raise ValueError(
            f"{key}: aggregator.name={cfg.aggregator.name!r} needs each client's update; the "
            "server only sees sums under SecAgg+, so use ffa (exact), fedit, or svd (dense upload)"
        )
    if cfg.privacy.mode == "client":
        raise ValueError(
            f"{key}: privacy.mode='client' clips and noises each update on the server, which "
            "never sees one under SecAgg+; use privacy.mode 'sample' or 'none'"
        )
    if cfg.adaptive is not None or any(t.pruning > 0 for t in cfg.lora.tiers or []):
        raise ValueError(f"{key}: pruned tiers and adaptive (rank, pruning) are not supported")
    if cfg.compression.dtype != "float32" or cfg.compression.topk is not None:
        raise ValueError(f"{key}: compression does not apply (masked vectors are integers)")
    n = cfg.federation.clients_per_round or cfg.data.num_clients
    if n < 2:
        raise ValueError(
            f"{key}: SecAgg+ needs at least 2 clients per round to form a sum (and 3 to hide "
            f"each update), got {n}"
        )
    if n == 2:
        raise ValueError(
            f"{key}: exactly 2 clients per round (federation.clients_per_round or "
            "data.num_clients) hides nothing: the global adapter they receive is the weighted sum "
            "of both updates, so each client learns the other's by subtracting its own; use at "
            "least 3"
        )
    if sa.quantization_range * n >= MODULUS:
        raise ValueError(
            f"{key}.quantization_range ({sa.quantization_range}) × {n} clients must stay below "
            f"2**32 (the masks' modulus), or the sum overflows; use at most {MODULUS // n - 1}"
        )


@register
class SecureAggregation(Feature):
    """SecAgg+ training rounds: the client's mod masks its vectors, the server sees only sums."""

    name = "secagg"
    order = 0
    client_mod = staticmethod(mod)

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        return cfg.privacy.secure_aggregation.enabled

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cls.enabled(cfg):
            check_recipe(cfg)

    def reply_keys(self) -> frozenset[str] | None:
        """Only `CLEAR_KEYS` leave a SecAgg+ client outside the masked sum."""
        return CLEAR_KEYS

    @classmethod
    def wrap_train(
        cls,
        cfg: RunConfig,
        content: RecordDict,
        context: Any,
        train: Callable[[RunConfig, RecordDict, Any], RecordDict],
    ) -> RecordDict | None:
        if FITINS not in content.config_records:
            return None
        return client_reply(cfg, content, context, train)

    def run_round(self, server_round: int, *, strategy: Any, grid: Any) -> RoundResult:
        label = f"round {server_round}/{self.cfg.federation.rounds} train"
        say(f"{label}: SecAgg+ from global {factors_digest(strategy.global_)}")
        result = train_round(strategy, grid, server_round)
        for i, row in enumerate(result.ok, 1):  # no loss: it stays on the client
            r = row.reply
            seconds = "" if r.train_seconds is None else f", {r.train_seconds:.0f}s"
            say(
                f"{label}: client {i}/{result.sampled} (partition {r.partition}, rank {r.rank}): "
                f"{r.steps} steps{seconds} (masked)"
            )
        failed = {row.reason for row in result.rows if row.status == "failed" and row.reply}
        for reason in failed:
            say(f"{label}: {reason}; the global adapter is unchanged")
        return result
