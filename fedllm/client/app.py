"""The Flower ClientApp: local LoRA training and held-out evaluation on one private shard.

Each message takes this client's shard (built from the recipe, deterministic) and the base model
from the app's `ProcessCache` (built and loaded once per process), attaches a LoRA adapter at
this client's rank, starts it from the global factors it received and replies with its factors
and metrics. Optional capabilities (DP-SGD, pruning, compression, FedProx, ...) are features
(`fedllm.features`): this module calls their hooks in order and knows none of them by name.
Only adapter tensors and metrics leave the client.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, get_args

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from fedllm.aggregators.base import Factors
from fedllm.client.node_config import node_shard
from fedllm.client.schedule import num_local_steps, schedule_span
from fedllm.client.train import TrainResult, chain_results, evaluate_nll, train_local
from fedllm.constrained.pruning import check_ratio
from fedllm.data.shards import ProcessCache
from fedllm.features import registry
from fedllm.features.base import Feature
from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate
from fedllm.model import packing, wire
from fedllm.model.adapters import attach_lora, from_record, read_factors, write_factors
from fedllm.model.base import cached_base_model
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


def base_plan(cfg: RunConfig, partition: int, config: ConfigRecord, node_config) -> ClientPlan:
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
    pruning = check_ratio(config.get("pruning", 0.0), who=who)
    quant = config.get("quantization", cfg.model.quantization)
    if quant not in (valid := get_args(BasePrecision)):
        raise ValueError(f"{who}: quantization must be one of {valid}, got {quant!r}")
    return ClientPlan(partition, rank, pruning, None if quant == "none" else quant)


def client_round(cfg: RunConfig, config: ConfigRecord, context: Context) -> ClientRound:
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
        seed=cfg.seed * 100_003 + server_round * 1009 + pid,
        plan=base_plan(cfg, pid, config, context.node_config),
    )


def client_plan(
    cfg: RunConfig, partition: int, config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> ClientPlan:
    """What a client runs in a round with this config: the base plan after every active
    feature's `plan` hook (for tools and tests; a round computes it in `train_content`)."""
    node = {**node_config, "partition-id": partition}
    context = Context(0, 0, node, RecordDict(), {})
    rnd = client_round(cfg, ConfigRecord({"server-round": 1, **config}), context)
    for f in registry.build(cfg):
        rnd.plan = f.plan(rnd.plan, rnd)
    return rnd.plan


def check_rank_fits(model: torch.nn.Module, plan: ClientPlan, targets: list[str]) -> None:
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
    model_cfg = cfg.model.model_copy(update={"quantization": quant or "none"})
    rnd.cache = cache  # e.g. the pruned base's feature keeps its pruned model there
    base, rnd.tokenizer = cached_base_model(
        cfg.model_copy(update={"model": model_cfg}), cache=cache
    )
    rnd.shard = node_shard(cfg, rnd.node_config, rnd.tokenizer, cache=cache)
    for f in features:
        base = f.prepare_base(base, rnd)
    check_rank_fits(base, plan, cfg.lora.target_modules)
    with wire.merged_into(base, merged or {}):
        model = attach_lora(
            base,
            rank=plan.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        )
        try:
            yield model
        finally:
            model.unload()


