"""SecAgg+ on a client: the vectors `secaggplus_mod` masks, built from one local training round.

Each client sends the same shape whatever its rank (zero-padded to the federation's max rank),
refuses non-finite entries, counts what quantisation will clip, and keeps all but `CLEAR_KEYS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat

from fedllm.aggregators.base import Factors
from fedllm.model.adapters import from_record
from fedllm.privacy.secagg_common import (
    CLEAR_KEYS,
    CLIPPED,
    KEY,
    MIN_SUM,
    MODES,
    max_weight,
    weight_ratio,
    workflow_max_weight,
)
from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.secagg")


def mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """`secaggplus_mod` for SecAgg+ messages, after `check_stage`; every other message passes
    through untouched."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        state = context.state.config_records.get(RECORD_KEY_STATE)
        check_stage(msg.content.config_records[RECORD_KEY_CONFIGS], state)
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def check_stage(configs: ConfigRecord, state: ConfigRecord | None = None) -> None:
    """Refuse a protocol stage with which the server could unmask this client's own update.

    Flower's mod checks the types, not these: at setup, a round of fewer than 3 clients (the
    sum of 2 gives each update away), fewer than 3 key shares, or a threshold t with 2t <= k
    shares (the server could collect t shares of this client's mask seed from some neighbours
    and t of its secret key from others, by telling them different dropouts); at unmasking, a
    node named both alive and dropped (its seed share and its key share together unmask it),
    and, when every node of the round is this client's neighbour (`state`: the mod's, from
    setup), fewer than 3 alive (Flower's mod needs only the threshold, 2 of 3 shares with 3
    clients: a dropout, real or claimed, would give the server a sum of two updates). With
    fewer shares than clients a client sees only its neighbours, and cannot count the others.
    """
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        n, k, t = (
            int(configs[key]) for key in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD)
        )
        if n < MIN_SUM or k < MIN_SUM or not k < 2 * t <= 2 * k:
            raise ValueError(
                f"{KEY}: the server's SecAgg+ setup ({n} clients, {k} key shares, threshold {t}) "
                "would let it unmask this client's update; refusing (valid: at least 3 clients "
                "and 3 shares, and shares / 2 < threshold <= shares)"
            )
    elif stage == Stage.UNMASK:
        alive = set(configs[Key.ACTIVE_NODE_ID_LIST])
        # the mod's state from setup: every node of the round is a neighbour when k >= n
        everyone = state is not None and int(state["share_num"]) >= int(state["sample_num"])
        if everyone and len(alive) < MIN_SUM:
            raise ValueError(
                f"{KEY}: the server would unmask a sum of {len(alive)} updates (nodes "
                f"{sorted(alive)} alive); refusing (valid: at least 3 alive)"
            )
        both = alive & set(configs[Key.DEAD_NODE_ID_LIST])
        if both:
            raise ValueError(
                f"{KEY}: the server named nodes {sorted(both)} both alive and dropped; refusing "
                "to send both shares of one node"
            )


def vectors(update: dict[str, Factors], *, mode: str, width: int) -> list[np.ndarray]:
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


def clipped_entries(vecs: Sequence[np.ndarray], *, ratio: float, clipping_range: float) -> int:
    """How many entries the mod's quantisation clips: |ratio·x| > clipping_range."""
    return sum(int(np.count_nonzero(np.abs(v * ratio) > clipping_range)) for v in vecs)


def client_reply(
    cfg: RunConfig, content: RecordDict, *, context: Context, train: Callable[..., RecordDict]
) -> RecordDict:
    """Train from a FitIns-form message; reply in FitRes form with the vectors to be masked."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config.pop("secagg-keys")).split("\n")
    # what to send and how to weight it follow this client's recipe, never the server's word
    mode, width = MODES[cfg.aggregator.name], cfg.max_rank
    uniform = cfg.aggregator.weighting == "uniform"
    asked = {k: config.pop(k) for k in ("secagg-mode", "secagg-width", "secagg-uniform")}
    mine = {"secagg-mode": mode, "secagg-width": width, "secagg-uniform": uniform}
    if asked != mine:
        raise ValueError(f"{KEY}: the server asked for {asked}, but this recipe gives {mine}")
    arrays = to_ndarrays(fitins.parameters)
    received = ArrayRecord(
        {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)}
    )
    plain = RecordDict({"global": received, "config": ConfigRecord(config)})
    out = train(cfg, plain, context=context)
    metrics = dict(out["metrics"])
    update = from_record(out["update"], cfg.client_scaling(int(metrics["rank"])))
    vecs = vectors(update, mode=mode, width=width)
    check_finite(vecs, vector_names(update, mode))
    weight = 1 if uniform else int(metrics["num-examples"])
    if weight > max_weight(cfg):  # the mod would only warn, and the masked sum overflow
        raise ValueError(f"weight {weight} exceeds privacy.secure_aggregation.max_weight")
    sa = cfg.privacy.secure_aggregation
    ratio = weight_ratio(
        weight, max_weight=workflow_max_weight(cfg), quantization_range=sa.quantization_range
    )
    clipped = clipped_entries(vecs, ratio=ratio, clipping_range=sa.clipping_range)
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
