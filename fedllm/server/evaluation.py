"""Evaluation whose cost follows the clients that take part, not how many exist.

Two ways, chosen in the recipe and usable together:
- `federation.evaluate_clients`: a panel of clients evaluates the global adapter on their own
  held-out splits each round (Flower's `fraction_evaluate`). The panel is the same every round
  (rendezvous hashing of the nodes' seats, their partitions (`fedllm.server.seats`), with the
  recipe's seed), so the curves of a run compare the same clients, across a resume too; a node
  joining or leaving moves at most one seat.
- `data.test_set`: a global test set drawn from every domain before the clients' partition,
  evaluated by the server itself with the global adapter (no message to any client).

The panel's replies are checked like training replies (`read_evaluations`): a malformed, lying
or duplicated one is dropped with a logged reason and the round's loss is the others'.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence

from flwr.app import Message

from fedllm.aggregators.base import Factors
from fedllm.client.train import evaluate_nll
from fedllm.data import tokenize_all
from fedllm.data.shards import ProcessCache, global_test_set
from fedllm.errors import short_reason
from fedllm.features.types import EvalRow
from fedllm.model.adapters import adapter_holding
from fedllm.model.base import cached_base_model
from fedllm.model.loading import scoring_mode
from fedllm.recipe.schema import RunConfig
from fedllm.server.replies import shared_partitions

log = logging.getLogger("fedllm.server")


def panel_size(spec: str | int | float, num_nodes: int) -> int:
    """How many of `num_nodes` evaluate: all, none, a count (at most all), or a fraction
    rounded half up (at least one)."""
    if spec == "all":
        return num_nodes
    if spec == "none" or num_nodes == 0:
        return 0
    if isinstance(spec, float):
        return min(num_nodes, max(1, math.floor(spec * num_nodes + 0.5)))
    return min(int(spec), num_nodes)


def evaluation_panel(
    nodes: Iterable[int],
    *,
    spec: str | int | float,
    seed: int,
    seats: Mapping[int, tuple[int, int]] | None = None,
) -> list[int]:
    """The sorted nodes that evaluate this round: the `panel_size` nodes whose hash with `seed`
    is smallest, the same every round for the same nodes; hashed by seat where `seats` gives
    one (a partition: the same panel after a resume gives the nodes new ids)."""
    nodes = sorted(set(nodes))
    k = panel_size(spec, len(nodes))
    if k == len(nodes):
        return nodes
    seated = dict(seats or {})

    def score(node: int) -> bytes:
        kind, value = seated.get(node, (1, node))
        key = f"p{value}" if kind == 0 else str(value)
        return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()

    return sorted(sorted(nodes, key=score)[:k])


def read_evaluations(
    replies: Sequence[Message],
    *,
    server_round: int,
    cfg: RunConfig,
    partitions: Mapping[int, int],
    declared: Mapping[str, type | tuple[type, float]] | None = None,
) -> tuple[list[EvalRow], dict[int, str]]:
    """The panel's readable replies as rows, and why each other one was dropped (by node).

    Dropped: metrics that do not parse (`EvalRow.parse`, with the features' `declared`
    `eval_metrics`), a partition outside the recipe or not
    the one the node trained as (`partitions`), more tokens than its shard can hold
    (data.max_examples × data.max_length, when the recipe caps the examples), and every reply of
    a partition two nodes claim in one round (except the partition's sole known holder: the
    claimant is dropped alone). Failed replies (Flower errors) are neither.
    """
    rows: dict[int, EvalRow] = {}
    dropped: dict[int, str] = {}
    n, cap = cfg.data.num_clients, cfg.data.max_examples
    max_tokens = None if cap is None else cap * cfg.data.max_length
    for msg in replies:
        if msg.has_error():
            continue
        node = msg.metadata.src_node_id
        try:
            row = EvalRow.parse(server_round, msg.content["metrics"], declared=declared)
            held = partitions.get(node)
            if row.partition >= n:
                raise ValueError(f"partition-id {row.partition} outside the recipe's [0, {n})")
            if held is not None and row.partition != held:
                raise ValueError(f"partition-id {row.partition}, but the node trained as {held}")
            if max_tokens is not None and row.tokens > max_tokens:
                raise ValueError(
                    f"tokens {row.tokens} above data.max_examples × data.max_length={max_tokens}"
                )
        except (KeyError, TypeError, ValueError) as err:
            dropped[node] = f"malformed evaluation: {err}"
            continue
        rows[node] = row
    holders: dict[int, list[int]] = {}  # partition -> the nodes accepted training taught it
    for node, pid in partitions.items():
        holders.setdefault(pid, []).append(node)
    for node, reason in shared_partitions({n: row.partition for n, row in rows.items()}).items():
        if holders.get(rows[node].partition) == [node]:
            continue  # its sole known holder: a newcomer's claim cannot oust it
        del rows[node]
        dropped[node] = reason
    return list(rows.values()), dropped


def evaluate_round(
    replies: Sequence[Message],
    *,
    server_round: int,
    cfg: RunConfig,
    partitions: Mapping[int, int],
    declared: Mapping[str, type | tuple[type, float]] | None = None,
) -> tuple[tuple[float, int] | None, list[EvalRow], dict[int, str]]:
    """((token-weighted held-out loss, tokens) or None, one row per client that has held-out
    tokens, why each dropped reply was dropped): a bad reply never ends the round or moves its
    loss; each is logged. `declared`: the features' `eval_metrics`, read into the rows."""
    for msg in replies:
        if msg.has_error():
            node, why = msg.metadata.src_node_id, short_reason(msg.error.reason)
            log.warning("round %d: node %s failed to evaluate: %s", server_round, node, why)
    rows, dropped = read_evaluations(
        replies, server_round=server_round, cfg=cfg, partitions=partitions, declared=declared
    )
    for node, reason in dropped.items():
        log.warning("round %d: dropped node %s's evaluation: %s", server_round, node, reason)
    if empty := sorted(r.partition for r in rows if r.tokens == 0):  # its loss would read 0.0
        if server_round <= 1:  # a private run says how many, not which (h107)
            log.warning(
                "%s hold no held-out examples: no held-out loss of theirs is recorded (raise "
                "data.held_out or data.max_examples)",
                f"{len(empty)} partitions" if cfg.privacy.private else f"partitions {empty}",
            )
        rows = [r for r in rows if r.tokens > 0]
    tokens = sum(r.tokens for r in rows)
    nll = sum(r.held_out_loss * r.tokens for r in rows)
    return ((nll / tokens, tokens) if tokens else None), rows, dropped


