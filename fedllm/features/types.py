"""The typed values that travel through one round: a client's plan and update, what a node is
sent, a validated training reply, and the rows of `metrics.jsonl`.

A reply's metrics are validated once (`TrainReply.parse`), inside the round's error handling;
nothing downstream reads a string-keyed metrics dict. A feature's own metrics (`TrainReply.extra`)
are checked by its `receive` hook (`extra_number`), inside that handling too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedllm.aggregators.base import Factors, RoundSpec


@dataclass(frozen=True)
class ClientPlan:
    """What one client runs this round: LoRA rank, pruning ratio of its base, quantization, and
    the lora_alpha its adapter trains at (None: the recipe's; the reply is at the recipe's α/r
    either way, so only the local steps' size per parameter changes)."""

    partition: int
    rank: int
    pruning: float = 0.0
    quantization: str | None = None  # None: full precision
    lora_alpha: float | None = None


@dataclass
class ClientRound:
    """One training round on one client as its hooks see it; the ClientApp fills it in as the
    round proceeds (plan, then tokenizer and shard once the base is loaded)."""

    cfg: Any  # fedllm.recipe.schema.RunConfig
    partition: int
    server_round: int
    spec: RoundSpec
    config: ConfigRecord  # the server's round config
    node_config: Mapping[str, Any]
    state: RecordDict  # the node's persistent context.state
    seed: int
    plan: ClientPlan
    tokenizer: Any = None
    shard: Any = None  # fedllm.data.shards.Shard
    cache: Any = None  # the app's fedllm.data.shards.ProcessCache (None: nothing kept)


@dataclass(frozen=True)
class ClientUpdate:
    """A client's trained adapter, what it started from (same rank) and that rank."""

    factors: dict[str, Factors]
    start: dict[str, Factors]
    rank: int


@dataclass(frozen=True)
class Download:
    """What the server sends one node: its rank (None until known), factors and config entries."""

    rank: int | None
    factors: dict[str, Factors]
    config: dict[str, Any] = field(default_factory=dict)


MAX_INT = 2**53  # the largest integer a reply metric may claim (exact as a float)


def _number(metrics: Mapping[str, Any], key: str, *, kind: type, minimum: float = 0) -> Any:
    if key not in metrics:
        raise ValueError(f"reply metrics lack {key!r}")
    raw = metrics[key]
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"reply metric {key!r} must be a number, got {raw!r}")
    if not math.isfinite(raw):
        raise ValueError(f"reply metric {key!r} must be finite, got {raw!r}")
    if kind is int and float(raw) != int(raw):
        raise ValueError(f"reply metric {key!r} must be an integer, got {raw!r}")
    if kind is int and abs(raw) > MAX_INT:  # 1.7e308 "examples" overflowed the weights' sums
        raise ValueError(f"reply metric {key!r} must be at most 2**53, got {raw!r}")
    value = kind(raw)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"reply metric {key!r} must be finite and >= {minimum}, got {raw!r}")
    return value


def _optional(metrics: Mapping[str, Any], key: str, *, kind: type, minimum: float = 0) -> Any:
    return _number(metrics, key, kind=kind, minimum=minimum) if key in metrics else None


def extra_number(
    reply: TrainReply, key: str, *, kind: type = float, minimum: float = -math.inf
) -> Any:
    """A feature's own reply metric `key` (in `reply.extra`) as a finite scalar of `kind` >=
    `minimum`, or None if the reply has none; ValueError naming the key otherwise (a list, a
    string, NaN: Flower's records carry them all). For a feature's `receive`, so that a bad value
    rejects its reply there instead of failing a later hook."""
    return _optional(reply.extra, key, kind=kind, minimum=minimum)


def declared_metrics(reply: TrainReply, declared: Mapping[str, Any]) -> dict[str, Any]:
    """The reply's values of the `declared` metrics (key -> type or (type, minimum); see
    `Feature.reply_metrics`) by their row names (`squeeze-rank` -> `squeeze_rank`), checked;
    ValueError naming the key for a bad one, absent keys left out."""
    return _declared(reply.extra, declared)


def _declared(metrics: Mapping[str, Any], declared: Mapping[str, Any]) -> dict[str, Any]:
    """`declared_metrics` over a reply's raw metrics (a training reply's extra keys, or an
    evaluation reply's metrics for `Feature.eval_metrics`)."""
    out: dict[str, Any] = {}
    for key, spec in declared.items():
        kind, minimum = spec if isinstance(spec, tuple) else (spec, -math.inf)
        if (value := _optional(metrics, key, kind=kind, minimum=minimum)) is not None:
            out[key.replace("-", "_")] = value
    return out


CORE_KEYS = (
    "partition-id",
    "rank",
    "num-examples",
    "train-loss",
    "train-loss-first",
    "train-loss-last",
    "steps",
    "train-seconds",
    "bytes-sent",
    "bytes-received",
    "pruning",
    "scaling",
)