def read_global(
    record: ArrayRecord, rnd: ClientRound, features: Sequence[Feature]
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
        write_factors(model, wire.personal(model, received, rnd.state))
    else:
        write_factors(model, start)
    if rnd.spec.freeze_A:
        wire.freeze_A(model)
    return start


def local_steps(model: PeftModel, rnd: ClientRound, features: Sequence[Feature]) -> TrainResult:
    """The round's local steps: a feature's own trainer (DP-SGD), else plain steps with every
    feature's regularisers added to the loss, in the stages the features' `stage` hooks ask for
    (one unless a feature changes the adapter mid-round, e.g. squeeze_intune)."""
    fed = rnd.cfg.federation
    steps = num_local_steps(
        len(rnd.shard.train),
        batch_size=fed.batch_size,
        local_steps=fed.local_steps,
        local_epochs=fed.local_epochs,
        accumulation=fed.gradient_accumulation_steps,
    )
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
        results.append(_plain_steps(model, rnd, run, done=done, span=(offset, span), terms=terms))
        done += run
    return chain_results(results)


def _plain_steps(
    model: PeftModel,
    rnd: ClientRound,
    steps: int,
    *,
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


def train(
    cfg: RunConfig, msg: Message, context: Context, *, cache: ProcessCache | None = None
) -> Message:
    """One round of local training, started from the global factors in `msg`.

    A feature may take the message in its own form (SecAgg+ rounds arrive as FitIns and reply
    as FitRes, which its mod masks before anything leaves the client).
    """
    run = functools.partial(train_content, cache=cache)
    received = packing.unpack(msg.content)  # packed arrays from a ClientApp without the mod
    for cls in registry.active(cfg):
        content = cls.wrap_train(cfg, received, context, run)
        if content is not None:
            return Message(content, reply_to=msg)
    return Message(run(cfg, received, context), reply_to=msg)


def train_content(
    cfg: RunConfig, content: RecordDict, context: Context, *, cache: ProcessCache | None = None
) -> RecordDict:
    """`train` on a message's content: {global, config} in, {update, metrics} out."""
    config = content["config"]
    check_recipe(cfg, config)
    features = registry.build(cfg)
    rnd = client_round(cfg, config, context)
    for f in features:
        rnd.plan = f.plan(rnd.plan, rnd)
    received = content["global"]
    global_factors = None if rnd.spec.local_B else read_global(received, rnd, features)
    folded = [f.fold(global_factors or {}, rnd) for f in features]  # e.g. Fed-PLoRA's modules
    merged = wire.stacked(global_factors if rnd.spec.merge else {}, *folded)
    with lora_model(rnd, features, merged=merged or None, cache=cache) as model:
        start = start_adapter(
            model, received, global_factors=global_factors, rnd=rnd, features=features
        )
        result = local_steps(model, rnd, features)
        live = read_factors(model)  # on the model's device; what follows works on the CPU
        trained = {m: Factors(f.B.cpu(), f.A.cpu(), f.scaling) for m, f in live.items()}
        update = ClientUpdate(trained, start, rnd.plan.rank)
        for f in features:
            update = f.post_process(update, rnd)
        if rnd.spec.local_B:
            wire.keep_local_B(rnd.state, update.factors)
        arrays = {"update": wire.outgoing(update.factors, rnd.spec)}
        for f in features:
            arrays = f.reply(arrays, update, rnd)
    log.info(
        "client %d round %d: rank %d, %d steps, loss %.4f -> %.4f",
        rnd.partition,
        rnd.server_round,
        update.rank,
        result.steps,
        result.loss_first,
        result.loss_last,
    )
    metrics = MetricRecord(
        {
            "num-examples": len(rnd.shard.train),
            "partition-id": rnd.partition,
            "rank": update.rank,
            "scaling": cfg.client_scaling(update.rank),
            "train-loss": result.loss_mean,
            "train-loss-first": result.loss_first,
            "train-loss-last": result.loss_last,
            "steps": result.steps,
            "train-seconds": result.seconds,
            "bytes-received": received.count_bytes(),
            "bytes-sent": sum(r.count_bytes() for r in arrays.values()),
            "pruning": rnd.plan.pruning,
            **{k: v for f in features for k, v in f.metrics().items()},
        }
    )
    return RecordDict({**arrays, "metrics": only_allowed(metrics, features)})


def only_allowed(metrics: MetricRecord, features: Sequence[Feature]) -> MetricRecord:
    """The metrics every active feature's guarantee lets leave this client (all without one)."""
    limits = [keys for f in features if (keys := f.reply_keys()) is not None]
    return MetricRecord({k: v for k, v in metrics.items() if all(k in keys for keys in limits)})


def evaluate(
    cfg: RunConfig, msg: Message, context: Context, *, cache: ProcessCache | None = None
) -> Message:
    """Held-out NLL of the global adapter (as this client's features personalise it: fedsa's own
    B, sdflora's local module) on this client's held-out split."""
    content = packing.unpack(msg.content)  # packed arrays from a ClientApp without the mod
    config = content["config"]
    check_recipe(cfg, config)
    pid = partition_of(context)
    record: ArrayRecord = content["global"]
    spec = wire.spec_of(config)
    rnd = client_round(cfg, config, context)
    scaling = float(config["global-scaling"])
    # the global adapter as each active feature personalises it (sdflora: + its local module;
    # under local_B the personal adapter feature gives a resumed node its B back first)
    global_factors = {} if spec.local_B else from_record(record, scaling)
    for f in registry.build(cfg):
        global_factors = f.personalise(global_factors, rnd)
    if spec.local_B:  # personalised: the shared A with this node's own B, at its own rank
        rank = int(context.node_config.get("rank", cfg.client_rank(pid)))
        scaling = cfg.client_scaling(rank)
    else:
        rank = max((f.rank for f in global_factors.values()), default=1)
        if global_factors:  # a feature may have moved them to this client's scaling (sdflora)
            scaling = next(iter(global_factors.values())).scaling
    base, tokenizer = cached_base_model(cfg, cache=cache)
    model = attach_lora(
        base,
        rank=rank,
        alpha=scaling * rank,
        dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
    )
    try:
        shard = node_shard(cfg, context.node_config, tokenizer, cache=cache)
        if spec.local_B:
            global_factors = wire.personal(model, record, context.state)
        write_factors(model, global_factors)
        # No-grad forwards in eval mode would flip 4-bit layers to an inference kernel on some
        # CPUs (see platform notes); dropout is the only other difference, so stay in train mode
        # for quantized bases.
        model.train(cfg.model.quantization != "none")
        nll, tokens = evaluate_nll(
            model,
            shard.held_out,
            batch_size=cfg.federation.eval_batch_size,
            pad_id=tokenizer.pad_token_id,
            share_head=cfg.federation.share_head,
        )
        model.train()
    finally:
        model.unload()
    metrics = MetricRecord(
        {
            "partition-id": pid,
            "nll-sum": nll,
            "tokens": tokens,
            "num-examples": len(shard.held_out),
            "held-out-loss": nll / max(tokens, 1),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_client_app(cfg: RunConfig, *, cache: ProcessCache | None = None) -> ClientApp:
    """A ClientApp bound to a recipe (the simulation passes it by value to every worker), holding
    `cache` (a new one by default): the base loaded and each shard tokenized once per process."""
    app = ClientApp()
    cache = cache if cache is not None else ProcessCache()

    @app.train(mods=[packing.mod, *registry.client_mods()])  # arrays packed; e.g. SecAgg+
    def _train(msg: Message, context: Context) -> Message:
        return train(cfg, msg, context, cache=cache)

    @app.evaluate(mods=[packing.mod])
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(cfg, msg, context, cache=cache)

    return app