def extra_means(rows: Sequence[EvalRow]) -> dict[str, float]:
    """The token-weighted mean of each feature metric over the rows that carry it (features'
    `eval_metrics` are per-token values over the client's held-out tokens)."""
    keys = sorted({k for r in rows for k in r.extra})
    out = {}
    for key in keys:
        have = [r for r in rows if key in r.extra and r.tokens > 0]
        if tokens := sum(r.tokens for r in have):
            out[key] = sum(r.extra[key] * r.tokens for r in have) / tokens
    return out


class TestSetEvaluator:
    """The server's own evaluation of the global adapter on the recipe's global test set."""

    __test__ = False  # not a pytest class

    def __init__(
        self, cfg: RunConfig, *, cache: ProcessCache | None = None, max_examples: int | None = None
    ) -> None:
        """`cache`: where the base model is kept between calls (a cache of its own by default);
        `max_examples`: score an evenly spaced subset of at most this many (the same one every
        call), e.g. for a cheap per-client score."""
        if cfg.data.test_set is None:
            raise ValueError("data.test_set is not set: there is no global test set to evaluate")
        self.cfg = cfg
        self.cache = cache if cache is not None else ProcessCache()
        self.raw = global_test_set(cfg, cache=self.cache)
        if not self.raw:
            raise ValueError(
                "data.test_set drew no example (fraction too small for labels this size?); "
                "raise data.test_set.fraction or name whole labels"
            )
        if max_examples is not None and len(self.raw) > max_examples:
            n = len(self.raw)
            self.raw = [self.raw[i * n // max_examples] for i in range(max_examples)]
        self._tokenized: tuple[object, list[dict]] | None = None

    def examples(self, tokenizer: object) -> list[dict]:
        """The test set tokenized once for this tokenizer."""
        if self._tokenized is None or self._tokenized[0] is not tokenizer:
            fmt = {
                "prompt_format": self.cfg.data.prompt_format,
                "max_length": self.cfg.data.max_length,
            }
            self._tokenized = (tokenizer, tokenize_all(self.raw, tokenizer, **fmt))
        return self._tokenized[1]

    def evaluate(self, factors: Mapping[str, Factors]) -> tuple[float, int]:
        """(mean token NLL, tokens) of the base with `factors` as its LoRA adapter."""
        cfg = self.cfg
        base, tokenizer = cached_base_model(cfg, cache=self.cache)
        examples = self.examples(tokenizer)
        model = adapter_holding(
            base, factors, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules
        )
        try:
            scoring_mode(model, quantized=cfg.model.quantization != "none")  # as the clients
            nll, tokens = evaluate_nll(
                model,
                examples,
                batch_size=cfg.federation.eval_batch_size,
                pad_id=tokenizer.pad_token_id,
                share_head=cfg.federation.share_head,
            )
            model.train()
        finally:
            model.unload()
        return nll / max(tokens, 1), tokens
