"""The names both sides of SecAgg+ share: the wire constants, the clear metrics, the weight bound.

A leaf module, so that `secagg_client`, `secagg_server` and the `secagg` feature import it
without importing each other.
"""

from __future__ import annotations

from fedllm.recipe.schema import RunConfig

MODES = {"ffa": "ffa", "fedit": "fedit", "svd": "dense"}  # aggregator -> what clients send
MODULUS = 2**32  # SecAgg+ mask range; the sum of n quantized vectors must stay below it
FITINS = "fitins.config"  # a train message in FitIns form: a SecAgg+ round
KEY = "privacy.secure_aggregation"
CLIPPED = "secagg-clipped-entries"  # reply metric: entries the mod's quantisation will clip
# The reply metrics a SecAgg+ client sends in the clear (outside the masked sum): what the server
# needs to run the protocol (who, rank, weight, traffic) and to account DP-SGD. Losses, clipping
# statistics and every other key stay on the client.
MIN_SUM = 3  # the fewest updates a masked sum may hold: a sum of 2 gives each away to the other

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


def max_weight(cfg: RunConfig) -> float:
    """The largest weight a client may send (its number of training examples)."""
    sa = cfg.privacy.secure_aggregation
    return float(sa.max_weight or cfg.data.max_examples or 100_000)


def workflow_max_weight(cfg: RunConfig) -> float:
    """The max_weight the workflow and mods use: 1 with uniform weights (every weight is 1)."""
    return 1.0 if cfg.aggregator.weighting == "uniform" else max_weight(cfg)


def weight_ratio(weight: float, *, max_weight: float, quantization_range: int) -> float:
    """The factor `secaggplus_mod` multiplies a client's vectors by: wᵢ/max_weight, quantized."""
    return round(weight / max_weight * quantization_range) / quantization_range


def protocol_numbers(
    *, shares: int | float, threshold: int | float, clients: int
) -> tuple[int, int]:
    """(key shares k, threshold t) Flower's SecAgg+ setup derives for a round of `clients` from
    the recipe's `num_shares` and `reconstruction_threshold` (its `setup_stage`, restated here so
    a recipe is checked before any round: clients refuse a setup with 2t <= k)."""
    if isinstance(shares, float):
        k = round(shares * clients)
        if k < clients and k % 2 == 0:
            k += 1
        if k <= 2:
            k = clients
    else:
        k = shares
    t = max(round(threshold * k), 2) if isinstance(threshold, float) else threshold
    if clients != k and k % 2 == 0:
        k += 1
    return k, t