@dataclass(frozen=True)
class TrainReply:
    """A client's training metrics, validated; feature metrics stay in `extra` by their keys."""

    partition: int
    rank: int
    num_examples: int | None  # None: not sent (a private reply; see Feature.reply_keys)
    train_loss: float | None
    train_loss_first: float | None
    train_loss_last: float | None
    steps: int
    train_seconds: float | None
    bytes_sent: int
    bytes_received: int
    pruning: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, metrics: Mapping[str, Any]) -> TrainReply:
        """Validate a reply's metrics; ValueError names the first bad key.

        The keys a private reply leaves out (example count, losses, time) may be absent.
        """
        loss = -math.inf
        return cls(
            partition=_number(metrics, "partition-id", kind=int),
            rank=_number(metrics, "rank", kind=int, minimum=1),
            num_examples=_optional(metrics, "num-examples", kind=int, minimum=1),
            train_loss=_optional(metrics, "train-loss", kind=float, minimum=loss),
            train_loss_first=_optional(metrics, "train-loss-first", kind=float, minimum=loss),
            train_loss_last=_optional(metrics, "train-loss-last", kind=float, minimum=loss),
            steps=_number(metrics, "steps", kind=int),
            train_seconds=_optional(metrics, "train-seconds", kind=float),
            bytes_sent=_number(metrics, "bytes-sent", kind=int),
            bytes_received=_number(metrics, "bytes-received", kind=int),
            pruning=_number({"pruning": metrics.get("pruning", 0.0)}, "pruning", kind=float),
            extra={k: v for k, v in metrics.items() if k not in CORE_KEYS},
        )


# a trained client's reply, as the columns of its row in metrics.jsonl (`ClientRow.to_json`)
REPLY_COLUMNS = (
    "partition",
    "rank",
    "num_examples",
    "train_loss",
    "train_loss_first",
    "train_loss_last",
    "steps",
    "train_seconds",
    "bytes_sent",
    "bytes_received",
    "pruning",
)
# every column of a client's row that fedllm writes, "epsilon" by the DP features (a feature's
# declared reply metrics may not take one: `registry.register`)
ROW_KEYS = frozenset({"kind", "round", "node", "status", "reason", "epsilon", *REPLY_COLUMNS})
# the columns of an eval row and of the server row its features' `eval_metrics` are added to
EVAL_ROW_KEYS = frozenset(
    {"kind", "round", "partition", "held_out_loss", "tokens", "phase", "eval_clients"}
    | {"eval_dropped", "eval_tokens", "test_loss", "test_tokens", "clients_ok", "clients_failed"}
    | {"clients_sampled", "train_loss", "bytes_sent", "bytes_received", "seconds"}
    | {"train_seconds", "partition_id", "nll_sum", "num_examples"}  # the reply's own keys
)


@dataclass
class ClientRow:
    """One client's line of a training round in `metrics.jsonl` (features may add `fields`)."""

    round: int
    node: int
    status: str  # ok | rejected | failed
    reply: TrainReply | None = None
    partition: int | None = None
    reason: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    # an unreadable reply: the partitions its node may hold (it may have trained on any of them;
    # sample-level DP charges them), not written to the row
    may_hold: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The row as metrics.jsonl writes it: the reply's columns if accepted, else the reason."""
        row: dict[str, Any] = {"kind": "client", "round": self.round, "node": self.node}
        row["status"] = self.status
        r = self.reply
        if self.status == "ok" and r is not None:
            row.update({key: getattr(r, key) for key in REPLY_COLUMNS})
        else:
            if self.partition is not None or (self.status == "rejected" and r is not None):
                row["partition"] = self.partition if self.partition is not None else r.partition
            row["reason"] = self.reason
        return {**row, **self.fields}


@dataclass(frozen=True)
class EvalRow:
    """One client's held-out loss of the global adapter after a round."""

    round: int
    partition: int
    held_out_loss: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)  # features' `eval_metrics`, row names

    @classmethod
    def parse(
        cls,
        server_round: int,
        metrics: Mapping[str, Any],
        *,
        declared: Mapping[str, type | tuple[type, float]] | None = None,
    ) -> EvalRow:
        """Validate an evaluation reply's metrics; ValueError names the first bad key. The loss
        must be its own nll-sum over its tokens (the token-weighted mean uses both). `declared`:
        the active features' `eval_metrics`, kept in `extra` when present and valid."""
        nll = _number(metrics, "nll-sum", kind=float)
        tokens = _number(metrics, "tokens", kind=int)
        loss = _number(metrics, "held-out-loss", kind=float)
        if not math.isclose(loss, nll / max(tokens, 1), rel_tol=1e-5, abs_tol=1e-9):
            raise ValueError(
                f"reply metric 'held-out-loss'={loss!r} is not 'nll-sum'/'tokens' "
                f"({nll!r}/{tokens})"
            )
        extra = _declared(metrics, declared or {})
        return cls(server_round, _number(metrics, "partition-id", kind=int), loss, tokens, extra)

    def to_json(self) -> dict[str, Any]:
        """The row as metrics.jsonl writes it (`kind: eval`)."""
        return {
            "kind": "eval",
            "round": self.round,
            "partition": self.partition,
            "held_out_loss": self.held_out_loss,
            "tokens": self.tokens,
            **self.extra,
        }


@dataclass
class RoundResult:
    """What one training round produced: a row per sampled client and the weighted train loss."""

    sampled: int
    rows: list[ClientRow]
    train_loss: float | None = None  # example-weighted over accepted clients; None if none
    replies: int = 0  # replies received (errors included)
    aggregator_error: str | None = None  # the aggregator raised on the accepted updates

    @property
    def ok(self) -> list[ClientRow]:
        """The rows of accepted replies (status `ok`)."""
        return [r for r in self.rows if r.status == "ok"]
