"""Secure aggregation with Flower's SecAgg+: the server only ever sees the weighted sum.

This module is the `SecureAggregation` feature and its recipe checks. One training round runs
Flower's `SecAggPlusWorkflow` (four exchanges: setup, share keys, collect masked vectors, unmask):
the server side is `secagg_server.py` (`SecureRound`, `train_round`), the client side
`secagg_client.py` (`client_reply`, whose vectors `secaggplus_mod` masks), and the names both use
are in `secagg_common.py`.
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

from collections.abc import Callable
from typing import Any

from flwr.app import RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedllm.features.base import Feature
from fedllm.features.registry import register
from fedllm.features.types import RoundResult
from fedllm.model.adapters import factors_digest
from fedllm.privacy.secagg_client import client_reply, mod
from fedllm.privacy.secagg_common import (
    CLEAR_KEYS,
    FITINS,
    KEY,
    MODES,
    MODULUS,
    protocol_numbers,
)
from fedllm.privacy.secagg_server import train_round
from fedllm.recipe.schema import RunConfig
from fedllm.server.exchange import say


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
    k, t = protocol_numbers(shares=sa.num_shares, threshold=sa.reconstruction_threshold, clients=n)
    if not k < 2 * t <= 2 * k:
        raise ValueError(
            f"{key}: with {n} clients per round, num_shares={sa.num_shares} and "
            f"reconstruction_threshold={sa.reconstruction_threshold} give {k} key shares and a "
            f"threshold of {t}; it must be above half the shares and at most all of them, or "
            "a server that reports different dropouts to different clients can unmask one "
            "(clients refuse such a setup); e.g. reconstruction_threshold=0.67"
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
        """On with `privacy.secure_aggregation.enabled`."""
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
        *,
        context: Any,
        train: Callable[..., RecordDict],
    ) -> RecordDict | None:
        """Refuse a train message outside the SecAgg+ protocol (its reply would leave unmasked);
        reply through `client_reply` otherwise."""
        if FITINS not in content.config_records:  # a server skipping the protocol
            raise ValueError(
                f"{KEY}: this recipe trains every round under SecAgg+, but the server sent a "
                "plain training message; refusing to reply with an unmasked update"
            )
        # Flower's mod calls the app only at its masking stage (after setup and key sharing),
        # and `mod` hands it every message that carries the protocol's record: a FitIns
        # without that record skipped the protocol, and its reply would leave unmasked
        if RECORD_KEY_CONFIGS not in content.config_records:
            raise ValueError(
                f"{KEY}: the server sent a training message outside the SecAgg+ protocol (no "
                f"'{RECORD_KEY_CONFIGS}' record: its masking stage never ran); refusing to reply "
                "with an unmasked update"
            )
        return client_reply(cfg, content, context=context, train=train)

    def run_round(self, server_round: int, *, strategy: Any, grid: Any) -> RoundResult:
        label = f"round {server_round}/{self.cfg.federation.rounds} train"
        say(f"{label}: SecAgg+ from global {factors_digest(strategy.global_)}")
        result = train_round(strategy, grid=grid, server_round=server_round)
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
