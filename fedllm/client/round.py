"""One client round's steps, in the order the ClientApp runs them: the plan (rank, pruning,
precision) after every feature's `plan` hook, the base with a fresh LoRA at that rank, the
starting adapter (the global factors as the features start them) and the local steps (a
feature's own trainer, else plain steps in the stages the features ask for).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, get_args

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from peft import PeftModel

from fedllm.aggregators.base import Factors
from fedllm.client.node_config import node_shard
from fedllm.client.schedule import round_steps, schedule_span
from fedllm.client.train import TrainResult, chain_results, train_local
from fedllm.constrained.pruning import check_ratio
from fedllm.data.shards import ProcessCache
from fedllm.features import registry
from fedllm.features.base import Feature
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.model import wire
from fedllm.model.adapters import attach_lora, from_record, revive_dead, write_factors
from fedllm.model.base import cached_base_at
from fedllm.model.loading import module_shapes
from fedllm.recipe.schema import RunConfig
from fedllm.recipe.schema_common import BasePrecision

log = logging.getLogger("fedllm.client")


def partition_of(context: Context) -> int:
    """This node's partition id (set by the simulation engine or a SuperNode's --node-config)."""
    if "partition-id" not in context.node_config:
        raise ValueError("node config has no 'partition-id'; start the SuperNode with one")
    return int(context.node_config["partition-id"])


def check_recipe(cfg: RunConfig, config: ConfigRecord) -> None:
    """Refuse to train for a server running another base model, adapter layout or data split."""
    theirs = str(config.get("recipe-hash", ""))
    if theirs and theirs != cfg.fingerprint():
        raise ValueError(
            f"recipe mismatch: server runs recipe {theirs}, this client {cfg.fingerprint()} "
            "(model, lora, data and seed must match)"
        )


def base_plan(
    cfg: RunConfig, partition: int, *, config: ConfigRecord, node_config: Mapping[str, Any]
) -> ClientPlan:
    """The rank, pruning and base precision the server assigned this round, else this node's or
    the recipe's rank at full size and the model's precision."""
    who = f"client {partition}"
    raw = config.get("rank", node_config.get("rank", cfg.client_rank(partition)))
    try:
        rank = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: LoRA rank must be a positive integer, got {raw!r}") from None
    if rank <= 0:
        raise ValueError(f"{who}: LoRA rank must be > 0, got {rank}")
    if "rank" in config and rank > cfg.max_rank:  # h106: 10⁸ ran the node out of memory
        raise ValueError(
            f"{who}: the server asked rank {rank}, above the recipe's largest, {cfg.max_rank}"
        )
    pruning = check_ratio(config.get("pruning", 0.0), who=who)
    quant = config.get("quantization", cfg.model.quantization)
    if quant not in (valid := get_args(BasePrecision)):
        raise ValueError(f"{who}: quantization must be one of {valid}, got {quant!r}")
    return ClientPlan(partition, rank, pruning, None if quant == "none" else quant)


def client_seed(cfg: RunConfig, *, server_round: int, partition: int) -> int:
    """The seed of one client's training in one round: distinct per run seed, round and client,
    and the same on a resume. seed·100003 + round·1009 + partition for partitions below 1009,
    where it is one-to-one within a run (every run before stop 44 keeps its seeds); past it (h91:
    round 1 partition 1009 met round 2 partition 0) a hash of the three in [2⁶², 2⁶³), which
    the formula reaches only for seeds above 4·10¹³."""
    seed = cfg.seed
    if 0 <= partition < 1009:  # within a run (one seed) one-to-one for every round
        return seed * 100_003 + server_round * 1009 + partition
    digest = hashlib.sha256(f"{seed}/{server_round}/{partition}".encode()).digest()
    return 2**62 + int.from_bytes(digest[:8], "big") % 2**62


def client_round(cfg: RunConfig, config: ConfigRecord, *, context: Context) -> ClientRound:
    """This round's context for the hooks, with the plan before any feature changed it."""
    pid = partition_of(context)
    server_round = int(config["server-round"])
    return ClientRound(
        cfg=cfg,
        partition=pid,
        server_round=server_round,
        spec=wire.spec_of(config),
        config=config,
        node_config=context.node_config,
        state=context.state,
        seed=client_seed(cfg, server_round=server_round, partition=pid),
        plan=base_plan(cfg, pid, config=config, node_config=context.node_config),
    )


def client_plan(
    cfg: RunConfig, partition: int, *, config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> ClientPlan:
    """What a client runs in a round with this config: the base plan after every active
    feature's `plan` hook (for tools and tests; a round computes it in `train_content`)."""
    node = {**node_config, "partition-id": partition}
    context = Context(0, 0, node, RecordDict(), {})
    rnd = client_round(cfg, ConfigRecord({"server-round": 1, **config}), context=context)
    for f in registry.build(cfg):
        rnd.plan = f.plan(rnd.plan, rnd)
    return rnd.plan


def check_rank_fits(model: torch.nn.Module, plan: ClientPlan, *, targets: list[str]) -> None:
    """A rank above min(out, in) of an adapted module names the client and the valid ranks."""
    for name, (d, k) in module_shapes(model, targets).items():
        if plan.rank > min(d, k):
            raise ValueError(
                f"client {plan.partition}: rank {plan.rank} does not fit module {name} of shape "
                f"{(d, k)} after pruning {plan.pruning} (valid ranks: 1..{min(d, k)})"
            )


@contextmanager
def lora_model(
    rnd: ClientRound,
    features: Sequence[Feature],
    *,
    merged: dict[str, Factors] | None,
    cache: ProcessCache | None = None,
) -> Iterator[PeftModel]:
    """The base as the features prepare it (plus a `merged` delta) with a fresh LoRA at the
    planned rank; fills in `rnd.tokenizer` and `rnd.shard` (kept in `cache`, the app's);
    all undone afterwards."""
    cfg, plan = rnd.cfg, rnd.plan
    # a base to be pruned loads at full precision; the feature that prunes it quantizes after
    quant = None if plan.pruning > 0 else plan.quantization
    rnd.cache = cache  # e.g. the pruned base's feature keeps its pruned model there
    base, rnd.tokenizer = cached_base_at(cfg, quant, cache=cache)
    rnd.shard = node_shard(cfg, rnd.node_config, tokenizer=rnd.tokenizer, cache=cache)
    for f in features:
        base = f.prepare_base(base, rnd)
    check_rank_fits(base, plan, targets=cfg.lora.target_modules)
    with wire.merged_into(base, merged or {}):
        model = attach_lora(
            base,
            rank=plan.rank,
            alpha=cfg.lora.alpha if plan.lora_alpha is None else plan.lora_alpha,
            dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        )
        try:
            yield model
        finally:
            model.unload()


def read_global(
    record: ArrayRecord, rnd: ClientRound, *, features: Sequence[Feature]
) -> dict[str, Factors]:
    """The global factors the server sent, in the first encoding a feature claims, else plain."""
    scaling = float(rnd.config["global-scaling"])
    for f in features:
        if (factors := f.read_global(record, rnd)) is not None:
            return factors
    return from_record(record, scaling)


def start_adapter(
    model: PeftModel,
    received: ArrayRecord,
    *,
    global_factors: dict[str, Factors] | None,
    rnd: ClientRound,
    features: Sequence[Feature],
) -> dict[str, Factors]:
    """Write the round's starting adapter into `model`; returns the factors it starts from."""
    rank, scaling = rnd.plan.rank, rnd.cfg.client_scaling(rnd.plan.rank)
    start = dict(global_factors or {})
    for f in features:
        start = f.start(start, rnd)
    start = {m: f.truncate(rank, scaling) for m, f in start.items()}
    if rnd.spec.merge:  # the delta is in the base: train a fresh LoRA on top
        wire.fresh_adapter(model, seed=rnd.seed)
    elif rnd.spec.local_B:  # the shared A with this node's own B
        write_factors(model, wire.personal(model, received, state=rnd.state))
    else:
        # ffa's A must stay the server's shared one, bit for bit; a delta read against what
        # the server sent must start from exactly that
        if not rnd.spec.freeze_A and not any(f.sent_start() for f in features):
            start = revive(start, rnd)
        write_factors(model, start)
    if rnd.spec.freeze_A:
        wire.freeze_A(model)
    return start


def revive_generator(seed: int) -> torch.Generator:
    """The fresh A rows' stream for a round of `seed`: one of its own (squeeze_intune's fresh
    rows come from Generator(seed), and the same draws twice would be duplicate components
    that train as one)."""
    digest = hashlib.sha256(f"revive/{seed}".encode()).digest()[:8]
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") % 2**63)


def revive(start: dict[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
    """The start with its dead components (zero-padded past a lower-rank global: a recipe's
    `aggregator.global_rank` below this client's rank, or a round that sampled only lower-rank
    clients) given fresh A rows from the round's seed, so they train; ΔW is unchanged."""
    start, revived = revive_dead(start, generator=revive_generator(rnd.seed))
    if revived:
        log.info(
            "client %d, round %d: %d components of the received adapter were zero (a global of "
            "lower rank than %d); started them afresh",
            rnd.partition,
            rnd.server_round,
            revived,
            rnd.plan.rank,
        )
    return start


def local_steps(model: PeftModel, rnd: ClientRound, *, features: Sequence[Feature]) -> TrainResult:
    """The round's local steps: a feature's own trainer (DP-SGD), else plain steps with every
    feature's regularisers added to the loss, in the stages the features' `stage` hooks ask for
    (one unless a feature changes the adapter mid-round, e.g. squeeze_intune)."""
    fed = rnd.cfg.federation
    steps = round_steps(fed, len(rnd.shard.train))
    for f in features:
        if (result := f.train(model, rnd, steps=steps)) is not None:
            return result
    terms = [term for f in features for term in f.regularizers(model, rnd)]
    offset, span = schedule_span(
        scope=fed.schedule_scope, server_round=rnd.server_round, rounds=fed.rounds, steps=steps
    )
    results: list[TrainResult] = []
    done = 0
    while done < steps:
        asks = {f.name: f.stage(model, rnd, done=done, steps=steps) for f in features}
        run = min(asks.values(), default=steps - done)
        if not 0 < run <= steps - done:
            who = next(name for name, n in asks.items() if n == run)
            raise ValueError(
                f"feature {who!r} asked for a stage of {run} steps at step {done} of {steps} "
                f"(valid: 1..{steps - done})"
            )
        results.append(
            _plain_steps(model, rnd, steps=run, done=done, span=(offset, span), terms=terms)
        )
        done += run
    return chain_results(results)


def _plain_steps(
    model: PeftModel,
    rnd: ClientRound,
    *,
    steps: int,
    done: int,
    span: tuple[int, int],
    terms: Sequence[Any],
) -> TrainResult:
    """`steps` plain local steps from step `done` of the round (schedule and data continue)."""
    fed = rnd.cfg.federation
    offset, total = span
    return train_local(
        model,
        rnd.shard.train,
        steps=steps,
        batch_size=fed.batch_size,
        pad_id=rnd.tokenizer.pad_token_id,
        optimizer=fed.optimizer,
        lr=fed.lr,
        weight_decay=fed.weight_decay,
        schedule=fed.schedule,
        warmup_steps=fed.warmup_steps,
        schedule_offset=offset + done,
        schedule_steps=total,
        accumulation=fed.gradient_accumulation_steps,
        gradient_checkpointing=fed.gradient_checkpointing,
        precision=fed.precision,
        group_by_length=fed.group_by_length,
        share_head=fed.share_head,
        max_grad_norm=fed.max_grad_norm,
        seed=rnd.seed,
        skip_steps=done,
        regularizer=(lambda: sum(t() for t in terms)) if terms else None,
    )
